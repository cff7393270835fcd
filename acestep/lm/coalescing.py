"""Cross-request LM batching without re-implementing the planner.

``acestep.inference.plan_music_batch`` runs ``plan_music`` for every request of a batch, each on its
own thread, against a ``CoalescingLM`` proxy of the ``LLMHandler``. The planner reaches the model only
through ``generate_texts(requests)``; the proxy holds each call until every still-planning thread is
waiting in one, then decodes all their requests as one engine batch and hands each thread its own
texts. The pt engine computes every row as it would alone (left padding, per-row positions and
seeded generators), so a request's plan does not depend on its batch-mates, up to the float
rounding of differently shaped kernels (on CPU a row can drift from its solo run after tens of
tokens, which flips later samples).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Sequence


class CoalescingLM:
    """An ``LMContext`` whose concurrent ``generate_texts`` calls decode together."""

    def __init__(self, handler, planners: int, on_batch: Optional[Callable[[int], None]] = None):
        self._handler = handler
        self._active = planners
        self._pending: List[dict] = []
        self._cond = threading.Condition()
        self._on_batch = on_batch

    def __getattr__(self, name: str) -> Any:  # render, tokenize, decode, max_model_len, is_initialized...
        return getattr(self._handler, name)

    def plan(self, params, config, seeds):
        """``LLMHandler.plan`` with this proxy as the planner's LM context."""
        from acestep.lm import planner

        self._handler._require()
        return planner.plan(self, params, config, seeds)

    def generate_texts(self, requests: Sequence) -> List[str]:
        slot = {"requests": list(requests), "texts": None, "error": None}
        with self._cond:
            self._pending.append(slot)
            self._maybe_run()
            while slot["texts"] is None and slot["error"] is None:
                self._cond.wait()
        if slot["error"] is not None:
            raise slot["error"]
        return slot["texts"]

    def finished(self) -> None:
        """A planner thread is done (or failed): stop waiting for it."""
        with self._cond:
            self._active -= 1
            self._maybe_run()

    def _maybe_run(self) -> None:
        # Caller holds the lock. Run once every live planner is waiting here.
        if not self._pending or len(self._pending) < self._active:
            return
        slots, self._pending = self._pending, []
        requests = [r for slot in slots for r in slot["requests"]]
        if self._on_batch:
            self._on_batch(len(requests))
        try:
            texts = self._handler.generate_texts(requests)
        except Exception as error:  # every waiting planner gets the engine's error
            for slot in slots:
                slot["error"] = error
        else:
            start = 0
            for slot in slots:
                slot["texts"] = texts[start:start + len(slot["requests"])]
                start += len(slot["requests"])
        self._cond.notify_all()
