"""Continuous batching bookkeeping: which requests run, in which KV-cache slots (no tensors).

A request takes one slot (two with CFG: cond + uncond). Waiting requests join the running batch
between steps, at most ``max_admit`` per step, first come first served (a request that does not fit
yet holds back the ones behind it), while slots are free; a finished request frees its slots at once. Slots are handed out lowest
first, so the running rows stay packed near slot 0 and a decode step covers few idle slots."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)  # sequences compare by identity
class Job:
    """One request's decoding state. ``state`` holds the engine's per-request extras (FSM state,
    generator); the scheduler never looks inside."""

    rid: int
    request: Any
    slots_needed: int
    state: Any = None
    cond_slot: int = -1
    uncond_slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def slots(self) -> list[int]:
        return [self.cond_slot] + ([self.uncond_slot] if self.uncond_slot is not None else [])


class Scheduler:
    def __init__(self, max_slots: int, max_admit: int):
        if max_slots < 2:
            raise ValueError("max_rows must be >= 2 (one CFG pair)")
        self.max_slots = int(max_slots)
        self.max_admit = max(1, int(max_admit))
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._free = list(range(self.max_slots))
        heapq.heapify(self._free)

    def add(self, seq: Job) -> None:
        if seq.slots_needed > self.max_slots:
            raise ValueError(f"request needs {seq.slots_needed} rows; the engine has {self.max_slots}")
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Job]:
        """Move up to ``max_admit`` waiting sequences into the running batch (slots assigned)."""
        joined: list[Job] = []
        while self.waiting and len(joined) < self.max_admit and self.waiting[0].slots_needed <= len(self._free):
            seq = self.waiting.popleft()
            seq.cond_slot = heapq.heappop(self._free)
            if seq.slots_needed == 2:
                seq.uncond_slot = heapq.heappop(self._free)
            self.running.append(seq)
            joined.append(seq)
        return joined

    def drop(self, seq: Job) -> None:
        """Remove a waiting or running sequence (a running one frees its slots)."""
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.finished = True

    @property
    def rows_in_use(self) -> int:
        return self.max_slots - len(self._free)

    def finish(self, seq: Job) -> None:
        seq.finished = True
        self.running.remove(seq)
        for slot in seq.slots:
            heapq.heappush(self._free, slot)

    def span(self) -> int:
        """Rows a decode step must cover: one past the highest slot in use."""
        return 1 + max((s for seq in self.running for s in seq.slots), default=-1)
