"""A training run in one process: load the DiT for training, train, checkpoint, save the adapter.

The Ray Train job (``pipelines.train_lora``) runs the same pieces in each worker; this is the
one-process form (tests, and a single machine without Ray).

Output folder: ``adapter/`` (the final adapter, official PEFT layout), ``checkpoints/step_N/``
(``adapter/`` + ``training_state.pt``: every ``checkpoint_every`` steps), ``train_log.json``
(config and per-step losses)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.training.loop import TrainConfig, Trainer
from acestep.training.objective import Objective
from acestep.training.samples import SampleSet

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"
LOG_FILE = "train_log.json"


@dataclass
class TrainingModel:
    """What training needs of a DiT checkpoint: the transformer, the null condition CFG dropout
    swaps in, and the objective's constants from the checkpoint's config."""

    transformer: torch.nn.Module
    null_condition: torch.Tensor
    objective: Objective


@dataclass
class TrainResult:
    steps: int
    losses: List[float]
    adapter_dir: Path
    seconds: float
    checkpoints: List[Path] = field(default_factory=list)


def training_dtype(device: torch.device) -> torch.dtype:
    """Frozen base weights: bf16 on CUDA (autocast runs the forward in bf16 anyway), fp32 elsewhere;
    the adapter's own tensors stay fp32 (peft keeps them so beside a bf16 base)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_for_training(checkpoints: str, dit_config: str, device: str = "cpu") -> TrainingModel:
    from acestep.checkpoints.loader import load_diffusers_module, load_official_dit
    from acestep.checkpoints.mapping import DIT_COMPONENTS

    checkpoint = resolve_dit_checkpoint(checkpoints, dit_config)
    device_ = torch.device(device)
    dtype = training_dtype(device_)
    if checkpoint.layout == "official":
        modules = load_official_dit(checkpoint.dit_dir, dtype=dtype, device=device_)
        config = json.loads((checkpoint.dit_dir / "config.json").read_text())
    else:
        modules = {name: load_diffusers_module(checkpoint.dit_dir / name, DIT_COMPONENTS[name], dtype=dtype,
                                               device=device_) for name in ("transformer", "condition_encoder")}
        config = dict(modules["transformer"].config)
    transformer = modules["transformer"]
    transformer.requires_grad_(False)
    return TrainingModel(transformer, modules["condition_encoder"].null_condition_emb.detach(),
                         Objective.from_model_config(config))


def write_checkpoint(trainer: Trainer, folder: Path) -> Path:
    """``adapter/`` (inference-ready, as upstream's checkpoints are) + ``training_state.pt``."""
    folder = Path(folder)
    trainer.save_adapter(folder / ADAPTER_DIR)
    tmp = folder / f".{STATE_FILE}.part"
    torch.save(trainer.state_dict(), tmp)
    tmp.replace(folder / STATE_FILE)
    return folder


def read_checkpoint(folder: Path) -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def write_log(trainer: Trainer, output: Path, seconds: float) -> None:
    log = {"config": trainer.config.to_dict(), "steps": trainer.step, "losses": trainer.losses,
           "workers": trainer.world_size, "seconds": seconds}
    (Path(output) / LOG_FILE).write_text(json.dumps(log, indent=2))


def train(checkpoints: str, dit_config: str, data: str, output: str, config: TrainConfig, device: str = "cpu",
          resume: Optional[str] = None, on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Train in this process; ``resume``: a ``checkpoints/step_N`` folder of an earlier run."""
    started = time.perf_counter()
    model = load_for_training(checkpoints, dit_config, device)
    trainer = Trainer(model.transformer, model.null_condition, SampleSet(data), config, model.objective)
    if resume:
        trainer.load_state_dict(read_checkpoint(Path(resume)))
    out = Path(output)
    saved = []
    while trainer.step < config.steps:
        loss = trainer.train_step()
        if on_step is not None:
            on_step(trainer.step, loss)
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            saved.append(write_checkpoint(trainer, out / "checkpoints" / f"step_{trainer.step}"))
    adapter = trainer.save_adapter(out / ADAPTER_DIR)
    seconds = time.perf_counter() - started
    write_log(trainer, out, seconds)
    return TrainResult(trainer.step, list(trainer.losses), adapter, seconds, saved)
