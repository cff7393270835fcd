"""One local Ray per test module (2 CPUs, no dashboard); demo checkpoints from tests/conftest.py.

The stage actors claim the job's default CPUs: shares that fit the pools and the read tasks on 2 CPUs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import local_ray

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ray_session():
    with local_ray() as ray:
        yield ray


def write_jsonl(path: Path, rows) -> str:
    """Rows are dicts (written as JSON) or raw strings (written as given: malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def jsonl():
    """``jsonl(path, rows)`` writes a prompts file (see ``write_jsonl``)."""
    return write_jsonl
