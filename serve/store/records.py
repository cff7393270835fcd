"""Durable task records and the store interface they live behind.

A task is one asynchronous generation request: its record holds the request (enough to re-run it),
forward-only progress, the result or a failure code, and a lease saying which ingress replica drives
it. ``TaskStore`` is plain and synchronous so that any process can use it; two backends implement it:
``serve.store.sqlite`` (one file shared by the processes of one machine, the default) and
``serve.store.redis`` (shared by a cluster). ``open_task_store`` picks one from a URL, and
``wait_events`` / ``wait_final`` let async callers poll without blocking their event loop.

The state rules (what an update, finish, fail or claim may change) are written once here as
``apply_*`` functions over a ``TaskRecord``; a backend only has to run them atomically.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from acestep.fairness import DEFAULT_PRIORITY, Entry, fair_order

# prepare / train: a dataset or training job's phases (``serve.training``); generation never uses them
PHASES = ("queued", "lm", "dit", "encode", "prepare", "train", "done", "failed")
FINAL_PHASES = ("done", "failed")
_RANK = {name: rank for rank, name in enumerate(PHASES)}
_RANK["failed"] = _RANK["done"]

# Events kept per task: the first (queued) one plus the newest, so an LM that reports every few
# tokens cannot grow a record without bound.
MAX_EVENTS = 256


@dataclass
class TaskEvent:
    seq: int
    phase: str
    progress: float
    message: str
    time: float
    detail: Optional[Dict[str, Any]] = None  # e.g. the LM's {lm_phase, tokens_done, tokens_expected}


@dataclass
class TaskRecord:
    task_id: str
    key_name: str = ""
    phase: str = "queued"
    progress: float = 0.0
    message: str = ""
    detail: Optional[Dict[str, Any]] = None
    created_at: float = 0.0
    updated_at: float = 0.0
    request: Optional[Dict[str, Any]] = None
    result: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    attempts: int = 0
    owner: Optional[str] = None
    lease_until: float = 0.0
    idempotency_key: Optional[str] = None
    body_digest: Optional[str] = None
    last_seq: int = 0  # seq of the newest event, so the next one is numbered without reading events
    priority: int = DEFAULT_PRIORITY  # the task's class rank (acestep.fairness): its place in the claim order
    started_at: float = 0.0  # when a driver first claimed it (0: never); a key's latest is its last turn

    @property
    def finished(self) -> bool:
        return self.phase in FINAL_PHASES

    def summary(self) -> Dict[str, Any]:
        """The public view: no request, lease, owner, key name or digests."""
        return {
            "task_id": self.task_id, "phase": self.phase, "progress": self.progress,
            "message": self.message, "finished": self.finished, "created_at": self.created_at,
            "updated_at": self.updated_at, "result": self.result, "error": self.error,
            "detail": self.detail, "attempts": self.attempts,
        }


@dataclass
class Delivery:
    """One webhook call owed for a finished task (the outbox row). ``payload`` is the body's
    object, frozen when the task finished so that every attempt sends the same bytes; ``due_at`` is
    when it may be sent next (a claim pushes it one lease ahead, so a sender that dies mid-call
    leaves it due again); ``state`` is pending, delivered or abandoned (attempts ran out)."""

    delivery_id: str
    task_id: str
    key_name: str
    url: str
    event: str
    payload: Dict[str, Any]
    state: str = "pending"
    attempts: int = 0
    due_at: float = 0.0
    owner: Optional[str] = None
    created_at: float = 0.0
    updated_at: float = 0.0
    last_error: Optional[str] = None


WEBHOOK_FIELD = "webhook_url"  # where a task's stored request keeps its webhook (in its extras)


class StoreFull(Exception):
    """A create refused by its bounds; ``scope`` is "global" or "key", ``unfinished`` the count."""

    def __init__(self, scope: str, unfinished: int):
        super().__init__(f"{scope} bound reached at {unfinished} unfinished tasks")
        self.scope, self.unfinished = scope, unfinished


def check_bounds(bounds: Tuple[Optional[int], Optional[int]], count_all: Callable[[], int],
                 count_key: Callable[[], int]) -> None:
    """Raise StoreFull when one more unfinished task would pass a bound (None: no bound)."""
    limit, key_limit = bounds
    if limit is not None:
        unfinished = count_all()
        if unfinished >= limit:
            raise StoreFull("global", unfinished)
    if key_limit is not None:
        mine = count_key()
        if mine >= key_limit:
            raise StoreFull("key", mine)


class IdempotencyConflict(Exception):
    """The idempotency key was already used (by the same key name) with a different body."""

    def __init__(self, task_id: str):
        super().__init__(f"idempotency key already used for task {task_id} with a different body")
        self.task_id = task_id


# -- state rules shared by the backends ---------------------------------------------------------

def new_record(request: Dict[str, Any], *, key_name: str = "", task_id: Optional[str] = None,
               idempotency_key: Optional[str] = None, body_digest: Optional[str] = None,
               owner: Optional[str] = None, lease_s: float = 0.0, priority: int = DEFAULT_PRIORITY,
               now: Optional[float] = None) -> Tuple[TaskRecord, TaskEvent]:
    """A queued record and its first event; claimed already when ``owner`` is given."""
    now = time.time() if now is None else now
    record = TaskRecord(
        task_id=task_id or uuid.uuid4().hex, key_name=key_name or "", message="queued",
        created_at=now, updated_at=now, request=dict(request or {}),
        idempotency_key=idempotency_key, body_digest=body_digest, priority=int(priority),
    )
    if owner is not None:
        record.owner, record.lease_until, record.attempts, record.started_at = owner, now + lease_s, 1, now
    return record, TaskEvent(0, "queued", 0.0, "queued", now)


def same_body(stored_digest: Optional[str], digest: Optional[str]) -> bool:
    return (stored_digest or "") == (digest or "")


def _advance(record: TaskRecord, phase: str, progress: float, message: str,
             detail: Optional[Dict[str, Any]], now: float) -> TaskEvent:
    record.phase, record.progress, record.message = phase, progress, message
    record.detail, record.updated_at = detail, now
    record.last_seq += 1
    return TaskEvent(record.last_seq, phase, progress, message, now, detail)


def apply_update(record: TaskRecord, phase: str, progress: float, message: str,
                 detail: Optional[Dict[str, Any]], now: float) -> Optional[TaskEvent]:
    """Move forward (phase order, then fraction); None for a stale, backward or final update."""
    if record.finished or phase not in _RANK:
        return None
    progress = float(progress)
    if progress != progress:  # NaN compares false both ways and would slip past the checks
        return None
    progress = min(max(progress, 0.0), 1.0)
    if _RANK[phase] < _RANK[record.phase] or (phase == record.phase and progress <= record.progress):
        return None
    return _advance(record, phase, max(progress, record.progress), message, detail, now)


def apply_finish(record: TaskRecord, result: Dict[str, Any], now: float) -> Optional[TaskEvent]:
    if record.finished:
        return None
    record.result = result
    return _advance(record, "done", 1.0, "done", None, now)


def apply_fail(record: TaskRecord, code: str, message: str, now: float) -> Optional[TaskEvent]:
    if record.finished:
        return None
    record.error = code
    return _advance(record, "failed", record.progress, message or code, None, now)


def lease_free(record: TaskRecord, owner: Optional[str], now: float) -> bool:
    return record.owner is None or record.lease_until < now or record.owner == owner


def apply_claim(record: TaskRecord, owner: str, lease_s: float, now: float) -> bool:
    if record.finished or not lease_free(record, owner, now):
        return False
    record.owner, record.lease_until = owner, now + lease_s
    record.attempts += 1
    record.started_at = record.started_at or now
    return True


def apply_renew(record: TaskRecord, owner: str, lease_s: float, now: float) -> bool:
    if record.finished or record.owner != owner:
        return False
    record.lease_until = now + lease_s
    return True


def apply_release(record: TaskRecord, owner: str, now: float) -> bool:
    if record.finished or record.owner != owner:
        return False
    record.owner, record.lease_until = None, 0.0
    return True


def new_delivery(record: TaskRecord, now: float) -> Optional[Delivery]:
    """The webhook delivery a just-finished record owes (None when its request named no webhook):
    written by the backend in the transaction that finishes the task, so a crash between finishing
    and calling loses nothing. Its id is stable per task and event: receivers de-duplicate on it."""
    url = ((record.request or {}).get("extras") or {}).get(WEBHOOK_FIELD)
    if not record.finished or not url:
        return None
    event = f"task.{record.phase}"
    delivery_id = f"{record.task_id}.{record.phase}"
    payload = {"id": delivery_id, "event": event, "created_at": now, "task": record.summary()}
    return Delivery(delivery_id=delivery_id, task_id=record.task_id, key_name=record.key_name, url=url,
                    event=event, payload=payload, due_at=now, created_at=now, updated_at=now)


def apply_delivery_claim(delivery: Delivery, owner: str, lease_s: float, now: float) -> bool:
    if delivery.state != "pending" or delivery.due_at > now:
        return False
    delivery.owner, delivery.due_at, delivery.updated_at = owner, now + lease_s, now
    delivery.attempts += 1
    return True


def apply_delivery_settle(delivery: Delivery, owner: str, delivered: bool, retry_at: Optional[float],
                          error: Optional[str], now: float) -> bool:
    """Delivered, rescheduled at ``retry_at``, or abandoned (``retry_at`` None); only by the sender
    holding the claim (one whose lease lapsed and was re-claimed no longer does)."""
    if delivery.state != "pending" or delivery.owner != owner:
        return False
    delivery.owner, delivery.updated_at, delivery.last_error = None, now, error
    if delivered:
        delivery.state = "delivered"
    elif retry_at is None:
        delivery.state = "abandoned"
    else:
        delivery.due_at = retry_at
    return True


# A rule run inside a backend's transaction: returns (changed, event to append or None).
Mutation = Callable[[TaskRecord, float], Tuple[bool, Optional[TaskEvent]]]


def _event_rule(rule: Callable[..., Optional[TaskEvent]], *args) -> Mutation:
    def run(record: TaskRecord, now: float):
        event = rule(record, *args, now)
        return event is not None, event
    return run


def _lease_rule(rule: Callable[..., bool], *args) -> Mutation:
    def run(record: TaskRecord, now: float):
        return rule(record, *args, now), None
    return run


# A bucket idle this long is full again (admission's rates are at least one request per minute), so
# stores may forget it.
BUCKET_IDLE_S = 3600.0


def take_token(tokens: Optional[float], updated: float, rate_per_s: float, burst: float,
               now: float) -> Tuple[float, float]:
    """One take from a token bucket of ``burst`` tokens refilled at ``rate_per_s`` (``tokens`` None:
    a new bucket, full) → (tokens left, wait): wait is 0.0 when a token was taken, else the seconds
    until one is there, and nothing is taken."""
    level = burst if tokens is None else min(burst, tokens + max(0.0, now - updated) * rate_per_s)
    if level >= 1.0:
        return level - 1.0, 0.0
    return level, (1.0 - level) / rate_per_s


# -- the claim order ----------------------------------------------------------------------------

Claimable = Tuple[str, str, int]  # (task_id, key_name, priority), oldest created first


def claim_order(claimable: List[Claimable], in_flight: Dict[str, int], last_started: Dict[str, float],
                limit: int) -> List[str]:
    """The order drivers claim tasks in: ``acestep.fairness``'s rule over the key names, with the
    tasks each key has under a live lease as its work in service and its latest start as its last
    turn, so that one key's backlog takes turns with every other key's next task."""
    entries = [Entry(key_name, priority) for _, key_name, priority in claimable]
    order = fair_order(entries, {k: float(n) for k, n in in_flight.items()}, last_started, limit=int(limit))
    return [claimable[i][0] for i in order]


# -- the interface ------------------------------------------------------------------------------

class TaskStore(abc.ABC):
    """Tasks, their events and leases. Synchronous; safe from many threads and processes at once.

    Finished records live ``ttl_s`` seconds and at most ``max_records`` records are kept (unfinished
    ones are never deleted); ``create`` purges every ``purge_every`` calls so storage stays flat.
    ``clock`` is the wall clock (seconds) that times, leases and ages are read from (``time.time``
    when None); every client of one store must share it.
    """

    def __init__(self, ttl_s: float = 86400.0, max_records: int = 10000,
                 clock: Optional[Callable[[], float]] = None):
        self.clock: Callable[[], float] = clock or time.time
        self.ttl_s = float(ttl_s)
        self.max_records = int(max_records)
        self.purge_every = max(1, min(100, self.max_records // 10))
        self._creates = 0

    def _maybe_purge(self) -> None:
        self._creates += 1  # a lost increment from a thread race only delays one purge
        if self._creates % self.purge_every == 0:
            self.purge()

    @abc.abstractmethod
    def _mutate(self, task_id: str, mutation: Mutation) -> bool:
        """Run ``mutation`` on the stored record atomically; store it (and its event) if changed."""

    @abc.abstractmethod
    def create(self, request: Dict[str, Any], *, key_name: str = "", task_id: Optional[str] = None,
               idempotency_key: Optional[str] = None, body_digest: Optional[str] = None,
               owner: Optional[str] = None, lease_s: float = 0.0,
               bounds: Tuple[Optional[int], Optional[int]] = (None, None),
               priority: int = DEFAULT_PRIORITY) -> Tuple[str, bool]:
        """(task_id, created). An idempotency key already used by ``key_name`` gives the earlier id
        (same body digest) or raises IdempotencyConflict; an existing ``task_id`` gives (id, False).
        ``bounds`` = (most unfinished tasks in all, most for ``key_name``): a new record that would
        pass either raises StoreFull, checked in the same transaction as the insert, so concurrent
        creators on any replica never overshoot. ``priority``: the task's class rank (its place in
        the claim order, ``claim_order``)."""

    @abc.abstractmethod
    def count_unfinished(self, key_name: Optional[str] = None) -> int:
        """Unfinished tasks, all of them or one key name's."""

    def update(self, task_id: str, phase: str, progress: float, message: str = "",
               detail: Optional[Dict[str, Any]] = None) -> bool:
        """Move a task forward; unknown, final, backward or not-newer updates return False."""
        return self._mutate(task_id, _event_rule(apply_update, phase, progress, message, detail))

    def finish(self, task_id: str, result: Dict[str, Any]) -> bool:
        """Mark an unfinished task done with ``result``; written once."""
        return self._mutate(task_id, _event_rule(apply_finish, result))

    def fail(self, task_id: str, code: str, message: str = "") -> bool:
        """Mark an unfinished task failed with error ``code``."""
        return self._mutate(task_id, _event_rule(apply_fail, code, message))

    def claim(self, task_id: str, owner: str, lease_s: float) -> bool:
        """Take an unfinished task whose lease is free; exactly one concurrent claimer wins."""
        return self._mutate(task_id, _lease_rule(apply_claim, owner, lease_s))

    def renew(self, task_id: str, owner: str, lease_s: float) -> bool:
        return self._mutate(task_id, _lease_rule(apply_renew, owner, lease_s))

    def release(self, task_id: str, owner: str) -> bool:
        """Give an unfinished task back, phase unchanged, so that another replica re-drives it."""
        return self._mutate(task_id, _lease_rule(apply_release, owner))

    @abc.abstractmethod
    def claim_deliveries(self, owner: str, lease_s: float, limit: int = 16) -> List[Delivery]:
        """Pending webhook deliveries that are due, oldest due first, each claimed for ``lease_s``
        (its attempt counted); a delivery goes to exactly one concurrent claimer."""

    @abc.abstractmethod
    def settle_delivery(self, delivery_id: str, owner: str, delivered: bool, retry_at: Optional[float] = None,
                        error: Optional[str] = None) -> bool:
        """``apply_delivery_settle`` on the stored delivery; False when ``owner`` no longer holds it."""

    @abc.abstractmethod
    def get_delivery(self, delivery_id: str) -> Optional[Delivery]:
        ...

    @abc.abstractmethod
    def get(self, task_id: str) -> Optional[TaskRecord]:
        ...

    @abc.abstractmethod
    def get_many(self, task_ids: Iterable[str]) -> Dict[str, Optional[TaskRecord]]:
        ...

    @abc.abstractmethod
    def events(self, task_id: str, after: int = -1) -> Optional[List[TaskEvent]]:
        """Stored events with ``seq > after`` in order; None for an unknown task."""

    @abc.abstractmethod
    def expired(self, limit: int = 100) -> List[str]:
        """Unfinished tasks whose lease is free or expired, in the claim order (``claim_order``:
        priority class, then fair share over key names; one key alone: oldest created first)."""

    @abc.abstractmethod
    def stats(self) -> Dict[str, Any]:
        """{"tasks": {phase: count for every phase}, "records": total}."""

    @abc.abstractmethod
    def purge(self, now: Optional[float] = None) -> int:
        """Delete finished records past the TTL, then the oldest finished beyond the record cap."""

    @abc.abstractmethod
    def get_setting(self, name: str) -> Optional[Any]:
        """A service-wide setting every replica shares (JSON), or None when never set."""

    @abc.abstractmethod
    def put_setting(self, name: str, value: Any) -> None:
        ...

    @abc.abstractmethod
    def take_token(self, bucket: str, rate_per_s: float, burst: float, now: Optional[float] = None) -> float:
        """``take_token`` on the named bucket, atomically for every process using this store: 0.0
        when a token was taken, else the seconds until one is there."""

    @abc.abstractmethod
    def settings(self, prefix: str) -> Dict[str, Any]:
        """{name: value} of the settings whose names start with ``prefix``."""

    @abc.abstractmethod
    def delete_setting(self, name: str) -> None:
        """Forget ``name`` (nothing happens when it is not set)."""

    @abc.abstractmethod
    def ping(self) -> bool:
        ...

    @abc.abstractmethod
    def close(self) -> None:
        ...


# -- polling helpers for async callers ----------------------------------------------------------

async def wait_events(store: TaskStore, task_id: str, after: int = -1, timeout_s: float = 15.0,
                      poll_s: float = 0.2) -> Optional[List[TaskEvent]]:
    """Events with ``seq > after``, waiting up to ``timeout_s`` for one ([] on timeout); None for
    an unknown task."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = await asyncio.to_thread(store.events, task_id, after)
        if events is None or events:
            return events
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        await asyncio.sleep(min(poll_s, left))


async def wait_final(store: TaskStore, task_id: str, timeout_s: float,
                     poll_s: float = 0.2) -> Optional[str]:
    """The phase once final, or the current phase after ``timeout_s``; None for an unknown task."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = await asyncio.to_thread(store.get, task_id)
        if record is None or record.finished:
            return None if record is None else record.phase
        left = deadline - time.monotonic()
        if left <= 0:
            return record.phase
        await asyncio.sleep(min(poll_s, left))


async def sse_events(store: TaskStore, task_id: str, after: int, heartbeat_s: float = 15.0):
    """Server-sent events in order, a comment line every ``heartbeat_s`` of quiet; ends at done/failed."""
    quiet_since = time.monotonic()
    while True:
        events = await asyncio.to_thread(store.events, task_id, after)
        if events is None:
            return
        for event in events:
            after = event.seq
            yield f"id: {after}\nevent: {event.phase}\ndata: {json.dumps(dataclasses.asdict(event))}\n\n"
            if event.phase in FINAL_PHASES:
                return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= heartbeat_s:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.25)
