"""Input rows: how one prompts row parses, which id it gets, and how it becomes the library's
``GenerationParams`` / ``GenerationConfig``. Reading the files is ``pipelines.source`` (Ray Data).

A row is a flat mapping of ``GenerationParams`` fields plus the optional job fields ``id``,
``batch_size`` and ``audio_format`` (``seed`` is a ``GenerationParams`` field: a seed >= 0 fixes the
seeds of the row's items to seed, seed+1, ...; ``tracks``, a list or a string, renders every track
named, each song's files in track order). Reading never raises for one bad line: the row comes
back with an error and the job records it in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

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


def parse_line(line: bytes, number: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """One JSONL line (``number`` counts from 1) → (object, None) or (None, why it is not a row)."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return None, f"line {number}: not UTF-8 ({error})"
    except json.JSONDecodeError as error:
        return None, f"line {number}: invalid JSON ({error})"
    if not isinstance(value, dict):
        return None, f"line {number}: expected a JSON object, got {type(value).__name__}"
    return value, None


def split_fields(values: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """A parsed row → (its own id or None, its other fields without missing cells)."""
    fields = {k: _plain(v) for k, v in values.items() if not _is_missing(v)}
    own = fields.pop("id", None)
    return (str(own) if own else None), fields


def assign_ids(rows: Iterable[Tuple[Optional[str], Optional[str]]]) -> List[Tuple[str, Optional[str]]]:
    """(own id, read error) of every row, in input order → (id, error) of each.

    Ids: the row's own when given, else ``row-{index:06d}``; an id that is not file-name safe or
    repeats an earlier one makes that row a bad row."""
    out, seen = [], set()
    for index, (own, error) in enumerate(rows):
        row_id = own or f"row-{index:06d}"
        if error is None and not ID_PATTERN.match(row_id):
            error = f"id {row_id!r}: expected letters, digits, '.', '_' or '-' (a file-name safe id)"
            row_id = f"row-{index:06d}"
        if row_id in seen:
            error = error or f"id {row_id!r} repeats an earlier row"
            row_id = f"{row_id}.dup-{index:06d}"
        seen.add(row_id)
        out.append((row_id, error))
    return out


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
    values.setdefault("preset", "model")  # as over HTTP: the DiT's preset fills the sampling fields left out
    params = GenerationParams(**values)
    seed = params.seed
    fixed = isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
    config = GenerationConfig(batch_size=batch_size, audio_format=row_format, use_random_seed=not fixed)
    return params, config
