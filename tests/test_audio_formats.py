"""Every output format through the public API: written by generate_music, read back with a standard
reader (soundfile; PyAV for AAC), 48 kHz stereo of the rendered length; validation names the formats."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from acestep.audio import AUDIO_FORMATS, encode_audio
from acestep.inference import GenerationConfig, GenerationParams, generate_music, prepare_request
from acestep.validation import ValidationError

RATE = 48000
AAC_FRAME = 1024  # samples per AAC frame; FFmpeg's encoder also primes the stream with one frame


def _render(handler, tmp_path, audio_format: str):
    params = GenerationParams(thinking=False, caption="warm test tone", lyrics="[Verse]\nla la", duration=10)
    config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[7], audio_format=audio_format)
    result = generate_music(handler, None, params, config, save_dir=str(tmp_path))
    assert result.success, result.error
    return result.audios[0]


def _read_aac(data) -> np.ndarray:
    with av.open(data) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate, container.format.name) == ("aac", RATE, "aac")
        frames = [frame.to_ndarray() for frame in container.decode(stream)]
    return np.concatenate(frames, axis=1)  # [channels, samples] (planar float)


@pytest.mark.parametrize("audio_format, extension, subtype", [
    ("wav", "wav", "PCM_16"), ("wav32", "wav", "FLOAT"), ("opus", "opus", "OPUS")])
def test_soundfile_formats_through_generate_music(turbo_handler, tmp_path, audio_format, extension, subtype):
    audio = _render(turbo_handler, tmp_path, audio_format)
    assert audio["path"].endswith(f"{audio['key']}.{extension}")
    info = sf.info(audio["path"])
    assert (info.subtype, info.samplerate, info.channels) == (subtype, RATE, 2)
    data, _ = sf.read(audio["path"], always_2d=True, dtype="float32")
    assert data.shape == (audio["tensor"].shape[-1], 2)  # Ogg Opus records the exact length
    if audio_format != "opus":  # lossless: the tensor back, to the sample format's resolution
        step = 2.0 ** -14 if subtype == "PCM_16" else 0.0
        assert np.abs(data.T - audio["tensor"].numpy()).max() <= step


def test_aac_through_generate_music(turbo_handler, tmp_path):
    audio = _render(turbo_handler, tmp_path, "aac")
    assert audio["path"].endswith(f"{audio['key']}.aac")
    samples = _read_aac(audio["path"])
    assert samples.shape[0] == 2
    # ADTS carries no length: the decoder returns the priming frame and a padded last frame
    assert abs(samples.shape[1] - AAC_FRAME - audio["tensor"].shape[-1]) < AAC_FRAME


def test_lossy_bitrates_match_upstreams_ffmpeg_defaults():
    """Opus 96 kbit/s and AAC 128 kbit/s for stereo; on 10 s of noise (which takes all the rate a
    variable-rate encoder allows) the files come within 10 % of them."""
    noise = torch.randn(2, 10 * RATE, generator=torch.Generator().manual_seed(0)) * 0.1
    for audio_format, bitrate in (("opus", 96_000), ("aac", 128_000)):
        rate = len(encode_audio(noise, audio_format)) * 8 / 10
        assert abs(rate - bitrate) < 0.1 * bitrate, (audio_format, rate)
    assert _read_aac(io.BytesIO(encode_audio(noise, "aac"))).shape[0] == 2


@pytest.mark.parametrize("audio_format", AUDIO_FORMATS)
def test_validation_accepts_each_format(audio_format):
    prepare_request(GenerationParams(), GenerationConfig(audio_format=audio_format))


@pytest.mark.parametrize("audio_format", ["ogg", "m4a", "wav24", "OPUS", ""])
def test_validation_rejects_other_formats(audio_format):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(), GenerationConfig(audio_format=audio_format))
    assert info.value.field == "audio_format"
    assert "flac, wav, wav32, mp3, opus, aac" in str(info.value)


@pytest.mark.parametrize("audio_format", AUDIO_FORMATS)
def test_stored_files_of_every_format_decode_back(audio_format):
    """What the Serve handle API and the Ray Data writer use to read stored files: AAC included."""
    from acestep.audio import decode_audio

    t = torch.arange(48000 * 2) / 48000
    audio = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 660 * t)]) * 0.3
    samples, rate = decode_audio(encode_audio(audio, audio_format), audio_format)
    assert rate == 48000 and samples.shape[1] == 2 and samples.dtype == np.float32
    assert abs(samples.shape[0] - audio.shape[1]) <= 2048  # one codec frame of priming/padding at most
    assert 0.1 < float(np.abs(samples).max()) < 0.5
