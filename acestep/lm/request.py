"""What one LM generation asks for: prompt ids (plus the unconditional prompt under CFG), sampling
knobs, constraints, the seed of its private RNG and its token budget. Plain data shared by the
planner, the modes, the engine and the backends."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Set

from acestep.fairness import DEFAULT_PRIORITY
from acestep.lm.fsm import FsmSpec
from acestep.params import DEFAULT_LM_TEMPERATURE

StepCallback = Callable[[int], None]  # tokens generated so far, after each step a request took part in


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling knobs of one request (``None``/0 disable top-k/top-p, as upstream)."""

    temperature: float = DEFAULT_LM_TEMPERATURE
    cfg_scale: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.cfg_scale < 1.0:
            raise ValueError(f"lm_cfg_scale must be >= 1.0, got {self.cfg_scale}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def of(cls, temperature: float, top_k: Optional[int], top_p: Optional[float],
           repetition_penalty: float = 1.0, cfg_scale: float = 1.0) -> "SamplingConfig":
        """From the seed API's knobs: top_k 0/None and top_p None/>= 1 mean off."""
        return cls(temperature=float(temperature), cfg_scale=float(cfg_scale), top_k=int(top_k) if top_k else None,
                   top_p=float(top_p) if top_p and top_p < 1.0 else None,
                   repetition_penalty=float(repetition_penalty))

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    @property
    def effective_top_k(self) -> Optional[int]:
        return int(self.top_k) if self.top_k else None

    @property
    def effective_top_p(self) -> Optional[float]:
        return self.top_p if self.top_p and 0.0 < self.top_p < 1.0 else None


@dataclass
class LMRequest:
    """One generation. ``group`` names what the request belongs to (a task, a Ray Data row): the
    engine counts how many requests of each group it holds at once (``LMEngine.stats``).
    ``tenant`` (whose request, opaque) and ``priority`` (a class rank) place it in the engine's
    fair-share admission order (``acestep.fairness``)."""

    prompt_ids: List[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    max_new_tokens: int = 256
    uncond_ids: Optional[List[int]] = None
    fsm: Optional[FsmSpec] = None
    group: Optional[str] = None
    tenant: str = ""
    priority: int = DEFAULT_PRIORITY

    def __post_init__(self):
        if self.sampling.uses_cfg and not self.uncond_ids:
            raise ValueError("a request with cfg_scale > 1 needs an unconditional prompt")
        if not self.prompt_ids:
            raise ValueError("empty prompt")

    @property
    def rows(self) -> int:
        """KV-cache rows the request occupies: two under CFG (cond + uncond), else one."""
        return 2 if self.sampling.uses_cfg else 1

    @property
    def longest_prompt(self) -> int:
        return max(len(self.prompt_ids), len(self.uncond_ids or []))


@dataclass(frozen=True)
class LMProgress:
    """How far one caller's LM work is: ``phase`` ("cot" or "codes"), tokens generated in that phase
    over all its items, and the tokens expected (codes: 5 per second plus the stop token per item;
    ``None`` while unknown, e.g. the CoT, whose length the model decides)."""

    phase: str
    tokens_done: int
    tokens_expected: Optional[int] = None

    @property
    def fraction(self) -> Optional[float]:
        if not self.tokens_expected:
            return None
        return min(1.0, self.tokens_done / self.tokens_expected)


class Cancellation:
    """Cancels every engine request of one caller, those submitted so far and any submitted later
    (thread-safe). The engine aborts cancelled requests at its next step and frees their rows."""

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: Set[Future] = set()
        self.cancelled = False

    def track(self, future: Future) -> Future:
        with self._lock:
            if not self.cancelled:
                self._futures.add(future)
        if self.cancelled:
            future.cancel()
        else:
            future.add_done_callback(self._forget)
        return future

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            futures, self._futures = list(self._futures), set()
        for future in futures:
            future.cancel()

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)
