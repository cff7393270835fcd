"""Where tasks and audio live: task records (``records``: the state rules and the ``TaskStore``
interface) in SQLite (``sqlite``, one machine) or Redis (``redis``, a cluster), and encoded audio and
uploads in a directory or any fsspec URL (``audio``)."""

from __future__ import annotations

from typing import Callable, Optional

from serve.store.records import TaskStore
from serve.store.redis import RedisTaskStore
from serve.store.sqlite import SQLiteTaskStore


def open_task_store(url: str, *, ttl_s: float = 86400.0, max_records: int = 10000,
                    clock: Optional[Callable[[], float]] = None) -> TaskStore:
    """``sqlite:///abs/path/tasks.db`` or a plain path → SQLite; ``redis://host:port/db`` → Redis
    (``clock``: see ``TaskStore``)."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        scheme, rest = "sqlite", str(url)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest:
            raise ValueError(f"sqlite task store URL {url!r} names no file: use sqlite:///path/tasks.db")
        # sqlite:///abs and sqlite:////abs both mean /abs (POSIX would keep a leading "//").
        path = "/" + rest.lstrip("/") if rest.startswith("/") else rest
        return SQLiteTaskStore(path, ttl_s=ttl_s, max_records=max_records, clock=clock)
    if scheme in ("redis", "rediss", "unix"):
        return RedisTaskStore(url, ttl_s=ttl_s, max_records=max_records, clock=clock)
    raise ValueError(f"unsupported task store URL scheme {scheme!r} in {url!r}: "
                     "use sqlite:///path/tasks.db, a file path, or redis://host:port/db")
