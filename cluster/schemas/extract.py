"""Extract the ``v1`` OpenAPI schema from KubeRay CRD files into compact JSON (see README.md here).

    python cluster/schemas/extract.py --version v1.7.0 --commit <sha> \
        <kuberay>/helm-chart/kuberay-operator/crds/ray.io_rayservices.yaml \
        <kuberay>/helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml

Writes ``<kind>.v1.schema.json`` (e.g. ``rayservice.v1.schema.json``) next to this script. The only
change to the schema is dropping ``description`` texts, which never affect validation; everything
else (types, enums, patterns, ``required``, ``x-kubernetes-*`` markers) is kept as published.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

OUT_DIR = Path(__file__).resolve().parent
VERSION = "v1"


def strip_descriptions(schema: Any, in_properties: bool = False) -> Any:
    """Drop ``description`` keywords; a *property* named ``description`` (under ``properties``) stays."""
    if isinstance(schema, list):
        return [strip_descriptions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: strip_descriptions(value, in_properties=key == "properties" and not in_properties)
            for key, value in schema.items()
            if in_properties or key != "description"}


def openapi_schema(crd: dict) -> dict:
    """The served ``v1`` version's ``openAPIV3Schema`` of a CustomResourceDefinition."""
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return version["schema"]["openAPIV3Schema"]


def extract(crd_path: Path, source: str) -> Path:
    crd = yaml.safe_load(crd_path.read_text())
    kind = crd["spec"]["names"]["kind"]
    schema = {"$comment": f"{kind} {VERSION} openAPIV3Schema from {source}/{crd_path.name}, descriptions removed"}
    schema.update(strip_descriptions(openapi_schema(crd)))
    out = OUT_DIR / f"{kind.lower()}.{VERSION}.schema.json"
    out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path, help="CRD YAML files (ray.io_<kind>s.yaml)")
    parser.add_argument("--version", required=True, help="KubeRay release tag, e.g. v1.7.0")
    parser.add_argument("--commit", required=True, help="the tag's commit")
    args = parser.parse_args(argv)
    source = f"github.com/ray-project/kuberay {args.version} ({args.commit}) helm-chart/kuberay-operator/crds"
    for path in args.crds:
        print(f"wrote {extract(path, source).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
