"""The flow-matching objective the ACE-Step DiT was trained with (the official model's training
``forward``: ``sample_t_r``, CFG dropout to ``null_condition_emb``, x_t = t·noise + (1 − t)·x0, the
velocity target noise − x0, mean squared error), per sample.

Each sample draws its randomness from its own generator, in the official order: the CFG-dropout
uniform, the noise, then two logit-normal draws whose larger is t (r = t: every ACE-Step variant
trains without mean flow). So a sample's loss depends on its generator alone, not on which batch or
worker it is in, and a batch's loss is the mean of its samples' losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from acestep.dit.batch import velocity

# The official constants (model config.json ``timestep_mu`` / ``timestep_sigma``; the training
# forward's ``cfg_ratio`` default). ``data_proportion`` is in the configs too but unused: without
# mean flow the official ``sample_t_r`` sets r = t for the whole batch.
TIMESTEP_MU = -0.4
TIMESTEP_SIGMA = 1.0
CFG_RATIO = 0.15


@dataclass(frozen=True)
class Objective:
    """The objective's constants; ``from_model_config`` reads them as the official trainer does."""

    timestep_mu: float = TIMESTEP_MU  # mean of the logit-normal timestep draws
    timestep_sigma: float = TIMESTEP_SIGMA  # their standard deviation
    cfg_ratio: float = CFG_RATIO  # chance that a sample's condition is replaced by the null condition

    @classmethod
    def from_model_config(cls, config: dict, cfg_ratio: float = CFG_RATIO) -> "Objective":
        return cls(float(config.get("timestep_mu", TIMESTEP_MU)), float(config.get("timestep_sigma", TIMESTEP_SIGMA)),
                   cfg_ratio)


@dataclass
class Draws:
    """One sample's random choices for one step."""

    drop_condition: bool
    noise: torch.Tensor  # [T, C]
    t: float


def sample_timestep(generator: torch.Generator, objective: Objective) -> float:
    """The official ``sample_t_r`` for one sample: t = max of two sigmoid(N(mu, sigma)) draws."""
    t = torch.sigmoid(torch.randn((1,), generator=generator) * objective.timestep_sigma + objective.timestep_mu)
    r = torch.sigmoid(torch.randn((1,), generator=generator) * objective.timestep_sigma + objective.timestep_mu)
    return float(torch.maximum(t, r))


def draw(generator: torch.Generator, shape: Sequence[int], objective: Objective) -> Draws:
    """A sample's draws in the official order: dropout uniform, noise, timestep."""
    drop = bool(torch.rand((1,), generator=generator) < objective.cfg_ratio)
    noise = torch.randn(tuple(shape), generator=generator)
    return Draws(drop, noise, sample_timestep(generator, objective))


def flow_matching_loss(transformer, null_condition: torch.Tensor, latents: List[torch.Tensor],
                       states: List[torch.Tensor], contexts: List[torch.Tensor],
                       generators: List[torch.Generator], objective: Objective) -> torch.Tensor:
    """Mean over the samples of each sample's mean squared velocity error (fp32 scalar).

    ``latents[i]`` [T_i, C] clean VAE latents, ``states[i]`` [S_i, D] condition-encoder states,
    ``contexts[i]`` [T_i, 2C]; samples of different lengths share one padded, masked forward
    (``acestep.dit.batch.velocity``) and padding never enters the loss."""
    device = latents[0].device
    draws = [draw(g, x.shape, objective) for g, x in zip(generators, latents)]
    noisy, targets, conditions = [], [], []
    for x0, s, d in zip(latents, states, draws):
        x0 = x0.float()
        noise = d.noise.to(device)
        noisy.append(d.t * noise + (1.0 - d.t) * x0)
        targets.append(noise - x0)
        conditions.append(null_condition.to(s).reshape(1, -1).expand_as(s) if d.drop_condition else s)
    predicted = velocity(transformer, noisy, [d.t for d in draws], conditions, contexts)
    errors = [torch.mean((v.float() - target) ** 2) for v, target in zip(predicted, targets)]
    return torch.stack(errors).mean()
