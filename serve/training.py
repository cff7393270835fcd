"""Dataset and training jobs started over HTTP, run outside the ingress.

A job is a task record (``request["kind"]``: "dataset" or "training") that an ingress replica's
driver claims like any task; its path (``run_job``) starts a detached, named Ray actor per task
(``JobActor``, no CPU of its own) and awaits it. The actor calls the batch jobs' own functions:
``pipelines.prepare_dataset.run`` (Ray Data actors) or ``pipelines.train_lora.run`` (a Ray Train
``TorchTrainer``), so the work runs on the cluster's nodes, never in the ingress replica. While the
job runs the actor writes its progress into the task's events (phase ``prepare`` or ``train``;
``detail.training`` carries step, steps, loss and the steps' losses since the last event) and the
``acestep_training_*`` metrics. A cancelled task (``DELETE /v1/tasks/{id}``, ``/v1/training/stop``)
ends the actor, and Ray ends the Ray Train workers and Ray Data actors it owns with it. A re-driven
task (after a drain) finds its actor by name and waits for the same run.

Files live under the training directory (``serve.config.TrainingSettings``): ``datasets/{name}/songs``
(uploads), ``datasets/{name}/prepared`` (samples + manifest), ``runs/{name}`` (the run's folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from serve import metrics
from serve.driver import TaskFailure

log = logging.getLogger("acestep.serve")
JOB_KINDS = ("dataset", "training")
NAMESPACE = "acestep-jobs"
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROGRESS_FILE = "progress.jsonl"
POLL_S = 0.5


def valid_name(value: str) -> bool:
    """A dataset, run or adapter name: a plain file name (letters, digits, ``_ . -``), never a path."""
    return bool(NAME_RULE.match(value or "")) and ".." not in value


@dataclass
class JobSpec:
    """What a job task's stored request holds (besides ``kind``)."""

    kind: str  # "dataset" | "training"
    dataset: str  # the dataset's name
    root: str  # the training directory
    checkpoints: str  # the checkpoints root holding the DiT
    dit_config: str
    store_url: str
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    run: str = ""  # training: the run's name
    train: Dict[str, Any] = field(default_factory=dict)  # training: TrainConfig.to_dict()

    def songs(self) -> Path:
        return Path(self.root) / "datasets" / self.dataset / "songs"

    def prepared(self) -> Path:
        return Path(self.root) / "datasets" / self.dataset / "prepared"

    def run_dir(self) -> Path:
        return Path(self.root) / "runs" / self.run


def dataset_dirs(root: Path, name: str) -> Dict[str, Path]:
    return {"songs": root / "datasets" / name / "songs", "prepared": root / "datasets" / name / "prepared"}


class _Tail:
    """Reads the lines a job appends to a file (the run's progress, the dataset job's journal)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> List[Dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


class JobActor:
    """One job: ``run`` once (a second call, from a re-drive, waits for and returns the same result)."""

    def __init__(self, task_id: str, spec: Dict[str, Any]):
        from serve.store import open_task_store

        self.task_id, self.spec = task_id, JobSpec(**spec)
        self.store = open_task_store(self.spec.store_url)
        self.result: Optional[Dict[str, Any]] = None
        self.done = threading.Event()
        self.total = 1  # the dataset job's song count

    def run(self) -> Dict[str, Any]:
        if self.result is None:
            watcher = threading.Thread(target=self._watch, daemon=True)
            watcher.start()
            try:
                self.result = self._dataset() if self.spec.kind == "dataset" else self._training()
            except TaskFailure as failure:  # handed back as data: the exception's code would not survive pickling
                self.result = {"failure": [failure.code, failure.message]}
            except Exception:
                metrics.training_job(self.spec.kind, "failed")
                raise
            finally:
                self.done.set()
                watcher.join()
            metrics.training_job(self.spec.kind, "failed" if "failure" in self.result else "done")
        return self.result

    def _watch(self) -> None:
        """Progress into the task's events; a cancelled task ends this process (and what it owns)."""
        spec = self.spec
        path = spec.prepared() / ".manifest.journal.jsonl" if spec.kind == "dataset" else spec.run_dir() / PROGRESS_FILE
        tail, count = _Tail(path), 0
        while not self.done.wait(POLL_S):
            record = self.store.get(self.task_id)
            if record is not None and record.finished:
                log.warning("job %s: its task ended (%s); stopping", self.task_id, record.error)
                os._exit(0)
            lines = tail.new_lines()
            if lines and spec.kind == "dataset":
                count += len(lines)
                self.store.update(self.task_id, "prepare", min(0.99, count / self.total),
                                  f"prepared {count} of {self.total}",
                                  {"training": {"current": count, "total": self.total}})
            elif lines:
                self._steps(lines)
        if spec.kind == "training":
            self._steps(tail.new_lines())

    def _steps(self, lines: List[Dict[str, Any]]) -> None:
        if not lines:
            return
        steps, last = int(self.spec.train.get("steps", 1)), lines[-1]
        kind = self.spec.train.get("adapter", {}).get("kind", "lora")
        metrics.training_step(kind, len(lines), float(last["loss"]))
        detail = {"training": {"step": last["step"], "steps": steps, "loss": last["loss"], "kind": kind,
                               "losses": [[line["step"], line["loss"]] for line in lines]}}
        self.store.update(self.task_id, "train", min(0.99, last["step"] / steps),
                          f"step {last['step']} of {steps}, loss {last['loss']:.4f}", detail)

    def _dataset(self) -> Dict[str, Any]:
        from pipelines.prepare_dataset import PrepareOptions, list_songs, run

        spec = self.spec
        self.total = total = max(1, len(list_songs(str(spec.songs())))) if spec.songs().is_dir() else 1
        self.store.update(self.task_id, "prepare", 0.0, f"preparing {total} songs",
                          {"training": {"current": 0, "total": total}})
        options = PrepareOptions(input=str(spec.songs()), output=str(spec.prepared()), checkpoints=spec.checkpoints,
                                 dit_config=spec.dit_config, cpus=spec.cpus_per_worker,
                                 gpus=1.0 if spec.use_gpu else 0.0, device="cuda" if spec.use_gpu else "cpu")
        try:
            summary = run(options)
        except FileNotFoundError:
            raise TaskFailure("invalid_dataset", f"dataset {spec.dataset}: no audio files to prepare") from None
        failed = [{"id": r.id, "error": r.error} for r in summary.records if r.error]
        message = f"prepared {summary.done + summary.skipped} of {summary.total} songs"
        return {"message": message, "output_dir": spec.dataset, "num_tensors": summary.total - len(failed),
                "failed": failed, "seconds": round(summary.seconds, 3)}

    def _training(self) -> Dict[str, Any]:
        from acestep.training.loop import TrainConfig
        from acestep.training.samples import DatasetError
        from pipelines.train_lora import TrainJob, run

        spec = self.spec
        out = spec.run_dir()
        out.mkdir(parents=True, exist_ok=True)
        (out / PROGRESS_FILE).unlink(missing_ok=True)
        self.store.update(self.task_id, "train", 0.0, "starting", {"training": {"step": 0, "steps": spec.train["steps"]}})
        job = TrainJob(data=str(spec.prepared()), output=str(out), checkpoints=spec.checkpoints,
                       dit_config=spec.dit_config, workers=spec.workers, use_gpu=spec.use_gpu,
                       cpus_per_worker=spec.cpus_per_worker, progress=str(out / PROGRESS_FILE))
        try:
            result = run(job, TrainConfig(**spec.train))
        except (DatasetError, FileNotFoundError):
            raise TaskFailure("invalid_dataset", f"dataset {spec.dataset} has no prepared samples; "
                                                 "run /v1/dataset/preprocess_async first") from None
        return {"message": "training finished", "run": spec.run, "steps": result.steps,
                "final_loss": result.losses[-1], "losses": result.losses,
                "steps_per_second": round(result.steps_per_s, 4), "seconds": round(result.seconds, 3)}


async def run_job(record) -> Dict[str, Any]:
    """The driver's path for a job task: the task's actor (started here, or found again after a
    re-drive), awaited; the actor is ended once it has answered."""
    import ray

    spec = dict(record.request["job"])
    remote = ray.remote(num_cpus=0, max_restarts=0)(JobActor)
    actor = remote.options(name=f"job-{record.task_id}", namespace=NAMESPACE, lifetime="detached",
                           get_if_exists=True).remote(record.task_id, spec)
    result = await actor.run.remote()
    ray.kill(actor)
    if "failure" in result:
        raise TaskFailure(*result["failure"])
    return result


def job_request(spec: JobSpec, request_id: str = "") -> Dict[str, Any]:
    return {"kind": spec.kind, "job": asdict(spec), "request_id": request_id}
