"""Schedules match the official tables and formulas, including dtype rounding."""

from __future__ import annotations

import pytest
import torch

from acestep.dit.schedules import base_schedule, build_schedule, snap_turbo_timesteps, turbo_schedule


@pytest.mark.parametrize("shift,table", [
    (1.0, [1, .875, .75, .625, .5, .375, .25, .125]),
    (2.0, [1, 14 / 15, 6 / 7, 10 / 13, 2 / 3, 6 / 11, .4, 2 / 9]),
    (3.0, [1, 21 / 22, .9, 5 / 6, .75, 9 / 14, .5, .3]),
])
def test_turbo_tables(shift, table):
    assert turbo_schedule(8, shift) == pytest.approx(table + [0.0], abs=1e-7)
    # the tables are the base formula with 8 steps, terminal 0 kept
    assert base_schedule(8, shift) == pytest.approx(table + [0.0], abs=1e-6)


def test_turbo_takes_any_shift_and_at_most_8_steps():
    # upstream's turbo honours infer_steps with the shift formula (no snapping to 1/2/3)
    assert turbo_schedule(8, 2.6) == pytest.approx(base_schedule(8, 2.6), abs=1e-6)
    assert turbo_schedule(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-7)
    assert turbo_schedule(20, 1.0) == turbo_schedule(8, 1.0)  # capped as upstream's service caps it


def test_turbo_table_in_bf16_matches_upstream_rounding():
    assert turbo_schedule(8, 3.0, torch.bfloat16) == [1.0, 0.953125, 0.8984375, 0.83203125, 0.75, 0.64453125, 0.5,
                                                   0.30078125, 0.0]


def test_turbo_custom_timesteps_are_snapped_and_capped():
    snapped = snap_turbo_timesteps([0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085, 0])
    assert snapped[0] == pytest.approx(21 / 22) and snapped[-1] == 0.0 and len(snapped) == 9  # 0.97 → 21/22
    assert snapped[1] == pytest.approx(10 / 13)  # 0.76 → nearest table value
    assert len(snap_turbo_timesteps([1.0 - i / 40 for i in range(30)])) == 21


def test_base_shift_formula_and_custom():
    t = base_schedule(50, 3.0)
    assert len(t) == 51 and t[0] == 1.0 and t[-1] == 0.0
    raw = 1 - 10 / 50
    assert t[10] == pytest.approx(3 * raw / (1 + 2 * raw), rel=1e-6)
    assert build_schedule(is_turbo=False, steps=8, shift=1.0, timesteps=[0.9, 0.5, 0.1]) == pytest.approx(
        [0.9, 0.5, 0.1, 0.0])
    bf16 = base_schedule(50, 3.0, torch.bfloat16)
    assert bf16.count(0.984375) == 2  # upstream's bf16 collision, reproduced
