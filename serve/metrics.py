"""The service's metrics, as Ray Serve metrics (``ray.serve.metrics``).

Every name starts with ``acestep_``; Prometheus sees ``ray_acestep_<name>`` (counters end in
``_total``, histograms have ``_bucket`` / ``_sum`` / ``_count``), and Serve tags each sample with
its ``deployment``, ``replica`` and ``application`` besides the tags listed in ``SPECS``. Each
node's Ray metrics agent serves them at the node's metrics export port (``ray start
--metrics-export-port``) some seconds after they are recorded (Ray's report interval).

Callers record where the work already happens (the guard, admission, the task driver, the ingress
view refresh, the adapter pool) through the small functions below; the LM and DiT replicas turn
their engine's and worker's ``stats()`` into metrics once a second (``watch``). A metric is created
on first use in each process, so it carries that replica's tags; outside a Ray worker (unit tests)
recording does nothing. Tag values are bounded sets: route templates (never raw paths), phases,
reasons, failure codes, and model and adapter names from the server's config.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from serve.logs import log


SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    description: str
    tags: Tuple[str, ...]
    boundaries: Tuple[float, ...] = ()


SPECS: Dict[str, Spec] = {
    "acestep_http_requests": Spec("counter", "HTTP requests answered, by route template, method and status "
                                  "(status 'disconnected': the client left before an answer)",
                                  ("route", "method", "status")),
    "acestep_admissions": Spec("counter", "Admissions: kind 'task' (a new task passed every bound) or "
                               "'sync_slot' (a waiting sync request got a slot)", ("kind",)),
    "acestep_rejections": Spec("counter", "Requests refused before a task existed, by reason: the bound hit "
                               "(global, key_unfinished, key_rate, sync; 429) or draining (503)", ("reason",)),
    "acestep_task_phase_seconds": Spec("histogram", "Seconds a task spent in a phase (queued, lm, dit, encode), "
                                       "from its stored events", ("phase",), SECONDS),
    "acestep_tasks_finished": Spec("counter", "Tasks that ended, by outcome (done, failed) and failure code",
                                   ("outcome", "code")),
    "acestep_task_store_tasks": Spec("gauge", "Task records in the task store by phase (every ingress replica "
                                     "reports the same shared store: aggregate with max)", ("phase",)),
    "acestep_lm_tokens": Spec("counter", "Tokens the LM engine sampled (one per running request per step)",
                              ("model",)),
    "acestep_lm_steps": Spec("counter", "LM engine decode steps", ("model",)),
    "acestep_lm_step_rows": Spec("histogram", "KV rows decoding in one LM engine step (a CFG request takes two)",
                                 ("model",), ROWS),
    "acestep_lm_kv_rows_in_use": Spec("gauge", "LM engine KV-cache rows held by running requests", ("model",)),
    "acestep_lm_kv_rows": Spec("gauge", "LM engine KV-cache rows in all (engine.max_rows)", ("model",)),
    "acestep_dit_forwards": Spec("counter", "DiT forwards (one per group of running items per sampling step)",
                                 ("model",)),
    "acestep_dit_item_steps": Spec("counter", "Sampling steps of DiT items (each item in a forward takes one)",
                                   ("model",)),
    "acestep_dit_forward_rows": Spec("histogram", "Rows in one DiT forward: its batch size (a guided item takes "
                                     "two)", ("model",), ROWS),
    "acestep_adapter_loads": Spec("counter", "Adapters loaded into a DiT replica", ("adapter",)),
    "acestep_adapter_evictions": Spec("counter", "Adapters a DiT replica unloaded to make room", ("adapter",)),
    "acestep_training_steps": Spec("counter", "Optimizer steps of adapter training runs started over HTTP",
                                   ("kind",)),
    "acestep_training_loss": Spec("gauge", "Loss of the latest optimizer step of a training run (the run's "
                                  "mean over every worker's samples)", ("kind",)),
    "acestep_training_jobs": Spec("counter", "Dataset and training jobs that ended, by job (dataset, training) "
                                  "and outcome (done, failed)", ("job", "outcome")),
}

_made: Dict[str, Any] = {}
_lock = threading.Lock()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to find it is not running
    return ray is not None and ray.is_initialized()


def _metric(name: str):
    """This process's metric ``name``, made on first use; None outside a Ray worker."""
    made = _made.get(name)
    if made is not None or not _ray_running():
        return made
    from ray.serve import metrics as serve_metrics

    spec = SPECS[name]
    kinds = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge, "histogram": serve_metrics.Histogram}
    options: Dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
    if spec.kind == "histogram":
        options["boundaries"] = list(spec.boundaries)
    with _lock:
        if name not in _made:
            _made[name] = kinds[spec.kind](name, **options)
    return _made[name]


def _tags(name: str, values: Mapping[str, Any]) -> Dict[str, str]:
    return {key: str(values[key]) for key in SPECS[name].tags}


def inc(name: str, value: float = 1.0, **tags: Any) -> None:
    metric = _metric(name)
    if metric is not None and value > 0:
        metric.inc(value, tags=_tags(name, tags))


def observe(name: str, value: float, **tags: Any) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.observe(value, tags=_tags(name, tags))


def set_gauge(name: str, value: float, **tags: Any) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.set(value, tags=_tags(name, tags))


# -- what callers record ---------------------------------------------------------------------------


def http_request(route: str, method: str, status: Any) -> None:
    inc("acestep_http_requests", route=route, method=method, status=status)


def admitted(kind: str) -> None:
    inc("acestep_admissions", kind=kind)


def rejected(reason: str) -> None:
    inc("acestep_rejections", reason=reason)


def phase_done(phase: str, seconds: float) -> None:
    observe("acestep_task_phase_seconds", max(0.0, seconds), phase=phase)


def task_finished(outcome: str, code: Optional[str]) -> None:
    inc("acestep_tasks_finished", outcome=outcome, code=code or "")


def training_step(kind: str, steps: int, loss: float) -> None:
    inc("acestep_training_steps", steps, kind=kind)
    set_gauge("acestep_training_loss", loss, kind=kind)


def training_job(job: str, outcome: str) -> None:
    inc("acestep_training_jobs", job=job, outcome=outcome)


def store_tasks(counts: Mapping[str, int]) -> None:
    for phase, count in counts.items():
        set_gauge("acestep_task_store_tasks", count, phase=phase)


def adapter_loaded(name: str) -> None:
    inc("acestep_adapter_loads", adapter=name)


def adapter_evicted(name: str) -> None:
    inc("acestep_adapter_evictions", adapter=name)


def route_template(scope: Mapping[str, Any], routes: Sequence[Any] = ()) -> str:
    """The template of the route serving ``scope`` (``/v1/tasks/{task_id}``), never its raw path: the
    router's pick once it ran, else the first of ``routes`` that matches, else "unmatched"."""
    route = scope.get("route")
    if route is None:
        from starlette.routing import Match

        for candidate in routes:
            if candidate.matches(scope)[0] is not Match.NONE:
                route = candidate
                break
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"


# -- engine and worker stats -----------------------------------------------------------------------


class _Meter:
    """Successive ``stats()`` snapshots → metrics: a counter grows by the difference since the last
    snapshot, a histogram gets one sample per event counted since, a gauge takes the value. A count
    that went down (a new engine) counts from zero."""

    def __init__(self, model: str):
        self.tags = {"model": model}
        self._last: Dict[str, Any] = {}

    def _grow(self, name: str, value: int) -> None:
        before = self._last.get(name, 0)
        self._last[name] = value
        inc(name, value - before if value >= before else value, **self.tags)

    def _spread(self, name: str, counts: Mapping[int, int]) -> None:
        before = self._last.get(name, {})
        self._last[name] = dict(counts)
        for size, count in counts.items():
            new = count - before.get(size, 0)
            for _ in range(new if new >= 0 else count):
                observe(name, float(size), **self.tags)


class LMMeter(_Meter):
    def record(self, stats: Mapping[str, Any]) -> None:
        self._grow("acestep_lm_tokens", stats.get("tokens", 0))
        self._grow("acestep_lm_steps", stats.get("steps", 0))
        self._spread("acestep_lm_step_rows", stats.get("rows_per_step") or {})
        set_gauge("acestep_lm_kv_rows_in_use", stats.get("rows_in_use", 0), **self.tags)
        set_gauge("acestep_lm_kv_rows", stats.get("max_rows", 0), **self.tags)


class DiTMeter(_Meter):
    def record(self, stats: Mapping[str, Any]) -> None:
        items = stats.get("items_per_forward") or {}
        self._grow("acestep_dit_forwards", sum(items.values()))
        self._grow("acestep_dit_item_steps", sum(size * count for size, count in items.items()))
        self._spread("acestep_dit_forward_rows", stats.get("rows_per_forward") or {})


def watch(read: Callable[[], Mapping[str, Any]], meter: _Meter, period_s: float = 1.0) -> threading.Thread:
    """Record ``read()`` (an engine's or worker's ``stats``) with ``meter`` every ``period_s`` on a
    daemon thread: reading the stats is cheap and never waits for a step."""

    def run() -> None:
        while True:
            time.sleep(period_s)
            try:
                meter.record(read())
            except Exception:  # metrics are advisory: a failed read must not stop the next one
                log.debug("metrics refresh failed", exc_info=True)

    thread = threading.Thread(target=run, name=f"metrics-{type(meter).__name__}", daemon=True)
    thread.start()
    return thread
