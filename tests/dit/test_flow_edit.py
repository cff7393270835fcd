"""Flow-edit morph: the trajectory against upstream's own loop (commit 6d467e4; expected values in
tests/fixtures/upstream/flow_edit.json, written by make_flow_edit.py beside it), the worker's
rows against that one-item trajectory on the tiny DiT, a flow-edit item beside a plain one in the
shared running batch (its solo latents), renders through the Python API, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from acestep.dit.batch import velocity
from acestep.dit.flow_edit import FlowEditWindow, flow_edit_schedule, sample_flow_edit
from acestep.dit.samplers import VelocityControls
from acestep.inference import GenerationConfig, GenerationParams, generate_music, prepare_request
from acestep.validation import ValidationError
from tests.dit.conftest import prepare_each, run_together

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures/upstream/flow_edit.json").read_text())
WEIGHTS = {k: torch.tensor(v) for k, v in FIXTURE["weights"].items()}
TOL = 1e-5
FRAME = 1920


def fixture_velocity(x, t, states):
    """The fixture's velocity function (the generator's ``velocity``)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1)
    return torch.tanh(x @ WEIGHTS["w"] + 0.5 * t) + states[:, :1, :] * (1.0 + t)


def _fixture_side(points, t, targets, null):
    names = ["null" if null else "target" if target else "source" for target in targets]
    return fixture_velocity(points, t, torch.cat([WEIGHTS[n] for n in names]))


def _case(kw):
    timesteps = flow_edit_schedule(is_turbo=False, steps=kw.get("infer_steps", 0), shift=kw.get("shift", 1.0),
                                   timesteps=kw.get("timesteps"))
    window = FlowEditWindow(kw.get("n_min", 0.0), kw.get("n_max", 1.0), kw.get("n_avg", 1))
    return timesteps, window


@pytest.mark.parametrize("name", sorted(FIXTURE["trajectories"]))
def test_trajectories_match_upstream(name):
    run = FIXTURE["trajectories"][name]
    kw = run["kwargs"]
    timesteps, window = _case(kw)
    got = sample_flow_edit(_fixture_side, WEIGHTS["src"][0], timesteps, window,
                           torch.Generator().manual_seed(kw["seed"]),
                           guidance_scale=kw.get("diffusion_guidance_scale", 1.0),
                           cfg_interval=(kw.get("cfg_interval_start", 0.0), kw.get("cfg_interval_end", 1.0)),
                           controls=VelocityControls(kw.get("velocity_norm_threshold", 0.0),
                                                     kw.get("velocity_ema_factor", 0.0)))
    want = torch.tensor(run["latents"])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert (got - WEIGHTS["src"][0]).abs().max() > 1e-2  # the edit moved the source
    # the steps evaluated are upstream's: the window's start skips int(N·n_min) of them
    start = window.steps(len(timesteps) - 1)[0]
    seen = [t for i, t in enumerate(run["evaluated_at"]) if i == 0 or t != run["evaluated_at"][i - 1]]
    assert seen == pytest.approx(timesteps[start:-1], rel=1e-7)


def test_turbo_flow_edit_uses_upstreams_linspace_schedule_capped_at_8_steps():
    seen = sorted(set(FIXTURE["trajectories"]["plain_full_window"]["evaluated_at"]), reverse=True)
    assert flow_edit_schedule(is_turbo=True, steps=20, shift=3.0) == pytest.approx(seen + [0.0], rel=1e-7)


# -- the tiny DiT: the worker's running batch ---------------------------------------------------


EDIT = {"task_type": "cover", "caption": "bright synth pop", "lyrics": "[Verse]\nnew words",
        "flow_edit_morph": True, "flow_edit_source_caption": "dark acoustic folk",
        "flow_edit_source_lyrics": "[Verse]\nold words"}
GUIDED_EDIT = dict(EDIT, inference_steps=4, guidance_scale=4.0, cfg_interval_end=0.9, flow_edit_n_min=0.25,
                   flow_edit_n_max=0.75, flow_edit_n_avg=2, velocity_norm_threshold=1.5, velocity_ema_factor=0.1)
PLAIN = {"caption": "plain neighbour", "duration": 10, "inference_steps": 4, "guidance_scale": 4.0}


def _prepared(handler, specs, source_audio):
    return prepare_each(handler, specs, 60, source_audio, lambda spec: spec.get("flow_edit_morph"))


def _run(handler, pairs):
    latents, _, tracks, batch = run_together(handler, pairs)
    return latents, batch, tracks


def test_worker_rows_equal_the_one_item_flow_edit_sampler(base_mixer, source_audio):
    (item, settings), = _prepared(base_mixer, [GUIDED_EDIT], source_audio)
    latents, _, (track,) = _run(base_mixer, [(item, settings)])
    states, _, context = track.main
    source_states = track.edit.source[0]
    null = base_mixer.bundle.condition_encoder.null_condition_emb.to(states).reshape(1, -1)
    model = base_mixer.bundle.transformer

    def side_fn(points, t, targets, is_null):
        rows = [null.expand_as(states) if is_null else states if target else source_states for target in targets]
        return torch.stack(velocity(model, list(points), [t] * len(rows), rows, [context] * len(rows)))

    generator = torch.Generator().manual_seed(settings.edit_seed(0, item.seed))
    x_src = item.flow_edit.latents.float()
    pure = sample_flow_edit(side_fn, x_src, track.timesteps, settings.flow_edit, generator,
                            guidance_scale=settings.guidance_scale, cfg_interval=settings.cfg_interval,
                            controls=settings.controls)
    assert (latents[0] - pure).abs().max() <= TOL
    assert (latents[0] - x_src).abs().max() > 1e-3


def test_flow_edit_item_beside_a_plain_item_shares_forwards_and_matches_solo(base_mixer, source_audio):
    pairs = _prepared(base_mixer, [GUIDED_EDIT, PLAIN], source_audio)
    together, batch, _ = _run(base_mixer, pairs)
    for b, pair in enumerate(pairs):
        solo = _run(base_mixer, [pair])[0][0]
        assert (together[b] - solo).abs().max() <= TOL, f"item {b} differs from its solo run"
    # 4 steps, window steps 1-2: the edit's 2 draws × (source, target) rows and their null rows
    # (steps 1 and 2; t ≤ 0.9) share each forward with the plain item's two rows
    assert batch.items_per_forward == {2: 3, 1: 1}
    assert batch.rows_per_forward == {2 * 2 * 2 + 2: 2, 2 + 2: 1, 2: 1}



def test_same_descriptions_or_a_window_at_the_end_keep_the_source(turbo_mixer, source_audio):
    same = dict(EDIT, flow_edit_source_caption=EDIT["caption"], flow_edit_source_lyrics=EDIT["lyrics"])
    skipped = dict(EDIT, flow_edit_n_min=1.0, flow_edit_n_max=1.0)
    pairs = _prepared(turbo_mixer, [EDIT, same, skipped], source_audio)
    latents, _, tracks = _run(turbo_mixer, pairs)
    source = [item.flow_edit.latents.float() for item, _ in pairs]
    moved = [(x - s).abs().max().item() for x, s in zip(latents, source)]
    assert torch.equal(latents[2], source[2]) and tracks[2].step == tracks[2].steps
    assert moved[1] < 1e-3 < moved[0]  # V_tar − V_src vanishes when both describe the same song


def _render(handler, tmp_path, **fields):
    params = GenerationParams(thinking=False, duration=10, **fields)
    config = GenerationConfig(batch_size=1, seeds=[9], use_random_seed=False, audio_format="wav")
    result = generate_music(handler, None, params, config, save_dir=str(tmp_path))
    assert result.success, result.error
    data, rate = sf.read(result.audios[0]["path"], always_2d=True)
    assert rate == 48000 and data.shape[1] == 2
    return data


@pytest.mark.parametrize("task", ["cover", "text2music"])
def test_flow_edit_renders_through_the_python_api(turbo_handler, tmp_path, source_audio, task):
    morph = _render(turbo_handler, tmp_path / "morph", **dict(EDIT, task_type=task, src_audio=source_audio))
    plain = _render(turbo_handler, tmp_path / "plain", task_type=task, caption=EDIT["caption"],
                    lyrics=EDIT["lyrics"], src_audio=source_audio)
    assert abs(morph.shape[0] - 12 * 48000) <= FRAME  # the source's length (text2music's 10 s too)
    assert abs(morph).max() > 0.1
    assert morph.shape != plain.shape or not (abs(morph - plain) < 1e-3).all()


@pytest.mark.parametrize("fields,field", [
    ({"task_type": "repaint"}, "flow_edit_morph"),
    ({"task_type": "lego", "instruction": "Generate the bass track based on the audio context:"}, "flow_edit_morph"),
    ({"src_audio": None}, "src_audio"),
    ({"task_type": "text2music", "src_audio": None}, "src_audio"),
    ({"sampler_mode": "heun"}, "sampler_mode"),
    ({"infer_method": "sde"}, "infer_method"),
    ({"use_adg": True}, "use_adg"),
    ({"audio_cover_strength": 0.5}, "audio_cover_strength"),
    ({"cover_noise_strength": 0.4}, "cover_noise_strength"),
])
def test_combinations_upstream_does_not_run_are_refused_naming_the_field(source_audio, fields, field):
    params = GenerationParams(thinking=False, **{**EDIT, "src_audio": source_audio, **fields})
    with pytest.raises(ValidationError) as info:
        prepare_request(params, GenerationConfig())
    assert info.value.field == field


def test_a_morph_skips_the_lm_and_its_unreadable_source_is_a_4xx(tmp_path):
    from acestep.inference import uses_lm

    class ReadyLM:
        is_initialized = True

    morph = GenerationParams(task_type="text2music", flow_edit_morph=True, caption="x", thinking=True)
    assert uses_lm(ReadyLM(), GenerationParams(caption="x", thinking=True))
    assert not uses_lm(ReadyLM(), morph)  # its structure comes from the source
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really audio")
    with pytest.raises(ValidationError) as info:
        prepare_request(dataclasses.replace(morph, src_audio=str(bad)), GenerationConfig())
    assert info.value.field == "src_audio"
