"""The task driver without Ray: a real SQLite task store, pipelines that fail the way replicas do.

Store and driver read one fake clock, so leases lapse and phases time out when a test moves it,
never because this machine is slow. Waits on real time are bounded guards against hangs only.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import ray.exceptions as rex
from ray.serve.exceptions import BackPressureError

from serve.driver import DriverSettings, TaskDriver, TaskFailure, classify
from serve.store import open_task_store
from tests.clock import FakeClock


LEASE_S = 30.0
TIMEOUT_S = 60.0


def _settings(**changes) -> DriverSettings:
    values = dict(max_drives=4, lease_s=LEASE_S, retries=2, retry_backoff_s=0.01,
                  timeouts={"queued": TIMEOUT_S, "lm": TIMEOUT_S, "dit": TIMEOUT_S, "encode": TIMEOUT_S}, poll_s=0.05)
    values.update(changes)
    return DriverSettings(**values)


def _driver(store, pipeline, owner="a", **changes) -> TaskDriver:
    return TaskDriver(store, pipeline, _settings(**changes), owner, clock=store.clock)


@pytest.fixture
def store(tmp_path):
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())
    yield store
    store.close()


async def _until(condition, what: str, timeout_s: float = 30.0, tick=None):
    """Poll ``condition`` (real time bounded by ``timeout_s``); ``tick()`` runs between polls."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        if tick is not None:
            tick()
        await asyncio.sleep(0.02)


async def _until_final(store, task_id, tick_s: float = 0.0):
    """The task's final record; the fake clock moves ``tick_s`` between polls."""
    await _until(lambda: store.get(task_id).finished, f"task {task_id} finished",
                 tick=lambda: store.clock.advance(tick_s))
    return store.get(task_id)


def _died() -> Exception:
    return rex.ActorDiedError()


def test_classify_maps_replica_errors_to_codes():
    from acestep.audio import AudioLoadError

    assert classify(_died()).code == "replica_died"
    assert classify(BackPressureError(num_queued_requests=3, max_queued_requests=2)).code == "overloaded"
    assert isinstance(classify(AudioLoadError("bad")), TaskFailure) and classify(AudioLoadError("x")).code == "invalid_audio"
    failure = classify(RuntimeError("/secret/path/model.bin exploded"))
    assert failure.code == "internal" and "/secret" not in failure.message


def test_replica_deaths_are_retried_then_the_task_is_done(store):
    calls = []

    async def pipeline(record):
        calls.append(record.task_id)
        if len(calls) <= 2:
            raise _died()
        return {"audios": [], "seeds": record.request["seeds"]}

    async def main():
        driver = _driver(store, pipeline)
        task_id, _ = store.create({"seeds": [1]}, owner="a", lease_s=LEASE_S)
        assert driver.start(task_id, claimed=True)
        return await _until_final(store, task_id), driver

    record, driver = asyncio.run(main())
    assert record.phase == "done" and record.result == {"audios": [], "seeds": [1]}
    assert len(calls) == 3 and driver.stats()["retries"] == 2


def test_retries_run_out_with_a_code_and_no_raw_text(store):
    async def pipeline(record):
        raise BackPressureError(num_queued_requests=9, max_queued_requests=1)

    async def main():
        driver = _driver(store, pipeline, retries=1)
        task_id, _ = store.create({}, owner="a", lease_s=LEASE_S)
        driver.start(task_id, claimed=True)
        return await _until_final(store, task_id)

    record = asyncio.run(main())
    assert record.phase == "failed" and record.error == "overloaded"
    assert "BackPressure" not in record.message and "tried 2 times" in record.message


def test_a_phase_past_its_timeout_fails_with_timeout_code(store):
    """The LM never answers; the clock moves 5 s per poll until the LM phase has run past its 60 s."""
    async def pipeline(record):
        store.update(record.task_id, "lm", 0.1, "LM")
        await asyncio.Event().wait()

    async def main():
        driver = _driver(store, pipeline, timeouts={"queued": 10 * TIMEOUT_S, "lm": TIMEOUT_S, "dit": TIMEOUT_S,
                                                    "encode": TIMEOUT_S})
        task_id, _ = store.create({}, owner="a", lease_s=LEASE_S)
        driver.start(task_id, claimed=True)
        return await _until_final(store, task_id, tick_s=5.0)

    record = asyncio.run(main())
    assert (record.phase, record.error) == ("failed", "timeout:lm")
    assert record.message == "no result within the lm phase's 60s"
    lm_began = store.events(record.task_id)[1].time
    assert record.updated_at - lm_began > TIMEOUT_S, "not before the phase ran past its timeout"


def test_a_lapsed_lease_is_re_driven_by_another_driver(store):
    """Driver a dies mid-task (its drive vanishes without releasing); b's reaper takes the task over
    once the lease lapses and runs it from the stored request."""
    async def main():
        running = asyncio.Event()

        async def hang(record):
            running.set()
            await asyncio.Event().wait()

        async def work(record):
            return {"by": "b", "request": record.request}

        a = _driver(store, hang)
        task_id, _ = store.create({"seeds": [5]}, owner="a", lease_s=LEASE_S)
        a.start(task_id, claimed=True)
        await asyncio.wait_for(running.wait(), 30)
        drive = a.local(task_id)
        drive.cancel()  # the replica is gone: the drive releases nothing in a crash...
        await asyncio.gather(drive, return_exceptions=True)  # (its release has run)
        assert store.claim(task_id, "a", LEASE_S)  # ...so put the lease back as a crash would leave it
        b = _driver(store, work, owner="b")
        store.clock.advance(LEASE_S - 1)
        assert await b.reap() == 0, "the lease has not lapsed yet"
        store.clock.advance(2)
        assert await b.reap() == 1
        return await _until_final(store, task_id)

    record = asyncio.run(main())
    assert record.phase == "done" and record.result["by"] == "b" and record.owner == "b"
    assert record.attempts == 3, "created claimed by a, claimed again by a, then by b"
    assert record.result["request"] == {"seeds": [5]}


def test_cancel_elsewhere_stops_the_pipeline_and_keeps_cancelled(store):
    stopped = []

    async def main():
        running = asyncio.Event()

        async def pipeline(record):
            running.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped.append(record.task_id)
                raise

        driver = _driver(store, pipeline)
        task_id, _ = store.create({}, owner="a", lease_s=LEASE_S)
        driver.start(task_id, claimed=True)
        drive = driver.local(task_id)
        await asyncio.wait_for(running.wait(), 30)
        assert store.fail(task_id, "cancelled", "cancelled")
        await asyncio.wait_for(drive, 30)  # the drive ends once it sees the task final
        return store.get(task_id)

    record = asyncio.run(main())
    assert (record.phase, record.error) == ("failed", "cancelled") and stopped == [record.task_id]


class _LoopClock:
    """The running loop's clock, moved forward on demand: its timers (a drain's grace) fire as if
    that much time had passed."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        real, self.skew = loop.time, 0.0
        loop.time = lambda: real() + self.skew

    def advance(self, seconds: float) -> None:
        self.skew += seconds


def test_drain_finishes_short_tasks_and_releases_long_ones_for_the_next_start(store):
    """The short task finishes within the grace whatever this machine's speed: the grace ends only
    when the test moves the loop's clock past it, after the short task is done."""
    async def pipeline(record):
        if record.request["long"]:
            await asyncio.Event().wait()
        return {"ok": True}

    async def main():
        loop_clock = _LoopClock(asyncio.get_running_loop())
        driver = _driver(store, pipeline)
        short, _ = store.create({"long": False}, owner="a", lease_s=LEASE_S)
        long, _ = store.create({"long": True}, owner="a", lease_s=LEASE_S)
        queued, _ = store.create({"long": False})
        driver.start(short, claimed=True)
        driver.start(long, claimed=True)
        short_drive = driver.local(short)
        draining = asyncio.ensure_future(driver.drain(grace_s=TIMEOUT_S))
        await _until(short_drive.done, "the short task's drive ended")
        assert not draining.done(), "the long task is still within its grace"
        assert not driver.start(queued), "a draining driver takes nothing new"
        loop_clock.advance(TIMEOUT_S + 1)
        report = await asyncio.wait_for(draining, 30)
        return short, long, queued, report

    short, long, queued, report = asyncio.run(main())
    assert report == {"finished": 1, "released": 1}
    assert store.get(short).phase == "done"
    assert store.get(long).phase == "queued" and store.get(long).owner is None
    assert set(store.expired()) == {long, queued}, "both wait in the store for the next start"


def test_max_drives_leaves_the_rest_queued_for_the_reaper(store):
    gate = asyncio.Event

    async def main():
        release = gate()

        async def pipeline(record):
            await release.wait()
            return {}

        driver = _driver(store, pipeline, max_drives=2)
        ids = [store.create({})[0] for _ in range(5)]
        assert await driver.reap() == 2 and driver.stats()["driving"] == 2
        assert await driver.reap() == 0, "no room while two drive"
        owners = lambda: [store.get(task_id).owner for task_id in ids]  # noqa: E731
        await _until(lambda: owners().count("a") == 2, "the two drives claimed their tasks")
        assert owners().count(None) == 3, "the rest wait unclaimed"
        release.set()
        driving = []

        async def reap_until_all_done():
            while not all(store.get(task_id).finished for task_id in ids):
                await driver.reap()
                driving.append(driver.stats()["driving"])
                await asyncio.sleep(0.02)

        await asyncio.wait_for(reap_until_all_done(), 30)
        assert max(driving) <= 2
        return ids

    ids = asyncio.run(main())
    assert all(store.get(task_id).phase == "done" for task_id in ids)


class _Lines(logging.Handler):
    """The structured fields of the driver's phase lines."""

    def __init__(self):
        super().__init__()
        self.fields = []

    def emit(self, record):
        if hasattr(record, "ray_serve_extra_fields") and "next_phase" in record.ray_serve_extra_fields:
            self.fields.append(record.ray_serve_extra_fields)


@pytest.fixture
def phase_lines():
    from serve.logs import log

    handler = _Lines()
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    yield handler.fields
    log.removeHandler(handler)
    log.setLevel(previous)


def test_phase_clock_logs_each_transition_once_with_its_duration(phase_lines):
    from serve.driver import PhaseClock
    from serve.store.records import TaskEvent

    def event(seq, phase, time):
        return TaskEvent(seq, phase, 0.0, "", time)

    # re-driven while in lm: what happened before is where it stands, not logged again
    clock = PhaseClock("t1", [event(0, "queued", 100.0), event(1, "lm", 101.0), event(2, "lm", 102.0)])
    assert (clock.phase, clock.since, clock.seen, phase_lines) == ("lm", 101.0, 2, [])
    later = [event(2, "lm", 102.0), event(3, "lm", 103.0), event(4, "dit", 105.0), event(5, "dit", 106.0),
             event(6, "encode", 107.5)]
    clock.advance(later)
    clock.advance(later)  # seen already: nothing twice
    clock.advance(None)  # an unknown task's events
    assert phase_lines == [
        {"task_id": "t1", "phase": "lm", "duration_s": 4.0, "next_phase": "dit"},
        {"task_id": "t1", "phase": "dit", "duration_s": 2.5, "next_phase": "encode"}]


def test_a_drive_logs_every_phase_transition_of_its_task(store, phase_lines):
    """Each phase takes a known time on the clock; the drive's watch logs the transitions it sees
    (it sees each new phase before the pipeline moves on) and the drive's end logs the last one."""
    async def pipeline(record):
        for phase, progress in (("lm", 0.1), ("lm", 0.2), ("dit", 0.4), ("encode", 0.9)):
            store.clock.advance(1.0)
            store.update(record.task_id, phase, progress, phase)
            await _until(lambda: phase_lines and phase_lines[-1]["next_phase"] == phase, f"{phase} logged")
        store.clock.advance(1.0)
        return {"audios": []}

    async def main():
        driver = _driver(store, pipeline)
        task_id, _ = store.create({"request_id": "req-1"}, owner="a", lease_s=LEASE_S)
        driver.start(task_id, claimed=True)
        await asyncio.wait_for(driver.local(task_id), 30)
        return task_id

    task_id = asyncio.run(main())
    events = store.events(task_id)
    assert [(f["phase"], f["duration_s"], f["next_phase"]) for f in phase_lines] == [
        ("queued", 1.0, "lm"), ("lm", 2.0, "dit"), ("dit", 1.0, "encode"), ("encode", 1.0, "done")]
    assert {f["task_id"] for f in phase_lines} == {task_id}
    # the durations are the stored events' own: together, creation to done
    assert sum(f["duration_s"] for f in phase_lines) == events[-1].time - events[0].time == 5.0


def _completion_order(store, tasks, max_drives=2):
    """Create ``tasks`` ((key name, priority) each, in this order, all queued), let one driver's
    reaper run them all → (ids, the ids in the order their pipelines completed)."""
    done = []

    async def pipeline(record):
        await asyncio.sleep(0.005)
        store.clock.advance(0.01)  # starts and completions happen one after another
        done.append(record.task_id)
        return {}

    async def main():
        driver = _driver(store, pipeline, max_drives=max_drives, lease_s=1000.0)
        ids = []
        for key_name, priority in tasks:
            ids.append(store.create({}, key_name=key_name, priority=priority)[0])
            store.clock.advance(0.01)
        driver.ensure_reaper()
        await _until(lambda: len(done) == len(ids), "every task done", timeout_s=120.0)
        await driver.drain(1.0)
        return ids

    ids = asyncio.run(main())
    assert all(store.get(task_id).phase == "done" for task_id in ids)
    return ids, done


def test_a_flood_from_one_key_does_not_hold_back_another_keys_song(store):
    ids, done = _completion_order(store, [("a", 1)] * 40 + [("b", 1)])
    b_song, a_fifth_from_end = ids[40], ids[35]
    assert done.index(b_song) < done.index(a_fifth_from_end)


def test_priority_classes_go_first_whatever_was_queued_before(store):
    ids, done = _completion_order(store, [("c", 0)] + [("a", 1)] * 20 + [("b", 2)])
    low, high = ids[0], ids[21]
    assert done.index(high) < done.index(ids[16]), "the high class goes before a's 5th from the end"
    assert done.index(low) > max(done.index(t) for t in ids[3:21]), "the low class waits for the normal ones"


def test_a_new_task_waits_behind_a_backlog_the_reaper_left(store):
    """A task created while queued ones wait is not driven ahead of them: the reaper claims in
    the claim order, and the next pass runs at once."""
    async def main():
        release = asyncio.Event()

        async def pipeline(record):
            await release.wait()
            return {}

        driver = _driver(store, pipeline, max_drives=1)
        assert driver.may_claim_new()
        ids = [store.create({}, key_name="a")[0] for _ in range(3)]
        assert await driver.reap() == 1 and driver.backlog and not driver.may_claim_new()
        release.set()
        await _until(lambda: driver.has_room(), "the first drive ended")
        assert not driver.may_claim_new(), "the queued tasks go first"
        driver.ensure_reaper()
        await _until(lambda: all(store.get(t).finished for t in ids), "the queue drained")
        await _until(lambda: driver.may_claim_new(), "a pass found nothing left behind", tick=driver.wake)
        await driver.drain(1.0)

    asyncio.run(main())
