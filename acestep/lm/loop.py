"""``EngineLoop``: the one thread that owns an ``LMEngine`` and drives it for concurrent callers.

Callers ``submit(request, on_step)`` from any thread and get a ``concurrent.futures.Future`` of the
request's generated ids (``asyncio.wrap_future`` gives the async twin). The loop thread takes new
requests and cancellations between decode steps, calls ``engine.step()`` while work exists and
sleeps on a condition when idle. Nothing waits for a batch to fill or to drain: a request joins the
running batch at the next step boundary (as soon as KV rows are free, first come first served) and
its future resolves the step it finishes.

``future.cancel()`` (directly, or by cancelling the asyncio wrapper) aborts the request at the next
step and frees its rows; its batch-mates are untouched. ``on_step(tokens_done)`` runs on the loop
thread after every step the request took part in; it must be quick (the planner's rate-limited
progress reporter is)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Dict, Optional

from acestep.lm.engine import LMEngine
from acestep.lm.request import LMRequest

logger = logging.getLogger(__name__)
StepCallback = Callable[[int], None]


class EngineClosed(RuntimeError):
    """The engine loop was closed before the request finished."""


class EngineLoop:
    """Thread-safe front of one ``LMEngine`` (the engine itself is only touched by the loop thread)."""

    def __init__(self, engine: LMEngine, name: str = "acestep-lm-engine"):
        self.engine = engine
        self._name = name
        self._cond = threading.Condition(threading.RLock())  # reentrant: futures' callbacks take it too
        self._incoming: deque = deque()
        self._cancelled: deque = deque()
        self._live: Dict[int, tuple[Future, Optional[StepCallback]]] = {}
        self._rid_of: Dict[int, int] = {}  # id(future) -> engine request id
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # -- callers (any thread) ------------------------------------------------------------------
    def submit(self, request: LMRequest, on_step: Optional[StepCallback] = None) -> Future:
        """Queue ``request``; the future resolves to its generated ids (stop token included).
        Raises ValueError at once for a request the engine can never run."""
        self.engine.check(request)
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the LM engine is closed")
            self._incoming.append((request, future, on_step))
            self._ensure_thread()
            self._cond.notify()
        future.add_done_callback(self._on_done)
        return future

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            queued = len(self._incoming)
            stats = self.engine.stats()
        stats["waiting"] += queued
        return stats

    def close(self) -> None:
        """Stop the thread; unfinished futures fail with ``EngineClosed``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- the loop thread -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _on_done(self, future: Future) -> None:
        if future.cancelled():
            # a bare cancel() leaves the future CANCELLED, which concurrent.futures.wait() never sees
            future.set_running_or_notify_cancel()
            with self._cond:
                self._cancelled.append(future)
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._incoming or self._cancelled or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._closed:
                    break
                # under the lock, so stats() never misses a request between queue and engine
                incoming, self._incoming = list(self._incoming), deque()
                self._admit(incoming)
                cancelled, self._cancelled = list(self._cancelled), deque()
            self._abort(cancelled)
            if self.engine.has_unfinished():
                self._step()
        self._fail_all(EngineClosed("the LM engine is closed"))

    def _admit(self, incoming) -> None:
        for request, future, on_step in incoming:
            if future.cancelled():
                continue
            try:
                rid = self.engine.add_request(request)
            except Exception as error:  # e.g. an FSM spec the tables reject: this request only
                _settle(future, error=error)
                continue
            self._live[rid] = (future, on_step)
            self._rid_of[id(future)] = rid

    def _abort(self, cancelled) -> None:
        for future in cancelled:
            rid = self._rid_of.pop(id(future), None)
            if rid is not None and self._live.pop(rid, None) is not None:
                self.engine.abort(rid)

    def _step(self) -> None:
        try:
            done = self.engine.step()
        except Exception as error:  # outside any request's own work: every request fails; the loop goes on
            logger.exception("LM engine step failed")
            for rid in self.engine.abort_all():
                future, _ = self._live.pop(rid, (None, None))
                if future is not None:
                    self._rid_of.pop(id(future), None)
                    _settle(future, error=error)
            return
        for rid in done:
            future, _ = self._live.pop(rid)
            self._rid_of.pop(id(future), None)
            try:
                tokens = self.engine.pop_result(rid)
            except Exception as error:  # this request's own step raised
                _settle(future, error=error)
            else:
                _settle(future, result=tokens)
        for rid, tokens in self.engine.progress():
            on_step = self._live[rid][1]
            if on_step is not None:
                try:
                    on_step(tokens)
                except Exception:  # progress is best effort; decoding goes on
                    logger.exception("LM progress callback failed")

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            pending = [future for _, future, _ in self._incoming]
            self._incoming.clear()
        pending += [future for future, _ in self._live.values()]
        self.engine.abort_all()
        self._live.clear()
        for future in pending:
            _settle(future, error=error)


def _settle(future: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Resolve ``future`` unless a caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # InvalidStateError: cancelled between the check and now
        pass
