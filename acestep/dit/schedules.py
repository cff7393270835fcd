"""Timestep schedules, as the official samplers build them (flow time: t=1 noise, t=0 data).

Every builder returns the list of model timesteps followed by the terminal 0. Values are rounded
through the model dtype first, as upstream builds the schedule tensor in that dtype."""

from __future__ import annotations

from typing import List, Optional, Sequence

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


def turbo_schedule(shift: float, dtype: torch.dtype = torch.float32) -> List[float]:
    """Turbo: the fixed table of the nearest shift in {1, 2, 3}."""
    nearest = min(TURBO_TABLES, key=lambda s: abs(s - shift))
    return _through_dtype(TURBO_TABLES[nearest], dtype) + [0.0]


def snap_turbo_timesteps(timesteps: Sequence[float], dtype: torch.dtype = torch.float32) -> List[float]:
    """Turbo custom timesteps: trailing zeros dropped, at most 20, each snapped to a table value."""
    values = list(timesteps)
    while values and values[-1] == 0:
        values.pop()
    snapped = [min(TURBO_VALUES, key=lambda v: abs(v - t)) for t in values[:MAX_CUSTOM_TURBO_STEPS]]
    return _through_dtype(snapped, dtype) + [0.0]


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
        return snap_turbo_timesteps(timesteps, dtype) if timesteps else turbo_schedule(shift, dtype)
    return custom_schedule(timesteps, dtype) if timesteps else base_schedule(steps, shift, dtype)
