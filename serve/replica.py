"""What every model replica shares: progress written to the task store, and its own health.

``ProgressSink`` keeps the newest update per task and writes them from one thread a few times a
second: the LM reports every decode step, and a database write per token would cost more than the
token. Progress only moves forward in the store, so dropping superseded updates loses nothing a
client could see. ``StallWatch`` backs ``check_health``: a replica that holds requests but has not
advanced for ``stall_s`` (or hit a CUDA error) reports itself unhealthy, so Serve replaces it and the
ingress re-drives its tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from serve.logs import log


Update = Tuple[str, float, str, Optional[Dict[str, Any]]]

# Plans unpickled in this process. The ingress hands the LM call's ref to the DiT unfetched, so
# a plan (and its codes) is unpickled on DiT replicas only; every process's stats() show its count.
_plans_unpacked = [0]


class ShippedPlan:
    """The LM's outcome on its way out of the LM replica: unpickling yields the outcome itself."""

    def __init__(self, outcome: Any):
        self.outcome = outcome

    def __reduce__(self):
        return _unpack_plan, (self.outcome,)


def _unpack_plan(outcome: Any) -> Any:
    _plans_unpacked[0] += 1
    return outcome


def plans_unpacked() -> int:
    return _plans_unpacked[0]


class PlanLost(RuntimeError):
    """The LM replica holding a plan died before the DiT got it (retried like a replica death)."""


@dataclasses.dataclass
class PlanRef:
    """The LM call's result as a reference nested in the DiT call, sent once it is computed
    (``until_ready``), so the DiT replica takes it from the LM's node and never holds a slot waiting
    for it. As a top-level argument, a plan lost with its LM replica made Serve retry the DiT call
    forever, taking the lost argument for an unavailable DiT replica."""

    ref: Any  # ray.ObjectRef of the LMDeployment.plan call

    async def outcome(self) -> Any:
        import ray.exceptions as rex

        lost = (rex.ActorDiedError, rex.ActorUnavailableError, rex.ObjectLostError, rex.OwnerDiedError,
                rex.NodeDiedError, rex.WorkerCrashedError)
        try:
            return await self.ref
        except lost as error:  # not re-raised as is: Serve would read it as this replica being unavailable
            raise PlanLost(f"the LM replica was lost ({type(error).__name__})") from None


async def until_ready(ref: Any, first_poll_s: float = 0.01, max_poll_s: float = 0.05) -> None:
    """Wait until ``ref`` is computed or failed, without fetching it into this process. The polls
    are cheap (the ingress owns the ref); a long interval would be paid by every plan on top of its
    own time, so the interval stays short."""
    import ray

    delay = first_poll_s
    while not ray.wait([ref], timeout=0, fetch_local=False)[0]:
        await asyncio.sleep(delay)
        delay = min(max_poll_s, delay * 1.5)


class ProgressSink:
    """Coalesced, fire-and-forget ``store.update`` calls; safe from any thread.

    Between flushes a task keeps only its latest update, except milestones (a sub-phase's first
    event): those are written even when later updates follow within the same period."""

    def __init__(self, open_store: Callable[[], Any], period_s: float = 0.1):
        self._open_store, self._store = open_store, None
        self.period_s = period_s
        self._pending: Dict[str, List[Tuple[Update, bool]]] = {}
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def report(self, task_id: str, phase: str, progress: float, message: str = "",
               detail: Optional[Dict[str, Any]] = None, milestone: bool = False) -> None:
        with self._lock:
            queue = self._pending.setdefault(task_id, [])
            if queue and not queue[-1][1]:
                queue.pop()  # a plain update is superseded by the next one
            queue.append(((phase, progress, message, detail), milestone))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="progress-sink", daemon=True)
                self._thread.start()
            self._lock.notify()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            if self._store is None:
                self._store = self._open_store()
            for task_id, queue in pending.items():
                for (phase, progress, message, detail), _ in queue:
                    self._store.update(task_id, phase, progress, message, detail)
        except Exception:  # progress is advisory: a store hiccup must not fail the work itself
            log.warning("progress update failed", exc_info=True)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._pending))
            time.sleep(self.period_s)
            self.flush()


class StallWatch:
    """Unhealthy when busy with no progress for ``stall_s``, or after a CUDA error."""

    def __init__(self, stall_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.stall_s, self.clock = stall_s, clock
        self._mark: Any = None
        self._since = clock()
        self.fatal: Optional[str] = None

    def note_error(self, error: BaseException) -> None:
        if "CUDA error" in str(error) or type(error).__name__ == "AcceleratorError":
            self.fatal = "CUDA error"  # the context is unusable after one; only a new process helps

    def check(self, busy: bool, progress_mark: Any) -> None:
        """Raise RuntimeError when unhealthy; ``progress_mark`` changes whenever work advances."""
        if self.fatal:
            raise RuntimeError(f"replica unhealthy: {self.fatal}")
        now = self.clock()
        if not busy or progress_mark != self._mark:
            self._mark, self._since = progress_mark, now
            return
        if now - self._since > self.stall_s:
            raise RuntimeError(f"replica unhealthy: busy without progress for {now - self._since:.0f}s")
