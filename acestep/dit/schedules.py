"""Timestep schedules, as the official samplers build them (flow time: t=1 noise, t=0 data).

Turbo honours ``inference_steps`` (1-8) with the shift formula on any shift, as upstream's turbo
model does since it takes ``infer_steps``; 8 steps at shift 1/2/3 reproduce the fixed tables.

Every builder returns the list of model timesteps followed by the terminal 0. Values are rounded
through the model dtype first, as upstream builds the schedule tensor in that dtype."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

TURBO_STEPS = 8
MAX_CUSTOM_TURBO_STEPS = 20
# The turbo checkpoints' fixed 8-step tables (= the shift formula, terminal 0 dropped).
TURBO_TABLES = {
    1.0: [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
    2.0: [1.0, 14 / 15, 6 / 7, 10 / 13, 2 / 3, 6 / 11, 0.4, 2 / 9],
    3.0: [1.0, 21 / 22, 0.9, 5 / 6, 0.75, 9 / 14, 0.5, 0.3],
}
TURBO_VALUES = sorted({v for table in TURBO_TABLES.values() for v in table}, reverse=True)


def _through_dtype(values: Sequence[float], dtype: torch.dtype) -> List[float]:
    return [float(v) for v in torch.tensor(list(values), dtype=torch.float64).to(dtype).tolist()]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t ← shift·t / (1 + (shift − 1)·t); identity at shift 1."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _turbo_values(steps: int, shift: float, timesteps: Optional[Sequence[float]]) -> List[float]:
    """Turbo's model timesteps before the dtype rounding (no terminal 0), as upstream computes them
    in Python floats: custom timesteps snapped, else ``steps`` (at most 8) of the shift formula."""
    if timesteps:
        values = list(timesteps)
        while values and values[-1] == 0:
            values.pop()
        return [min(TURBO_VALUES, key=lambda v: abs(v - t)) for t in values[:MAX_CUSTOM_TURBO_STEPS]]
    n = min(int(steps), TURBO_STEPS)
    raw = [1.0 - i / n for i in range(n)]
    return raw if shift == 1.0 else [shift * t / (1.0 + (shift - 1.0) * t) for t in raw]


def turbo_schedule(steps: int, shift: float, dtype: torch.dtype = torch.float32) -> List[float]:
    """Turbo: ``steps`` (capped at 8, as upstream's service does) of 1 − i/steps, shifted; with 8
    steps and shift 1, 2 or 3 these are the checkpoints' fixed tables."""
    return _through_dtype(_turbo_values(steps, shift, None), dtype) + [0.0]


def snap_turbo_timesteps(timesteps: Sequence[float], dtype: torch.dtype = torch.float32) -> List[float]:
    """Turbo custom timesteps: trailing zeros dropped, at most 20, each snapped to a table value."""
    return _through_dtype(_turbo_values(0, 1.0, timesteps), dtype) + [0.0]


def base_schedule(steps: int, shift: float, dtype: torch.dtype = torch.float32) -> List[float]:
    """Base/SFT: linspace(1, 0, steps + 1) in the model dtype, then shifted (also in that dtype)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype)
    return [float(v) for v in shift_timesteps(t, shift).tolist()]


def custom_schedule(timesteps: Sequence[float], dtype: torch.dtype = torch.float32) -> List[float]:
    """Base/SFT custom timesteps: used verbatim (a terminal 0 is appended if missing)."""
    values = list(timesteps)
    if not values or values[-1] != 0:
        values.append(0.0)
    return _through_dtype(values, dtype)


def build_schedule(*, is_turbo: bool, steps: int, shift: float, timesteps: Optional[Sequence[float]] = None,
                   dtype: torch.dtype = torch.float32) -> List[float]:
    if is_turbo:
        return snap_turbo_timesteps(timesteps, dtype) if timesteps else turbo_schedule(steps, shift, dtype)
    return custom_schedule(timesteps, dtype) if timesteps else base_schedule(steps, shift, dtype)


def nearest_index(values: Sequence[float], level: float) -> int:
    """The first index of the value nearest ``level`` (Python's ``min``: ties go to the earlier)."""
    return min(range(len(values)), key=lambda i: abs(values[i] - level))


def cover_noise_schedule(*, is_turbo: bool, steps: int, shift: float, strength: float,
                         timesteps: Optional[Sequence[float]] = None,
                         dtype: torch.dtype = torch.float32) -> Tuple[List[float], float]:
    """(the schedule from the step nearest t = 1 − strength, that t): the source is re-noised to
    that t and sampling starts there. As upstream, turbo picks among its unrounded Python values
    and re-noises with the unrounded t, base/sft among the dtype-rounded ones, so float rounding
    decides near-ties (and the step count) the same way."""
    schedule = build_schedule(is_turbo=is_turbo, steps=steps, shift=shift, timesteps=timesteps, dtype=dtype)
    choices = _turbo_values(steps, shift, timesteps) if is_turbo else schedule[:-1]
    start = nearest_index(choices, 1.0 - strength)
    return schedule[start:], float(choices[start])
