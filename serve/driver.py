"""Driving accepted tasks to ``done`` or ``failed``: leases, retries, per-phase timeouts, re-drive, drain.

A ``TaskDriver`` lives in each ingress replica. It claims a task in the durable store under a lease,
runs the task's pipeline (a coroutine function the ingress passes in: LM plan → DiT render → audio
store) and renews the lease while it runs. A task whose lease lapses -- its ingress replica died, or
the whole service stopped -- is claimed again by any driver's reaper and run again from its stored
request (same seeds, so the same result). LM/DiT calls that fail because a replica died or pushed
back are retried with backoff; the record gets a failure code, never a traceback, actor id or path.
Tasks beyond ``max_drives`` stay queued in the store until a driver has room; a drive that ends
wakes the reaper, which claims the next ones in the store's claim order (priority class, then fair
share over API keys, ``serve.store.records.claim_order``). Jobs (dataset, label and training tasks:
a stored request with a ``kind``) hold a drive for their whole run, hours for a training run, so
they count against their own bound, ``max_jobs``, never against the songs' ``max_drives``.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set

from serve import metrics
from serve.logs import bind_request_id, extra, log
from serve.replica import PlanLost
from serve.store.records import FINAL_PHASES, TaskEvent, TaskRecord, TaskStore


MESSAGES = {
    "replica_died": "a model replica died while running this task",
    "overloaded": "the model replicas were overloaded",
    "invalid_audio": "an uploaded audio file could not be decoded",
    "internal": "internal error while running this task",
    "invalid_adapter": "the requested adapter could not be used",
}


class TaskFailure(Exception):
    """A terminal failure with a code from ``MESSAGES`` (or ``timeout:<phase>``) and a safe message."""

    def __init__(self, code: str, message: Optional[str] = None):
        super().__init__(message or MESSAGES.get(code, code))
        self.code, self.message = code, message or MESSAGES.get(code, code)


class _Retryable(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _chain(error: BaseException):
    """The error and what it wraps: Ray task errors (``.cause``), then ``__cause__`` / ``__context__``
    (a DiT call fails with the LM's death inside when the plan it waited on was lost)."""
    seen = []
    while error is not None and len(seen) < 8 and all(error is not e for e in seen):
        seen.append(error)
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return seen


def classify(error: BaseException) -> Exception:
    """A pipeline exception → ``_Retryable(code)`` (replica death, back-pressure) or ``TaskFailure``."""
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    from acestep.audio import AudioLoadError
    from acestep.dit.adapters import AdapterError

    chain = _chain(error)
    for item in chain:
        if isinstance(item, TaskFailure):
            return item
    if any(isinstance(item, (sex.BackPressureError, sex.DeploymentUnavailableError)) for item in chain):
        return _Retryable("overloaded")
    died = (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError, rex.WorkerCrashedError,
            rex.NodeDiedError, rex.OwnerDiedError, rex.ObjectLostError, sex.ReplicaUnavailableError, PlanLost)
    if any(isinstance(item, died) for item in chain):
        return _Retryable("replica_died")
    if any(isinstance(item, AudioLoadError) for item in chain):
        return TaskFailure("invalid_audio")
    adapter = next((item for item in chain if isinstance(item, AdapterError)), None)
    if adapter is not None:  # its message names the adapter and the problem, never a path
        return TaskFailure("invalid_adapter", str(adapter))
    log.warning("task failed with an internal error", exc_info=error)  # the log has it; the client a code
    return TaskFailure("internal")


def store_unavailable(error: BaseException) -> bool:
    """The task store (Redis down, SQLite locked past its timeout) rather than the task or a bug."""
    import sqlite3

    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeout

    return isinstance(error, (RedisConnectionError, RedisTimeout, sqlite3.OperationalError))


@dataclass
class DriverSettings:
    """The ingress settings a driver uses (see ``serve.config.IngressSettings``)."""

    max_drives: int
    lease_s: float
    retries: int
    retry_backoff_s: float
    timeouts: Dict[str, float]  # phase → seconds ("queued", "lm", "dit", "encode")
    poll_s: float = 0.5
    max_jobs: int = 0  # jobs driven at once beside the songs (``training.max_jobs``); 0: none here


Pipeline = Callable[[TaskRecord], Awaitable[Dict[str, Any]]]


def is_job(record: TaskRecord) -> bool:
    """A dataset, label or training job (``serve.training``) rather than a song."""
    return bool((record.request or {}).get("kind"))


class PhaseClock:
    """A task's phase transitions from its stored events: each is logged (``task_id``, the phase it
    ended, ``duration_s``, ``next_phase``) and timed (``serve.metrics``) once, at event precision,
    whenever the driver reads the events after one it has seen."""

    def __init__(self, task_id: str, history: List[TaskEvent]):
        self.task_id, self.phase, self.since, self.seen = task_id, "queued", 0.0, -1
        self._follow(history, quiet=True)  # a re-driven task: where it stands, logged already

    def advance(self, events: Optional[List[TaskEvent]]) -> None:
        self._follow(events or [], quiet=False)

    def _follow(self, events: List[TaskEvent], quiet: bool) -> None:
        for event in events:
            if event.seq <= self.seen:
                continue
            self.seen = event.seq
            if event.seq == 0 or event.phase == self.phase:
                self.phase, self.since = event.phase, self.since if event.seq else event.time
                continue
            if not quiet:
                seconds = event.time - self.since
                metrics.phase_done(self.phase, seconds)
                log.info("task %s: %s -> %s", self.task_id, self.phase, event.phase, extra=extra(
                    task_id=self.task_id, phase=self.phase, duration_s=round(seconds, 3), next_phase=event.phase))
            self.phase, self.since = event.phase, event.time


class _Stop(Exception):
    """The task turned final elsewhere (DELETE) or the lease was lost: stop without writing."""


class TaskDriver:
    """Drives tasks of ``store`` through ``pipeline``. Phase timeouts, lease renewals and task times
    are measured on ``clock`` (``time.monotonic`` when None); a task's queue age on the store's."""

    def __init__(self, store: TaskStore, pipeline: Pipeline, settings: DriverSettings, owner: str,
                 on_done: Optional[Callable[[float], None]] = None, clock: Optional[Callable[[], float]] = None,
                 webhooks=None):
        self.store, self.pipeline, self.settings, self.owner = store, pipeline, settings, owner
        self.webhooks = webhooks  # a serve.webhooks.WebhookSender: the reaper's period sends due deliveries
        self.on_done = on_done  # called with each finished task's wall time (admission's estimate)
        self.clock: Callable[[], float] = clock or time.monotonic
        self.draining = False
        self._drives: Dict[str, asyncio.Task] = {}
        self._jobs: Set[str] = set()  # the drives that are jobs
        self._reaper: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None  # set when a drive ends: there is room to claim
        self.backlog = False  # the last reaper pass left claimable tasks for want of room
        self._counts = {"started": 0, "done": 0, "failed": 0, "retries": 0, "redriven": 0, "released": 0}

    # -- starting ----------------------------------------------------------------------------------

    def has_room(self, job: bool = False) -> bool:
        """Room for one more song (``job``: one more job) here."""
        if self.draining:
            return False
        if job:
            return len(self._jobs) < self.settings.max_jobs
        return len(self._drives) - len(self._jobs) < self.settings.max_drives

    def may_claim_new(self) -> bool:
        """Whether a task created here may be driven at once: room, and no queued task left behind
        by the last reaper pass (those go first, in the claim order)."""
        return self.has_room() and not self.backlog

    def wake(self) -> None:
        """Run the next reaper pass now (a task was queued while there may be room)."""
        if self._wake is not None:
            self._wake.set()

    def start(self, task_id: str, claimed: bool = False, job: bool = False) -> bool:
        """Drive ``task_id`` here if there is room for it (claiming it unless the caller created it
        claimed); ``job``: it is a job, bounded by ``max_jobs``."""
        if not self.has_room(job) or task_id in self._drives:
            return False
        drive = asyncio.get_running_loop().create_task(self._drive(task_id, claimed))
        self._drives[task_id] = drive
        if job:
            self._jobs.add(task_id)
        drive.add_done_callback(lambda _: self._ended(task_id))
        return True

    def _ended(self, task_id: str) -> None:
        self._drives.pop(task_id, None)
        self._jobs.discard(task_id)
        self.wake()

    def local(self, task_id: str) -> Optional[asyncio.Task]:
        return self._drives.get(task_id)

    def ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._wake = asyncio.Event()
            # a context of its own: the drives it starts log their task's request id, not that of
            # the request that happened to start the reaper
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), context=contextvars.Context())

    async def _reap_forever(self) -> None:
        period = max(0.5, min(5.0, self.settings.lease_s / 3))
        while not self.draining:
            if self.webhooks is not None:
                self.webhooks.kick()
            try:
                await self.reap()
            except Exception:  # a store hiccup must not end re-driving for good
                log.warning("task reaper pass failed", exc_info=True)
            try:  # the next pass at the period, or as soon as a drive ends
                await asyncio.wait_for(self._wake.wait(), period)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def reap(self) -> int:
        """Claim tasks whose lease is free or lapsed (queued ones too) while there is room for their
        kind (songs, jobs); fail those queued longer than the queue timeout. Returns how many were
        started."""
        if not (self.has_room() or self.has_room(job=True)):
            return 0
        started, self.backlog = 0, False
        limit = (self.settings.max_drives + self.settings.max_jobs) * 2
        for task_id in await asyncio.to_thread(self.store.expired, limit):
            if not (self.has_room() or self.has_room(job=True)):
                self.backlog = True
                break
            if task_id in self._drives:
                continue
            record = await asyncio.to_thread(self.store.get, task_id)
            if record is None or record.phase in FINAL_PHASES:
                continue
            if record.phase == "queued" and self.store.clock() - record.created_at > self.settings.timeouts["queued"]:
                if await asyncio.to_thread(self.store.fail, task_id, "timeout:queued",
                                           "not started within the queue timeout"):
                    metrics.task_finished("failed", "timeout:queued")
                continue
            job = is_job(record)
            if self.start(task_id, job=job):
                started += 1
                self._counts["redriven"] += record.attempts > 0
            elif not job:
                self.backlog = True  # songs left behind go first next time; jobs further on still start
        return started

    # -- driving -----------------------------------------------------------------------------------

    async def _drive(self, task_id: str, claimed: bool) -> None:
        store = self.store
        began = self.clock()
        clock: Optional[PhaseClock] = None
        try:
            if not claimed and not await asyncio.to_thread(store.claim, task_id, self.owner, self.settings.lease_s):
                return
            self._counts["started"] += 1
            record = await asyncio.to_thread(store.get, task_id)
            if record is None or record.phase in FINAL_PHASES:
                return
            bind_request_id((record.request or {}).get("request_id", ""))
            clock = PhaseClock(task_id, await asyncio.to_thread(store.events, task_id) or [])
            output = await self._attempts(record, clock)
            if output is not None and await asyncio.to_thread(store.finish, task_id, output):
                self._counts["done"] += 1
                if self.on_done is not None:
                    self.on_done(self.clock() - began)
            await self._settle(clock)
        except TaskFailure as failure:
            self._counts["failed"] += 1
            await self._safely(store.fail, task_id, failure.code, failure.message)
            await self._settle(clock)
        except asyncio.CancelledError:
            # drain: the task stays in its phase with a free lease; the next start re-drives it
            self._counts["released"] += 1
            await asyncio.shield(self._safely(store.release, task_id, self.owner))
            raise
        except Exception as error:
            if store_unavailable(error):  # the lease lapses and a driver re-runs it once the store is back
                log.warning("task store unavailable; the task is re-driven later")
                return
            log.exception("task driver failed unexpectedly")
            self._counts["failed"] += 1
            await self._safely(store.fail, task_id, "internal", MESSAGES["internal"])
            await self._settle(clock)

    async def _settle(self, clock: Optional[PhaseClock]) -> None:
        """The last transitions (into done or failed, here or by DELETE) and the task's outcome; its
        webhook (if any) is sent now rather than at the reaper's next pass."""
        if self.webhooks is not None:
            self.webhooks.kick()
        if clock is None:
            return
        try:
            events = await asyncio.to_thread(self.store.events, clock.task_id, clock.seen)
            clock.advance(events)
            if clock.phase in FINAL_PHASES:
                record = await asyncio.to_thread(self.store.get, clock.task_id)
                metrics.task_finished(clock.phase, record.error if record is not None else None)
        except Exception:  # logs and metrics only: the task itself is settled
            log.warning("could not read a finished task's last events", exc_info=True)

    async def _safely(self, write, *args) -> None:
        """A final store write; if the store is down the lease lapses and the task is re-driven."""
        try:
            await asyncio.to_thread(write, *args)
        except Exception:
            log.warning("task store write failed; the task is re-driven later", exc_info=True)

    async def _attempts(self, record: TaskRecord, clock: PhaseClock) -> Optional[Dict[str, Any]]:
        """The pipeline's output, retrying replica deaths and back-pressure; None if stopped."""
        for attempt in range(self.settings.retries + 1):
            try:
                return await self._attempt(record, clock)
            except _Stop:
                return None
            except _Retryable as retry:
                if attempt == self.settings.retries:
                    raise TaskFailure(retry.code,
                                      f"{MESSAGES[retry.code]} (tried {attempt + 1} times)") from None
                self._counts["retries"] += 1
                await asyncio.sleep(self.settings.retry_backoff_s * 2 ** attempt)
        return None

    async def _attempt(self, record: TaskRecord, clock: PhaseClock) -> Dict[str, Any]:
        work = asyncio.ensure_future(self.pipeline(record))
        watch = asyncio.ensure_future(self._watch(record.task_id, clock))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                error = work.exception()
                if error is None:
                    return work.result()
                raise classify(error) from None
            watch.result()  # raises _Stop or TaskFailure(timeout:<phase>)
            raise _Stop()
        finally:
            for pending in (work, watch):
                if not pending.done():
                    pending.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)

    async def _watch(self, task_id: str, clock: PhaseClock) -> None:
        """Renew the lease; stop when the task turns final elsewhere or a phase outlives its timeout;
        follow its phase transitions (``clock``)."""
        settings, store = self.settings, self.store
        phase, since, renewed = None, self.clock(), self.clock()
        while True:
            await asyncio.sleep(settings.poll_s)
            now = self.clock()
            try:
                if now - renewed >= settings.lease_s / 3:
                    if not await asyncio.to_thread(store.renew, task_id, self.owner, settings.lease_s):
                        raise _Stop()  # another driver owns it now
                    renewed = now
                record = await asyncio.to_thread(store.get, task_id)
                if record is not None and record.phase != clock.phase and record.phase not in FINAL_PHASES:
                    clock.advance(await asyncio.to_thread(store.events, task_id, clock.seen))
            except Exception as error:
                if not store_unavailable(error):
                    raise
                continue  # a store outage: keep working; the lease check resumes when it is back
            if record is None or record.phase in FINAL_PHASES:
                raise _Stop()
            if record.phase != phase:
                phase, since = record.phase, now
            limit = settings.timeouts.get(phase)
            if limit is not None and now - since > limit:
                raise TaskFailure(f"timeout:{phase}", f"no result within the {phase} phase's {limit:g}s")

    # -- stopping ----------------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> Dict[str, int]:
        """Stop taking tasks; let drives in flight finish for ``grace_s``; release the rest."""
        self.draining = True
        if self._reaper is not None:
            self._reaper.cancel()
        running: Set[asyncio.Task] = set(self._drives.values())
        if running:
            await asyncio.wait(running, timeout=grace_s)
        left = [drive for drive in running if not drive.done()]
        for drive in left:
            drive.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        return {"finished": len(running) - len(left), "released": len(left)}

    def stats(self) -> Dict[str, Any]:
        return {"owner": self.owner, "driving": len(self._drives), "jobs": len(self._jobs), "draining": self.draining,
                **self._counts}
