"""The SQLite task store: one database file shared by the processes of one machine.

WAL mode lets readers run while one writer commits; every read-modify-write runs inside
``BEGIN IMMEDIATE`` (the write lock is taken before reading), so concurrent claimers in any process
serialise and exactly one wins. Each thread gets its own connection; ``busy_timeout`` makes a
connection wait for the lock instead of failing. Partial indexes over unfinished rows keep counting,
lease sweeps and purges proportional to the rows they touch.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from serve.store.records import (
    MAX_EVENTS, PHASES, Delivery, IdempotencyConflict, Mutation, TaskEvent, TaskRecord, TaskStore,
    BUCKET_IDLE_S, DEFAULT_PRIORITY, apply_delivery_claim, apply_delivery_settle, check_bounds, claim_order,
    new_delivery, new_record, same_body, take_token,
)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tasks (
        task_id TEXT PRIMARY KEY, key_name TEXT NOT NULL, phase TEXT NOT NULL,
        finished INTEGER NOT NULL, progress REAL NOT NULL, message TEXT NOT NULL, detail TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, request TEXT, result TEXT, error TEXT,
        attempts INTEGER NOT NULL, owner TEXT, lease_until REAL NOT NULL, idempotency_key TEXT,
        body_digest TEXT, last_seq INTEGER NOT NULL, priority INTEGER NOT NULL DEFAULT 1,
        started_at REAL NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS events (
        task_id TEXT NOT NULL, seq INTEGER NOT NULL, phase TEXT NOT NULL, progress REAL NOT NULL,
        message TEXT NOT NULL, time REAL NOT NULL, detail TEXT, PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS deliveries (
        delivery_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, key_name TEXT NOT NULL, url TEXT NOT NULL,
        event TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
        due_at REAL NOT NULL, owner TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, last_error TEXT)""",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due_at) WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS tasks_phase ON tasks (phase)",
    "CREATE INDEX IF NOT EXISTS tasks_unfinished_key ON tasks (key_name) WHERE finished = 0",
    "CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (lease_until) WHERE finished = 0",
    "CREATE INDEX IF NOT EXISTS tasks_finished_age ON tasks (updated_at) WHERE finished = 1",
    """CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (key_name, idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
)
# Columns added since the first schema: a file written before them gets them on open.
_ADDED_COLUMNS = (("priority", "INTEGER NOT NULL DEFAULT 1"), ("started_at", "REAL NOT NULL DEFAULT 0"))
_LATE_INDEXES = ("CREATE INDEX IF NOT EXISTS tasks_key_started ON tasks (key_name, started_at)",)
# The claimable tasks, at most ``limit`` per (key, class), oldest first: enough for any claim order.
_CLAIMABLE = """SELECT task_id, key_name, priority FROM (
    SELECT task_id, key_name, priority, created_at,
           ROW_NUMBER() OVER (PARTITION BY key_name, priority ORDER BY created_at) AS n
    FROM tasks WHERE finished = 0 AND lease_until < ?) WHERE n <= ? ORDER BY created_at"""

_JSON_COLUMNS = ("detail", "request", "result")
_COLUMNS = tuple(f.name for f in fields(TaskRecord))
_COUNT = "SELECT COUNT(*) FROM tasks WHERE finished = 0"
_INSERT = (f"INSERT INTO tasks ({', '.join(_COLUMNS)}, finished) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)}, ?)")
_MUTABLE = ("phase", "progress", "message", "detail", "updated_at", "result", "error", "attempts",
            "owner", "lease_until", "last_seq", "started_at")
_UPDATE = f"UPDATE tasks SET {', '.join(c + ' = ?' for c in _MUTABLE)}, finished = ? WHERE task_id = ?"
_DELIVERY_COLUMNS = tuple(f.name for f in fields(Delivery))
_DELIVERY_INSERT = (f"INSERT OR IGNORE INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in _DELIVERY_COLUMNS)})")
_DELIVERY_UPDATE = ("UPDATE deliveries SET state = ?, attempts = ?, due_at = ?, owner = ?, updated_at = ?, "
                    "last_error = ? WHERE delivery_id = ?")
_CHUNK = 500  # ids per IN (...) query, well below SQLite's bound-parameter limit


def _dumps(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value)


def _loads(text: Optional[str]) -> Any:
    return None if text is None else json.loads(text)


def _column_values(record: TaskRecord, columns: Iterable[str]) -> List[Any]:
    values = []
    for column in columns:
        value = getattr(record, column)
        values.append(_dumps(value) if column in _JSON_COLUMNS else value)
    return values


def _record_from_row(row: sqlite3.Row) -> TaskRecord:
    data = {column: row[column] for column in _COLUMNS}
    for column in _JSON_COLUMNS:
        data[column] = _loads(data[column])
    return TaskRecord(**data)


def _delivery_values(delivery: Delivery) -> List[Any]:
    return [_dumps(getattr(delivery, c)) if c == "payload" else getattr(delivery, c) for c in _DELIVERY_COLUMNS]


def _delivery_from_row(row: sqlite3.Row) -> Delivery:
    data = {column: row[column] for column in _DELIVERY_COLUMNS}
    data["payload"] = _loads(data["payload"])
    return Delivery(**data)


def _event_from_row(row: sqlite3.Row) -> TaskEvent:
    return TaskEvent(row["seq"], row["phase"], row["progress"], row["message"], row["time"],
                     _loads(row["detail"]))


def _chunks(items: List[str]) -> Iterator[List[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


class SQLiteTaskStore(TaskStore):
    """Tasks in one SQLite file (created with its parent directories if missing)."""

    def __init__(self, path: str, ttl_s: float = 86400.0, max_records: int = 10000,
                 busy_timeout_s: float = 30.0, clock: Optional[Callable[[], float]] = None):
        super().__init__(ttl_s=ttl_s, max_records=max_records, clock=clock)
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: List[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self._transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            present = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
            for column, declaration in _ADDED_COLUMNS:
                if column not in present:
                    conn.execute(f"ALTER TABLE tasks ADD COLUMN {column} {declaration}")
            for statement in _LATE_INDEXES:
                conn.execute(statement)

    # -- connections and transactions -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL mode
        with self._lock:
            self._connections.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        # A connection must not cross a fork: the pid check gives a forked child its own.
        conn, pid = getattr(self._local, "conn", None), getattr(self._local, "pid", None)
        if conn is None or pid != os.getpid():
            conn = self._connect()
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
        with self._transaction() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT task_id, body_digest FROM tasks WHERE key_name = ? AND idempotency_key = ?",
                    (record.key_name, idempotency_key)).fetchone()
                if row is not None:
                    if not same_body(row["body_digest"], body_digest):
                        raise IdempotencyConflict(row["task_id"])
                    return row["task_id"], False
            if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (record.task_id,)).fetchone():
                return record.task_id, False
            check_bounds(bounds, lambda: conn.execute(_COUNT).fetchone()[0],
                         lambda: conn.execute(_COUNT + " AND key_name = ?", (record.key_name,)).fetchone()[0])
            conn.execute(_INSERT, [*_column_values(record, _COLUMNS), 0])
            self._insert_event(conn, record.task_id, event)
        return record.task_id, True

    def _mutate(self, task_id: str, mutation: Mutation) -> bool:
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return False
            record = _record_from_row(row)
            was_finished, now = record.finished, self.clock()
            changed, event = mutation(record, now)
            if not changed:
                return False
            conn.execute(_UPDATE, [*_column_values(record, _MUTABLE), int(record.finished), task_id])
            if event is not None:
                self._insert_event(conn, task_id, event)
            delivery = None if was_finished else new_delivery(record, now)
            if delivery is not None:
                conn.execute(_DELIVERY_INSERT, _delivery_values(delivery))
        return True

    # -- webhook outbox ---------------------------------------------------------------------------

    def claim_deliveries(self, owner: str, lease_s: float, limit: int = 16) -> List[Delivery]:
        now = self.clock()
        # every replica asks every few seconds: a plain read first, so an empty outbox takes no write lock
        if self._conn().execute("SELECT 1 FROM deliveries WHERE state = 'pending' AND due_at <= ? LIMIT 1",
                                (now,)).fetchone() is None:
            return []
        with self._transaction() as conn:
            rows = conn.execute("SELECT * FROM deliveries WHERE state = 'pending' AND due_at <= ? "
                                "ORDER BY due_at LIMIT ?", (now, int(limit))).fetchall()
            claimed = []
            for row in rows:
                delivery = _delivery_from_row(row)
                if apply_delivery_claim(delivery, owner, lease_s, now):
                    self._update_delivery(conn, delivery)
                    claimed.append(delivery)
        return claimed

    def settle_delivery(self, delivery_id: str, owner: str, delivered: bool, retry_at: Optional[float] = None,
                        error: Optional[str] = None) -> bool:
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
            if row is None:
                return False
            delivery = _delivery_from_row(row)
            if not apply_delivery_settle(delivery, owner, delivered, retry_at, error, self.clock()):
                return False
            self._update_delivery(conn, delivery)
        return True

    @staticmethod
    def _update_delivery(conn: sqlite3.Connection, delivery: Delivery) -> None:
        conn.execute(_DELIVERY_UPDATE, (delivery.state, delivery.attempts, delivery.due_at, delivery.owner,
                                        delivery.updated_at, delivery.last_error, delivery.delivery_id))

    def get_delivery(self, delivery_id: str) -> Optional[Delivery]:
        row = self._conn().execute("SELECT * FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
        return None if row is None else _delivery_from_row(row)

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, task_id: str, event: TaskEvent) -> None:
        conn.execute("INSERT INTO events (task_id, seq, phase, progress, message, time, detail) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (task_id, event.seq, event.phase, event.progress, event.message, event.time,
                      _dumps(event.detail)))
        if event.seq >= MAX_EVENTS:  # keep seq 0 and the newest MAX_EVENTS - 1
            conn.execute("DELETE FROM events WHERE task_id = ? AND seq > 0 AND seq <= ?",
                         (task_id, event.seq - MAX_EVENTS + 1))

    def take_token(self, bucket: str, rate_per_s: float, burst: float, now: Optional[float] = None) -> float:
        now = self.clock() if now is None else now
        with self._transaction() as conn:
            row = conn.execute("SELECT tokens, updated FROM buckets WHERE name = ?", (bucket,)).fetchone()
            tokens, wait = take_token(row[0] if row else None, row[1] if row else now, rate_per_s, burst, now)
            conn.execute("INSERT INTO buckets (name, tokens, updated) VALUES (?, ?, ?) ON CONFLICT(name) "
                         "DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated", (bucket, tokens, now))
        return wait

    def purge(self, now: Optional[float] = None) -> int:
        now = self.clock() if now is None else now
        cutoff = now - self.ttl_s
        with self._transaction() as conn:
            conn.execute("DELETE FROM buckets WHERE updated < ?", (now - BUCKET_IDLE_S,))
            # settled deliveries go with the TTL; pending ones stay until sent or abandoned
            conn.execute("DELETE FROM deliveries WHERE state != 'pending' AND updated_at < ?", (cutoff,))
            stale = [row[0] for row in conn.execute(
                "SELECT task_id FROM tasks WHERE finished = 1 AND updated_at < ?", (cutoff,))]
            self._delete(conn, stale)
            excess = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] - self.max_records
            oldest = []
            if excess > 0:
                oldest = [row[0] for row in conn.execute(
                    "SELECT task_id FROM tasks WHERE finished = 1 ORDER BY updated_at LIMIT ?",
                    (excess,))]
                self._delete(conn, oldest)
        return len(stale) + len(oldest)

    @staticmethod
    def _delete(conn: sqlite3.Connection, task_ids: List[str]) -> None:
        for chunk in _chunks(task_ids):
            marks = ", ".join("?" for _ in chunk)
            conn.execute(f"DELETE FROM events WHERE task_id IN ({marks})", chunk)
            conn.execute(f"DELETE FROM tasks WHERE task_id IN ({marks}) AND finished = 1", chunk)

    # -- reads ----------------------------------------------------------------------------------

    def count_unfinished(self, key_name: Optional[str] = None) -> int:
        if key_name is None:
            query, args = _COUNT, ()
        else:
            query, args = _COUNT + " AND key_name = ?", (key_name,)
        return self._conn().execute(query, args).fetchone()[0]

    def get(self, task_id: str) -> Optional[TaskRecord]:
        row = self._conn().execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else _record_from_row(row)

    def get_many(self, task_ids: Iterable[str]) -> Dict[str, Optional[TaskRecord]]:
        wanted = list(dict.fromkeys(task_ids))
        found: Dict[str, Optional[TaskRecord]] = {task_id: None for task_id in wanted}
        for chunk in _chunks(wanted):
            marks = ", ".join("?" for _ in chunk)
            for row in self._conn().execute(f"SELECT * FROM tasks WHERE task_id IN ({marks})", chunk):
                found[row["task_id"]] = _record_from_row(row)
        return found

    def events(self, task_id: str, after: int = -1) -> Optional[List[TaskEvent]]:
        conn = self._conn()
        # One read transaction so that a purge in between cannot turn "known" into "no events".
        conn.execute("BEGIN")
        try:
            if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is None:
                return None
            rows = conn.execute("SELECT * FROM events WHERE task_id = ? AND seq > ? ORDER BY seq",
                                (task_id, after)).fetchall()
        finally:
            conn.execute("COMMIT")
        return [_event_from_row(row) for row in rows]

    def expired(self, limit: int = 100) -> List[str]:
        conn, now = self._conn(), self.clock()
        conn.execute("BEGIN")  # one snapshot: the candidates and the keys' turns agree
        try:
            claimable = [tuple(row) for row in conn.execute(_CLAIMABLE, (now, int(limit)))]
            in_flight = dict(conn.execute("SELECT key_name, COUNT(*) FROM tasks WHERE finished = 0 "
                                          "AND lease_until >= ? GROUP BY key_name", (now,)).fetchall())
            keys = sorted({key_name for _, key_name, _ in claimable})
            last_started: Dict[str, float] = {}
            for chunk in _chunks(keys):
                marks = ", ".join("?" for _ in chunk)
                last_started.update(conn.execute(
                    f"SELECT key_name, MAX(started_at) FROM tasks WHERE key_name IN ({marks}) AND started_at > 0 "
                    "GROUP BY key_name", chunk).fetchall())
        finally:
            conn.execute("COMMIT")
        return claim_order(claimable, in_flight, last_started, limit)

    def stats(self) -> Dict[str, Any]:
        counts = {phase: 0 for phase in PHASES}
        for phase, count in self._conn().execute("SELECT phase, COUNT(*) FROM tasks GROUP BY phase"):
            counts[phase] = count
        return {"tasks": counts, "records": sum(counts.values())}

    def get_setting(self, name: str) -> Optional[Any]:
        row = self._conn().execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_setting(self, name: str, value: Any) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                         "value = excluded.value", (name, json.dumps(value)))

    def settings(self, prefix: str) -> Dict[str, Any]:
        rows = self._conn().execute("SELECT name, value FROM settings WHERE substr(name, 1, ?) = ?",
                                    (len(prefix), prefix))
        return {name: json.loads(value) for name, value in rows}

    def delete_setting(self, name: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM settings WHERE name = ?", (name,))

    def ping(self) -> bool:
        try:
            return self._conn().execute("SELECT 1").fetchone()[0] == 1
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

