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


def _tenant_jobs(*tenants, rows=1, priority=1, start=0):
    return [LMSequence(start + i, request=None, rows_needed=rows, tenant=t, priority=priority)
            for i, t in enumerate(tenants)]


def test_admits_round_robin_across_tenants():
    """A flood from one tenant takes turns with a later tenant instead of going first."""
    sched = Scheduler(max_rows=2, max_admit=8)
    flood = _tenant_jobs(*["a"] * 6)
    late = _tenant_jobs("b", start=6)
    for job in flood:
        sched.add(job)
    assert sched.admit() == flood[:2]
    sched.add(late[0])  # behind four more of a's
    sched.finish(flood[0])
    assert sched.admit() == late  # a holds one row, b none: b goes next
    sched.finish(flood[1])
    assert sched.admit() == [flood[2]]  # a's own requests keep their arrival order


def test_two_tenants_waiting_together_alternate():
    sched = Scheduler(max_rows=4, max_admit=8)
    a, b = _tenant_jobs("a", "a", "a"), _tenant_jobs("b", "b", start=3)
    for job in a + b:
        sched.add(job)
    assert sched.admit() == [a[0], b[0], a[1], b[1]]


def test_higher_priority_class_is_admitted_first():
    sched = Scheduler(max_rows=2, max_admit=1)
    low = _tenant_jobs("a", "a", priority=0)
    high = _tenant_jobs("a", priority=2, start=2)
    for job in low + high:
        sched.add(job)
    assert sched.admit() == high
    assert sched.admit() == [low[0]]


def test_the_next_in_fair_order_holds_back_when_it_does_not_fit():
    sched = Scheduler(max_rows=3, max_admit=8)
    a = _tenant_jobs("a", "a", rows=1)
    b = _tenant_jobs("b", rows=2, start=2)
    for job in a + b:
        sched.add(job)
    assert sched.admit() == [a[0], b[0]]  # b holds no rows yet: it goes second
    assert sched.admit() == []  # a[1] is next but the rows are taken
