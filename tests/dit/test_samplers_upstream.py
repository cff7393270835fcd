"""The sampler controls against upstream's own code (commit 6d467e4): Euler / Heun trajectories of
turbo and sft with the velocity clamp, EMA, guidance, DCW, retake and cover noise, and DCW's four
modes, on a tiny deterministic velocity function. Expected values: tests/fixtures/upstream/
sampler_controls.json, written by make_sampler_controls.py beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acestep.dit.dcw import DCWSettings, dcw_correct, resolve_dcw
from acestep.dit.guidance import corrector_combine, guided, in_cfg_interval
from acestep.dit.samplers import VelocityControls, controlled_sample, retake_noise
from acestep.dit.schedules import build_schedule, cover_noise_schedule

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures/upstream/sampler_controls.json").read_text())
WEIGHTS = {k: torch.tensor(v) for k, v in FIXTURE["weights"].items()}
SHAPE = (1, FIXTURE["frames"], FIXTURE["channels"])


def velocity(x, t, states):
    """The fixture's velocity function (the generator's ``velocity``)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1)
    return torch.tanh(x @ WEIGHTS["w"] + 0.5 * t) + states[:, :1, :] * (1.0 + t)


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _model_fns(kw):
    """(model_fn, corrector_fn) as the worker guides them: APG/ADG at the predictor, plain CFG
    (ADG when asked, away from t = 0) at Heun's corrector, cond only outside the cfg interval."""
    cond_fn = lambda x, t: velocity(x, t, WEIGHTS["cond"])  # noqa: E731
    scale = kw.get("diffusion_guidance_scale", 1.0)
    if scale <= 1.0 or "sft" not in kw["_model"]:
        return cond_fn, cond_fn
    pair_fn = lambda x, t: (cond_fn(x, t), velocity(x, t, WEIGHTS["null"]))  # noqa: E731
    interval = (kw.get("cfg_interval_start", 0.0), kw.get("cfg_interval_end", 1.0))
    use_adg = kw.get("use_adg", False)

    def corrector_fn(x, t):
        if not in_cfg_interval(t, *interval):
            return cond_fn(x, t)
        return corrector_combine(x, t, *pair_fn(x, t), scale, use_adg)

    return guided(pair_fn, cond_fn, scale, interval, use_adg), corrector_fn


def _ours(name: str) -> torch.Tensor:
    kw = dict(FIXTURE["trajectories"][name]["kwargs"], _model=name)
    is_turbo = name.startswith("turbo")
    noise = _noise(7)
    if kw.get("retake_variance", 0) > 0:
        noise = retake_noise(noise, _noise(kw["retake_seed"][0]), kw["retake_variance"])
    schedule = dict(is_turbo=is_turbo, steps=kw["infer_steps"], shift=kw["shift"])
    x = noise
    if kw.get("cover_noise_strength", 0) > 0:
        timesteps, t0 = cover_noise_schedule(strength=kw["cover_noise_strength"], **schedule)
        x = t0 * noise + (1 - t0) * WEIGHTS["src"]
    else:
        timesteps = build_schedule(**schedule)
    dcw = None
    if kw.get("dcw_enabled", True):
        dcw = DCWSettings(kw.get("dcw_mode", "double"), kw.get("dcw_scaler", 0.05), kw.get("dcw_high_scaler", 0.02),
                          kw.get("dcw_wavelet", "haar"))
    model_fn, corrector_fn = _model_fns(kw)
    controls = VelocityControls(kw.get("velocity_norm_threshold", 0.0), kw.get("velocity_ema_factor", 0.0))
    return controlled_sample(model_fn, x, timesteps, is_turbo=is_turbo, sampler_mode=kw.get("sampler_mode", "euler"),
                             controls=controls, dcw=dcw, corrector_fn=corrector_fn)


@pytest.mark.parametrize("name", sorted(FIXTURE["trajectories"]))
def test_trajectories_match_upstream(name):
    want = torch.tensor(FIXTURE["trajectories"][name]["latents"])
    got = _ours(name)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_heun_differs_from_euler_and_evaluates_the_corrector_where_upstream_does():
    runs = FIXTURE["trajectories"]
    euler, heun = torch.tensor(runs["turbo_euler"]["latents"]), torch.tensor(runs["turbo_heun"]["latents"])
    assert (euler - heun).abs().max() > 1e-3
    # turbo: 8 predictors + 7 correctors (none on the last step); sft: a corrector at t = 0 too
    assert len(runs["turbo_heun"]["evaluated_at"]) == 15 and runs["sft_heun"]["evaluated_at"][-1] == 0.0


def test_cover_noise_step_counts_follow_upstream_rounding():
    runs = FIXTURE["trajectories"]
    turbo, _ = cover_noise_schedule(is_turbo=True, steps=8, shift=3.0, strength=0.6)
    sft, _ = cover_noise_schedule(is_turbo=False, steps=8, shift=1.0, strength=0.6)
    assert turbo[:-1] == pytest.approx(runs["turbo_cover_noise_0_6"]["evaluated_at"])  # 0.5 wins the tie with 0.3
    assert sft[:-1] == pytest.approx(runs["sft_cover_noise_0_6"]["evaluated_at"])


def test_turbo_steps_and_shift_follow_upstream_formula():
    seen = FIXTURE["trajectories"]["turbo_4_steps_shift_2_5_dcw_low_db4"]["evaluated_at"]
    assert build_schedule(is_turbo=True, steps=4, shift=2.5) == pytest.approx(seen + [0.0], rel=1e-7)


@pytest.mark.parametrize("case", FIXTURE["dcw"]["cases"], ids=lambda c: f"{c['mode']}-{c['wavelet']}")
def test_dcw_modes_match_upstream(case):
    x, y = torch.tensor(FIXTURE["dcw"]["x"]), torch.tensor(FIXTURE["dcw"]["denoised"])
    settings = DCWSettings(case["mode"], case["scaler"], case["high_scaler"], case["wavelet"])
    got = dcw_correct(x, y, case["t"], settings)
    assert got.shape == x.shape and not torch.equal(got, x)
    assert torch.allclose(got, torch.tensor(case["out"]), rtol=1e-6, atol=1e-6)


def test_dcw_default_is_model_aware():
    assert resolve_dcw(None, is_turbo=True) and not resolve_dcw(None, is_turbo=False)
    assert resolve_dcw(True, is_turbo=False) and not resolve_dcw(False, is_turbo=True)
    assert not DCWSettings("high", scaler=0.0).active and DCWSettings("double", 0.0, 0.02).active
