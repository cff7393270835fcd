"""``StepLoop``: the one thread that owns a stepper (the LM engine, the DiT worker) and drives it
for concurrent callers; and ``isolate``, which both steppers use so one bad member of a batch
fails alone.

A stepper holds requests and advances all of them by one step at a time:

- ``add(*args)`` queues one request and returns its key (what it raises fails that request);
- ``abort(key)`` drops a request that is waiting or running;
- ``has_work`` says whether any request is left;
- ``step()`` advances every running request once and returns an ``Outcome`` for each that left:
  its result, or the error its own work raised (its batch-mates go on);
- ``stats()`` is a dict of counters with a ``waiting`` entry.

Callers ``submit(*args)`` from any thread and get a ``concurrent.futures.Future`` of the
request's result (``asyncio.wrap_future`` gives the async twin). Between two steps the loop thread
runs queued ``call(fn)``s (other work that must use the stepper's modules on this thread), adds
new requests and aborts cancelled ones, then steps while work exists and sleeps on a condition
when idle. Nothing waits for a batch to fill: a request joins at the next step boundary and its
future resolves the step it leaves. ``future.cancel()`` (or cancelling its asyncio wrapper) aborts
the request at the next step; its batch-mates are untouched."""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Protocol, Sequence, Tuple, TypeVar, Union

import torch

logger = logging.getLogger(__name__)
Member = TypeVar("Member")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Outcome:
    """A request that left its stepper: ``result``, or the ``error`` its own work raised."""

    key: Hashable
    result: Any = None
    error: Optional[Exception] = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class Stepper(Protocol):
    def add(self, *args: Any) -> Hashable: ...
    def abort(self, key: Hashable) -> Any: ...
    @property
    def has_work(self) -> bool: ...
    def step(self) -> List[Outcome]: ...
    def stats(self) -> Dict[str, Any]: ...


class LoopClosed(RuntimeError):
    """The loop was closed before the request finished."""


def isolate(run: Callable[[List[Member]], Sequence[Result]],
            members: Sequence[Member]) -> List[Union[Result, Exception]]:
    """``run(members)`` gives one result per member, computed together. When it raises, each half
    of the members runs again (recursively): a member whose run alone raises gets that exception
    as its entry, every other member its result (from a smaller batch, equal to float rounding)."""
    members = list(members)
    if not members:
        return []
    try:
        return list(run(members))
    except Exception as error:  # noqa: BLE001 - attributed to a member below
        if len(members) == 1:
            return [error]
    half = len(members) // 2
    return isolate(run, members[:half]) + isolate(run, members[half:])


class StepLoop:
    """Thread-safe front of one stepper (only the loop thread touches the stepper)."""

    def __init__(self, stepper: Stepper, name: str):
        self.stepper, self.name = stepper, name
        self._cond = threading.Condition(threading.RLock())  # reentrant: futures' callbacks take it too
        self._calls: Deque[Tuple[Callable[[], Any], Future]] = deque()
        self._incoming: Deque[Tuple[tuple, Future]] = deque()
        self._cancelled: Deque[Future] = deque()
        self._live: Dict[Hashable, Future] = {}  # key -> future of a request in the stepper
        self._keys: Dict[int, Hashable] = {}  # id(future) -> key
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # -- callers (any thread) ------------------------------------------------------------------
    def submit(self, *args: Any) -> Future:
        """Queue ``stepper.add(*args)`` for the next step boundary; the future resolves to the
        request's result (or raises what ``add`` or the request's own step raised)."""
        future: Future = Future()
        with self._cond:
            self._check_open()
            self._incoming.append((args, future))
            self._wake()
        future.add_done_callback(self._on_done)
        return future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the loop thread at the next step boundary; the future holds its result."""
        future: Future = Future()
        with self._cond:
            self._check_open()
            self._calls.append((fn, future))
            self._wake()
        return future

    def stats(self) -> Dict[str, Any]:
        """The stepper's ``stats()``; ``waiting`` also counts requests not yet handed to it."""
        with self._cond:
            stats = self.stepper.stats()
            stats["waiting"] += len(self._incoming)
        return stats

    def close(self) -> None:
        """Stop the thread; unfinished futures fail with ``LoopClosed``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _check_open(self) -> None:
        if self._closed:
            raise LoopClosed(f"{self.name} is closed")

    def _wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._cond.notify()

    def _on_done(self, future: Future) -> None:
        if future.cancelled():
            future.set_running_or_notify_cancel()  # so concurrent.futures.wait() sees it finished
            with self._cond:
                self._cancelled.append(future)
                self._cond.notify()

    # -- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():  # grad mode is per thread; nothing on this one trains
            self._serve()
        closed = LoopClosed(f"{self.name} is closed")
        with self._cond:
            pending = [f for _, f in self._calls] + [f for _, f in self._incoming]
            self._calls.clear(), self._incoming.clear()
        for future in pending:
            _settle(future, Outcome(None, error=closed))
        self._fail_live(closed)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._calls or self._incoming or self._cancelled
                           or self.stepper.has_work):
                    self._cond.wait()
                if self._closed:
                    return
                calls, self._calls = list(self._calls), deque()
            for fn, future in calls:
                _run_call(fn, future)
            with self._cond:  # under the lock, so stats() never misses a request between queue and stepper
                self._admit()
                self._abort_cancelled()
            if self.stepper.has_work:
                self._step()

    def _admit(self) -> None:
        incoming, self._incoming = list(self._incoming), deque()
        for args, future in incoming:
            if future.cancelled():
                continue
            try:
                key = self.stepper.add(*args)
            except Exception as error:  # noqa: BLE001 - this request only
                _settle(future, Outcome(None, error=error))
                continue
            self._live[key] = future
            self._keys[id(future)] = key

    def _abort_cancelled(self) -> None:
        cancelled, self._cancelled = list(self._cancelled), deque()
        for future in cancelled:
            key = self._keys.pop(id(future), None)
            if key is not None and self._live.pop(key, None) is not None:
                self.stepper.abort(key)

    def _step(self) -> None:
        try:
            outcomes = self.stepper.step()
        except Exception as error:  # noqa: BLE001 - outside any request's own work: all of them fail
            logger.exception("%s: step failed", self.name)
            self._fail_live(error)
            return
        for outcome in outcomes:
            future = self._live.pop(outcome.key, None)
            if future is not None:
                self._keys.pop(id(future), None)
                _settle(future, outcome)

    def _fail_live(self, error: Exception) -> None:
        live, self._live = list(self._live.items()), {}
        self._keys.clear()
        for key, future in live:
            self.stepper.abort(key)
            _settle(future, Outcome(key, error=error))


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    try:
        result = fn()
    except BaseException as error:  # noqa: BLE001 - handed to the caller
        _settle(future, Outcome(None, error=error))
    else:
        _settle(future, Outcome(None, result=result))


def _settle(future: Future, outcome: Outcome) -> None:
    """Resolve ``future`` unless a caller cancelled it meanwhile."""
    try:
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.result)
    except InvalidStateError:
        pass
