"""Flow-edit "morph": move a source clip, described by a source caption/lyrics, toward the
request's caption/lyrics without sampling from noise (as upstream's flow-edit overlay).

Per item, over the schedule t_0 > … > t_N = 0, with x_src the source latents and x ← x_src:
- steps before ``start`` = int(N·n_min) are skipped;
- inside the window (``start`` ≤ i < ``stop`` = int(N·n_max)), each of ``draws`` fresh noises n_k
  gives z_src = (1 − t)·x_src + t·n_k and z_tar = x + z_src − x_src; the DiT's velocity at z_src
  under the source condition and at z_tar under the target one are guided (APG, every draw from
  the same momentum, which then advances once with the mean difference), clamped against their
  own point, averaged over the draws, then EMA-blended with that side's previous velocity; and
  x ← x − (t − t_next)·(V_tar − V_src);
- at ``stop`` the edit leaves the window once: x ← x + z_src − x_src with one more noise draw, and
  the remaining steps are ordinary Euler steps under the target condition.

Euler only: upstream runs no Heun, ADG or DCW inside this loop (the worker leaves DCW off for
flow-edit items; validation refuses Heun, ADG and SDE with it). The functions are pure; the
worker's running batch puts an item's 2·draws rows (and their null rows) in the shared forward,
and ``sample_flow_edit`` is the same trajectory for one item on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

from acestep.dit.guidance import APG_MOMENTUM, apg, in_cfg_interval
from acestep.dit.samplers import VelocityControls, clamp_velocity, ema_velocity
from acestep.dit.schedules import TURBO_STEPS, base_schedule, custom_schedule
from acestep.params import GenerationParams

Condition = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # encoder states [S, D], mask [S], context [T, 2C]
SideFn = Callable[[torch.Tensor, float, List[bool], bool], torch.Tensor]  # (x [R,T,C], t, targets, null?) → v


@dataclass(frozen=True)
class FlowEditWindow:
    """A request's flow-edit window (GenerationParams.flow_edit_*; defaults stated there)."""

    n_min: float = GenerationParams.flow_edit_n_min  # share of the schedule skipped before editing
    n_max: float = GenerationParams.flow_edit_n_max  # share after which plain target denoising takes over
    draws: int = GenerationParams.flow_edit_n_avg  # noise draws averaged per edit step

    def steps(self, total: int) -> Tuple[int, int]:
        """(start, stop) step indices of a schedule of ``total`` steps, as upstream: int(N·n)."""
        return int(total * self.n_min), int(total * self.n_max)


@dataclass(eq=False)
class FlowEditState:
    """One item's flow-edit state in the running batch: the source side's condition, guidance
    momentum and previous velocity (the target side's live on the track), and this step's noised
    points, drawn once before the forward so a re-run forward sees the same rows."""

    source: Optional[Condition]  # None outside the worker (``sample_flow_edit``)
    x_src: torch.Tensor  # [T, C] fp32 source latents
    stop: int
    draws: int
    generator: torch.Generator
    momentum: Optional[MomentumBuffer] = None
    previous_v: Optional[torch.Tensor] = None  # [1, T, C]
    points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (z_src, z_tar) [draws, T, C] in the window
    left: bool = False  # the window has been left (x is now the target-only variable)

    def draw(self) -> torch.Tensor:
        return torch.randn((1, *self.x_src.shape), generator=self.generator, device=self.x_src.device)


def flow_edit_schedule(*, is_turbo: bool, steps: int, shift: float, timesteps: Optional[Sequence[float]] = None,
                       dtype: torch.dtype = torch.float32) -> List[float]:
    """Upstream's flow-edit schedule for every model: linspace + shift in the model dtype (turbo
    too, at most 8 steps), or custom timesteps verbatim with a terminal 0."""
    if timesteps:
        return custom_schedule(timesteps, dtype)
    return base_schedule(min(int(steps), TURBO_STEPS) if is_turbo else int(steps), shift, dtype)


def edit_points(x: torch.Tensor, x_src: torch.Tensor, noises: torch.Tensor, t: float) -> Tuple[torch.Tensor, ...]:
    """(z_src, z_tar) [R, T, C] for noises [R, T, C]: the source noised to t, and the edit moved by
    the same offset."""
    z_src = (1.0 - t) * x_src + t * noises
    return z_src, x + z_src - x_src


def guide_draws(v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor], scale: float,
                momentum: Optional[MomentumBuffer]) -> torch.Tensor:
    """APG on each draw [R, T, C] from the same pre-step momentum, which then advances once with the
    mean cond − uncond difference; cond only without null rows (outside the cfg interval)."""
    if v_uncond is None or momentum is None:
        return v_cond
    before, guided, diff = momentum.running_average, [], None
    for k in range(v_cond.shape[0]):
        momentum.running_average = before
        c, u = v_cond[k: k + 1], v_uncond[k: k + 1]
        guided.append(apg(c, u, scale, momentum))
        diff = c - u if diff is None else diff + (c - u)
    momentum.running_average = before
    momentum.update(diff / v_cond.shape[0])
    return torch.cat(guided, 0)


def side_velocity(v: torch.Tensor, points: torch.Tensor, controls: VelocityControls,
                  previous: Optional[torch.Tensor]) -> torch.Tensor:
    """One side's step velocity [1, T, C] from its guided draws [R, T, C]: each clamped against its
    own point, averaged over the draws, then EMA with that side's previous velocity."""
    clamped = clamp_velocity(v, points, controls.norm_threshold)
    total = clamped[0:1]
    for k in range(1, clamped.shape[0]):
        total = total + clamped[k: k + 1]
    return ema_velocity(total / clamped.shape[0], previous, controls.ema_factor)


def edit_step(x: torch.Tensor, v_tar: torch.Tensor, v_src: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """x − (t − t_next)·(V_tar − V_src): the edit moves by the velocity difference only."""
    return x - (t - t_next) * (v_tar - v_src)


def begin_edit_step(edit: FlowEditState, x: torch.Tensor, t: float, step: int) -> torch.Tensor:
    """Before an item's forward at ``step`` (x [T, C]): inside the window, draw this step's noised
    source and target points (once, so a re-run forward sees the same rows); at the window's end,
    the one switch to the target variable, which is returned in place of x."""
    if step < edit.stop:
        if edit.points is None:
            edit.points = edit_points(x, edit.x_src, torch.cat([edit.draw() for _ in range(edit.draws)]), t)
        return x
    if edit.left:
        return x
    edit.left = True
    return edit_points(x, edit.x_src, edit.draw()[0], t)[1]


def advance_edit(edit: FlowEditState, x: torch.Tensor, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor],
                 t: float, t_next: float, scale: float, controls: VelocityControls,
                 momentum: Optional[MomentumBuffer], previous: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """One step from the forward's rows (v_cond, v_uncond [R, T, C], as ``begin_edit_step`` laid
    them out) → (next x [T, C], the target side's velocity [1, T, C]). Inside the window the edit
    moves by V_tar − V_src; after it, an Euler step of the target variable. ``momentum`` and
    ``previous`` are the target side's (the source side's live on ``edit``)."""
    if edit.points is None:
        v = side_velocity(guide_draws(v_cond, v_uncond, scale, momentum), x.unsqueeze(0), controls, previous)
        return (x.unsqueeze(0) - v * (t - t_next))[0], v
    n, (z_src, z_tar) = edit.draws, edit.points
    null_src, null_tar = (None, None) if v_uncond is None else (v_uncond[:n], v_uncond[n:])
    v_src = side_velocity(guide_draws(v_cond[:n], null_src, scale, edit.momentum), z_src, controls, edit.previous_v)
    v_tar = side_velocity(guide_draws(v_cond[n:], null_tar, scale, momentum), z_tar, controls, previous)
    edit.previous_v, edit.points = v_src, None
    return edit_step(x.unsqueeze(0), v_tar, v_src, t, t_next)[0], v_tar


def sample_flow_edit(side_fn: SideFn, x_src: torch.Tensor, timesteps: Sequence[float], window: FlowEditWindow,
                     generator: torch.Generator, *, guidance_scale: float = 1.0,
                     cfg_interval: Tuple[float, float] = (0.0, 1.0),
                     controls: VelocityControls = VelocityControls()) -> torch.Tensor:
    """One item's flow-edit trajectory on its own, by the steps the worker takes (x_src [T, C];
    noise drawn from ``generator``). ``side_fn(points [R, T, C], t, targets, null)`` is the model's
    velocity at each point under the target (True) or source (False) condition, or the null
    condition; with ``guidance_scale`` > 1 each side has its own APG momentum."""
    guided = guidance_scale > 1.0
    start, stop = window.steps(len(timesteps) - 1)
    edit = FlowEditState(None, x_src, stop, window.draws, generator,
                         MomentumBuffer(APG_MOMENTUM) if guided else None)
    momentum = MomentumBuffer(APG_MOMENTUM) if guided else None
    x, previous = x_src.clone(), None
    for i in range(start, len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        x = begin_edit_step(edit, x, t, i)
        if edit.points is not None:
            points, targets = torch.cat(edit.points), [False] * edit.draws + [True] * edit.draws
        else:
            points, targets = x.unsqueeze(0), [True]
        v_cond = side_fn(points, t, targets, False)
        v_uncond = side_fn(points, t, targets, True) if guided and in_cfg_interval(t, *cfg_interval) else None
        x, previous = advance_edit(edit, x, v_cond, v_uncond, t, t_next, guidance_scale, controls, momentum, previous)
    return x
