"""Songs handed on while the VAE decodes them (``acestep.dit.stream``, the worker's ``stream``): the
windows come in order whatever order they are decoded in, post-processed as the stored file (the same
samples when the gain cannot change, never louder than the file's peak), the render's own output is
unchanged, and the windows encoded as one Opus / MP3 stream decode to the stored file's length."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep.audio import HOP, StreamEncoder, encode_audio
from acestep.dit import vae as vae_ops
from acestep.dit.items import PostProcess
from acestep.dit.stream import SongStream
from acestep.dit.tasks import splice_waveform
from acestep.inference import GenerationConfig, GenerationParams, RenderJob, submit_render

FRAMES = 700  # latent frames: 28 s, several CPU windows
MP3_PADDING = 2 * 1152  # an MP3 stream carries the encoder's delay and a padded last frame


def _song(seed: int = 0, frames: int = FRAMES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.12 * torch.randn(2, frames * HOP, generator=generator)  # peaks below full scale


def _pieces(audio: torch.Tensor):
    """The song cut as the CPU decode cuts it: (first sample, samples) per window."""
    return [(lo * HOP + keep_from, audio[..., lo * HOP + keep_from:lo * HOP + keep_to])
            for lo, _, keep_from, keep_to in vae_ops.tile_plan(audio.shape[-1] // HOP, vae_ops.CPU_DECODE_WINDOW)]


def _collect(post: PostProcess, total: int, splice=None):
    out = []
    stream = SongStream(total, post, lambda start, audio, length: out.append((start, audio, length)), splice)
    return stream, out


def test_windows_in_any_order_or_twice_come_out_once_in_order():
    song, post = _song(), PostProcess(normalize=False, fade_in_s=0.5, fade_out_s=1.0)
    stream, out = _collect(post, song.shape[-1])
    pieces = _pieces(song)
    assert len(pieces) > 3
    shuffled = [pieces[2], pieces[0], pieces[0], pieces[3], *pieces[1:]]  # ahead, twice, out of order
    for start, audio in shuffled:
        stream.piece(start, audio)
    assert [start for start, _, _ in out] == [start for start, _ in pieces]
    assert stream.ended and all(length == song.shape[-1] for _, _, length in out)
    joined = torch.cat([audio for _, audio, _ in out], dim=-1)
    # without normalisation and below full scale the gain is 1: the stored file's samples exactly
    assert torch.equal(joined, vae_ops.postprocess(song, post))


def test_a_retry_in_smaller_windows_continues_where_the_stream_is():
    song, post = _song(1), PostProcess(normalize=False)
    stream, out = _collect(post, song.shape[-1])
    first = _pieces(song)[0]
    stream.piece(*first)
    half = vae_ops.MIN_DECODE_WINDOW  # an out-of-memory retry plans other windows
    for lo, _, keep_from, keep_to in vae_ops.tile_plan(FRAMES, half):
        stream.piece(lo * HOP + keep_from, song[..., lo * HOP + keep_from:lo * HOP + keep_to])
    assert torch.equal(torch.cat([audio for _, audio, _ in out], dim=-1), song)


def test_normalised_stream_never_passes_the_target_and_meets_the_file_at_its_peak():
    song, post = _song(2), PostProcess()  # normalisation to -1 dBFS
    loud = 2 * HOP * FRAMES // 3
    song[..., loud] = 1.7  # the song's peak, late and above full scale
    stream, out = _collect(post, song.shape[-1])
    for start, audio in _pieces(song):
        stream.piece(start, audio)
    joined = torch.cat([audio for _, audio, _ in out], dim=-1)
    stored = vae_ops.postprocess(song, post)
    target = 10 ** (post.normalization_db / 20)
    assert joined.shape == stored.shape and joined.abs().max() <= target + 1e-6
    window = next(start for start, audio, _ in out if start <= loud < start + audio.shape[-1])
    torch.testing.assert_close(joined[..., window:], stored[..., window:])
    assert joined[..., :window].abs().max() > stored[..., :window].abs().max()  # louder before the peak came


def test_a_repaint_splice_is_the_stored_files():
    song, source = _song(3), _song(4)[..., : FRAMES * HOP - 5000]  # a source shorter than the song
    splice = (source, (3 * 48000, 9 * 48000), 0.05)
    post = PostProcess(normalize=False)
    stream, out = _collect(post, song.shape[-1], splice)
    for start, audio in _pieces(song):
        stream.piece(start, audio)
    expected = vae_ops.postprocess(splice_waveform(song, source, splice[1], splice[2]), post)
    torch.testing.assert_close(torch.cat([audio for _, audio, _ in out], dim=-1), expected)


@pytest.mark.parametrize("stream_format", ["opus", "mp3"])
def test_pieces_encode_to_one_stream_of_the_songs_length(stream_format):
    song = torch.clamp(_song(5), -1, 1)
    encoder, chunks = StreamEncoder(stream_format), []
    for _, audio in _pieces(song):
        chunks.append(encoder.encode(audio))
    chunks.append(encoder.finish())
    assert encoder.finish() == b""  # once
    first, _ = sf.read(io.BytesIO(chunks[0]), dtype="float32", always_2d=True)
    assert first.shape[0] > 0, "the first window alone already plays"
    decoded, rate = sf.read(io.BytesIO(b"".join(chunks)), dtype="float32", always_2d=True)
    assert rate == 48000 and decoded.shape[1] == 2
    if stream_format == "opus":  # Ogg Opus records the exact length
        assert decoded.shape[0] == song.shape[-1]
    else:
        assert 0 <= decoded.shape[0] - song.shape[-1] <= MP3_PADDING


def _render(handler, stream=None, seeds=(3, 4)):
    params = GenerationParams(caption="a slow organ", duration=12, inference_steps=2, thinking=False,
                              fade_out_duration=1.0)
    config = GenerationConfig(batch_size=len(seeds), use_random_seed=False, seeds=list(seeds))
    return submit_render(handler, RenderJob(params, config, list(seeds)), stream=stream).result(timeout=300)


def test_a_streamed_render_is_the_unstreamed_one_and_its_stream_has_the_files_length(turbo_handler):
    pieces = {}
    streamed = _render(turbo_handler, lambda index, start, audio, total: pieces.setdefault(index, []).append(
        (start, audio, total)))
    plain = _render(turbo_handler)
    assert len(streamed.audios) == len(plain.audios) == 2
    for index, (audio, again) in enumerate(zip(streamed.audios, plain.audios)):
        assert torch.equal(audio, again), "streaming does not change the rendered audio"
        got = pieces[index]
        assert len(got) > 1 and [start for start, _, _ in got] == sorted(start for start, _, _ in got)
        joined = torch.cat([piece for _, piece, _ in got], dim=-1)
        assert joined.shape == audio.shape and got[-1][2] == audio.shape[-1]
        # the stream's peak: at most the file's (its gain follows the peak so far)
        assert joined.abs().max() <= audio.abs().max() + 1e-6
        encoder = StreamEncoder("opus")
        data = b"".join([encoder.encode(piece) for _, piece, _ in got] + [encoder.finish()])
        streamed_file, _ = sf.read(io.BytesIO(data), always_2d=True)
        stored, _ = sf.read(io.BytesIO(encode_audio(audio, "flac")), always_2d=True)
        assert streamed_file.shape == stored.shape and np.abs(streamed_file).max() > 0


@pytest.mark.parametrize("fields, refused", [({"task_type": "extend"}, "extend"), ({"tracks": ["vocals"]}, "tracks")])
def test_extend_and_stems_are_refused_naming_stream(turbo_handler, base_handler, source_audio, fields, refused):
    params = GenerationParams(caption="x", duration=10, inference_steps=2, thinking=False, src_audio=source_audio,
                              **({"extend_right_s": 5.0} if refused == "extend" else {"task_type": "extract"}),
                              **fields)
    config = GenerationConfig(batch_size=1, use_random_seed=False, seeds=[1])
    handler = turbo_handler if refused == "extend" else base_handler
    with pytest.raises(ValueError, match="^stream: "):
        submit_render(handler, RenderJob(params, config, [1]), stream=lambda *args: None)
