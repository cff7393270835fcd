"""Input rows: read prompts.jsonl / prompts.parquet, give every row an id, turn a row into the
library's ``GenerationParams`` / ``GenerationConfig``.

A row is a flat mapping of ``GenerationParams`` fields plus the optional job fields ``id``,
``batch_size`` and ``audio_format`` (``seed`` is a ``GenerationParams`` field: a seed >= 0 fixes the
seeds of the row's items to seed, seed+1, ...). Reading never raises for one bad line: the row comes
back with ``error`` set and the job records it in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from acestep.params import GenerationConfig, GenerationParams

JOB_FIELDS = ("id", "batch_size", "audio_format")
PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationParams))
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RowError(ValueError):
    """A row that cannot become a request (bad JSON, unknown field, bad id)."""


@dataclass
class InputRow:
    """One input row: its id, its position in the input, its fields (as given), and the error found
    while reading it (``None`` when it is readable)."""

    id: str
    index: int
    fields: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


def _is_missing(value: Any) -> bool:
    """Parquet / pandas fill absent cells with None or NaN: such a cell means "use the default"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars / arrays (from Parquet) → Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read_jsonl(path: Path) -> List[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append((None, f"line {number}: invalid JSON ({error})"))
            continue
        if not isinstance(value, dict):
            rows.append((None, f"line {number}: expected a JSON object, got {type(value).__name__}"))
        else:
            rows.append((value, None))
    return rows


def _read_parquet(path: Path) -> List[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    import pyarrow.parquet as pq

    return [(row, None) for row in pq.read_table(path).to_pylist()]


def read_rows(path: str | Path) -> List[InputRow]:
    """All rows of a ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` file, in order.

    Ids: the row's ``id`` when given, else ``row-{index:06d}``; an id that is not file-name safe or
    repeats an earlier one makes that row a bad row."""
    path = Path(path)
    if path.suffix == ".parquet":
        raw = _read_parquet(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        raw = _read_jsonl(path)
    else:
        raise ValueError(f"--input {path}: expected a .jsonl or .parquet file")
    rows, seen = [], set()
    for index, (values, error) in enumerate(raw):
        values = {k: _plain(v) for k, v in (values or {}).items() if not _is_missing(v)}
        row_id = str(values.pop("id", None) or f"row-{index:06d}")
        if error is None and not ID_PATTERN.match(row_id):
            error = f"id {row_id!r}: expected letters, digits, '.', '_' or '-' (a file-name safe id)"
            row_id = f"row-{index:06d}"
        if row_id in seen:
            error = error or f"id {row_id!r} repeats an earlier row"
            row_id = f"{row_id}.dup-{index:06d}"
        seen.add(row_id)
        rows.append(InputRow(id=row_id, index=index, fields=values, error=error))
    return rows


def to_request(fields: Dict[str, Any], audio_format: str = "flac") -> Tuple[GenerationParams, GenerationConfig]:
    """Row fields → (params, config). Raises ``RowError`` for unknown fields; field values are
    checked later by ``acestep.inference.prepare_request`` (ValidationError naming the field)."""
    values = dict(fields)
    values.pop("id", None)
    batch_size = values.pop("batch_size", 1)
    row_format = values.pop("audio_format", audio_format)
    unknown = sorted(set(values) - PARAM_FIELDS)
    if unknown:
        raise RowError(f"unknown field(s): {', '.join(unknown)}")
    params = GenerationParams(**values)
    seed = params.seed
    fixed = isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
    config = GenerationConfig(batch_size=batch_size, audio_format=row_format, use_random_seed=not fixed)
    return params, config
