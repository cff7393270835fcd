"""``acestep train-lora`` / ``python -m pipelines.train_lora``: LoRA / LoKr training on Ray Train.

    acestep train-lora --data prepared/ --out runs/my-style --checkpoints ./checkpoints --workers 2

A ``TorchTrainer`` runs ``acestep.training``'s loop in each worker (gloo on CPUs, NCCL on GPUs): the
workers read the same prepared folder, each takes its slice of every global batch, and their
gradients are averaged in one all-reduce per optimizer step, so N workers × batch b train the same
adapter as one worker × batch N·b. Every ``--checkpoint-every`` steps rank 0 reports a checkpoint
(the adapter in the official PEFT layout + the optimizer state) to Ray Train; when a worker dies,
Ray Train (``--max-failures``) restarts the group from the latest one and the run continues exactly
where it was. The last checkpoint is the result: its adapter is copied to ``{out}/adapter`` and the
run's log to ``{out}/train_log.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from acestep.training.loop import PRECISIONS, SCHEDULERS, TrainConfig
from acestep.training.lora import ADAPTER_KINDS, ATTENTION_TYPES, AdapterSpec

logger = logging.getLogger(__name__)
RUN_NAME = "train"


@dataclass
class TrainJob:
    """Where the run reads and writes and how many workers it uses; ``main`` fills it."""

    data: str  # a prepared folder (``pipelines.prepare_dataset``), local or a filesystem URI
    output: str  # the run's folder: adapter/, train_log.json, ray/ (Ray Train's checkpoints)
    checkpoints: Optional[str] = None  # checkpoints root holding the DiT folder
    demo: bool = False  # tiny demo checkpoints, written under {output}/.demo-checkpoints
    dit_config: str = "acestep-v15-turbo"  # the DiT folder the adapter is for
    workers: int = 1  # Ray Train workers (one process each; one GPU each with use_gpu)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage: Optional[str] = None  # where Ray Train keeps checkpoints (default {output}/ray; a URI on a cluster)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    fail_once_at: Optional[Tuple[int, int]] = None  # (rank, step): that worker exits there unless resumed
    progress: Optional[str] = None  # a local file rank 0 appends {"step", "loss"} to after every step (JSON lines)


@dataclass
class TrainJobResult:
    steps: int
    losses: List[float]
    adapter_dir: Path
    seconds: float
    steps_per_s: float  # optimizer steps per second of the last attempt's training loop
    resumed_at: List[int] = field(default_factory=list)  # steps the run resumed from after lost workers

    def line(self) -> str:
        return (f"train-lora: {self.steps} steps, loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, "
                f"{self.steps_per_s:.2f} steps/s; adapter: {self.adapter_dir}")


def _localize(data: str) -> str:
    """A URI's prepared folder copied to a local temporary folder (a path is used as it is)."""
    if "://" not in data:
        return data
    import fsspec

    fs, path = fsspec.core.url_to_fs(data)
    local = tempfile.mkdtemp(prefix="acestep-data-")
    fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
    return local


def _maybe_fail(job: TrainJob, rank: int, step: int, resumed: bool) -> None:
    """Rehearse a lost worker: the process ends the way a crashed or preempted one does."""
    if job.fail_once_at is not None and not resumed and (rank, step) == tuple(job.fail_once_at):
        logger.warning("rank %d: exiting at step %d (fail_once_at)", rank, step)
        os._exit(1)


def _append_progress(path: str, step: int, loss: float) -> None:
    """One line per step, flushed, so a watcher sees the run's steps as they happen."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "loss": loss}) + "\n")


def _report(trainer, rank: int, rate: float, final: bool) -> None:
    import ray.train
    from acestep.training.run import write_checkpoint

    metrics = {"step": trainer.step, "loss": trainer.losses[-1], "steps_per_s": rate, "final": final}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = ray.train.Checkpoint.from_directory(str(write_checkpoint(trainer, Path(folder)))) \
            if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)  # every rank reports: it is a barrier too


def train_worker(loop_config: Dict[str, Any]) -> None:
    """One Ray Train worker: load the DiT, resume from Ray Train's checkpoint if any, train."""
    import ray.train
    import ray.train.torch

    from acestep.training.loop import Trainer
    from acestep.training.run import load_for_training, read_checkpoint
    from acestep.training.samples import SampleSet

    job, config = TrainJob(**loop_config["job"]), TrainConfig(**loop_config["train"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if job.use_gpu else "cpu"
    model = load_for_training(job.checkpoints, job.dit_config, str(device))
    trainer = Trainer(model.transformer, model.null_condition, SampleSet(_localize(job.data)), config,
                      model.objective)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(read_checkpoint(Path(folder)))
        trainer.resumed_at.append(trainer.step)
    started, first = time.perf_counter(), trainer.step
    while trainer.step < config.steps:
        trainer.train_step()
        if rank == 0 and job.progress:
            _append_progress(job.progress, trainer.step, trainer.losses[-1])
        _maybe_fail(job, rank, trainer.step, checkpoint is not None)
        last = trainer.step == config.steps
        if last or trainer.step % config.checkpoint_every == 0:
            rate = (trainer.step - first) / max(time.perf_counter() - started, 1e-9)
            _report(trainer, rank, rate, last)


def _resolve_checkpoints(job: TrainJob) -> None:
    from acestep.checkpoints.layout import resolve_dit_checkpoint

    if job.demo:
        from acestep.checkpoints.demo import write_demo_checkpoints

        root = Path(job.output) / ".demo-checkpoints"
        if not (root / job.dit_config).is_dir():
            write_demo_checkpoints(root, with_lm=False)
        job.checkpoints = str(root)
    job.checkpoints = str(Path(job.checkpoints).resolve())
    resolve_dit_checkpoint(job.checkpoints, job.dit_config)  # FileNotFoundError naming the folder, before Ray


def build_trainer(job: TrainJob, config: TrainConfig):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = job.storage or str((Path(job.output) / "ray").resolve())
    return TorchTrainer(
        train_worker, train_loop_config={"job": job.__dict__, "train": config.to_dict()},
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage,
                             failure_config=FailureConfig(max_failures=job.max_failures)))


def run(job: TrainJob, config: TrainConfig) -> TrainJobResult:
    """Train on Ray Train; the final checkpoint's adapter → ``{output}/adapter``."""
    import ray

    from acestep.training.run import ADAPTER_DIR, LOG_FILE, read_checkpoint

    from acestep.training.samples import sample_files

    started = time.perf_counter()
    if "://" not in job.data:
        job.data = str(Path(job.data).resolve())
        sample_files(job.data)  # DatasetError naming the folder, before Ray
    _resolve_checkpoints(job)
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set in a RayJob) or a new local Ray
    result = build_trainer(job, config).fit()
    out = Path(job.output)
    with result.checkpoint.as_directory() as folder:
        state = read_checkpoint(Path(folder))
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
        shutil.copytree(Path(folder) / ADAPTER_DIR, out / ADAPTER_DIR)
    seconds = time.perf_counter() - started
    done = TrainJobResult(int(state["step"]), list(state["losses"]), out / ADAPTER_DIR, seconds,
                          float(result.metrics.get("steps_per_s", 0.0)), list(state.get("resumed_at", [])))
    log = {"config": config.to_dict(), "workers": job.workers, **{k: v for k, v in done.__dict__.items()
                                                                 if k != "adapter_dir"}}
    (out / LOG_FILE).write_text(json.dumps(log, indent=2))
    return done


def _rank_step(text: str) -> Tuple[int, int]:
    try:
        rank, step = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:STEP, got {text!r}") from None
    return rank, step


def build_parser() -> argparse.ArgumentParser:
    job, train, adapter = TrainJob("", ""), TrainConfig(), AdapterSpec()
    p = argparse.ArgumentParser(prog="acestep train-lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared folder (pipelines.prepare_dataset), path or URI")
    p.add_argument("--out", dest="output", required=True, help="run folder: adapter/, train_log.json, ray/")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--checkpoints", help="checkpoints root")
    models.add_argument("--demo", action="store_true", help="tiny demo checkpoints (written under --out)")
    p.add_argument("--dit-config", default=job.dit_config, help="the DiT folder the adapter is for")
    p.add_argument("--workers", type=int, default=job.workers, help="Ray Train workers")
    p.add_argument("--gpu", dest="use_gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    p.add_argument("--cpus-per-worker", type=float, default=job.cpus_per_worker)
    p.add_argument("--storage", default=None, help="Ray Train checkpoint storage (default {out}/ray; a URI on a "
                                                   "cluster)")
    p.add_argument("--max-failures", type=int, default=job.max_failures,
                   help="worker-group restarts from the latest checkpoint")
    p.add_argument("--fail-once-at", type=_rank_step, default=None, metavar="RANK:STEP",
                   help="rehearse a lost worker: that rank exits at that step unless the run resumed")
    a = p.add_argument_group("adapter")
    a.add_argument("--adapter", dest="kind", choices=ADAPTER_KINDS, default=adapter.kind)
    a.add_argument("--rank", type=int, default=adapter.rank, help="LoRA rank / LoKr linear dimension")
    a.add_argument("--alpha", type=float, default=adapter.alpha)
    a.add_argument("--dropout", type=float, default=adapter.dropout, help="LoRA dropout")
    a.add_argument("--target-modules", nargs="+", default=list(adapter.target_modules), help="official names")
    a.add_argument("--attention-type", dest="attention", choices=ATTENTION_TYPES, default=adapter.attention)
    a.add_argument("--lokr-factor", type=int, default=adapter.lokr_factor)
    a.add_argument("--lokr-decompose-both", action="store_true")
    t = p.add_argument_group("training")
    for name in ("steps", "batch_size", "grad_accumulation", "warmup_steps", "seed", "checkpoint_every"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(train, name))
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "cfg_ratio"):
        t.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(train, name))
    t.add_argument("--scheduler", choices=SCHEDULERS, default=train.scheduler)
    t.add_argument("--precision", choices=PRECISIONS, default=train.precision)
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=train.gradient_checkpointing)
    return p


def parse_args(argv: List[str]) -> Tuple[TrainJob, TrainConfig]:
    """(job, training config); a bad value exits with the field and its allowed range."""
    parser = build_parser()
    args = vars(parser.parse_args([arg for arg in argv if arg != "--"]))
    pick = lambda cls: {f.name: args.pop(f.name) for f in fields(cls) if f.name in args}  # noqa: E731
    try:
        values = pick(AdapterSpec)
        adapter = AdapterSpec(**{**values, "target_modules": tuple(values["target_modules"])})
        job = TrainJob(**pick(TrainJob))
        config = TrainConfig(adapter=adapter, **pick(TrainConfig))
    except ValueError as error:
        parser.error(str(error))
    if job.workers < 1:
        parser.error(f"--workers must be >= 1 (got {job.workers})")
    return job, config


def main(argv: Optional[List[str]] = None) -> int:
    """0 when the run finished, 2 when the data or the model folder is missing."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job, config = parse_args(list(sys.argv[1:] if argv is None else argv))
    from acestep.training.samples import DatasetError

    try:
        result = run(job, config)
    except (FileNotFoundError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
