"""Flow-matching samplers as small pure functions: ``x = step(model_fn, x, t, t_next)``.

Convention: x_t = t·noise + (1 − t)·x0 and the model predicts v = noise − x0, so the data
estimate is x0 = x − t·v. ``model_fn(x, t) -> v``; guidance wraps ``model_fn``, DCW wraps the
step (``acestep.dit.dcw.corrected``), not the sampler.

Velocity controls (as upstream, per item): the predictor's velocity is clamped to
``threshold·|x|`` (norms over the whole item), then blended with the previous step's final
velocity (EMA). Heun (ODE only) evaluates a corrector at (x − v·dt, t_next), clamps it against
that point, blends it with this step's predictor velocity, and steps with the average. Turbo goes
straight to x0 on its last step (no corrector); sft/base evaluate the corrector at t = 0 too."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]
NORM_EPS = 1e-10


@dataclass(frozen=True)
class VelocityControls:
    """Per-item velocity knobs (GenerationParams.velocity_*); 0 turns each off."""

    norm_threshold: float = 0.0  # clamp |v| to norm_threshold·|x|
    ema_factor: float = 0.0  # v ← (1 − f)·v + f·v_previous


def ode_step(model_fn: ModelFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Euler step of dx/dt = v from t to t_next (t_next = 0 gives x0 = x − t·v)."""
    return x - model_fn(x, t) * (t - t_next)


def sde_step(model_fn: ModelFn, x: torch.Tensor, t: float, t_next: float, noise_fn: NoiseFn) -> torch.Tensor:
    """Predict x0, then re-noise it to t_next with fresh noise (x0 itself at t_next = 0)."""
    x0 = x - model_fn(x, t) * t
    if t_next <= 0:
        return x0
    return t_next * noise_fn(x0) + (1 - t_next) * x0


def clamp_velocity(v: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale each item's v [B, ...] down so that |v| ≤ threshold·|x| (never up; 0 = off)."""
    if threshold <= 0:
        return v
    dims = tuple(range(1, v.dim()))
    v_norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    x_norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True) + NORM_EPS
    return v * torch.clamp(threshold * x_norm / (v_norm + NORM_EPS), max=1.0)


def ema_velocity(v: torch.Tensor, previous: Optional[torch.Tensor], factor: float) -> torch.Tensor:
    """(1 − factor)·v + factor·previous; v itself without a previous velocity or with factor 0."""
    if factor <= 0 or previous is None:
        return v
    return (1.0 - factor) * v + factor * previous


def predictor_velocity(v: torch.Tensor, x: torch.Tensor, controls: VelocityControls,
                       previous: Optional[torch.Tensor]) -> torch.Tensor:
    """A step's (guided) velocity at x after the controls: clamp, then EMA with the previous step's."""
    return ema_velocity(clamp_velocity(v, x, controls.norm_threshold), previous, controls.ema_factor)


def corrector_velocity(v2: torch.Tensor, x_predicted: torch.Tensor, controls: VelocityControls,
                       v: torch.Tensor) -> torch.Tensor:
    """Heun's corrector velocity after the controls: clamp against the predicted point, EMA with
    this step's predictor velocity."""
    return ema_velocity(clamp_velocity(v2, x_predicted, controls.norm_threshold), v, controls.ema_factor)


def heun_correct(x: torch.Tensor, v: torch.Tensor, v2: torch.Tensor, t: float,
                 t_next: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_next, the step's velocity): the trapezoidal step with the average of v and v2."""
    v_avg = 0.5 * (v + v2)
    return x - v_avg * (t - t_next), v_avg


def uses_corrector(sampler_mode: str, method: str, t_next: float, is_turbo: bool) -> bool:
    """Whether this step evaluates Heun's corrector: ODE only (SDE falls back to Euler, as
    upstream), and never on turbo's last step, which goes straight to x0."""
    return sampler_mode == "heun" and method == "ode" and not (is_turbo and t_next <= 0)


def heun_step(model_fn: ModelFn, x: torch.Tensor, t: float, t_next: float,
              corrector_fn: Optional[ModelFn] = None) -> torch.Tensor:
    """Heun's step: Euler predictor, corrector at (x_predicted, t_next) (``corrector_fn``, default
    ``model_fn``), averaged velocity."""
    v = model_fn(x, t)
    x_predicted = x - v * (t - t_next)
    v2 = (corrector_fn or model_fn)(x_predicted, t_next)
    return heun_correct(x, v, v2, t, t_next)[0]


def retake_noise(noise: torch.Tensor, other: torch.Tensor, variance: float) -> torch.Tensor:
    """cos(v·π/2)·noise + sin(v·π/2)·other: variance-preserving, ``noise`` at 0, ``other`` at 1."""
    if variance <= 0:
        return noise
    angle = variance * (math.pi / 2.0)
    return math.cos(angle) * noise + math.sin(angle) * other


def controlled_sample(model_fn: ModelFn, x: torch.Tensor, timesteps: Sequence[float], *, is_turbo: bool,
                      sampler_mode: str = "euler", controls: VelocityControls = VelocityControls(),
                      dcw=None, corrector_fn: Optional[ModelFn] = None) -> torch.Tensor:
    """The ODE schedule with the velocity controls, Euler or Heun, and DCW (an
    ``acestep.dit.dcw.DCWSettings`` or None) after every step: one item's solo trajectory, as the
    worker's running batch runs it step by step."""
    from acestep.dit.dcw import dcw_correct

    previous = None
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        v = predictor_velocity(model_fn(x, t), x, controls, previous)
        if uses_corrector(sampler_mode, "ode", t_next, is_turbo):
            x_predicted = x - v * (t - t_next)
            v2 = corrector_velocity((corrector_fn or model_fn)(x_predicted, t_next), x_predicted, controls, v)
            x_next, previous = heun_correct(x, v, v2, t, t_next)
        else:
            x_next, previous = x - v * (t - t_next), v
        if dcw is not None:
            x_next = dcw_correct(x_next, x - v * t, t, dcw)
        x = x_next
    return x


def sample(model_fn: ModelFn, x: torch.Tensor, timesteps: Sequence[float], method: str = "ode",
           noise_fn: Optional[NoiseFn] = None, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the schedule ``timesteps`` (ending in 0). ``callback(i, t_next, x)`` may return a new x
    (used by repaint to re-inject the source outside the region)."""
    if method == "sde" and noise_fn is None:
        raise ValueError("infer_method='sde' needs a noise_fn")
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        if method == "sde":
            x = sde_step(model_fn, x, t, t_next, noise_fn)
        else:
            x = ode_step(model_fn, x, t, t_next)
        if callback is not None:
            replaced = callback(i, t_next, x)
            x = x if replaced is None else replaced
    return x
