"""Repaint modes, crossfades and chunk mask modes: the numbers equal upstream's own functions'
(fixture written by tests/fixtures/upstream/gen_repaint.py), and each mode renders on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch

from acestep.dit.items import SamplingSettings
from acestep.dit.tasks import (Repaint, RepaintConfig, Window, crossfade_mask, inject_steps, repaint_config,
                               resolve_window, splice_waveform, task_context)
from acestep.dit.running import RunningBatch, Track, _finish_repaint
from acestep.inference import GenerationConfig, GenerationParams, generate_music, prepare_request
from acestep.validation import ValidationError, check_cross_fields

UPSTREAM = torch.load(Path(__file__).parents[1] / "fixtures" / "upstream" / "repaint.pt", weights_only=True)


def test_each_mode_resolves_as_upstream():
    for case, (ratio, frames, wav_s) in UPSTREAM["configs"].items():
        mode, strength = case.split(":")
        config = repaint_config(mode, float(strength))
        assert (config.inject_ratio, config.crossfade_frames, config.wav_crossfade_s) == (ratio, frames, wav_s), case
        assert config.splice == (mode != "aggressive")


def test_explicit_crossfades_replace_the_modes():
    config = repaint_config("conservative", 0.5, crossfade_frames=3, wav_crossfade_s=0.0)
    assert config == RepaintConfig(1.0, 3, 0.0, splice=True)
    assert repaint_config("balanced", 0.5, None, None) == RepaintConfig(0.5, 12, 0.025, splice=True)


def test_injection_steps_follow_each_models_loop():
    conservative = repaint_config("conservative", 0.5)
    assert inject_steps(conservative, 8, is_turbo=True) == 7  # turbo's last step jumps to x0
    assert inject_steps(conservative, 50, is_turbo=False) == 50  # sft/base inject after the last step too
    assert inject_steps(repaint_config("balanced", 0.5), 7, is_turbo=False) == 4  # round(3.5), as upstream


def _track(x, clean, noise, window: Window, config: RepaintConfig, timesteps):
    """A worker track of one repaint item (its item holds what the repaint lines read)."""
    frames = x.shape[0]
    item = SimpleNamespace(repaint=Repaint(window, (0, 0), config), frames=frames)
    track = Track(item=item, settings=SamplingSettings(), timesteps=timesteps, x=x.clone(), noise=noise, clean=clean,
                  generator=torch.Generator(), main=(torch.zeros(1, 1), torch.ones(1), torch.zeros(frames, 2)))
    track.keep = crossfade_mask(window, frames, 0).unsqueeze(-1)
    track.inject_steps = inject_steps(config, track.steps, is_turbo=False)
    return track


def _window(mask_row: torch.Tensor) -> Window:
    idx = torch.nonzero(mask_row).squeeze(-1)
    return Window(int(idx[0]), int(idx[-1]) + 1)


def test_step_injection_and_boundary_blend_equal_upstream(turbo_handler):
    model = UPSTREAM["model"]
    batch = RunningBatch(turbo_handler.bundle)
    for b in range(2):
        window = _window(model["mask"][b])
        x, clean, noise = model["x"][b], model["clean"][b], model["noise"][b]
        track = _track(x, clean, noise, window, repaint_config("conservative", 0.5), [1.0, 0.625, 0.0])
        batch._advance(track, torch.zeros_like(x), None)  # v = 0: the step leaves x, the injection acts
        torch.testing.assert_close(track.x, model["injected"][b], rtol=1e-6, atol=1e-6)
        for frames in (12, 25, 2):
            track = _track(x, clean, noise, window, RepaintConfig(0.5, frames, 0.0, True), [1.0, 0.0])
            torch.testing.assert_close(_finish_repaint(track).x, model[f"blend_{frames}"][b], rtol=1e-6, atol=1e-6)


def test_no_latent_blend_at_width_zero():
    x, clean = torch.randn(20, 3), torch.randn(20, 3)
    track = _track(x, clean, x, Window(5, 10), RepaintConfig(0.0, 0, 0.0, False), [1.0, 0.0])
    assert torch.equal(_finish_repaint(track).x, x)  # upstream skips the blend: pure diffusion outside too


def test_soft_mask_and_waveform_splice_equal_upstream():
    splice = UPSTREAM["splice"]
    assert torch.equal(crossfade_mask(Window(4, 21), 30, 12), splice["soft_mask_12"][0])
    pred, src = splice["pred"], splice["src"]
    for name in ("mid", "edges", "hard"):
        case = splice[f"splice_{name}"]
        rate = case["rate"]
        for b in range(2):
            samples = (int(case["starts"][b] * rate), int(case["ends"][b] * rate))
            out = splice_waveform(pred[b], src[b], samples, case["fade"], sample_rate=rate)
            torch.testing.assert_close(out, case["out"][b], rtol=1e-6, atol=1e-6, msg=f"{name}[{b}]")


def test_waveform_crossfade_rounds_to_whole_samples():
    # 0.035 s at 48 kHz is 1680 samples; upstream's int() of 1679.99... makes it 1679
    fade = 0.05 * (1 - 0.3)
    out = splice_waveform(torch.zeros(1, 48000), torch.ones(1, 48000), (20000, 30000), fade)
    ramp = ((out > 0) & (out < 1)).sum().item()
    assert ramp == 2 * 1680


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_chunk_mask_modes_equal_upstream(mode):
    expected = UPSTREAM["chunk_masks"][mode]
    window = resolve_window(1.0, 3.0, 150)
    src, mask = task_context("repaint", 150, torch.zeros(1, 150, 4), torch.ones(150, 4), window, mode)
    assert torch.equal(mask, expected["chunk"][0])
    assert torch.equal(crossfade_mask(window, 150, 0).bool(), expected["repaint_mask"][0])
    assert torch.equal(src[window.start: window.end], torch.zeros(window.end - window.start, 4))  # silenced


def test_cover_nofsq_validation():
    check_cross_fields(GenerationParams(task_type="cover-nofsq", src_audio="song.wav"), is_turbo=True)
    check_cross_fields(GenerationParams(task_type="cover-nofsq", audio_codes="<|audio_code_1|>"), is_turbo=True)
    with pytest.raises(ValidationError) as error:
        check_cross_fields(GenerationParams(task_type="cover-nofsq"), is_turbo=True)
    assert error.value.field == "src_audio"


def _params(source_audio, **fields):
    params, _, seeds = prepare_request(
        GenerationParams(thinking=False, caption="warm test tone", task_type="repaint", src_audio=source_audio,
                         repainting_start=4.0, repainting_end=8.0, **fields),
        GenerationConfig(use_random_seed=False, batch_size=1, seeds=[5]))
    return params, seeds


def _corr(a, b) -> float:
    return float(torch.corrcoef(torch.stack([torch.as_tensor(a), torch.as_tensor(b)]))[0, 1])


@pytest.mark.parametrize("mode,spliced", [("conservative", True), ("balanced", True), ("aggressive", False)])
def test_each_repaint_mode_renders(turbo_handler, tmp_path, source_audio, mode, spliced):
    config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[5], audio_format="wav")
    params = GenerationParams(thinking=False, caption="warm test tone", task_type="repaint", src_audio=source_audio,
                              repainting_start=4.0, repainting_end=8.0, repaint_mode=mode)
    result = generate_music(turbo_handler, None, params, config, save_dir=str(tmp_path))
    assert result.success, result.error
    data, rate = sf.read(result.audios[0]["path"], always_2d=True)
    source, _ = sf.read(source_audio, always_2d=True)
    assert rate == 48000 and data.shape == source.shape
    before = slice(0, int(3.5 * 48000))  # away from every crossfade
    # spliced modes get the source waveform back outside the window; aggressive keeps the model's
    assert (_corr(data[before, 0], source[before, 0]) > 0.999) == spliced


def test_repaint_items_with_different_modes_share_a_batch_as_alone(turbo_handler, source_audio):
    conservative, seeds = _params(source_audio, repaint_mode="conservative")
    aggressive, _ = _params(source_audio, repaint_mode="aggressive", repaint_latent_crossfade_frames=4)
    together = turbo_handler.render([conservative, aggressive], seeds * 2)
    for i, params in enumerate((conservative, aggressive)):
        alone = turbo_handler.render([params], seeds)
        torch.testing.assert_close(together.latents[i], alone.latents[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together.audios[i], alone.audios[0], rtol=0, atol=1e-4)
    assert not torch.allclose(together.audios[0], together.audios[1], atol=1e-3)
    assert math.isfinite(float(together.audios[1].abs().max()))
