"""Every task type renders a readable 48 kHz stereo file of the right length (tiny checkpoints)."""

from __future__ import annotations

import soundfile as sf
import pytest
import torch

from acestep.dit.codes import format_audio_codes
from acestep.inference import GenerationConfig, GenerationParams, generate_music

FRAME = 1920


def _run(handler, tmp_path, **fields):
    config_fields = {k: fields.pop(k) for k in list(fields) if k in ("batch_size", "seeds", "audio_format")}
    config = GenerationConfig(use_random_seed=False, **{"batch_size": 1, "seeds": [7], **config_fields})
    params = GenerationParams(thinking=False, caption="warm test tone", lyrics="[Verse]\nla la", **fields)
    result = generate_music(handler, None, params, config, save_dir=str(tmp_path))
    assert result.success, result.error
    return result


def _read(path):
    data, rate = sf.read(path, always_2d=True)
    assert rate == 48000
    assert data.shape[1] == 2
    return data


@pytest.mark.parametrize("audio_format", ["flac", "wav", "mp3"])
def test_text2music_writes_each_format(turbo_handler, tmp_path, audio_format):
    result = _run(turbo_handler, tmp_path, duration=10, audio_format=audio_format)
    audio = result.audios[0]
    assert audio["path"].endswith(f"{audio['key']}.{audio_format}")
    data = _read(audio["path"])
    assert abs(data.shape[0] - 10 * 48000) <= FRAME
    assert audio["tensor"].shape == (2, 250 * FRAME)


def test_cover_from_source_audio(turbo_handler, tmp_path, source_audio):
    result = _run(turbo_handler, tmp_path, task_type="cover", src_audio=source_audio, audio_cover_strength=0.5)
    assert abs(_read(result.audios[0]["path"]).shape[0] - 12 * 48000) <= FRAME


def test_cover_from_audio_codes_sets_length_from_codes(turbo_handler, tmp_path):
    codes = format_audio_codes([(i * 997) % 64000 for i in range(55)])  # 11 s of 5 Hz codes
    result = _run(turbo_handler, tmp_path, task_type="cover", audio_codes=codes)
    assert abs(_read(result.audios[0]["path"]).shape[0] - 11 * 48000) <= FRAME
    assert result.audios[0]["params"]["audio_codes"] == codes


def test_repaint_keeps_the_source_outside_the_window(turbo_handler, tmp_path, source_audio):
    result = _run(turbo_handler, tmp_path, task_type="repaint", src_audio=source_audio, repainting_start=4.0,
                  repainting_end=8.0, audio_format="wav")
    data = _read(result.audios[0]["path"])
    assert abs(data.shape[0] - 12 * 48000) <= FRAME
    source, _ = sf.read(source_audio, always_2d=True)
    # Outside the window (away from the crossfades) the waveform is the source's, rescaled by the
    # final peak normalization: the correlation is ~1 there and not inside the window.
    before = slice(0, int(3.5 * 48000))
    corr = torch.corrcoef(torch.tensor([data[before, 0], source[before, 0]]))[0, 1]
    assert corr > 0.999
    inside = slice(int(5 * 48000), int(7 * 48000))
    corr_inside = torch.corrcoef(torch.tensor([data[inside, 0], source[inside, 0]]))[0, 1]
    assert corr_inside < 0.9


@pytest.mark.parametrize("task_type,instruction", [
    ("lego", "Generate the GUITAR track based on the audio context:"),
    ("extract", "Extract the VOCALS track from the audio:"),
    ("complete", "Complete the input track with drums, bass, guitar:"),
])
def test_base_only_tasks(base_handler, tmp_path, source_audio, task_type, instruction):
    result = _run(base_handler, tmp_path, task_type=task_type, instruction=instruction, src_audio=source_audio,
                  inference_steps=4, guidance_scale=3.0)
    assert abs(_read(result.audios[0]["path"]).shape[0] - 12 * 48000) <= FRAME


def test_reference_audio_changes_the_result(turbo_handler, tmp_path, reference_audio):
    plain = _run(turbo_handler, tmp_path, duration=10)
    timbre = _run(turbo_handler, tmp_path, duration=10, reference_audio=reference_audio)
    assert abs(_read(timbre.audios[0]["path"]).shape[0] - 10 * 48000) <= FRAME
    assert not torch.equal(plain.audios[0]["tensor"], timbre.audios[0]["tensor"])


def test_src_audio_to_codes_round_trip(turbo_handler, source_audio):
    codes = turbo_handler.convert_src_audio_to_codes(source_audio, seed=1)
    assert codes.count("<|audio_code_") == 60  # 12 s at 5 Hz
    assert codes == turbo_handler.convert_src_audio_to_codes(source_audio, seed=1)


def test_results_report_time_costs_and_extras(turbo_handler, tmp_path):
    result = _run(turbo_handler, tmp_path, duration=10, batch_size=2, seeds=[3, 4])
    costs = result.extra_outputs["time_costs"]
    for key in ("dit_total_time_cost", "dit_diffusion_time_cost", "dit_vae_decode_time_cost", "pipeline_total_time"):
        assert costs[key] > 0
    assert result.extra_outputs["latents"].shape == (2, 250, 8)
    assert result.extra_outputs["masks"].shape == (2, 250)
    assert result.extra_outputs["lm_metadata"] is None
    assert result.extra_outputs["seed_value"] == "3, 4"
    assert [a["params"]["seed"] for a in result.audios] == [3, 4]
    assert len({a["key"] for a in result.audios}) == 2


def test_cover_nofsq_conditions_on_the_raw_source_latents(turbo_handler, tmp_path, source_audio):
    result = _run(turbo_handler, tmp_path, task_type="cover-nofsq", src_audio=source_audio)
    assert abs(_read(result.audios[0]["path"]).shape[0] - 12 * 48000) <= FRAME
    cover = _run(turbo_handler, tmp_path, task_type="cover", src_audio=source_audio)
    assert not torch.allclose(result.audios[0]["tensor"], cover.audios[0]["tensor"], atol=1e-3)
    params = GenerationParams(task_type="cover-nofsq", src_audio=source_audio, caption="c")
    nofsq, = turbo_handler.prepare([params], [7])
    fsq, = turbo_handler.prepare([GenerationParams(task_type="cover", src_audio=source_audio, caption="c")], [7])
    assert nofsq.hints is None and fsq.hints is not None  # no FSQ round trip: not a cover item
    assert torch.equal(nofsq.src_latents, fsq.src_latents)  # the VAE latents of the source
    assert torch.equal(nofsq.chunk_mask, torch.ones(nofsq.frames))
    assert nofsq.text.instruction == fsq.text.instruction
