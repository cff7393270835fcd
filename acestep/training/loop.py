"""The training loop: optimizer steps over prepared samples, one process or one of several.

Determinism without a DistributedSampler: step s, micro-batch m reads the global batch at positions
``(s·accum + m)·B .. + B`` (B = batch_size × workers) of an epoch-seeded permutation of the samples,
each worker taking its own ``batch_size`` slice, and each sample draws its noise, timestep and CFG
dropout from a generator seeded by (seed, step, micro-batch, position). Gradients are averaged over
the workers with one all-reduce per optimizer step (DDP's rule: every worker's batch weighs the
same), so W workers × batch b train the same adapter as one worker × batch W·b, and a run resumed
from a checkpoint continues exactly as if it had never stopped."""

from __future__ import annotations

import functools
import hashlib
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from acestep.training.lora import AdapterSpec, inject, save_official
from acestep.training.objective import CFG_RATIO, Objective, flow_matching_loss
from acestep.training.samples import SampleSet

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
MIN_LR_FACTOR = 0.01  # upstream's schedules end at 1 % of the peak learning rate
WARMUP_START_FACTOR = 0.1  # ... and warm up from 10 % of it


@dataclass
class TrainConfig:
    """One training run (defaults: upstream's trainer's, except that runs count optimizer steps)."""

    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # samples per worker per micro-batch
    grad_accumulation: int = 4  # micro-batches per optimizer step
    learning_rate: float = 1e-4
    weight_decay: float = 0.01  # AdamW
    warmup_steps: int = 100  # linear warm-up from 10 % (at most a tenth of the run, as upstream)
    scheduler: str = "cosine"  # after warm-up: "cosine" or "linear" decay to 1 %, or "constant"
    max_grad_norm: float = 1.0  # gradient clipping (global norm, after the workers' average)
    seed: int = 42
    cfg_ratio: float = CFG_RATIO  # chance of training a sample on the null condition
    gradient_checkpointing: bool = True  # recompute each DiT layer's activations in the backward pass
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; "fp32" / "bf16" to force
    checkpoint_every: int = 100  # optimizer steps between checkpoints (Ray Train resumes from the last)

    def __post_init__(self):
        if isinstance(self.adapter, dict):
            self.adapter = AdapterSpec(**{**self.adapter, "target_modules": tuple(self.adapter["target_modules"])}
                                       if "target_modules" in self.adapter else self.adapter)
        for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: {self.scheduler!r} is not one of {SCHEDULERS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if not 0.0 <= self.cfg_ratio <= 1.0 or self.learning_rate <= 0:
            raise ValueError(f"cfg_ratio must be in [0, 1] (got {self.cfg_ratio}), learning_rate > 0 "
                             f"(got {self.learning_rate})")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_scheduler(optimizer, config: TrainConfig):
    """Upstream's schedule: warm-up over min(warmup, steps // 10) steps (at least one), then the decay."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    warmup = max(1, min(config.warmup_steps, config.steps // 10))
    rest = max(1, config.steps - warmup)
    if config.scheduler == "constant":
        main = ConstantLR(optimizer, factor=1.0, total_iters=config.steps)
    elif config.scheduler == "linear":
        main = LinearLR(optimizer, start_factor=1.0, end_factor=MIN_LR_FACTOR, total_iters=rest)
    else:
        main = CosineAnnealingLR(optimizer, T_max=rest, eta_min=config.learning_rate * MIN_LR_FACTOR)
    start = LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [start, main], milestones=[warmup])


def checkpoint_layers(transformer: torch.nn.Module) -> None:
    """Gradient checkpointing for every DiT layer, whichever forward calls it (the stock one or
    the padded, masked one)."""
    for layer in transformer.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains an adapter on ``transformer`` over ``samples``; one per worker process."""

    def __init__(self, transformer: torch.nn.Module, null_condition: torch.Tensor, samples: SampleSet,
                 config: TrainConfig, objective: Objective = Objective()):
        self.transformer, self.samples, self.config = transformer, samples, config
        self.null_condition = null_condition.detach()
        self.objective = Objective(objective.timestep_mu, objective.timestep_sigma, config.cfg_ratio)
        self.rank, self.world_size = _world()
        self.device = next(transformer.parameters()).device
        torch.manual_seed(config.seed)  # the adapter's initial values: the same on every worker
        self.params = [p for _, p in inject(transformer, config.adapter)]
        self.names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        if config.gradient_checkpointing:
            checkpoint_layers(transformer)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                           **fused)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.step = 0
        self.losses: List[float] = []
        self.resumed_at: List[int] = []  # steps a run resumed from (kept across checkpoints)
        self._epochs: Dict[int, torch.Tensor] = {}

    def _autocast(self):
        bf16 = self.config.precision == "bf16" or (self.config.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def positions(self, micro: int) -> List[int]:
        """This worker's global batch positions at this step's micro-batch ``micro``."""
        b = self.config.batch_size
        first = (self.step * self.config.grad_accumulation + micro) * b * self.world_size + self.rank * b
        return list(range(first, first + b))

    def sample_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(derived_seed(self.config.seed, epoch))
            self._epochs = {epoch: torch.randperm(len(self.samples), generator=generator)}
        return int(self._epochs[epoch][offset])

    def _micro_loss(self, micro: int) -> torch.Tensor:
        positions = self.positions(micro)
        batch = [self.samples[self.sample_index(p)] for p in positions]
        generators = [torch.Generator().manual_seed(derived_seed(self.config.seed, self.step, micro, p))
                      for p in positions]
        torch.manual_seed(derived_seed(self.config.seed, self.step, micro, self.rank))  # LoRA dropout's draws
        with self._autocast():
            return flow_matching_loss(self.transformer, self.null_condition,
                                      [s.target_latents.to(self.device) for s in batch],
                                      [s.encoder_hidden_states.to(self.device) for s in batch],
                                      [s.context_latents.to(self.device) for s in batch], generators, self.objective)

    def train_step(self) -> float:
        """One optimizer step; returns its loss (the mean over every worker's samples)."""
        self.transformer.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(self.config.grad_accumulation):
            loss = self._micro_loss(micro) / self.config.grad_accumulation
            loss.backward()
            total += loss.detach()
        total = self._average(total)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(float(total))
        return self.losses[-1]

    def _average(self, loss: torch.Tensor) -> torch.Tensor:
        """Every worker's gradients and loss → their mean, in one all-reduce."""
        if self.world_size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g).to(p.dtype)
            offset += g.numel()
        return flat[-1]

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "resumed_at": list(self.resumed_at),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "adapter": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(state["adapter"][name].to(p))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        self.resumed_at = list(state.get("resumed_at", []))

    def save_adapter(self, folder: str | Path) -> Path:
        """The adapter in the official PEFT layout (what ``load_lora`` and upstream read)."""
        return save_official(self.transformer, self.config.adapter, folder)
