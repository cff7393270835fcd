"""cluster/rayjob-train.yaml: valid against the vendored KubeRay RayJob schema, on the RayService's
image and Ray, and its entrypoint (prepare, then train) parses with the jobs' own parsers, asking for
no more GPUs and CPUs than its worker group has, on paths its pods mount."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.prepare_dataset import build_parser as prepare_parser
from pipelines.train_lora import parse_args

ray = pytest.importorskip("ray")  # a GPU machine without Ray collects this folder too

from tests.cluster.test_manifests import _crd_validator, _errors  # noqa: E402  (imports Ray)

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _images(cluster_spec):
    pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}


def _load():
    job = yaml.safe_load((CLUSTER / "rayjob-train.yaml").read_text())
    prepare, train = (shlex.split(part) for part in job["spec"]["entrypoint"].split("&&"))
    assert prepare[:3] == ["python", "-m", "pipelines.prepare_dataset"]
    assert train[:3] == ["python", "-m", "pipelines.train_lora"]
    return job, prepare_parser().parse_args(prepare[3:]), parse_args(train[3:])


def test_the_training_rayjob_validates_and_matches_the_rayservice():
    job, _, _ = _load()
    assert _errors(_crd_validator("RayJob"), job) == []
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ == service["spec"]["rayClusterConfig"]["rayVersion"]
    assert _images(spec) == _images(service["spec"]["rayClusterConfig"])


def test_its_jobs_fit_the_worker_group_and_share_its_volume():
    job, prepare, (train, config) = _load()
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]["containers"][0]
    gpus, cpus = group["replicas"] * int(group["rayStartParams"]["num-gpus"]), int(pod["resources"]["limits"]["cpu"])
    assert train.use_gpu and train.workers <= gpus and train.cpus_per_worker <= cpus
    assert prepare.actors * prepare.gpus <= gpus and prepare.cpus <= cpus
    assert prepare.output == train.data and prepare.checkpoints == train.checkpoints
    mounts = {m["mountPath"] for m in pod["volumeMounts"]}
    assert {"/data", "/models"} <= mounts
    assert all(p.startswith("/data/") for p in (prepare.input, prepare.output, train.output, train.storage))
    assert config.steps % config.checkpoint_every == 0 and config.adapter.kind == "lora"
