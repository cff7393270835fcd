"""Dataset, label and training jobs started over HTTP, run outside the ingress.

A job is a task record (``request["kind"]``: "dataset", "label" or "training") that an ingress replica's
driver claims like any task; its path (``run_job``) starts a detached, named Ray actor per task
(``JobActor``, no CPU of its own) and awaits it. The actor calls the batch jobs' own functions:
``pipelines.prepare_dataset.run`` (Ray Data actors), ``pipelines.prepare_dataset.label_songs`` (the
LM's labels, written into the songs' sidecars) or ``pipelines.train_lora.run`` (a Ray Train
``TorchTrainer``), so the work runs on the cluster's nodes, never in the ingress replica. While the
job runs the actor writes its progress into the task's events (phase ``prepare`` -- dataset and label
jobs, ``detail.training`` with current and total -- or ``train``: step, steps, loss and the steps'
losses since the last event) and the ``acestep_training_*`` metrics. Unless ``training.cpus_per_worker``
is set, each job's workers claim the CPUs free when it starts, shared (``job_cpus``). A cancelled task
(``DELETE /v1/tasks/{id}``, ``/v1/training/stop``) ends the actor, and Ray ends the Ray Train workers
and Ray Data actors it owns with it. A re-driven task (after a drain) finds its actor by name and
waits for the same run.

Files live under the training directory (``serve.config.TrainingSettings``): ``datasets/{name}/songs``
(uploads and their sidecars: a song's labels), ``datasets/{name}/dataset.json`` (its ``DatasetMeta``),
``datasets/{name}/prepared`` (samples + manifest), ``runs/{name}`` (the run's folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from acestep.training.labels import CaptionTag
from serve import metrics
from serve.driver import TaskFailure

log = logging.getLogger("acestep.serve")
JOB_KINDS = ("dataset", "label", "training")
META_FILE = "dataset.json"
NAMESPACE = "acestep-jobs"
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROGRESS_FILE = "progress.jsonl"
POLL_S = 0.5


def valid_name(value: str) -> bool:
    """A dataset, run or adapter name: a plain file name (letters, digits, ``_ . -``), never a path."""
    return bool(NAME_RULE.match(value or "")) and ".." not in value


def job_cpus(setting: Optional[float], workers: int, free: float) -> float:
    """CPUs per worker: ``training.cpus_per_worker`` when set, else the ``free`` CPUs shared by the
    workers (two decimals, rounded down), at most one and at least a small floor each: a claim past
    what is free would wait forever behind the replicas' own (``acestep serve --demo`` on two CPUs)."""
    from pipelines.placement import MAX_ACTOR_CPUS, MIN_ACTOR_CPUS

    if setting is not None:
        return setting
    return min(MAX_ACTOR_CPUS, max(MIN_ACTOR_CPUS, math.floor(free / max(1, workers) * 100) / 100))


@dataclass
class DatasetMeta:
    """A dataset's own settings (upstream's dataset metadata), in ``datasets/{name}/dataset.json``."""

    custom_tag: str = CaptionTag.custom_tag
    tag_position: str = CaptionTag.tag_position
    all_instrumental: bool = True  # songs without lyrics are instrumental (upstream's default)
    genre_ratio: int = CaptionTag.genre_ratio


def read_meta(root: Path, name: str) -> DatasetMeta:
    """The dataset's settings (the defaults where it has none yet)."""
    path = Path(root) / "datasets" / name / META_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DatasetMeta()
    known = {f.name for f in fields(DatasetMeta)}
    return DatasetMeta(**{k: v for k, v in values.items() if k in known}) if isinstance(values, dict) else DatasetMeta()


def write_meta(root: Path, name: str, meta: DatasetMeta) -> None:
    from acestep.jsonl import replace_atomically

    path = Path(root) / "datasets" / name / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(meta), indent=1, ensure_ascii=False)
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass
class JobSpec:
    """What a job task's stored request holds (besides ``kind``)."""

    kind: str  # "dataset" | "label" | "training"
    dataset: str  # the dataset's name
    root: str  # the training directory
    checkpoints: str  # the checkpoints root holding the DiT
    dit_config: str
    store_url: str
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = None  # None: fitted to the CPUs free when the job starts
    run: str = ""  # training: the run's name
    train: Dict[str, Any] = field(default_factory=dict)  # training: TrainConfig.to_dict()
    lm: str = ""  # label: the LM's name
    label: Dict[str, Any] = field(default_factory=dict)  # label: only_unlabeled, skip_metas, transcribe_lyrics

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
                self.result = {"dataset": self._dataset, "label": self._label, "training": self._training}[
                    self.spec.kind]()
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
        """Progress into the task's events (the label job writes its own); a cancelled task ends this
        process (and what it owns)."""
        spec = self.spec
        path = spec.prepared() / ".manifest.journal.jsonl" if spec.kind == "dataset" else spec.run_dir() / PROGRESS_FILE
        tail, count = _Tail(path), 0
        while not self.done.wait(POLL_S):
            record = self.store.get(self.task_id)
            if record is not None and record.finished:
                log.warning("job %s: its task ended (%s); stopping", self.task_id, record.error)
                os._exit(0)
            lines = tail.new_lines() if spec.kind != "label" else []
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

    def _options(self, **extra):
        """The dataset and label jobs' ``PrepareOptions``: one actor, its CPUs fitted now."""
        from pipelines.placement import free_cpus
        from pipelines.prepare_dataset import PrepareOptions

        spec = self.spec
        return PrepareOptions(input=str(spec.songs()), output=str(spec.prepared()), checkpoints=spec.checkpoints,
                              dit_config=spec.dit_config, cpus=job_cpus(spec.cpus_per_worker, 1, free_cpus()),
                              gpus=1.0 if spec.use_gpu else 0.0, device="cuda" if spec.use_gpu else "cpu", **extra)

    def _dataset(self) -> Dict[str, Any]:
        from pipelines.prepare_dataset import list_songs, run

        spec = self.spec
        self.total = total = max(1, len(list_songs(str(spec.songs())))) if spec.songs().is_dir() else 1
        self.store.update(self.task_id, "prepare", 0.0, f"preparing {total} songs",
                          {"training": {"current": 0, "total": total}})
        meta = read_meta(Path(spec.root), spec.dataset)
        options = self._options(custom_tag=meta.custom_tag, tag_position=meta.tag_position,
                                genre_ratio=meta.genre_ratio)
        try:
            summary = run(options)
        except FileNotFoundError:
            raise TaskFailure("invalid_dataset", f"dataset {spec.dataset}: no audio files to prepare") from None
        failed = [{"id": r.id, "error": r.error} for r in summary.records if r.error]
        message = f"prepared {summary.done + summary.skipped} of {summary.total} songs"
        return {"message": message, "output_dir": spec.dataset, "num_tensors": summary.total - len(failed),
                "total": summary.total, "failed": failed, "seconds": round(summary.seconds, 3)}

    def _label(self) -> Dict[str, Any]:
        """The LM's labels into the songs' sidecars, song by song (upstream's auto-label rules)."""
        from pipelines.prepare_dataset import label_songs, list_songs

        spec = self.spec
        songs = list_songs(str(spec.songs())) if spec.songs().is_dir() else []
        chosen = [s for s in songs if not (spec.label.get("only_unlabeled") and is_labeled(_values(s)))]
        position = {song.id: index for index, song in enumerate(songs)}
        total, labeled, failed, last = len(chosen), 0, [], {}
        self.store.update(self.task_id, "prepare", 0.0, f"Labeling 0/{total}",
                          {"training": {"current": 0, "total": total}})
        try:
            results = label_songs(self._options(lm=spec.lm), chosen) if chosen else []
            for count, (song, labels, error) in enumerate(results, 1):
                detail = {"current": count, "total": total, "last_updated_index": position[song.id]}
                if labels is not None:
                    detail["last_updated_sample"] = self._write_labels(song, labels)
                    labeled += 1
                else:
                    failed.append({"index": position[song.id], "error": error})
                self.store.update(self.task_id, "prepare", min(0.99, count / max(1, total)),
                                  f"Labeling {count}/{total}: {song.source.rsplit('/', 1)[-1]}", {"training": detail})
                last = {k: v for k, v in detail.items() if k.startswith("last_")}
        except FileNotFoundError as missing:  # the LM (or the DiT) is not in the checkpoints
            raise TaskFailure("invalid_model", str(missing).replace(spec.checkpoints, "<checkpoints>")) from None
        message = f"Labeled {labeled}/{total} samples" + (f" ({len(failed)} failed)" if failed else "")
        return {"message": message, "labeled": labeled, "failed": failed, "total": total,
                "dataset_name": spec.dataset, **last}

    def _write_labels(self, song, labels: Dict[str, Any]) -> Dict[str, Any]:
        from acestep.training.labels import apply_labels, is_instrumental
        from pipelines.prepare_dataset import write_sidecar

        rules, values = self.spec.label, _values(song)
        instrumental = is_instrumental(values, read_meta(Path(self.spec.root), self.spec.dataset).all_instrumental)
        values = apply_labels(values, labels, instrumental, bool(rules.get("skip_metas")),
                              bool(rules.get("transcribe_lyrics")))
        write_sidecar(song, values)
        return values

    def _training(self) -> Dict[str, Any]:
        from acestep.training.loop import TrainConfig
        from acestep.training.samples import DatasetError
        from pipelines.train_lora import TrainJob, run

        spec = self.spec
        out = spec.run_dir()
        out.mkdir(parents=True, exist_ok=True)
        (out / PROGRESS_FILE).unlink(missing_ok=True)
        self.store.update(self.task_id, "train", 0.0, "starting",
                          {"training": {"step": 0, "steps": spec.train["steps"]}})
        from pipelines.placement import free_cpus

        job = TrainJob(data=str(spec.prepared()), output=str(out), checkpoints=spec.checkpoints,
                       dit_config=spec.dit_config, workers=spec.workers, use_gpu=spec.use_gpu,
                       cpus_per_worker=job_cpus(spec.cpus_per_worker, spec.workers, free_cpus()),
                       progress=str(out / PROGRESS_FILE))
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


def _values(song) -> Dict[str, Any]:
    """A song's sidecar fields; a broken sidecar reads as none (a label run replaces it)."""
    from pipelines.prepare_dataset import sidecar_values

    try:
        return sidecar_values(song)
    except (OSError, ValueError):
        return {}


def is_labeled(values: Dict[str, Any]) -> bool:
    """Upstream's "labeled" for a song: it has a caption (its own, or from a label run)."""
    return bool(str(values.get("caption") or "").strip())


def job_request(spec: JobSpec, request_id: str = "") -> Dict[str, Any]:
    return {"kind": spec.kind, "job": asdict(spec), "request_id": request_id}
