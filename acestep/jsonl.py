"""JSON-lines journals that survive a killed writer: reading past a torn last line, and replacing a
file atomically. Shared by the render job's manifest and the prepared-sample dataset's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable


def read_records(path: Path) -> Iterable[Dict[str, Any]]:
    """The records (objects with an ``id``) of a JSONL file; a torn last line is skipped."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "id" in value:
            yield value


def ends_torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (its writer was killed mid-line)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` next to ``path``, then rename over it (a rename within a directory is atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
