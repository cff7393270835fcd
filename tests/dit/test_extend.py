"""Extend: continue a source left and/or right (tiny checkpoints; turbo, base and XL turbo DiTs).
The output is the source plus the extension; outside the waveform crossfade the kept part is the
source's samples (exactly with normalisation off, the source times the normalisation gain with it
on); the LM plans the new part from the new lyrics; past the DiT's longest song the extension
renders in windows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from acestep.dit import vae as vae_ops
from acestep.dit.codes import format_audio_codes
from acestep.dit.extend import (ExtendConfig, ExtendWindow, extension_frames, finish_audio, plan_windows, split_codes,
                                window_codes)
from acestep.dit.items import PostProcess
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music, prepare_request
from acestep.validation import ValidationError

HOP = 1920
RATE = 48000
CROSSFADE = int(0.025 * RATE)  # the balanced repaint mode's waveform crossfade (the default)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _source(path) -> torch.Tensor:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == RATE
    return torch.from_numpy(data.T.copy())


def _extend(handler, source_audio, seeds=(7,), llm=None, save_dir=None, **fields):
    params = GenerationParams(task_type="extend", src_audio=source_audio, caption="a bright synth outro",
                              thinking=llm is not None, **fields)
    config = GenerationConfig(batch_size=len(seeds), seeds=list(seeds), use_random_seed=False, audio_format="wav")
    result = generate_music(handler, llm, params, config, save_dir=save_dir)
    assert result.success, result.error
    return result


def _kept_matches(audio: torch.Tensor, source: torch.Tensor, at: int, fades=(0, CROSSFADE), gain: float = 1.0):
    """The source's samples at ``at`` in ``audio``, but for ``fades`` samples at its start / end."""
    kept = audio[:, at + fades[0]: at + source.shape[-1] - fades[1]]
    expected = source[:, fades[0]: source.shape[-1] - fades[1]] * gain
    assert float((kept - expected).abs().max()) <= 1e-6 * max(gain, 1.0)
    # inside the crossfade the new audio comes in
    assert not torch.equal(audio[:, at:at + source.shape[-1]], source * gain)


# -- windows and codes ---------------------------------------------------------------------------
def _check_cover(windows, source: int, left: int, right: int, config: ExtendConfig):
    """The windows render every new frame once, each side outward from the source, within a window."""
    for side, frames in (("right", right), ("left", left)):
        mine = [w for w in windows if w.side == side]
        assert sum(w.new_frames for w in mine) == frames
        assert [w.distance for w in mine] == [sum(w.new_frames for w in mine[:i]) for i in range(len(mine))]
        assert all(w.new_frames % 5 == 0 for w in mine[:-1])
    total = source + (left + right) * HOP
    for window in windows:
        assert 0 <= window.start and window.end <= total
        assert math.ceil(window.context / HOP) + window.new_frames <= config.window_frames


def test_a_song_that_fits_one_window_keeps_everything_in_each():
    config = ExtendConfig()
    source = 12 * RATE
    windows = plan_windows(source, 75, 100, config)
    assert windows == [ExtendWindow("right", 75 * HOP, source, 100, 0),
                       ExtendWindow("left", 0, source + 100 * HOP, 75, 0)]
    _check_cover(windows, source, 75, 100, config)


def test_a_long_extension_chains_windows_holding_the_last_context_seconds():
    config = ExtendConfig()
    source = 12 * RATE
    right, left = extension_frames(1000.0), extension_frames(150.0)
    windows = plan_windows(source, left, right, config)
    _check_cover(windows, source, left, right, config)
    assert [w.side for w in windows] == ["right", "right", "left"]
    first, second, third = windows
    assert first.context == source and first.new_frames == config.window_frames - 300
    # each later window keeps the 60 s before (after) its new part: the previous window's tail
    assert second.context == 60 * RATE and second.start == first.end - 60 * RATE
    assert third.context == 60 * RATE and third.end == left * HOP + 60 * RATE and third.start == 0


def test_codes_go_to_each_side_from_the_source_outward():
    codes = list(range(10))  # 2 s: the left 0.8 s (4 codes), then the right 1.2 s
    sides = split_codes(codes, left_frames=20)
    assert sides == {"left": [3, 2, 1, 0], "right": [4, 5, 6, 7, 8, 9]}
    assert window_codes(sides, ExtendWindow("right", 0, 0, 15, 0)) == [4, 5, 6]
    assert window_codes(sides, ExtendWindow("right", 0, 0, 15, 15)) == [7, 8, 9]
    assert window_codes(sides, ExtendWindow("left", 0, 0, 10, 10)) == [0, 1]  # the far part, in time order
    assert window_codes(sides, ExtendWindow("left", 0, 0, 10, 0)) == [2, 3]


def test_finishing_in_place_equals_the_decode_postprocess():
    audio = torch.randn(2, 50_000, generator=torch.Generator().manual_seed(0)) * 0.8
    for post in (PostProcess(), PostProcess(normalize=False), PostProcess(fade_in_s=0.3, fade_out_s=0.7)):
        expected = vae_ops.postprocess(audio.clone(), post)
        assert torch.equal(finish_audio(audio.clone(), post), expected)


# -- validation ----------------------------------------------------------------------------------
def _refusal(source_audio, **fields) -> ValidationError:
    with pytest.raises(ValidationError) as error:
        prepare_request(GenerationParams(task_type="extend", src_audio=source_audio, **fields),
                        GenerationConfig(batch_size=1))
    return error.value


def test_extension_fields_are_checked_with_their_ranges(source_audio):
    assert _refusal(source_audio, extend_right_s=-1.0).field == "extend_right_s"
    nothing = _refusal(source_audio)
    assert nothing.field == "extend_right_s" and "> 0" in nothing.allowed
    too_long = _refusal(source_audio, extend_left_s=1000.0, extend_right_s=190.0)  # 12 s + 1190 s > 1200 s
    assert too_long.field == "extend_right_s" and "1200" in too_long.allowed and "1188.00" in too_long.allowed
    assert _refusal(None, extend_right_s=5.0).field == "src_audio"
    with pytest.raises(ValidationError) as error:
        prepare_request(GenerationParams(extend_left_s=5.0, duration=10), GenerationConfig(batch_size=1))
    assert error.value.field == "extend_left_s" and "extend" in error.value.allowed
    prepare_request(GenerationParams(task_type="extend", src_audio=source_audio, extend_right_s=1188.0),
                    GenerationConfig(batch_size=1))


# -- rendering -----------------------------------------------------------------------------------
def test_right_extension_is_source_plus_new_audio_with_the_source_kept(turbo_handler, source_audio, tmp_path):
    source = _source(source_audio)
    codes = format_audio_codes([(i * 977) % 64000 for i in range(20)])  # the new 4 s, as an LM would plan them
    plain = _extend(turbo_handler, source_audio, seeds=(7, 8), save_dir=str(tmp_path), extend_right_s=4.0,
                    enable_normalization=False)
    coded = _extend(turbo_handler, source_audio, extend_right_s=4.0, enable_normalization=False, audio_codes=codes)
    for audio in (plain.audios[0]["tensor"], plain.audios[1]["tensor"], coded.audios[0]["tensor"]):
        assert audio.shape == (2, source.shape[-1] + 4 * RATE)
        _kept_matches(audio, source, 0)
        assert float(audio[:, -3 * RATE:].abs().max()) > 1e-3  # new audio, not silence
    data, rate = sf.read(plain.audios[0]["path"], dtype="float32", always_2d=True)
    assert rate == RATE and data.shape == (source.shape[-1] + 4 * RATE, 2)
    assert not torch.allclose(plain.audios[0]["tensor"], coded.audios[0]["tensor"], atol=1e-3)  # the codes count


def test_both_sides_on_the_base_model_with_normalisation(base_handler, source_audio):
    source = _source(source_audio)
    result = _extend(base_handler, source_audio, extend_left_s=3.0, extend_right_s=2.0, inference_steps=4,
                     guidance_scale=3.0)
    audio = result.audios[0]["tensor"]
    assert audio.shape == (2, source.shape[-1] + 5 * RATE)
    assert float(audio.abs().max()) == pytest.approx(10 ** (-1.0 / 20), abs=1e-6)  # the whole song normalised once
    # the kept part is the source times the one normalisation gain
    kept, expected = audio[:, 3 * RATE + CROSSFADE: 15 * RATE - CROSSFADE], source[:, CROSSFADE:-CROSSFADE]
    gain = float((kept * expected).sum() / (expected * expected).sum())
    _kept_matches(audio, source, 3 * RATE, fades=(CROSSFADE, CROSSFADE), gain=gain)
    assert [w["side"] for w in result.extra_outputs["extend_windows"]] == ["right", "left"]


def test_the_xl_dit_extends_too(xl_root, source_audio):
    from tests.conftest import dit_handler

    handler = dit_handler(xl_root, "xl-turbo")
    try:
        source = _source(source_audio)
        audio = _extend(handler, source_audio, extend_left_s=2.0, enable_normalization=False).audios[0]["tensor"]
        assert audio.shape == (2, source.shape[-1] + 2 * RATE)
        _kept_matches(audio, source, 2 * RATE, fades=(CROSSFADE, 0))
    finally:
        handler.loop.close()


@pytest.fixture(scope="module")
def small_windows(turbo_handler):
    """The demo turbo DiT with 10 s windows keeping 3 s of context: chaining in seconds of audio."""
    handler = AceStepHandler.from_bundle(turbo_handler.bundle)
    handler.extend = ExtendConfig(window_s=10.0, context_s=3.0)
    yield handler
    handler.loop.close()


def test_past_the_longest_window_the_extension_chains_windows(small_windows, source_audio):
    source = _source(source_audio)
    codes = format_audio_codes([(i * 311) % 64000 for i in range(27 * 5)])
    result = _extend(small_windows, source_audio, seeds=(3, 4), extend_left_s=7.0, extend_right_s=20.0,
                     enable_normalization=False, audio_codes=codes)
    windows = [ExtendWindow(**w) for w in result.extra_outputs["extend_windows"]]
    assert windows == plan_windows(source.shape[-1], 175, 500, small_windows.extend)
    assert [w.side for w in windows] == ["right", "right", "right", "left"]
    for audio in (a["tensor"] for a in result.audios):
        assert audio.shape == (2, source.shape[-1] + 27 * RATE)
        _kept_matches(audio, source, 7 * RATE, fades=(CROSSFADE, CROSSFADE))
        for window in windows:  # every window's new part is new audio
            lo = window.start + window.context if window.side == "right" else window.start
            assert float(audio[:, lo: lo + window.new_samples].abs().max()) > 1e-3
    assert result.extra_outputs["latents"].shape == (2, math.ceil(audio.shape[-1] / HOP), 8)
    assert not torch.allclose(result.audios[0]["tensor"], result.audios[1]["tensor"], atol=1e-3)


def test_cancelling_an_extension_stops_between_windows(small_windows, source_audio):
    import threading

    second, reports = threading.Event(), []

    def progress(_fraction, desc):
        reports.append(desc)
        if desc.startswith("window 2/"):
            second.set()

    params, _, seeds = prepare_request(
        GenerationParams(task_type="extend", src_audio=source_audio, extend_right_s=30.0, thinking=False),
        GenerationConfig(batch_size=1, seeds=[5], use_random_seed=False))
    future = small_windows.submit([params], seeds, progress=progress)
    assert second.wait(timeout=300)
    assert future.cancel() and future.cancelled()
    for _ in range(600):  # the window in flight is dropped at the next step
        stats = small_windows.stats()
        if not stats["running"] and not stats["waiting"]:
            break
        threading.Event().wait(0.5)
    assert not small_windows.stats()["running"] and not small_windows.stats()["waiting"]
    assert reports[-1].startswith(("window 1/5", "window 2/5")) and not any(r.startswith("window 3/") for r in reports)


# -- the LM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_lm(demo_root):
    from acestep.llm_inference import LLMHandler

    handler = LLMHandler()
    handler.initialize(checkpoint_dir=str(demo_root), lm_model_path="acestep-5Hz-lm-0.6B", backend="pt", device="cpu")
    yield handler
    handler.unload()


def test_the_lm_plans_the_new_part_from_the_new_lyrics(turbo_handler, demo_lm, source_audio, monkeypatch):
    prompts = []
    submit = demo_lm.submit

    def recording(request, on_step=None):  # the real engine, with each request's prompt noted
        prompts.append((demo_lm.decode(request.prompt_ids), request.fsm))
        return submit(request, on_step)

    monkeypatch.setattr(demo_lm, "submit", recording)
    lyrics = "[Outro]\nthe harbour lights go down"
    result = _extend(turbo_handler, source_audio, llm=demo_lm, extend_right_s=4.0, lyrics=lyrics, bpm=96,
                     use_cot_caption=False, use_cot_language=False, enable_normalization=False)
    (cot, cot_fsm), (codes, codes_fsm) = prompts
    assert lyrics in cot and lyrics in codes  # both phases see the new part's lyrics
    assert cot_fsm.phase == "cot" and cot_fsm.user_metadata == {"bpm": 96, "duration": 4}  # the source's bpm
    assert "duration: 4" in codes and "bpm: 96" in codes and codes_fsm.target_codes == 20  # the new 4 s
    assert result.audios[0]["params"]["audio_codes"].count("<|audio_code_") == 20
    assert result.extra_outputs["lm_metadata"]["duration"] == 4
    audio = result.audios[0]["tensor"]
    source = _source(source_audio)
    assert audio.shape == (2, source.shape[-1] + 4 * RATE)
    _kept_matches(audio, source, 0)


# -- 20 minutes ----------------------------------------------------------------------------------
TWENTY_MINUTES = """
import json, resource, sys
import soundfile as sf
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music

root, source, out = sys.argv[1:4]
handler = AceStepHandler()
handler.initialize_service(root, "acestep-v15-turbo", device="cpu")
# one sampling step: the windows and the memory are what is shown, not the sound
params = GenerationParams(task_type="extend", src_audio=source, extend_right_s=1188.0, thinking=False, caption="x",
                          inference_steps=1)
config = GenerationConfig(batch_size=1, seeds=[1], use_random_seed=False, audio_format="wav")
result = generate_music(handler, None, params, config, save_dir=out)
print(json.dumps({"error": result.error, "frames": sf.info(result.audios[0]["path"]).frames if result.success else 0,
                  "windows": result.extra_outputs.get("extend_windows"),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
# One pass over 20 minutes would hold the demo DiT's full-attention scores for 30,000 frames alone:
# 2 heads x 30,000^2 x 4 bytes = 7.2 GB. Windows of 600 s need about half this bound.
MEMORY_BOUND_MIB = 5 * 1024


@pytest.mark.slow
def test_a_twenty_minute_extension_renders_in_windows_with_bounded_memory(demo_root, source_audio, tmp_path, capsys):
    """In a process of its own, so its peak RSS is this render's (minutes on two cores)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, "-c", TWENTY_MINUTES, str(demo_root), source_audio, str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=1800)
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n20-minute extension: {len(report['windows'] or [])} windows, "
              f"peak RSS {report['peak_rss_mib']:.0f} MiB")
    assert report["error"] is None and report["frames"] == 1200 * RATE
    assert [w["new_frames"] for w in report["windows"]] == [14700, 13500, 1500]
    assert report["peak_rss_mib"] < MEMORY_BOUND_MIB
