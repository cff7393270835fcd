"""Scale to zero: LM and DiT deployments with ``min_replicas: 0``. The config's rules, what /ready
means with zero replicas, the cold-start note in a task's record (a real SQLite store). A whole app
that reaches zero LM and DiT replicas, stays there, and then serves a song through a cold start is
the cold-start bench's run (tests/bench/test_bench_commands.py), which starts one such app anyway."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from serve.cli import load_serve_config
from serve.config import AppConfig
from serve.deployments import DIT_START, LM_DONE
from serve.ingress_state import readiness
from serve.pipeline import COLD_START, ColdStart, TaskPipeline
from serve.store import open_task_store


def test_lm_and_dit_may_scale_to_zero_and_the_ingress_may_not():
    from ray.serve.config import AutoscalingConfig

    zero = {"deployment": {"autoscaling_config": {"min_replicas": 0, "downscale_to_zero_delay_s": 120}}}
    config = AppConfig.model_validate({"demo": True, "lm": zero, "dit": zero})
    for settings in (config.lm, config.dit):
        serve_options = AutoscalingConfig(**settings.deployment.to_serve()["autoscaling_config"])
        assert (serve_options.min_replicas, serve_options.downscale_to_zero_delay_s) == (0, 120)
        assert serve_options.initial_replicas is None  # Serve's rule: start with min_replicas (none)
    with pytest.raises(ValidationError, match=r"ingress\.deployment\.autoscaling_config\.min_replicas must be at "
                                              r"least 1 \(got 0\)"):
        AppConfig.model_validate({"demo": True, "ingress": zero})
    with pytest.raises(ValidationError, match="downscale_to_zero_delay_s"):
        AppConfig.model_validate({"demo": True, "lm": {"deployment": {"autoscaling_config": {
            "min_replicas": 0, "downscale_to_zero_delay_s": -1}}}})
    args = load_serve_config()["applications"][0]["args"]  # the shipped config keeps a replica of each
    assert args["lm"]["deployment"]["autoscaling_config"]["min_replicas"] == 1
    assert args["dit"]["deployment"]["autoscaling_config"]["min_replicas"] == 1


def test_ready_with_zero_replicas_when_they_may_scale_from_zero():
    minimum = {"Ingress": 1, "LMDeployment": 0, "DiTDeployment": 0}
    healthy = {name: "HEALTHY" for name in minimum}
    now = 1000.0

    def report(running, statuses=healthy, store_ok=True, as_of=now - 1):
        return readiness(minimum, running, statuses, store_ok, as_of, now=now)

    idle = report({"Ingress": 1})
    assert idle["ready"] and idle["scaled_to_zero"] == ["LMDeployment", "DiTDeployment"]
    assert idle["status"] == healthy
    assert idle["running_replicas"] == {"Ingress": 1, "LMDeployment": 0, "DiTDeployment": 0}
    assert report({"Ingress": 1, "LMDeployment": 1, "DiTDeployment": 2})["scaled_to_zero"] == []
    for status in ("UNHEALTHY", "DEPLOY_FAILED"):  # a deployment that cannot start a replica
        failed = report({"Ingress": 1}, {**healthy, "DiTDeployment": status})
        assert not failed["ready"] and failed["unavailable"] == ["DiTDeployment"]
        assert failed["scaled_to_zero"] == ["LMDeployment"]
    assert report({"Ingress": 1, "LMDeployment": 1}, {**healthy, "DiTDeployment": "UPSCALING"})["ready"]
    no_ingress = report({"LMDeployment": 1, "DiTDeployment": 1})  # min_replicas 1: never at zero
    assert not no_ingress["ready"] and no_ingress["unavailable"] == ["Ingress"]
    kept = readiness({**minimum, "LMDeployment": 1}, {"Ingress": 1}, healthy, True, now - 1, now=now)
    assert not kept["ready"] and kept["unavailable"] == ["LMDeployment"]
    assert not report({"Ingress": 1}, store_ok=False)["ready"]
    assert not report({"Ingress": 1}, as_of=now - 31)["ready"]  # a view the refresher stopped updating


def test_a_cold_start_note_shows_until_the_replicas_first_event(tmp_path):
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    running = {"LMDeployment": 0, "DiTDeployment": 0, "DiTDeployment-base": 1}
    cold = ColdStart(store, running.get)
    try:
        task_id, _ = store.create({})
        asyncio.run(cold.note(task_id, "lm", "LMDeployment"))
        record = store.get(task_id)
        assert (record.phase, record.message, record.detail) == ("lm", COLD_START, {"cold_start": "LMDeployment"})
        store.update(task_id, "lm", 0.05, "LM cot 0/?")  # the LM replica's first event replaces it
        assert store.get(task_id).message == "LM cot 0/?"
        store.update(task_id, "lm", LM_DONE, "LM done")
        asyncio.run(cold.note(task_id, "dit", "DiTDeployment"))
        assert (store.get(task_id).phase, store.get(task_id).message) == ("dit", COLD_START)
        store.update(task_id, "dit", DIT_START, "DiT queued")  # as the DiT replica reports before sampling
        assert store.get(task_id).message == "DiT queued"
        other, _ = store.create({})
        for deployment in ("DiTDeployment-base", "DiTDeployment-unknown"):  # running, or not in the view yet
            asyncio.run(cold.note(other, "dit", deployment))
        assert [event.message for event in store.events(other)] == ["queued"]
    finally:
        store.close()


def test_a_task_wakes_only_the_deployments_it_calls():
    assert TaskPipeline._roles({}) == ("lm", "dit")
    assert TaskPipeline._roles({"analysis": "extract_codes_only"}) == ("dit",)
    assert TaskPipeline._roles({"analysis": "analysis_only"}) == ("lm",)
    assert TaskPipeline._roles({"analysis": "full_analysis_only"}) == ("lm", "dit")


def test_a_deployment_that_never_starts_fails_the_task_at_its_phase_timeout(tmp_path):
    """The cold start counts in the LM phase: a replica that never comes fails the task with
    ``timeout:lm`` (the LM's timeout, not the queue's ten times longer one), never a hang."""
    from serve.driver import DriverSettings, TaskDriver
    from tests.clock import FakeClock

    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())
    cold = ColdStart(store, {"LMDeployment": 0}.get)

    async def pipeline(record):  # the LM call waits for a replica that never starts
        await cold.note(record.task_id, "lm", "LMDeployment")
        await asyncio.Event().wait()

    async def main():
        settings = DriverSettings(max_drives=1, lease_s=30, retries=0, retry_backoff_s=0, poll_s=0.02,
                                  timeouts={"queued": 600, "lm": 60, "dit": 60, "encode": 60})
        driver = TaskDriver(store, pipeline, settings, "a", clock=store.clock)
        task_id, _ = store.create({}, owner="a", lease_s=30)
        driver.start(task_id, claimed=True)
        deadline = time.monotonic() + 60
        while not store.get(task_id).finished:  # the fake clock moves 5 s per poll
            assert time.monotonic() < deadline, "the task never failed"
            store.clock.advance(5.0)
            await asyncio.sleep(0.02)
        return store.get(task_id)

    try:
        record = asyncio.run(main())
        assert (record.phase, record.error) == ("failed", "timeout:lm")
        assert [event.message for event in store.events(record.task_id)][:2] == ["queued", COLD_START]
    finally:
        store.close()


# -- one app at zero ---------------------------------------------------------------------------------
