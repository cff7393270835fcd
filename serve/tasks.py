"""The task store: task records, ordered progress events and encoded audio.

Plain asyncio, no Ray: ``serve.deployments.TaskStoreDeployment`` runs one instance as a single-replica
deployment so that every ingress replica (and the LM/DiT replicas reporting progress) see the same
tasks. Progress only moves forward (phase order, then fraction), so events read back are in order
even when updates from different replicas arrive out of order.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

PHASES = ("queued", "lm", "dit", "encode", "done", "failed")
FINAL_PHASES = ("done", "failed")
_RANK = {name: rank for rank, name in enumerate(PHASES)}
_RANK["failed"] = _RANK["done"]


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
    phase: str = "queued"
    progress: float = 0.0
    message: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    request: Dict[str, Any] = field(default_factory=dict)
    result: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    detail: Optional[Dict[str, Any]] = None
    events: List[TaskEvent] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        data = asdict(self)
        data.pop("events")
        data["finished"] = self.phase in FINAL_PHASES
        return data


class TaskStore:
    """In-memory tasks + audio with a TTL and a byte budget; one instance per application."""

    def __init__(self, max_active_tasks: int = 200, task_ttl_s: float = 86400.0, max_audio_bytes: int = 2 << 30):
        self.max_active_tasks = max_active_tasks
        self.task_ttl_s = task_ttl_s
        self.max_audio_bytes = max_audio_bytes
        self._tasks: Dict[str, TaskRecord] = {}
        self._audio: "OrderedDict[str, tuple[bytes, str, float]]" = OrderedDict()
        self._audio_bytes = 0
        self._changed = asyncio.Condition()
        self._seq = itertools.count()

    # -- tasks ---------------------------------------------------------------------------------

    async def create(self, request: Optional[Dict[str, Any]] = None, task_id: Optional[str] = None) -> Optional[str]:
        """A new queued task's id, or None when ``max_active_tasks`` unfinished tasks exist."""
        self._purge()
        active = sum(1 for t in self._tasks.values() if t.phase not in FINAL_PHASES)
        if active >= self.max_active_tasks:
            return None  # full: the ingress answers 429 with Retry-After
        task_id = task_id or uuid.uuid4().hex
        record = TaskRecord(task_id=task_id, request=dict(request or {}))
        record.events.append(TaskEvent(next(self._seq), "queued", 0.0, "queued", record.created_at))
        self._tasks[task_id] = record
        return task_id

    async def update(self, task_id: str, phase: str, progress: float, message: str = "",
                     detail: Optional[Dict[str, Any]] = None) -> bool:
        """Move a task forward; stale or backward updates are ignored (returns False)."""
        record = self._tasks.get(task_id)
        if record is None or record.phase in FINAL_PHASES or phase not in _RANK:
            return False
        progress = min(max(float(progress), 0.0), 1.0)
        if _RANK[phase] < _RANK[record.phase] or (phase == record.phase and progress <= record.progress):
            return False
        progress = max(progress, record.progress)
        await self._record(record, phase, progress, message, detail)
        return True

    async def finish(self, task_id: str, result: Dict[str, Any]) -> None:
        record = self._tasks.get(task_id)
        if record is not None and record.phase not in FINAL_PHASES:
            record.result = result
            await self._record(record, "done", 1.0, "done")

    async def fail(self, task_id: str, error: str) -> bool:
        """Mark an unfinished task failed with ``error`` (a cancellation too); False if already final."""
        record = self._tasks.get(task_id)
        if record is None or record.phase in FINAL_PHASES:
            return False
        record.error = error
        await self._record(record, "failed", record.progress, error)
        return True

    async def get(self, task_id: str) -> Optional[Dict[str, Any]]:
        record = self._tasks.get(task_id)
        return None if record is None else record.summary()

    async def get_many(self, task_ids: List[str]) -> Dict[str, Optional[Dict[str, Any]]]:
        return {task_id: await self.get(task_id) for task_id in task_ids}

    async def wait_events(self, task_id: str, after: int = -1, timeout_s: float = 15.0) -> Optional[List[Dict]]:
        """Events with ``seq > after``; waits up to ``timeout_s`` for one. None for an unknown task."""
        if task_id not in self._tasks:
            return None

        def newer() -> List[Dict]:
            record = self._tasks.get(task_id)
            return [asdict(e) for e in record.events if e.seq > after] if record else []

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: bool(newer())), timeout_s)
            except asyncio.TimeoutError:
                pass
        return newer()

    async def wait_final(self, task_id: str, timeout_s: float = 60.0) -> Optional[str]:
        """The task's phase once it is final (done/failed), waiting up to ``timeout_s``; the current
        phase on timeout; None for an unknown task."""
        if task_id not in self._tasks:
            return None

        def final() -> bool:
            record = self._tasks.get(task_id)
            return record is None or record.phase in FINAL_PHASES

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(final), timeout_s)
            except asyncio.TimeoutError:
                pass
        record = self._tasks.get(task_id)
        return record.phase if record is not None else None

    async def stats(self) -> Dict[str, Any]:
        counts = {phase: 0 for phase in PHASES}
        for record in self._tasks.values():
            counts[record.phase] += 1
        return {"tasks": counts, "audio_files": len(self._audio), "audio_bytes": self._audio_bytes}

    async def _record(self, record: TaskRecord, phase: str, progress: float, message: str,
                      detail: Optional[Dict[str, Any]] = None) -> None:
        now = time.time()
        record.phase, record.progress, record.message, record.updated_at = phase, progress, message, now
        record.detail = detail
        record.events.append(TaskEvent(next(self._seq), phase, progress, message, now, detail))
        async with self._changed:
            self._changed.notify_all()

    # -- audio ---------------------------------------------------------------------------------

    async def put_audio(self, key: str, data: bytes, media_type: str) -> None:
        if key in self._audio:
            self._audio_bytes -= len(self._audio.pop(key)[0])
        self._audio[key] = (data, media_type, time.time())
        self._audio_bytes += len(data)
        while self._audio_bytes > self.max_audio_bytes and len(self._audio) > 1:
            _, (old, _, _) = self._audio.popitem(last=False)
            self._audio_bytes -= len(old)

    async def get_audio(self, key: str) -> Optional[tuple]:
        item = self._audio.get(key)
        return None if item is None else (item[0], item[1])

    def _purge(self) -> None:
        cutoff = time.time() - self.task_ttl_s
        for task_id in [t for t, r in self._tasks.items() if r.phase in FINAL_PHASES and r.updated_at < cutoff]:
            del self._tasks[task_id]
        while self._audio and next(iter(self._audio.values()))[2] < cutoff:
            _, (old, _, _) = self._audio.popitem(last=False)
            self._audio_bytes -= len(old)
