"""Bounded admission for new tasks, with a Retry-After derived from the actual backlog.

Three bounds guard task creation: the server's unfinished tasks, one API key's unfinished tasks and
one key's request rate (a token bucket kept in the task store, so every ingress replica charges the
same one). The sync route, whose requests hold a connection until the
result is ready, has its own smaller bound on requests in flight. A refusal is a 429 in the one error
model (``type: overloaded``) whose Retry-After estimates when capacity frees up, from the queue depth
and the recent task wall time, instead of a fixed guess.

The caller owns the task counts (the task store knows them); this module only decides and estimates.
All state sits behind one lock, so async routes and sync routes (worker threads) can share it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Sequence

from serve import metrics
from serve.edge.errors import APIError, retry_after
from serve.store.records import take_token

Clock = Callable[[], float]

DEFAULT_TASK_S = 10.0  # the task time assumed before any task has finished
TASK_EWMA_ALPHA = 0.2  # weight of the newest task time in the running average
COMPLETION_WINDOW = 32  # completions kept to estimate throughput
MIN_RETRY_S, MAX_RETRY_S = 1.0, 600.0
MAX_BUCKETS = 4096  # per-key rate buckets kept at most (least recently used go first)

_KEY_LOC = ("header", "authorization")
_GLOBAL_LOC = ("body",)


@dataclass(frozen=True)
class AdmissionLimits:
    """The admission bounds of one ingress replica."""

    # Unfinished (queued or running) tasks the whole server accepts; a new task beyond it gets a 429.
    max_unfinished: int
    # Unfinished tasks one API key may have at once; None: only the global bound applies.
    per_key_unfinished: Optional[int] = None
    # Task-creating requests per minute per API key, as a token bucket that holds up to
    # max(1, rpm / 6) tokens (ten seconds' worth), so short bursts pass; None: no rate bound.
    per_key_rpm: Optional[float] = None
    # Sync-route requests waiting for their result at once; kept below max_unfinished because each
    # one holds a connection (and a proxy slot) for a whole task.
    sync_max_inflight: int = 8

    def __post_init__(self):
        if self.max_unfinished < 1 or self.sync_max_inflight < 1:
            raise ValueError("max_unfinished and sync_max_inflight must be >= 1")
        if self.per_key_unfinished is not None and self.per_key_unfinished < 1:
            raise ValueError("per_key_unfinished must be >= 1 or None")
        if self.per_key_rpm is not None and not self.per_key_rpm > 0:
            raise ValueError("per_key_rpm must be > 0 or None")

    @property
    def per_key_burst(self) -> Optional[float]:
        return None if self.per_key_rpm is None else max(1.0, self.per_key_rpm / 6.0)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; starts full; in this process only (the shared
    one is the task store's ``take_token``, the same rule). Not locked: callers serialize."""

    def __init__(self, rate_per_s: float, burst: float, clock: Clock = time.monotonic):
        if not rate_per_s > 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s, self.burst, self.clock = float(rate_per_s), float(burst), clock
        self.tokens, self.updated = float(burst), clock()

    def take(self) -> float:
        """0.0 after consuming a token, else the seconds until one is there (nothing consumed)."""
        now = self.clock()
        self.tokens, wait = take_token(self.tokens, self.updated, self.rate_per_s, self.burst, now)
        self.updated = now
        return wait

    def is_full(self) -> bool:
        """A full bucket behaves exactly like a new one, so it can be dropped without effect."""
        return self.tokens + max(0.0, self.clock() - self.updated) * self.rate_per_s >= self.burst


# take(bucket name, rate per second, burst) -> wait: a bucket every ingress replica shares
SharedBuckets = Callable[[str, float, float], float]


class Admission:
    """Admission decisions and Retry-After estimates for one ingress replica.

    Retry-After for an unfinished-task bound (clamped to [1, 600] s)::

        excess      = unfinished - bound + 1          # tasks that must finish before one more fits
        parallelism = workers hint (set_parallelism), else completion rate x recent task time
                      (Little's law over the last completions), else 1; at least 1 and at most
                      the unfinished count that is being bounded
        retry_after = excess x recent_task_s / parallelism

    ``recent_task_s`` is an EWMA of the task wall times passed to ``record_task_time`` (10 s before
    the first). For the rate bound Retry-After is the bucket's wait for its next token.
    """

    def __init__(self, limits: AdmissionLimits, clock: Clock = time.monotonic, *, max_buckets: int = MAX_BUCKETS,
                 shared: Optional[SharedBuckets] = None):
        """``shared``: the per-key rate buckets live there (the task store, so every ingress replica
        charges the same bucket); None: in this process (one replica, or tests with a fake clock)."""
        self.limits, self.clock, self.max_buckets = limits, clock, max(1, max_buckets)
        self.shared = shared
        self._lock = threading.Lock()
        self._buckets: "OrderedDict[str, TokenBucket]" = OrderedDict()
        self._task_s: Optional[float] = None
        self._completions: Deque[float] = deque(maxlen=COMPLETION_WINDOW)
        self._workers: Optional[int] = None
        self._sync_inflight = 0
        self._admitted = 0
        self._sync_admitted = 0
        self._refused = {"global": 0, "key_unfinished": 0, "key_rate": 0, "sync": 0}
        self._buckets_dropped = 0

    # --- estimates ---------------------------------------------------------------------------

    def record_task_time(self, seconds: float) -> None:
        """A task finished after ``seconds`` of wall time (call once per finished task)."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            return
        with self._lock:
            # The first sample replaces the made-up default instead of being averaged with it.
            previous = self._task_s
            self._task_s = seconds if previous is None else previous + TASK_EWMA_ALPHA * (seconds - previous)
            self._completions.append(self.clock())

    def set_parallelism(self, workers: Optional[int]) -> None:
        """How many tasks run at once (e.g. DiT replicas x batch); None: estimate from completions."""
        with self._lock:
            self._workers = None if workers is None else max(1, int(workers))

    @property
    def recent_task_s(self) -> float:
        return DEFAULT_TASK_S if self._task_s is None else self._task_s

    def _parallelism(self) -> float:
        if self._workers is not None:
            return float(self._workers)
        stamps = self._completions
        if len(stamps) < 2 or stamps[-1] <= stamps[0]:
            return 1.0
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        return max(1.0, rate * self.recent_task_s)

    def _queue_wait(self, unfinished: int, bound: int) -> float:
        excess = max(1, unfinished - bound + 1)
        parallel = min(self._parallelism(), max(1.0, float(unfinished)))
        return min(MAX_RETRY_S, max(MIN_RETRY_S, excess * self.recent_task_s / parallel))

    # --- decisions ---------------------------------------------------------------------------

    def _refuse(self, reason: str, message: str, loc: Sequence[str], wait_s: float) -> APIError:
        self._refused[reason] += 1
        metrics.rejected(reason)
        return APIError(429, message, loc=loc, code="overloaded", headers=retry_after(wait_s))

    def admit(self, key_name: str, unfinished_global: int, unfinished_key: int) -> None:
        """Admit one new task or raise a 429 naming the bound that was hit.

        ``unfinished_global`` / ``unfinished_key``: unfinished tasks before this one, on the server
        and for this key. The rate bucket is only charged once both unfinished bounds pass.
        """
        limits = self.limits
        with self._lock:
            if unfinished_global >= limits.max_unfinished:
                raise self._refuse(
                    "global", f"server busy: {limits.max_unfinished} unfinished tasks is the server's limit",
                    _GLOBAL_LOC, self._queue_wait(unfinished_global, limits.max_unfinished))
            cap = limits.per_key_unfinished
            if cap is not None and unfinished_key >= cap:
                raise self._refuse(
                    "key_unfinished", f"{cap} unfinished tasks is the limit for this key",
                    _KEY_LOC, self._queue_wait(unfinished_key, cap))
            if limits.per_key_rpm is not None:
                wait = self._take(key_name)
                if wait > 0:
                    raise self._refuse(
                        "key_rate", f"{limits.per_key_rpm:g} requests per minute is the limit for this key",
                        _KEY_LOC, wait)
            self._admitted += 1
        metrics.admitted("task")

    def _take(self, key_name: str) -> float:
        if self.shared is not None:
            return self.shared(f"rpm:{key_name}", self.limits.per_key_rpm / 60.0, self.limits.per_key_burst)
        return self._bucket(key_name).take()

    def _bucket(self, key_name: str) -> TokenBucket:
        bucket = self._buckets.get(key_name)
        if bucket is None:
            self._prune()
            rate = self.limits.per_key_rpm / 60.0
            bucket = self._buckets[key_name] = TokenBucket(rate, self.limits.per_key_burst, self.clock)
        else:
            self._buckets.move_to_end(key_name)
        return bucket

    def _prune(self) -> None:
        """Drop refilled buckets from the least recently used end, then enforce ``max_buckets``.

        Stopping at the first bucket still refilling keeps this O(1) amortized; the hard cap makes
        memory bounded even when many key names are active at once (an evicted key starts full).
        """
        buckets = self._buckets
        while buckets and next(iter(buckets.values())).is_full():
            buckets.popitem(last=False)
            self._buckets_dropped += 1
        while len(buckets) >= self.max_buckets:
            buckets.popitem(last=False)
            self._buckets_dropped += 1

    @contextmanager
    def sync_slot(self) -> Iterator[None]:
        """Hold one of ``sync_max_inflight`` slots for the body of a ``with``, or raise a 429 at once.

        A plain (sync) context manager, so it also works around ``await`` in async code; the slot
        is released on any exit, cancellation included.
        """
        bound = self.limits.sync_max_inflight
        with self._lock:
            if self._sync_inflight >= bound:
                raise self._refuse(
                    "sync", f"{bound} waiting sync requests is the server's limit; use the async route",
                    _GLOBAL_LOC, self._queue_wait(self._sync_inflight, bound))
            self._sync_inflight += 1
            self._sync_admitted += 1
        metrics.admitted("sync_slot")
        try:
            yield
        finally:
            with self._lock:
                self._sync_inflight -= 1

    def stats(self) -> Dict[str, Any]:
        """Counters and estimates for the app's stats route."""
        with self._lock:
            return {
                "admitted": self._admitted,
                "refused": dict(self._refused),
                "sync_admitted": self._sync_admitted,
                "sync_inflight": self._sync_inflight,
                "sync_max_inflight": self.limits.sync_max_inflight,
                "recent_task_s": round(self.recent_task_s, 3),
                "recent_completions": len(self._completions),
                "parallelism": round(self._parallelism(), 3),
                "rate_buckets": len(self._buckets),
                "rate_buckets_dropped": self._buckets_dropped,
            }
