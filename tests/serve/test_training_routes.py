"""Training jobs without a Serve app: the driver's job bound (a real SQLite task store, no Ray), the
CPU claim a job fits to a busy cluster, and the job actor on a plain local Ray: a cancelled job's actor
ends, and a re-driven job finds its running actor by name instead of starting a second run. The
routes themselves run in the models app (tests/serve/test_models_app.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.driver import DriverSettings, TaskDriver
from serve.store import open_task_store
from serve.training import NAMESPACE, JobSpec, job_cpus, job_request, run_job
from tests.clock import FakeClock
from tests.conftest import local_ray, write_tone

TIMEOUT_S = 60.0


@pytest.fixture
def store(tmp_path):
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())
    yield store
    store.close()


async def _until(condition, what: str, timeout_s: float = 30.0):
    """Poll ``condition`` (a bounded wait on real time: a guard against hangs only)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def test_jobs_count_against_their_own_bound_not_the_songs(store):
    """One song slot and one job slot: a long job never keeps a song waiting, nor a song a job."""
    gates = {}

    async def pipeline(record):
        gates[record.task_id] = asyncio.Event()
        await gates[record.task_id].wait()
        return {"ok": True}

    def create(kind=None):
        return store.create({"kind": kind, "job": {}} if kind else {"params": {}})[0]

    async def main():
        settings = DriverSettings(max_drives=1, max_jobs=1, lease_s=30.0, retries=0, retry_backoff_s=0.0,
                                  timeouts={"queued": TIMEOUT_S, "lm": TIMEOUT_S, "dit": TIMEOUT_S,
                                            "encode": TIMEOUT_S}, poll_s=0.05)
        driver = TaskDriver(store, pipeline, settings, "a", clock=store.clock)
        training, song, dataset, second_song = create("training"), create(), create("dataset"), create()
        assert await driver.reap() == 2
        await _until(lambda: {training, song} <= set(gates), "the job and the song both run")
        assert driver.stats()["jobs"] == 1 and dataset not in gates and second_song not in gates
        assert driver.backlog and not driver.may_claim_new()  # the song slot is full: songs queue
        gates[song].set()  # a song ends: the next song starts, the job slot is still the training's
        await _until(lambda: store.get(song).finished, "the first song done")
        await driver.reap()
        await _until(lambda: second_song in gates, "the second song runs")
        assert dataset not in gates
        gates[training].set()
        await _until(lambda: store.get(training).finished, "the training done")
        await driver.reap()
        await _until(lambda: dataset in gates, "the dataset job runs once the job slot is free")
        for gate in gates.values():
            gate.set()
        await _until(lambda: all(store.get(t).finished for t in (dataset, second_song)), "all done")

    asyncio.run(main())


def test_a_job_claims_the_cpus_free_when_it_starts():
    # `acestep serve --demo` on two CPUs leaves 0.25 free: a claim of one CPU would never be placed
    assert job_cpus(None, workers=1, free=0.25) == 0.25
    assert job_cpus(None, workers=2, free=0.25) == 0.12
    assert job_cpus(None, workers=1, free=0.0) == 0.05  # nothing free yet (an autoscaling cluster)
    assert job_cpus(None, workers=2, free=16.0) == 1.0
    assert job_cpus(2.0, workers=1, free=0.0) == 2.0  # training.cpus_per_worker, when set, as it is
    from serve.config import TrainingSettings

    assert TrainingSettings().cpus_per_worker is None


@pytest.fixture(scope="module")
def ray_here():
    with local_ray() as ray:
        yield ray


def _dataset_job(tmp_path, demo_root, seconds: float = 2.0):
    """A task store and a dataset job's task record over one song."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    songs = tmp_path / "training" / "datasets" / "one" / "songs"
    songs.mkdir(parents=True)
    write_tone(songs / "tone.wav", seconds)
    spec = JobSpec(kind="dataset", dataset="one", root=str(tmp_path / "training"), checkpoints=str(demo_root),
                   dit_config="acestep-v15-turbo", store_url=url)
    store = open_task_store(url)
    task_id, _ = store.create(job_request(spec))
    return store, task_id


def _actor(ray, task_id):
    try:
        return ray.get_actor(f"job-{task_id}", namespace=NAMESPACE)
    except ValueError:
        return None


def test_a_redriven_job_finds_its_running_actor_and_a_cancelled_job_ends_it(ray_here, demo_root, tmp_path):
    """A drain lets go of a running job; the re-drive (run_job again, as any driver's reaper would)
    finds the job's actor by name and waits on that same run; cancelling the task ends the actor."""
    store, task_id = _dataset_job(tmp_path, demo_root, seconds=30.0)

    async def main():
        first = asyncio.ensure_future(run_job(store.get(task_id)))
        await _until(lambda: store.get(task_id).phase == "prepare", "the job reports its start", TIMEOUT_S)
        actor = _actor(ray_here, task_id)
        first.cancel()  # a drain: this drive lets go, the job's actor runs on
        await asyncio.gather(first, return_exceptions=True)
        redrive = asyncio.ensure_future(run_job(store.get(task_id)))
        await asyncio.sleep(1.0)  # a second actor under the same name would have been refused by now
        assert not redrive.done() and _actor(ray_here, task_id)._actor_id == actor._actor_id
        assert store.fail(task_id, "cancelled", "cancelled")  # DELETE /v1/tasks/{id}, /v1/training/stop
        with pytest.raises(ray_here.exceptions.RayActorError):  # the run it waited on ended
            await asyncio.wait_for(redrive, TIMEOUT_S)

    asyncio.run(main())
    deadline = time.monotonic() + TIMEOUT_S
    while _actor(ray_here, task_id) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _actor(ray_here, task_id) is None
    starts = [e.message for e in store.events(task_id) if e.message.startswith("preparing")]
    assert starts == ["preparing 1 songs"]  # one run, started once
    store.close()
