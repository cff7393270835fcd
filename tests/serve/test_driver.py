"""The task driver without Ray: a real SQLite task store, pipelines that fail the way replicas do."""

from __future__ import annotations

import asyncio
import logging

import pytest
import ray.exceptions as rex
from ray.serve.exceptions import BackPressureError

from serve.driver import DriverSettings, TaskDriver, TaskFailure, classify
from serve.store import open_task_store


def _settings(**changes) -> DriverSettings:
    values = dict(max_drives=4, lease_s=1.0, retries=2, retry_backoff_s=0.01,
                  timeouts={"queued": 60.0, "lm": 60.0, "dit": 60.0, "encode": 60.0}, poll_s=0.05)
    values.update(changes)
    return DriverSettings(**values)


@pytest.fixture
def store(tmp_path):
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    yield store
    store.close()


async def _until_final(store, task_id, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        record = store.get(task_id)
        if record.finished:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"task still {store.get(task_id).phase}")


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
        driver = TaskDriver(store, pipeline, _settings(), "a")
        task_id, _ = store.create({"seeds": [1]}, owner="a", lease_s=1.0)
        assert driver.start(task_id, claimed=True)
        return await _until_final(store, task_id), driver

    record, driver = asyncio.run(main())
    assert record.phase == "done" and record.result == {"audios": [], "seeds": [1]}
    assert len(calls) == 3 and driver.stats()["retries"] == 2


def test_retries_run_out_with_a_code_and_no_raw_text(store):
    async def pipeline(record):
        raise BackPressureError(num_queued_requests=9, max_queued_requests=1)

    async def main():
        driver = TaskDriver(store, pipeline, _settings(retries=1), "a")
        task_id, _ = store.create({}, owner="a", lease_s=1.0)
        driver.start(task_id, claimed=True)
        return await _until_final(store, task_id)

    record = asyncio.run(main())
    assert record.phase == "failed" and record.error == "overloaded"
    assert "BackPressure" not in record.message and "tried 2 times" in record.message


def test_a_phase_past_its_timeout_fails_with_timeout_code(store):
    async def pipeline(record):
        store.update(record.task_id, "lm", 0.1, "LM")
        await asyncio.sleep(30)

    async def main():
        driver = TaskDriver(store, pipeline, _settings(timeouts={"queued": 60, "lm": 0.3, "dit": 60, "encode": 60}), "a")
        task_id, _ = store.create({}, owner="a", lease_s=1.0)
        driver.start(task_id, claimed=True)
        return await _until_final(store, task_id)

    record = asyncio.run(main())
    assert record.phase == "failed" and record.error == "timeout:lm"


def test_a_lapsed_lease_is_re_driven_by_another_driver(store):
    """Driver a dies mid-task (its drive vanishes without releasing); b's reaper takes the task over
    once the lease lapses and runs it from the stored request."""
    async def hang(record):
        await asyncio.sleep(60)

    async def work(record):
        return {"by": "b", "request": record.request}

    async def main():
        a = TaskDriver(store, hang, _settings(lease_s=0.5), "a")
        task_id, _ = store.create({"seeds": [5]}, owner="a", lease_s=0.5)
        a.start(task_id, claimed=True)
        await asyncio.sleep(0.1)
        drive = a.local(task_id)
        drive.cancel()  # the replica is gone: the drive releases nothing in a crash...
        await asyncio.gather(drive, return_exceptions=True)  # (its release has run)
        store.claim(task_id, "a", 60.0)  # ...so put the lease back as a crash would leave it
        b = TaskDriver(store, work, _settings(lease_s=0.5), "b")
        assert await b.reap() == 0, "the lease has not lapsed yet"
        assert store.renew(task_id, "a", 0.05)  # the lease runs out (no clock race: it was 60 s until now)
        await asyncio.sleep(0.2)
        assert await b.reap() == 1
        return await _until_final(store, task_id)

    record = asyncio.run(main())
    assert record.phase == "done" and record.result["by"] == "b" and record.attempts >= 2
    assert record.result["request"] == {"seeds": [5]}


def test_cancel_elsewhere_stops_the_pipeline_and_keeps_cancelled(store):
    stopped = []

    async def pipeline(record):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(record.task_id)
            raise

    async def main():
        driver = TaskDriver(store, pipeline, _settings(), "a")
        task_id, _ = store.create({}, owner="a", lease_s=1.0)
        driver.start(task_id, claimed=True)
        await asyncio.sleep(0.1)
        store.fail(task_id, "cancelled", "cancelled")
        await asyncio.sleep(0.3)
        return store.get(task_id)

    record = asyncio.run(main())
    assert record.error == "cancelled" and stopped == [record.task_id]


def test_drain_finishes_short_tasks_and_releases_long_ones_for_the_next_start(store):
    async def pipeline(record):
        await asyncio.sleep(record.request["seconds"])
        return {"ok": True}

    async def main():
        driver = TaskDriver(store, pipeline, _settings(), "a")
        short, _ = store.create({"seconds": 0.05}, owner="a", lease_s=1.0)
        long, _ = store.create({"seconds": 60}, owner="a", lease_s=1.0)
        queued, _ = store.create({"seconds": 0.0})
        driver.start(short, claimed=True)
        driver.start(long, claimed=True)
        report = await driver.drain(grace_s=0.5)
        assert not driver.start(queued), "a draining driver takes nothing new"
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

        driver = TaskDriver(store, pipeline, _settings(max_drives=2), "a")
        ids = [store.create({})[0] for _ in range(5)]
        assert await driver.reap() == 2 and driver.stats()["driving"] == 2
        release.set()
        for _ in range(20):
            await driver.reap()
            await asyncio.sleep(0.05)
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
    async def pipeline(record):
        for phase, progress in (("lm", 0.1), ("lm", 0.2), ("dit", 0.4), ("encode", 0.9)):
            store.update(record.task_id, phase, progress, phase)
            await asyncio.sleep(0.02)
        return {"audios": []}

    async def main():
        driver = TaskDriver(store, pipeline, _settings(), "a")
        task_id, _ = store.create({"request_id": "req-1"}, owner="a", lease_s=1.0)
        driver.start(task_id, claimed=True)
        await driver.local(task_id)
        return task_id

    task_id = asyncio.run(main())
    events = store.events(task_id)
    assert [(f["phase"], f["next_phase"]) for f in phase_lines] == [
        ("queued", "lm"), ("lm", "dit"), ("dit", "encode"), ("encode", "done")]
    assert {f["task_id"] for f in phase_lines} == {task_id}
    # the durations are the stored events' own: together, creation to done
    assert sum(f["duration_s"] for f in phase_lines) == pytest.approx(events[-1].time - events[0].time, abs=0.01)
