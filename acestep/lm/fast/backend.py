"""The fast path behind the backends' one call, on top of a loaded pt backend (same model, same
token tables): ``FastBackend(pt_backend).generate(requests) -> list[list[int]]``."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from acestep.lm.engine import LMRequest
from acestep.lm.fast.engine import FastEngine


class FastBackend:
    """Drop-in for ``PtBackend`` (``name``, ``vocab_size``, ``generate``, ``close``); concurrent
    ``generate`` calls run one after the other (merge them upstream to batch them)."""

    name = "fast"

    def __init__(self, pt_backend, **engine_kwargs):
        runner = pt_backend.runner
        self.pt = pt_backend
        self.engine = FastEngine(runner.model, runner.tables, runner.encode, runner.pad_id, **engine_kwargs)
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.pt.vocab_size

    def generate(self, requests: Sequence[LMRequest]) -> list[list[int]]:
        with self._lock:
            return self.engine.generate(requests)

    def close(self) -> None:
        self.engine = None
        self.pt.close()
