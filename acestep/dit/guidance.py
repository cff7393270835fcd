"""Guidance as wrappers around the model call (base/SFT only; turbo is guidance-distilled).

``PairFn(x, t) -> (v_cond, v_uncond)`` runs cond and null-condition rows in one forward. The
wrappers return a plain ``model_fn(x, t) -> v`` for the samplers."""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

PairFn = Callable[[torch.Tensor, float], Tuple[torch.Tensor, torch.Tensor]]
CondFn = Callable[[torch.Tensor, float], torch.Tensor]

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
ADG_MAX_ANGLE = 3.14 / 6  # upstream's literal (not math.pi)


def in_cfg_interval(t: float, start: float, end: float) -> bool:
    """Guidance applies while start ≤ t ≤ end (raw flow time, as upstream)."""
    return start <= t <= end


def apg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, momentum: MomentumBuffer) -> torch.Tensor:
    """Adaptive projected guidance: momentum, norm clip over time, orthogonal part only (eta 0)."""
    return normalized_guidance(v_cond, v_uncond, guidance_scale=scale - 1.0, momentum_buffer=momentum, eta=0.0,
                               norm_threshold=APG_NORM_THRESHOLD, use_original_formulation=True, norm_dim=(1,))


def adg(x: torch.Tensor, t: float, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Adaptive dual guidance: rotate the cond x0 estimate away from the uncond one, per frame.

    Works per (item, frame) over channels, so any batch size broadcasts (upstream: batch 1 only)."""
    weight = max(scale - 1.0, 0.0) + 1e-3
    x0_cond = (x - t * v_cond).double()
    x0_uncond = (x - t * v_uncond).double()
    cos = torch.nn.functional.cosine_similarity(x0_cond, x0_uncond, dim=-1).clamp(-1.0, 1.0).unsqueeze(-1)
    theta = torch.acos(cos)
    theta_new = (weight * theta).clamp(-ADG_MAX_ANGLE, ADG_MAX_ANGLE)
    delta = x0_cond - x0_uncond
    unit_uncond = torch.nn.functional.normalize(x0_uncond, dim=-1)
    perp = delta - (delta * unit_uncond).sum(-1, keepdim=True) * unit_uncond
    sin_theta = torch.sin(theta)
    safe_sin = torch.where(sin_theta > 1e-3, sin_theta, torch.ones_like(sin_theta))
    rotated = torch.where(sin_theta > 1e-3, perp * torch.sin(theta_new) / safe_sin, perp * weight)
    x0 = torch.cos(theta_new) * x0_cond + rotated
    return ((x.double() - x0) / t).to(v_cond.dtype)


def combine(x: torch.Tensor, t: float, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float,
            use_adg: bool, momentum: MomentumBuffer) -> torch.Tensor:
    """The guided velocity from a (cond, uncond) pair: ADG, or APG with ``momentum``."""
    if use_adg:
        return adg(x, t, v_cond, v_uncond, scale)
    return apg(v_cond, v_uncond, scale, momentum)


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain classifier-free guidance."""
    return v_uncond + scale * (v_cond - v_uncond)


def corrector_combine(x: torch.Tensor, t: float, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float,
                      use_adg: bool) -> torch.Tensor:
    """Guidance for Heun's corrector evaluation, as upstream: plain CFG rather than APG (so the
    APG momentum moves once per step), ADG where it is asked for except at t = 0 (it divides by t)."""
    if use_adg and t > 0:
        return adg(x, t, v_cond, v_uncond, scale)
    return cfg(v_cond, v_uncond, scale)


def guided(pair_fn: PairFn, cond_fn: CondFn, scale: float, interval: Tuple[float, float],
           use_adg: bool = False) -> CondFn:
    """Wrap a model with APG (default) or ADG between ``interval``; cond-only outside it.

    The APG momentum lives in the returned closure: build one per sampling run."""
    momentum = MomentumBuffer(APG_MOMENTUM)

    def model_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        if not in_cfg_interval(t, *interval):
            return cond_fn(x, t)
        v_cond, v_uncond = pair_fn(x, t)
        return combine(x, t, v_cond, v_uncond, scale, use_adg, momentum)

    return model_fn

