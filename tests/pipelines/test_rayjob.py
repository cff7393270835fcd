"""cluster/rayjob.yaml runs this job's CLI on the RayService's image with enough GPUs for its actors."""

from __future__ import annotations

import shlex
from pathlib import Path

import ray
import yaml

from pipelines.render import parse_options

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _images(cluster_spec):
    pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}


def test_rayjob_matches_the_rayservice_and_its_entrypoint_parses():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == service["apiVersion"]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ == service["spec"]["rayClusterConfig"]["rayVersion"]
    assert _images(spec) == _images(service["spec"]["rayClusterConfig"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.render"]
    options = parse_options(argv[3:])
    assert options.checkpoints.startswith("/models/") and not options.no_lm
    gpus = sum(g["replicas"] * int(g["rayStartParams"].get("num-gpus", "0")) for g in spec["workerGroupSpecs"])
    assert gpus >= options.lm_actors * options.lm_gpus + options.dit_actors * options.dit_gpus
