"""``acestep verify-layout PARAMS.tsv``: map a checkpoint's tensor table onto modules built from
the real config on the meta device (no weights needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

from acestep.checkpoints.loader import MappingReport, build_dit_modules, match_tensors, module_tensor_shapes
from acestep.checkpoints.mapping import EXTERNAL_TENSORS, map_official_name

DEFAULT_CONFIG = "acestep-v15-turbo"


def read_params_table(path: str | Path) -> Dict[str, Tuple[int, ...]]:
    """``name<TAB>shape<TAB>dtype`` lines (shape comma-separated) → {name: shape}."""
    table = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        name, shape, *_ = line.split("\t")
        table[name] = tuple(int(d) for d in shape.split(","))
    return table


def verify_layout(table_path: str | Path, config: dict) -> Tuple[MappingReport, int]:
    checkpoint = read_params_table(table_path)
    modules = build_dit_modules(config, device="meta")
    return match_tensors(checkpoint, module_tensor_shapes(modules), map_official_name, EXTERNAL_TENSORS), len(checkpoint)


def run_verify_layout(table_path: str, config_name: str = DEFAULT_CONFIG) -> int:
    from acestep.checkpoints.demo import real_config

    report, total = verify_layout(table_path, real_config(config_name))
    if report.ok and len(report.mapped) == total:
        print(f"{len(report.mapped)}/{total} tensors mapped, shapes equal")
        return 0
    print(f"{len(report.mapped)}/{total} tensors mapped; {report.describe()}")
    return 1
