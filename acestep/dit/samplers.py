"""Flow-matching samplers as small pure functions: ``x = step(model_fn, x, t, t_next)``.

Convention: x_t = t·noise + (1 − t)·x0 and the model predicts v = noise − x0, so the data
estimate is x0 = x − t·v. ``model_fn(x, t) -> v``; guidance wraps ``model_fn``, not the sampler."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]


def ode_step(model_fn: ModelFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Euler step of dx/dt = v from t to t_next (t_next = 0 gives x0 = x − t·v)."""
    return x - model_fn(x, t) * (t - t_next)


def sde_step(model_fn: ModelFn, x: torch.Tensor, t: float, t_next: float, noise_fn: NoiseFn) -> torch.Tensor:
    """Predict x0, then re-noise it to t_next with fresh noise (x0 itself at t_next = 0)."""
    x0 = x - model_fn(x, t) * t
    if t_next <= 0:
        return x0
    return t_next * noise_fn(x0) + (1 - t_next) * x0


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
