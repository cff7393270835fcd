"""cluster/: the RayService's serveConfigV2 is rendered from serve_config.yaml, and the manifest places
LM and DiT replicas on their own GPU groups."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ray
import yaml

from serve.config import AppConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def _render_module():
    spec = importlib.util.spec_from_file_location("cluster_render", REPO_ROOT / "cluster" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest():
    return yaml.safe_load((REPO_ROOT / "cluster" / "rayservice.yaml").read_text())


def test_serve_config_v2_agrees_with_serve_config_yaml():
    render = _render_module()
    embedded = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    assert embedded == render.serve_config()
    assert render.main(["--check"]) == 0
    # the application itself (import path, names, model variants) is serve_config.yaml's
    local = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    for key in ("name", "import_path", "route_prefix"):
        assert embedded["applications"][0][key] == local["applications"][0][key]
    assert embedded["applications"][0]["args"]["dit"]["model"] == local["applications"][0]["args"]["dit"]["model"]


def test_cluster_config_validates_and_places_lm_and_dit_on_their_gpu_groups():
    from ray.serve.schema import ServeDeploySchema

    manifest = _manifest()
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    config = AppConfig.model_validate(embedded["applications"][0]["args"])
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no replicas on the head"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for settings, group in ((config.lm, "lm-gpu"), (config.dit, "dit-gpu")):
        options = settings.deployment.ray_actor_options
        assert options.num_gpus >= 1 and settings.device == "cuda"
        advertised = json.loads(json.loads(groups[group]["rayStartParams"]["resources"]))
        assert set(options.resources) == set(advertised), (group, options.resources, advertised)
        limits = groups[group]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert groups[group]["maxReplicas"] >= settings.deployment.autoscaling_config.max_replicas
    assert config.checkpoints and not config.demo


def test_dockerfile_installs_the_project_without_vllm_on_the_manifest_ray():
    dockerfile = (REPO_ROOT / "cluster" / "Dockerfile").read_text()
    assert "RUN pip install --no-cache-dir ." in dockerfile
    assert "[vllm]" not in dockerfile  # its backend refuses the default request (paired CFG)
    assert f"rayproject/ray:{ray.__version__}" in dockerfile
