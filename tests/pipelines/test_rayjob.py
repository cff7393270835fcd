"""cluster/rayjob.yaml runs this job's CLI on the RayService's image, each model stage on its own
worker group (the GPU profile's custom resources), with enough GPUs for its actors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.render import parse_options

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _images(cluster_spec):
    pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}


def _job():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.render"]
    return job, parse_options(argv[3:])


def test_rayjob_matches_the_rayservice_and_its_entrypoint_parses():
    job, options = _job()
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == service["apiVersion"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ == service["spec"]["rayClusterConfig"]["rayVersion"]
    assert _images(spec) == _images(service["spec"]["rayClusterConfig"])
    assert options.checkpoints.startswith("/models/") and not options.no_lm
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no stage actor on the head


@pytest.mark.parametrize("stage,group", [("lm", "lm-gpu"), ("dit", "dit-gpu")])
def test_each_stage_asks_for_the_resources_only_its_worker_group_advertises(stage, group):
    job, options = _job()
    profile = yaml.safe_load((CLUSTER / "gpu-profile.yaml").read_text())["applications"][0]["args"]
    asked = getattr(options, f"{stage}_resources")
    assert asked == profile[stage]["deployment"]["ray_actor_options"]["resources"]  # as the RayService's
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    advertised = {name: json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))
                  for name, g in groups.items()}
    assert [name for name, resources in advertised.items() if set(asked) & set(resources)] == [group]
    actors, replicas = getattr(options, f"{stage}_actors"), groups[group]["replicas"]
    assert all(replicas * advertised[group][name] >= actors * amount for name, amount in asked.items())
    gpus = replicas * int(groups[group]["rayStartParams"].get("num-gpus", "0"))
    assert gpus >= actors * getattr(options, f"{stage}_gpus") >= actors
