"""``WorkerLoop``: the one thread that owns a ``DiTWorker`` (and the DiT-side modules) and drives
it for concurrent callers.

Callers ``submit(items, settings, progress)`` from any thread and get a
``concurrent.futures.Future`` of the request's ``RenderOutput``. Between two sampling steps the
loop thread prepares new requests (reads and encodes their audio, encodes their conditions) and
queues their items in the worker, drops cancelled ones, then runs one step for every running item.
Items that finish in the same step are decoded by the VAE together; a request's future resolves
when its last item is decoded. Nothing waits for a batch to fill: a request joins the running batch
at the next step boundary (as the worker's limits allow, first come first served).

``call(fn)`` runs other model work (``convert_src_audio_to_codes``, preparing items) on the same
thread, so the modules are never used from two threads. ``future.cancel()`` (or cancelling its
asyncio wrapper) drops the request's items at the next step; their batch-mates are untouched."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Union

import torch

from acestep.dit.adapters import AdapterSlots
from acestep.dit.batch import DiTLimits
from acestep.dit.runner import DiTItem, Progress, RenderOutput, SamplingSettings, collect, decode_items
from acestep.dit.worker import DiTWorker, Track

logger = logging.getLogger(__name__)
Items = Union[List[DiTItem], Callable[[], List[DiTItem]]]


class WorkerClosed(RuntimeError):
    """The DiT worker loop was closed before the request finished."""


@dataclass(eq=False)
class _Job:
    future: Future
    items: Items
    settings: SamplingSettings
    progress: Optional[Progress]
    tracks: List[Track] = field(default_factory=list)
    audios: Dict[int, torch.Tensor] = field(default_factory=dict)  # track index -> audio
    costs: Dict[str, float] = field(default_factory=dict)

    def report(self, _track: Track) -> None:
        if self.progress is None:
            return
        done, total = sum(t.step for t in self.tracks), sum(t.steps for t in self.tracks)
        step, steps = min(t.step for t in self.tracks), max(t.steps for t in self.tracks)
        try:
            self.progress(done / max(total, 1), f"diffusion step {step}/{steps}")
        except Exception:  # a progress sink must never stop the batch
            logger.exception("DiT progress callback failed")


class WorkerLoop:
    """Thread-safe front of one ``DiTWorker``; ``stats()`` counts items and rows per forward."""

    def __init__(self, bundle, limits: DiTLimits = DiTLimits(), name: str = "acestep-dit-worker",
                 adapters: Optional[AdapterSlots] = None):
        self.bundle = bundle
        self.worker = DiTWorker(bundle, limits, adapters)
        self._name = name
        self._cond = threading.Condition(threading.RLock())  # reentrant: futures' callbacks take it too
        self._calls: Deque[tuple] = deque()
        self._incoming: Deque[_Job] = deque()
        self._cancelled: Deque[Future] = deque()
        self._jobs: Dict[int, _Job] = {}  # id(future) -> job being sampled
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.requests = 0

    # -- callers (any thread) ------------------------------------------------------------------
    def submit(self, items: Items, settings: SamplingSettings, progress: Optional[Progress] = None) -> Future:
        """Queue one request's items (or a function that prepares them on the loop thread; what it
        raises fails this request only); the future resolves to its ``RenderOutput``."""
        future: Future = Future()
        with self._cond:
            self._check_open()
            self._incoming.append(_Job(future, items, settings, progress))
            self.requests += 1
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
        # the counters are only written by the loop thread; copies taken in one C call are consistent
        worker = self.worker
        items, rows = dict(worker.items_per_forward), dict(worker.rows_per_forward)
        stats = {"requests": self.requests, "waiting": len(self._incoming) + len(worker.waiting),
                 "running": len(worker.running), "steps": sum(items.values()),
                 "items_per_forward": dict(sorted(items.items())), "rows_per_forward": dict(sorted(rows.items())),
                 "forwards_by_adapters": dict(sorted(dict(worker.forwards_by_adapters).items()))}
        if worker.adapters is not None:
            stats["adapters"] = worker.adapters.stats()
        return stats

    def close(self) -> None:
        """Stop the thread; unfinished futures fail with ``WorkerClosed``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _check_open(self) -> None:
        if self._closed:
            raise WorkerClosed("the DiT worker is closed")

    def _wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
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
        with torch.no_grad():  # grad mode is per thread
            self._serve()
        closed = WorkerClosed("the DiT worker is closed")
        with self._cond:
            pending = [f for _, f in self._calls] + [job.future for job in self._incoming]
            self._calls.clear(), self._incoming.clear()
        for future in pending:
            _settle(future, error=closed)
        self._fail(list(self._jobs.values()), closed)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._calls or self._incoming or self._cancelled or self.worker.has_work):
                    self._cond.wait()
                if self._closed:
                    break
                calls, self._calls = list(self._calls), deque()
                incoming, self._incoming = list(self._incoming), deque()
                cancelled, self._cancelled = list(self._cancelled), deque()
            for fn, future in calls:
                _run_call(fn, future)
            for job in incoming:
                self._admit(job)
            for future in cancelled:
                self._drop(self._jobs.pop(id(future), None))
            if self.worker.has_work:
                self._step()

    def _admit(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        started = time.perf_counter()
        try:
            for item in job.items() if callable(job.items) else job.items:
                job.tracks.append(self.worker.track(item, job.settings, owner=job, on_step=job.report))
        except Exception as error:  # unreadable audio, bad codes...: this request only
            self._drop(job)
            _settle(job.future, error=error)
            return
        job.costs["started"] = started
        job.costs["encoded"] = time.perf_counter()
        self._jobs[id(job.future)] = job

    def _drop(self, job: Optional[_Job]) -> None:
        if job is None:
            return
        for track in job.tracks:
            self.worker.drop(track)

    def _step(self) -> None:
        try:
            left = self.worker.step()
        except Exception as error:  # outside any item's own work: every running request fails
            logger.exception("DiT step failed")
            self._fail(list({id(t.owner): t.owner for t in self.worker.running}.values()), error)
            return
        for track in left:
            if track.error is not None:
                logger.error("DiT item failed: %r", track.error)
                self._fail([track.owner], track.error)
        finished = [t for t in left if t.error is None]
        if finished:
            self._finish(finished)

    def _finish(self, tracks: List[Track]) -> None:
        """Decode the tracks that finished this step together; settle requests now complete."""
        sampled = time.perf_counter()
        good = []
        for track in tracks:
            if track.owner.future.done():
                continue
            if torch.isfinite(track.x).all():
                good.append(track)
            else:
                self._fail([track.owner], RuntimeError("the DiT produced NaN/Inf latents"))
        if not good:
            return
        owners = list({id(t.owner): t.owner for t in good}.values())
        try:
            audios = decode_items(self.bundle, [t.item for t in good], [t.x for t in good])
        except Exception as error:
            logger.exception("VAE decode failed")
            self._fail(owners, error)
            return
        decoded = time.perf_counter()
        for track, audio in zip(good, audios):
            track.owner.audios[track.owner.tracks.index(track)] = audio
        for job in owners:
            costs = job.costs
            costs["vae"] = costs.get("vae", 0.0) + decoded - sampled
            if len(job.audios) == len(job.tracks):
                costs["sampled"] = sampled
                self._jobs.pop(id(job.future), None)
                _settle(job.future, result=self._output(job, decoded))

    @staticmethod
    def _output(job: _Job, decoded: float) -> RenderOutput:
        c = job.costs
        steps = max(t.steps for t in job.tracks)
        diffusion = c["sampled"] - c["encoded"]
        return collect(job.tracks, [job.audios[i] for i in range(len(job.tracks))], {
            "encoder_time_cost": c["encoded"] - c["started"], "diffusion_time_cost": diffusion,
            "diffusion_per_step_time_cost": diffusion / max(steps, 1), "vae_decode_time_cost": c["vae"],
            "total_time_cost": decoded - c["started"]})

    def _fail(self, jobs: List[_Job], error: BaseException) -> None:
        for job in jobs:
            self._drop(job)
            self._jobs.pop(id(job.future), None)
            _settle(job.future, error=error)


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    try:
        result = fn()
    except BaseException as error:  # noqa: BLE001 - handed to the caller
        _settle(future, error=error)
    else:
        _settle(future, result=result)


def _settle(future: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
