"""The Redis task store: task records shared by every replica of a cluster.

Layout, all under one key prefix:

- ``P:task:ID`` hash, one JSON-encoded value per ``TaskRecord`` field (plus ``idem_ref``);
- ``P:events:ID`` sorted set of JSON events scored by seq;
- ``P:unfinished`` (score: created_at) and ``P:lease`` (score: lease_until) sorted sets of the
  unfinished tasks, ``P:active:KEYNAME`` sets of each key name's unfinished tasks and the
  ``P:phases`` hash counting unfinished tasks per phase;
- ``P:finished`` and ``P:failed`` sorted sets of finished tasks scored by finish time;
- ``P:idem:HASH`` hash (task_id, digest) for each key name's idempotency key;
- ``P:settings`` hash of the service-wide settings (JSON values);
- ``P:started`` hash of each key name's latest task start (its last turn in the claim order).
- ``P:delivery:ID`` hash of one webhook delivery (JSON values) and ``P:outbox`` sorted set of the
  pending ones scored by when they are due.

Read-modify-writes WATCH the task's hash, apply the shared rules from ``serve.store.records`` and write the
record and every index in one MULTI, retrying when another client changed the hash in between, so
concurrent claimers anywhere in the cluster serialise. Finished records also get a Redis TTL a
little past ``ttl_s`` so they go away even when nothing purges. Leases compare wall-clock times
taken on the clients, so the replicas' clocks are assumed synchronised (NTP).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import redis

from serve.store.records import (
    MAX_EVENTS, PHASES, Delivery, IdempotencyConflict, Mutation, TaskEvent, TaskRecord, TaskStore,
    BUCKET_IDLE_S, DEFAULT_PRIORITY, apply_delivery_claim, apply_delivery_settle, check_bounds, claim_order,
    new_delivery, new_record, same_body, take_token,
)

_FIELDS = tuple(f.name for f in fields(TaskRecord))
_DELIVERY_FIELDS = tuple(f.name for f in fields(Delivery))
_BATCH = 500  # ids per purge round trip

# Deletes finished tasks (never unfinished ones: only ids still in the finished set), their events
# and their idempotency key when it still points at them. KEYS: finished, failed; ARGV: prefix, ids.
_PURGE_LUA = """
local removed = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    removed = removed + 1
    redis.call('ZREM', KEYS[2], id)
    local task = ARGV[1] .. ':task:' .. id
    local ref = redis.call('HGET', task, 'idem_ref')
    if ref then
      ref = cjson.decode(ref)
      if type(ref) == 'string' and redis.call('HGET', ref, 'task_id') == id then
        redis.call('DEL', ref)
      end
    end
    redis.call('DEL', task, ARGV[1] .. ':events:' .. id)
  end
end
return removed
"""


def _encode(record: TaskRecord) -> Dict[str, str]:
    return {name: json.dumps(getattr(record, name)) for name in _FIELDS}


def _decode(data: Dict[str, str]) -> TaskRecord:
    return TaskRecord(**{name: json.loads(data[name]) for name in _FIELDS if name in data})


def _decode_delivery(data: Dict[str, str]) -> Delivery:
    return Delivery(**{name: json.loads(data[name]) for name in _DELIVERY_FIELDS if name in data})


def _event_json(event: TaskEvent) -> str:
    return json.dumps(asdict(event), sort_keys=True)


class RedisTaskStore(TaskStore):
    """Tasks in Redis at ``url`` (``redis://host:port/db``), keys under ``prefix``."""

    def __init__(self, url: str, ttl_s: float = 86400.0, max_records: int = 10000,
                 prefix: str = "acestep", socket_timeout_s: float = 10.0,
                 clock: Optional[Callable[[], float]] = None):
        super().__init__(ttl_s=ttl_s, max_records=max_records, clock=clock)
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=socket_timeout_s)
        self._purge_script = self._redis.register_script(_PURGE_LUA)
        self._expire_s = int(math.ceil(self.ttl_s)) + 60  # purge normally removes them first

    # -- keys -----------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _task_key(self, task_id: str) -> str:
        return self._key("task", task_id)

    def _events_key(self, task_id: str) -> str:
        return self._key("events", task_id)

    def _active_key(self, key_name: str) -> str:
        return self._key("active", key_name)

    def _idem_key(self, key_name: str, idempotency_key: str) -> str:
        # Hashed so that any characters in either part make a distinct, bounded key.
        digest = hashlib.sha256(json.dumps([key_name, idempotency_key]).encode()).hexdigest()
        return self._key("idem", digest[:40])

    # -- transactions ---------------------------------------------------------------------------

    def _atomic(self, watch: List[str], body: Callable[[Any], Any]) -> Any:
        """Run ``body(pipe)`` with ``watch`` watched until its MULTI commits; ``body`` reads in
        immediate mode and calls ``pipe.multi()`` before queueing writes (or writes nothing)."""
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*watch)
                    value = body(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    else:
                        pipe.unwatch()
                    return value
                except redis.WatchError:
                    continue

    # -- writes ---------------------------------------------------------------------------------

    def create(self, request: Dict[str, Any], *, key_name: str = "", task_id: Optional[str] = None,
               idempotency_key: Optional[str] = None, body_digest: Optional[str] = None,
               owner: Optional[str] = None, lease_s: float = 0.0,
               bounds: Tuple[Optional[int], Optional[int]] = (None, None),
               priority: int = DEFAULT_PRIORITY) -> Tuple[str, bool]:
        self._maybe_purge()
        record, event = new_record(request, key_name=key_name, task_id=task_id,
                                   idempotency_key=idempotency_key, body_digest=body_digest,
                                   owner=owner, lease_s=lease_s, priority=priority, now=self.clock())
        task_key = self._task_key(record.task_id)
        idem_ref = None if idempotency_key is None else self._idem_key(record.key_name, idempotency_key)

        def body(pipe) -> Tuple[str, bool]:
            if idem_ref is not None:
                earlier = pipe.hgetall(idem_ref)
                if earlier and pipe.exists(self._task_key(earlier["task_id"])):
                    if not same_body(earlier.get("digest"), body_digest):
                        raise IdempotencyConflict(earlier["task_id"])
                    return earlier["task_id"], False
            if pipe.exists(task_key):
                return record.task_id, False
            check_bounds(bounds, lambda: int(pipe.zcard(self._key("unfinished"))),
                         lambda: int(pipe.scard(self._active_key(record.key_name))))
            pipe.multi()
            self._queue_insert(pipe, record, event, idem_ref)
            return record.task_id, True

        watch = [task_key] + ([idem_ref] if idem_ref else [])
        if bounds != (None, None):  # a finish or another create between the count and the insert retries
            watch += [self._key("unfinished"), self._active_key(record.key_name)]
        return self._atomic(watch, body)

    def _queue_insert(self, pipe, record: TaskRecord, event: TaskEvent, idem_ref: Optional[str]) -> None:
        task_id = record.task_id
        pipe.hset(self._task_key(task_id), mapping={**_encode(record), "idem_ref": json.dumps(idem_ref)})
        pipe.zadd(self._events_key(task_id), {_event_json(event): event.seq})
        pipe.zadd(self._key("unfinished"), {task_id: record.created_at})
        pipe.zadd(self._key("lease"), {task_id: record.lease_until})
        pipe.sadd(self._active_key(record.key_name), task_id)
        pipe.hincrby(self._key("phases"), record.phase, 1)
        if record.started_at:
            pipe.hset(self._key("started"), record.key_name, repr(record.started_at))
        if idem_ref is not None:
            pipe.hset(idem_ref, mapping={"task_id": task_id, "digest": record.body_digest or ""})

    def _mutate(self, task_id: str, mutation: Mutation) -> bool:
        task_key = self._task_key(task_id)

        def body(pipe) -> bool:
            data = pipe.hgetall(task_key)
            if not data:
                return False
            record = _decode(data)
            before, was_finished, now = record.phase, record.finished, self.clock()
            changed, event = mutation(record, now)
            if not changed:
                return False
            pipe.multi()
            self._queue_write(pipe, record, before, event, json.loads(data.get("idem_ref", "null")))
            if record.started_at != json.loads(data.get("started_at", "0")):  # its first claim
                pipe.hset(self._key("started"), record.key_name, repr(record.started_at))
            delivery = None if was_finished else new_delivery(record, now)
            if delivery is not None:
                self._queue_delivery(pipe, delivery)
            return True

        return self._atomic([task_key], body)

    def _queue_write(self, pipe, record: TaskRecord, before: str, event: Optional[TaskEvent],
                     idem_ref: Optional[str]) -> None:
        task_id = record.task_id
        pipe.hset(self._task_key(task_id), mapping=_encode(record))
        if event is not None:
            events_key = self._events_key(task_id)
            pipe.zadd(events_key, {_event_json(event): event.seq})
            if event.seq >= MAX_EVENTS:  # keep seq 0 and the newest MAX_EVENTS - 1
                pipe.zremrangebyscore(events_key, 1, event.seq - MAX_EVENTS + 1)
        if record.phase != before:  # the rules never change a finished record, so before is unfinished
            pipe.hincrby(self._key("phases"), before, -1)
        if record.finished:
            self._queue_finished(pipe, record, idem_ref)
            return
        if record.phase != before:
            pipe.hincrby(self._key("phases"), record.phase, 1)
        pipe.zadd(self._key("lease"), {task_id: record.lease_until})

    def _queue_finished(self, pipe, record: TaskRecord, idem_ref: Optional[str]) -> None:
        task_id = record.task_id
        pipe.zrem(self._key("unfinished"), task_id)
        pipe.zrem(self._key("lease"), task_id)
        pipe.srem(self._active_key(record.key_name), task_id)
        pipe.zadd(self._key("finished"), {task_id: record.updated_at})
        if record.phase == "failed":
            pipe.zadd(self._key("failed"), {task_id: record.updated_at})
        for key in (self._task_key(task_id), self._events_key(task_id), idem_ref):
            if key is not None:
                pipe.expire(key, self._expire_s)

    # -- webhook outbox ---------------------------------------------------------------------------

    def _delivery_key(self, delivery_id: str) -> str:
        return self._key("delivery", delivery_id)

    def _queue_delivery(self, pipe, delivery: Delivery) -> None:
        key = self._delivery_key(delivery.delivery_id)
        pipe.hset(key, mapping={name: json.dumps(getattr(delivery, name)) for name in _DELIVERY_FIELDS})
        if delivery.state == "pending":
            pipe.zadd(self._key("outbox"), {delivery.delivery_id: delivery.due_at})
        else:  # settled: kept as long as finished tasks are, for inspection
            pipe.zrem(self._key("outbox"), delivery.delivery_id)
            pipe.expire(key, self._expire_s)

    def _change_delivery(self, delivery_id: str, rule: Callable[[Delivery], bool]) -> Optional[Delivery]:
        key = self._delivery_key(delivery_id)

        def body(pipe) -> Optional[Delivery]:
            data = pipe.hgetall(key)
            if not data:
                return None
            delivery = _decode_delivery(data)
            if not rule(delivery):
                return None
            pipe.multi()
            self._queue_delivery(pipe, delivery)
            return delivery

        return self._atomic([key], body)

    def claim_deliveries(self, owner: str, lease_s: float, limit: int = 16) -> List[Delivery]:
        now = self.clock()
        due = self._redis.zrangebyscore(self._key("outbox"), "-inf", repr(now), start=0, num=int(limit))
        claimed = (self._change_delivery(d, lambda delivery: apply_delivery_claim(delivery, owner, lease_s, now))
                   for d in due)
        return [delivery for delivery in claimed if delivery is not None]

    def settle_delivery(self, delivery_id: str, owner: str, delivered: bool, retry_at: Optional[float] = None,
                        error: Optional[str] = None) -> bool:
        return self._change_delivery(delivery_id, lambda delivery: apply_delivery_settle(
            delivery, owner, delivered, retry_at, error, self.clock())) is not None

    def get_delivery(self, delivery_id: str) -> Optional[Delivery]:
        data = self._redis.hgetall(self._delivery_key(delivery_id))
        return _decode_delivery(data) if data else None

    def purge(self, now: Optional[float] = None) -> int:
        cutoff = (self.clock() if now is None else now) - self.ttl_s
        finished = self._key("finished")
        removed = 0
        while True:
            stale = self._redis.zrangebyscore(finished, "-inf", f"({cutoff!r}", start=0, num=_BATCH)
            if not stale:
                break
            removed += self._delete(stale)
        while True:
            excess = self._redis.zcard(self._key("unfinished")) + self._redis.zcard(finished) - self.max_records
            oldest = self._redis.zrange(finished, 0, min(excess, _BATCH) - 1) if excess > 0 else []
            if not oldest:
                break
            removed += self._delete(oldest)
        return removed

    def _delete(self, task_ids: List[str]) -> int:
        return int(self._purge_script(keys=[self._key("finished"), self._key("failed")],
                                      args=[self.prefix, *task_ids]))

    # -- reads ----------------------------------------------------------------------------------

    def count_unfinished(self, key_name: Optional[str] = None) -> int:
        if key_name is None:
            return int(self._redis.zcard(self._key("unfinished")))
        return int(self._redis.scard(self._active_key(key_name)))

    def get(self, task_id: str) -> Optional[TaskRecord]:
        data = self._redis.hgetall(self._task_key(task_id))
        return _decode(data) if data else None

    def get_many(self, task_ids: Iterable[str]) -> Dict[str, Optional[TaskRecord]]:
        wanted = list(dict.fromkeys(task_ids))
        with self._redis.pipeline(transaction=False) as pipe:
            for task_id in wanted:
                pipe.hgetall(self._task_key(task_id))
            rows = pipe.execute()
        return {task_id: (_decode(data) if data else None) for task_id, data in zip(wanted, rows)}

    def events(self, task_id: str, after: int = -1) -> Optional[List[TaskEvent]]:
        with self._redis.pipeline(transaction=True) as pipe:  # one snapshot: existence and events
            pipe.exists(self._task_key(task_id))
            pipe.zrangebyscore(self._events_key(task_id), f"({int(after)}", "+inf")
            exists, rows = pipe.execute()
        if not exists:
            return None
        return [TaskEvent(**json.loads(row)) for row in rows]

    def expired(self, limit: int = 100) -> List[str]:
        now = self.clock()
        due = self._redis.zrangebyscore(self._key("lease"), "-inf", f"({now!r}")
        if not due:
            return []
        created = self._redis.zmscore(self._key("unfinished"), due)
        ordered = sorted((score, task_id) for task_id, score in zip(due, created) if score is not None)
        live = self._redis.zrangebyscore(self._key("lease"), repr(now), "+inf")
        with self._redis.pipeline(transaction=False) as pipe:
            for _, task_id in ordered:
                pipe.hmget(self._task_key(task_id), "key_name", "priority")
            for task_id in live:
                pipe.hget(self._task_key(task_id), "key_name")
            pipe.hgetall(self._key("started"))
            rows = pipe.execute()
        claimable = [(task_id, json.loads(key or '""'), json.loads(priority or str(DEFAULT_PRIORITY)))
                     for (_, task_id), (key, priority) in zip(ordered, rows)]
        in_flight: Dict[str, int] = {}
        for key in rows[len(ordered):-1]:
            if key is not None:
                in_flight[json.loads(key)] = in_flight.get(json.loads(key), 0) + 1
        last_started = {name: float(value) for name, value in rows[-1].items()}
        return claim_order(claimable, in_flight, last_started, limit)

    def stats(self) -> Dict[str, Any]:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("phases"))
            pipe.zcard(self._key("unfinished"))
            pipe.zcard(self._key("finished"))
            pipe.zcard(self._key("failed"))
            unfinished_phases, unfinished, finished, failed = pipe.execute()
        counts = {phase: 0 for phase in PHASES}
        for phase, count in unfinished_phases.items():
            counts[phase] = max(int(count), 0)
        counts["done"], counts["failed"] = finished - failed, failed
        return {"tasks": counts, "records": unfinished + finished}

    def take_token(self, bucket: str, rate_per_s: float, burst: float, now: Optional[float] = None) -> float:
        key = self._key("bucket", bucket)

        def body(pipe) -> float:
            stored = pipe.hgetall(key)
            at = self.clock() if now is None else now
            tokens, wait = take_token(float(stored["tokens"]) if stored else None,
                                      float(stored.get("updated", at)) if stored else at, rate_per_s, burst, at)
            pipe.multi()
            pipe.hset(key, mapping={"tokens": repr(tokens), "updated": repr(at)})
            pipe.expire(key, int(BUCKET_IDLE_S))
            return wait

        return self._atomic([key], body)

    def get_setting(self, name: str) -> Optional[Any]:
        value = self._redis.hget(self._key("settings"), name)
        return None if value is None else json.loads(value)

    def put_setting(self, name: str, value: Any) -> None:
        self._redis.hset(self._key("settings"), name, json.dumps(value))

    def settings(self, prefix: str) -> Dict[str, Any]:
        # a handful of entries (defaults, one per DiT replica holding adapters): one round trip
        stored = self._redis.hgetall(self._key("settings"))
        return {name: json.loads(value) for name, value in stored.items() if name.startswith(prefix)}

    def delete_setting(self, name: str) -> None:
        self._redis.hdel(self._key("settings"), name)

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._redis.close()
