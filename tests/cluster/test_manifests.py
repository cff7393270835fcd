"""cluster/: the KubeRay manifests validate against the vendored KubeRay CRD schemas (cluster/schemas/),
the ``ray up`` config against the installed Ray's ray-schema.json, and the launcher config places LM and
DiT replicas as cluster/gpu-profile.yaml asks, on the RayService's image. Each validator is shown to be
live by a broken copy it must reject."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.cluster.harness import load_render

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
SCHEMAS = CLUSTER / "schemas"
KUBERAY_VERSION = "v1.7.0"
MANIFESTS = [("rayservice.yaml", "RayService"), ("rayjob.yaml", "RayJob")]
pytestmark = pytest.mark.cluster


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


_render_module = load_render


def kubernetes_semantics(schema):
    """An OpenAPI CRD schema as the API server applies it with strict field validation (kubectl's default):
    unknown fields are errors unless ``x-kubernetes-preserve-unknown-fields``; int-or-string and nullable
    become plain JSON Schema."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {key: kubernetes_semantics(value) for key, value in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = kubernetes_semantics(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [kubernetes_semantics(item) for item in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def cel_rule_paths(schema, path=()):
    """Property paths carrying ``x-kubernetes-validations`` (CEL rules, which jsonschema cannot run)."""
    found = [path] if "x-kubernetes-validations" in schema else []
    for key, value in schema.get("properties", {}).items():
        found += cel_rule_paths(value, path + (key,))
    if isinstance(schema.get("items"), dict):
        found += cel_rule_paths(schema["items"], path + ("*",))
    return found


def _has_path(document, path):
    if not path:
        return True
    if path[0] == "*":
        return isinstance(document, list) and any(_has_path(item, path[1:]) for item in document)
    return isinstance(document, dict) and path[0] in document and _has_path(document[path[0]], path[1:])


def _crd_schema(kind):
    return json.loads((SCHEMAS / f"{kind.lower()}.v1.schema.json").read_text())


def _crd_validator(kind):
    schema = kubernetes_semantics(_crd_schema(kind))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _ray_validator():
    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, document):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_vendored_schemas_are_the_targeted_kuberay_release(kind):
    schema = _crd_schema(kind)
    assert KUBERAY_VERSION in schema["$comment"] and kind in schema["$comment"]
    assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"])
    readme = (SCHEMAS / "README.md").read_text()
    assert KUBERAY_VERSION in readme and f"{kind.lower()}.v1.schema.json" in readme


@pytest.mark.parametrize("name,kind", MANIFESTS)
def test_kuberay_manifest_validates_against_crd_schema(name, kind):
    manifest = _load(name)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    assert _errors(_crd_validator(kind), manifest) == []
    # fields with CEL rules are checked by the API server only; the manifests set none of them
    assert [p for p in cel_rule_paths(_crd_schema(kind)) if _has_path(manifest, p)] == []


def _cluster_spec(manifest):
    return manifest["spec"].get("rayClusterConfig") or manifest["spec"]["rayClusterSpec"]


def _head_container(manifest):
    return _cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _misspelt_field(manifest):
    _head_container(manifest)["envs"] = _head_container(manifest).pop("env")
    return "'envs' was unexpected"


def _wrong_type(manifest):
    _cluster_spec(manifest)["workerGroupSpecs"][0]["replicas"] = "one"
    return "workerGroupSpecs/0/replicas: 'one' is not of type 'integer'"


def _bad_quantity(manifest):
    _head_container(manifest)["resources"]["limits"]["memory"] = "8 GB"
    return "resources/limits/memory: '8 GB' does not match"


@pytest.mark.parametrize("break_it", [_misspelt_field, _wrong_type, _bad_quantity])
@pytest.mark.parametrize("name,kind", MANIFESTS)
def test_crd_validator_rejects_a_broken_manifest(name, kind, break_it):
    manifest = _load(name)
    expected = break_it(manifest)
    errors = _errors(_crd_validator(kind), manifest)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize("name,kind", MANIFESTS)
def test_crd_validator_accepts_int_or_string_quantities(name, kind):
    manifest = _load(name)
    _head_container(manifest)["resources"]["limits"]["cpu"] = 2
    assert _errors(_crd_validator(kind), manifest) == []


def test_launcher_config_validates_against_ray_schema():
    assert _errors(_ray_validator(), _load("ray-cluster.yaml")) == []


def _unknown_node_type_field(config):
    config["available_node_types"]["lm-gpu"]["min_worker"] = 1
    return "'min_worker' was unexpected"


def _string_resource(config):
    config["available_node_types"]["dit-gpu"]["resources"]["dit_gpu"] = "1"
    return "resources/dit_gpu: '1' is not of type 'integer'"


def _no_provider(config):
    del config["provider"]
    return "'provider' is a required property"


@pytest.mark.parametrize("break_it", [_unknown_node_type_field, _string_resource, _no_provider])
def test_ray_schema_rejects_a_broken_launcher_config(break_it):
    config = _load("ray-cluster.yaml")
    expected = break_it(config)
    errors = _errors(_ray_validator(), config)
    assert any(expected in error for error in errors), errors


def _stage_options(stage):
    app = _render_module().serve_config()["applications"][0]
    return app["args"][stage]["deployment"]


@pytest.mark.parametrize("stage,node_type,group", [("lm", "lm-gpu", "lm-gpu"), ("dit", "dit-gpu", "dit-gpu"),
                                                    ("ingress", "cpu", "cpu")])
def test_launcher_node_types_carry_the_gpu_profile_resources(stage, node_type, group):
    deployment = _stage_options(stage)
    options = deployment["ray_actor_options"]
    node_types = _load("ray-cluster.yaml")["available_node_types"]
    advertised = node_types[node_type]["resources"]
    assert options["resources"] and set(options["resources"]) <= set(advertised)
    assert all(advertised[name] >= amount for name, amount in options["resources"].items())
    assert advertised.get("GPU", 0) >= options["num_gpus"] >= (0 if stage == "ingress" else 1)
    per_node = min(advertised[name] // amount for name, amount in options["resources"].items())
    assert node_types[node_type]["max_workers"] * per_node >= deployment["autoscaling_config"]["max_replicas"]
    others = [t for t, spec in node_types.items()
              if t != node_type and set(options["resources"]) & set(spec["resources"])]
    assert others == [], "only its own stage's node type may host these replicas"
    # the same resources and GPU count as the RayService's worker group
    groups = {g["groupName"]: g for g in _cluster_spec(_load("rayservice.yaml"))["workerGroupSpecs"]}
    params = groups[group]["rayStartParams"]
    custom = {name: amount for name, amount in advertised.items() if name not in ("CPU", "GPU")}
    assert json.loads(json.loads(params["resources"])) == custom
    assert int(params.get("num-gpus", 0)) == advertised.get("GPU", 0)


def test_launcher_head_is_cpu_only_and_runs_the_rayservice_image():
    config = _load("ray-cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head == {"CPU": 0}, "no replicas on the head, as the RayService's num-cpus: '0'"
    render = _render_module()
    images = render.manifest_images(_load("rayservice.yaml")) | render.manifest_images(_load("rayjob.yaml"))
    assert images == {config["docker"]["image"]}
    commands = " ".join(config["head_start_ray_commands"])
    assert "render.py --serve-config" in commands and "serve deploy" in commands


def test_render_check_covers_the_launcher_config(capsys):
    render = _render_module()
    config, manifest = render.serve_config(), _load("rayservice.yaml")
    launcher = _load("ray-cluster.yaml")
    assert render.launcher_problems(config, launcher, manifest) == []
    assert render.main(["--check"]) == 0
    broken = copy.deepcopy(launcher)
    broken["docker"]["image"] = "rayproject/ray:2.60.0"
    broken["available_node_types"]["head"]["resources"]["lm_gpu"] = 1
    broken["available_node_types"]["dit-gpu"]["max_workers"] = 2
    problems = " | ".join(render.launcher_problems(config, broken, manifest))
    for expected in ("not the RayService's image", "lm_gpu must be advertised by exactly one",
                     "dit: node type dit-gpu max_workers"):
        assert expected in problems, problems
    assert render.main(["--serve-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config
