"""Continuous batching bookkeeping: which requests run, in which KV-cache rows (no tensors).

A request takes one row (two with CFG: cond + uncond). Waiting requests join the running batch
between steps, at most ``max_admit`` per step, while rows are free, in the fair-share order of
``acestep.fairness`` (priority class first, then the tenant holding the fewest running rows, then
arrival; one tenant alone is first come first served); the request next in that order holds back the
others while it does not fit yet. A finished request frees its rows at once. Slots are handed out
lowest first, so the running rows stay packed near row 0 and a decode step covers few idle rows."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from acestep.fairness import DEFAULT_PRIORITY, Entry, Turns


@dataclass(eq=False)  # sequences compare by identity
class LMSequence:
    """One request's decoding state. ``state`` holds the engine's per-request extras (FSM state,
    generator); the scheduler never looks inside."""

    rid: int
    request: Any
    rows_needed: int
    state: Any = None
    cond_row: int = -1
    uncond_row: int | None = None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    tenant: str = ""  # whose request (opaque), for the fair-share order
    priority: int = DEFAULT_PRIORITY

    @property
    def entry(self) -> Entry:
        return Entry(self.tenant, self.priority, float(self.rows_needed))

    @property
    def rows(self) -> list[int]:
        return [self.cond_row] + ([self.uncond_row] if self.uncond_row is not None else [])


class Scheduler:
    def __init__(self, max_rows: int, max_admit: int):
        if max_rows < 2:
            raise ValueError("max_rows must be >= 2 (one CFG pair)")
        self.max_rows = int(max_rows)
        self.max_admit = max(1, int(max_admit))
        self.waiting: deque[LMSequence] = deque()
        self.running: list[LMSequence] = []
        self.turns = Turns()
        self._free = list(range(self.max_rows))
        heapq.heapify(self._free)

    def add(self, seq: LMSequence) -> None:
        if seq.rows_needed > self.max_rows:
            raise ValueError(f"request needs {seq.rows_needed} rows; the engine has {self.max_rows}")
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[LMSequence]:
        """Move up to ``max_admit`` waiting sequences into the running batch (rows assigned)."""
        joined: list[LMSequence] = []
        while self.waiting and len(joined) < self.max_admit:
            seq = self.waiting[self.turns.pick([s.entry for s in self.waiting], [s.entry for s in self.running])]
            if seq.rows_needed > len(self._free):
                break
            self.waiting.remove(seq)
            self.turns.served(seq.tenant, [s.entry for s in (*self.waiting, *self.running)])
            seq.cond_row = heapq.heappop(self._free)
            if seq.rows_needed == 2:
                seq.uncond_row = heapq.heappop(self._free)
            self.running.append(seq)
            joined.append(seq)
        return joined

    def drop(self, seq: LMSequence) -> None:
        """Remove a waiting or running sequence (a running one frees its rows)."""
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.finished = True

    @property
    def rows_in_use(self) -> int:
        return self.max_rows - len(self._free)

    def finish(self, seq: LMSequence) -> None:
        seq.finished = True
        self.running.remove(seq)
        for row in seq.rows:
            heapq.heappush(self._free, row)

    def span(self) -> int:
        """Rows a decode step must cover: one past the highest row in use."""
        return 1 + max((s for seq in self.running for s in seq.rows), default=-1)
