"""The scheduler is pure bookkeeping: FIFO admission in chunks, lowest rows first, rows freed
by finished requests and reused."""

from __future__ import annotations

import pytest

from acestep.lm.engine.scheduler import LMSequence, Scheduler


def _jobs(*rows_needed):
    return [LMSequence(rid, request=None, rows_needed=n) for rid, n in enumerate(rows_needed)]


def test_admits_in_chunks_fifo_lowest_rows_first():
    sched = Scheduler(max_rows=6, max_admit=2)
    jobs = _jobs(2, 1, 2, 2)
    for job in jobs:
        sched.add(job)
    assert sched.admit() == jobs[:2] and [j.rows for j in jobs[:2]] == [[0, 1], [2]]
    assert sched.admit() == [jobs[2]] and jobs[2].rows == [3, 4]  # only one row left for jobs[3]
    assert sched.admit() == [] and sched.span() == 5
    sched.finish(jobs[0])
    assert jobs[0].finished and sched.admit() == [jobs[3]] and jobs[3].rows == [0, 1]
    for job in (jobs[1], jobs[2], jobs[3]):
        sched.finish(job)
    assert not sched.has_unfinished and sched.span() == 0


def test_rejects_what_can_never_fit():
    with pytest.raises(ValueError):
        Scheduler(max_rows=1, max_admit=1)
    sched = Scheduler(max_rows=2, max_admit=1)
    with pytest.raises(ValueError):
        sched.add(LMSequence(0, None, 3))
