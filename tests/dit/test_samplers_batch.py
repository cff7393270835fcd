"""The sampler controls per item inside the shared running batch: items that differ in sampler
(Euler / Heun), velocity clamp and EMA, DCW, retake and cover noise share forwards and get their
solo latents; the worker's two-batch-step Heun equals the one-item sampler on the same model; retake
seeds are resolved per item, recorded, and reproduce the audio."""

from __future__ import annotations

import pytest
import torch

from acestep.dit.batch import velocity
from acestep.dit.guidance import corrector_combine, guided, in_cfg_interval
from acestep.dit.samplers import controlled_sample
from acestep.dit.running import RunningBatch
from acestep.inference import GenerationConfig, GenerationParams, RenderJob, prepare_request, render_music_batch
from tests.dit.conftest import ONE_FORWARD, prepare_each, run_together

TOL = 1e-5

TURBO_SPECS = [
    {"caption": "plain", "duration": 10},  # Euler, DCW on (turbo's default)
    {"caption": "heun with clamp and ema", "duration": 12, "sampler_mode": "heun", "velocity_norm_threshold": 0.9,
     "velocity_ema_factor": 0.2, "dcw_enabled": False},
    {"caption": "retake, dcw low db4", "duration": 11, "retake_variance": 0.4, "retake_seed": 33, "dcw_mode": "low",
     "dcw_wavelet": "db4"},
    {"caption": "cover from re-noised source", "task_type": "cover", "cover_noise_strength": 0.5,
     "sampler_mode": "heun", "dcw_mode": "pix"},
]
BASE_SPECS = [
    {"caption": "euler apg", "duration": 10, "inference_steps": 4, "guidance_scale": 4.0},
    {"caption": "heun apg with controls and dcw", "duration": 13, "inference_steps": 4, "guidance_scale": 4.0,
     "cfg_interval_end": 0.9, "sampler_mode": "heun", "velocity_norm_threshold": 1.2, "velocity_ema_factor": 0.1,
     "dcw_enabled": True, "dcw_mode": "double"},
    {"caption": "heun adg", "duration": 10, "inference_steps": 3, "guidance_scale": 3.0, "use_adg": True,
     "sampler_mode": "heun"},
]




def _prepared(handler, specs, source_audio):
    return prepare_each(handler, specs, 40, source_audio, lambda spec: spec.get("task_type") == "cover")


def _run(handler, pairs):
    """Latents of ``pairs`` run together on a fresh running batch, the batch steps it took, the tracks."""
    return run_together(handler, pairs)[:3]


def _assert_shared_equals_solo(handler, pairs):
    together, _, _ = _run(handler, pairs)
    for b, pair in enumerate(pairs):
        solo = _run(handler, [pair])[0][0]
        diff = (together[b] - solo).abs().max()
        assert diff <= TOL, f"item {b} differs from its solo run by {diff}"


def test_turbo_items_with_different_controls_share_forwards_and_match_solo(turbo_mixer, source_audio):
    pairs = _prepared(turbo_mixer, TURBO_SPECS, source_audio)
    _assert_shared_equals_solo(turbo_mixer, pairs)
    _, steps, tracks = _run(turbo_mixer, [pairs[1]])
    assert steps == 8 + 7 and tracks[0].step == 8  # a corrector row per step but the last (straight to x0)
    cover = _run(turbo_mixer, [pairs[3]])[2][0]
    assert cover.steps < 8 and cover.dcw is not None  # started part-way down the schedule


def test_base_heun_with_guidance_shares_forwards_and_matches_solo(base_mixer):
    pairs = _prepared(base_mixer, BASE_SPECS, None)
    _assert_shared_equals_solo(base_mixer, pairs)
    _, steps, tracks = _run(base_mixer, [pairs[2]])
    assert steps == 2 * 3 and tracks[0].dcw is None  # sft/base: a corrector at t = 0 too; DCW off by default


def _pure(handler, item, settings):
    """The one-item sampler (``controlled_sample``) on the same DiT, guidance and conditions."""
    batch = RunningBatch(handler.bundle, ONE_FORWARD)
    track = batch.track(item, settings)
    states, _, context = track.main
    null = handler.bundle.condition_encoder.null_condition_emb.to(states).reshape(1, -1).expand_as(states)
    model = handler.bundle.transformer

    def run(x, t, cond_states):
        return velocity(model, [x[0]], [t], [cond_states], [context])[0].unsqueeze(0)

    cond_fn = lambda x, t: run(x, t, states)  # noqa: E731
    model_fn, corrector_fn = cond_fn, cond_fn
    if track.use_cfg:
        pair_fn = lambda x, t: (cond_fn(x, t), run(x, t, null))  # noqa: E731
        s = settings
        model_fn = guided(pair_fn, cond_fn, s.guidance_scale, s.cfg_interval, s.use_adg)
        corrector_fn = lambda x, t: (corrector_combine(x, t, *pair_fn(x, t), s.guidance_scale, s.use_adg)  # noqa: E731
                                     if in_cfg_interval(t, *s.cfg_interval) else cond_fn(x, t))
    return controlled_sample(model_fn, track.x.unsqueeze(0), track.timesteps, is_turbo=handler.bundle.is_turbo,
                             sampler_mode=settings.sampler_mode, controls=settings.controls, dcw=track.dcw,
                             corrector_fn=corrector_fn)[0]


@pytest.mark.parametrize("mixer,specs,index", [("turbo_mixer", TURBO_SPECS, 1), ("base_mixer", BASE_SPECS, 1),
                                               ("base_mixer", BASE_SPECS, 2)])
def test_worker_heun_in_two_batch_steps_equals_the_one_item_sampler(request, mixer, specs, index):
    handler = request.getfixturevalue(mixer)
    item, settings = _prepared(handler, [specs[index]], None)[0]
    worker = _run(handler, [(item, settings)])[0][0]
    assert (worker - _pure(handler, item, settings)).abs().max() <= TOL


def _render(handler, seeds, **fields):
    params, config, item_seeds = prepare_request(
        GenerationParams(thinking=False, caption="retake", duration=10, **fields),
        GenerationConfig(batch_size=len(seeds), seeds=seeds, use_random_seed=False))
    return params, render_music_batch(handler, [RenderJob(params, config, item_seeds)])[0]


def test_retake_seeds_are_resolved_per_item_recorded_and_reproduce(turbo_handler):
    params, first = _render(turbo_handler, [1, 2], retake_variance=0.5)
    resolved = [int(s) for s in params.retake_seed.split(",")]
    assert len(resolved) == 2 and [a["params"]["retake_seed"] for a in first.audios] == resolved
    again = _render(turbo_handler, [1, 2], retake_variance=0.5, retake_seed=params.retake_seed)[1]
    other = _render(turbo_handler, [1], retake_variance=0.5, retake_seed=resolved[0] + 1)[1]
    plain = _render(turbo_handler, [1], retake_seed=resolved[0])[1]  # variance 0: the retake seed is unused
    audio = [a["tensor"] for a in first.audios]
    assert all(torch.equal(a, b["tensor"]) for a, b in zip(audio, again.audios))
    assert not torch.allclose(audio[0], other.audios[0]["tensor"], atol=1e-3)
    assert not torch.allclose(audio[0], plain.audios[0]["tensor"], atol=1e-3)
    assert plain.audios[0]["params"]["retake_seed"] == resolved[0]  # as given; not resolved while off
    assert _render(turbo_handler, [1, 2], retake_variance=0.5, retake_seed=9)[0].retake_seed == "9,10"
