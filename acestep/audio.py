"""Audio in and out (soundfile; PyAV for AAC and the streamed formats), and the result key (a hash of
the params).

Audio inputs (``AudioSource``) are a path, the file's bytes (``bytes``/``bytearray``/``memoryview``)
or a seekable binary file object; callers holding an upload in memory need no temporary file.
Messages about in-memory audio call it "uploaded audio" and never include its bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import soundfile as sf
import torch

from acestep.params import AudioSource

SAMPLE_RATE = 48000  # the VAE's output: 48 kHz stereo
HOP = 1920  # samples per latent frame (25 latent frames per second)


@dataclass(frozen=True)
class Encoding:
    """How one output format is written: through soundfile (libsndfile's format and subtype names),
    or through PyAV (FFmpeg's muxer and encoder names) when ``pyav``."""

    extension: str  # of files on disk
    container: str
    codec: Optional[str] = None  # libsndfile subtype (None: its default), or the FFmpeg encoder
    bitrate: Optional[int] = None  # bit/s, for the lossy codecs whose rate is set
    pyav: bool = False


# Upstream's choices: 16-bit PCM "wav" and 32-bit float "wav32" (a .wav file too); Opus in Ogg at
# 96 kbit/s and AAC-LC in ADTS at 128 kbit/s (FFmpeg's defaults for stereo, which upstream uses).
ENCODINGS: Dict[str, Encoding] = {
    "flac": Encoding("flac", "FLAC", "PCM_24"),
    "wav": Encoding("wav", "WAV", "PCM_16"),
    "wav32": Encoding("wav", "WAV", "FLOAT"),
    "mp3": Encoding("mp3", "MP3"),
    "opus": Encoding("opus", "OGG", "OPUS", bitrate=96_000),
    "aac": Encoding("aac", "adts", "aac", bitrate=128_000, pyav=True),
}
AUDIO_FORMATS = tuple(ENCODINGS)
# libsndfile's Opus rate for compression level q is (6000 + (1 − q)·250000) bit/s per channel
_OPUS_MIN_BPS, _OPUS_SPAN_BPS = 6_000, 250_000
_BYTES_TYPES = (bytes, bytearray, memoryview)


class AudioLoadError(ValueError):
    """A source or reference audio input cannot be read or holds no sound."""


def is_audio_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def is_audio_bytes(source: Any) -> bool:
    return isinstance(source, _BYTES_TYPES)


def is_audio_file(source: Any) -> bool:
    """A binary file object: ``read`` and ``seek``, and not a text stream."""
    return (hasattr(source, "read") and hasattr(source, "seek") and not isinstance(source, io.TextIOBase)
            and not is_audio_bytes(source))


def describe_source(source: Any) -> str:
    """How messages name an audio input: the path, or "uploaded audio" (never the bytes)."""
    return f"audio file {source}" if is_audio_path(source) else "uploaded audio"


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, ValueError, OSError):  # closed, or a stream without seekable()
        return False


@contextmanager
def _opened(source: AudioSource) -> Iterator[Any]:
    """What soundfile reads for ``source``: a path string or a stream at its start. A caller's
    file object is read from its beginning and left at the position it had."""
    if is_audio_path(source):
        yield os.fspath(source)
    elif is_audio_bytes(source):
        yield io.BytesIO(source)
    elif is_audio_file(source):
        if not _seekable(source):
            raise AudioLoadError("uploaded audio must be a seekable binary file object")
        position = source.tell()
        source.seek(0)
        try:
            yield source
        finally:
            source.seek(position)
    else:
        raise AudioLoadError(f"audio must be a path, bytes or a binary file object, not {type(source).__name__}")


def _read_failure(source: AudioSource, error: Exception) -> AudioLoadError:
    # soundfile's text for a stream names the Python object; its error_string is the reason alone
    reason = str(error) if is_audio_path(source) else getattr(error, "error_string", None) or "unreadable data"
    return AudioLoadError(f"cannot read {describe_source(source)}: {reason}")


def read_source_bytes(source: AudioSource) -> bytes:
    """The whole input as bytes: a path's file, a buffer, or a file object from its start (left at
    the position it had)."""
    if is_audio_bytes(source):
        return bytes(source)
    try:
        with _opened(source) as target:
            if isinstance(target, str):
                return Path(target).read_bytes()
            data = target.read()
    except OSError as error:
        raise AudioLoadError(f"cannot read {describe_source(source)}: {error.strerror or 'I/O error'}") from None
    if not isinstance(data, bytes):
        raise AudioLoadError("uploaded audio must be a binary file object")
    return data


def source_key(source: Optional[AudioSource]) -> Any:
    """A dict key standing for an audio input (buffers and file objects by identity when unhashable)."""
    if source is None or is_audio_path(source):
        return None if source is None else ("path", os.fspath(source))
    if isinstance(source, bytes):
        return ("bytes", source)  # bytes cache their hash: equal uploads share one encode
    return ("object", id(source))


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> Tuple[torch.Tensor, int]:
    """Read anything soundfile reads → stereo float32 [2, S] at ``sample_rate``, clamped to [−1, 1].

    ``source``: a path, bytes or a binary file object. Mono is duplicated, channels beyond two are
    dropped (as upstream)."""
    with _opened(source) as target:
        try:
            data, rate = sf.read(target, dtype="float32", always_2d=True)
        except Exception as error:  # soundfile raises several types for unreadable input
            raise _read_failure(source, error) from None
    if data.shape[0] == 0:
        raise AudioLoadError(f"{describe_source(source)} is empty")
    if data.shape[1] == 1:
        data = np.repeat(data, 2, axis=1)
    data = data[:, :2].T
    if rate != sample_rate:
        from scipy.signal import resample_poly

        factor = gcd(rate, sample_rate)
        data = resample_poly(data, sample_rate // factor, rate // factor, axis=1).astype(np.float32)
    return torch.from_numpy(np.clip(data, -1.0, 1.0)).contiguous(), sample_rate


def audio_duration(source: AudioSource) -> float:
    """Seconds of audio in ``source`` (a path, bytes or a binary file object), from its header."""
    with _opened(source) as target:
        try:
            info = sf.info(target)
        except Exception as error:
            raise _read_failure(source, error) from None
    if info.samplerate <= 0:
        raise AudioLoadError(f"{describe_source(source)} has no valid sample rate")
    return info.frames / info.samplerate


def _opus_level(bitrate: int, channels: int) -> float:
    """libsndfile's compression level that gives ``bitrate`` (half a bit/s up, as it truncates)."""
    per_channel = bitrate / channels - _OPUS_MIN_BPS + 0.5
    return min(max(1.0 - per_channel / _OPUS_SPAN_BPS, 0.0), 1.0)


def _write_pyav(target, data: np.ndarray, encoding: Encoding, sample_rate: int) -> None:
    """[S, C] float32 through FFmpeg's encoder (``av``), into a path or a binary stream."""
    import av

    layout = "stereo" if data.shape[1] == 2 else "mono"
    with av.open(target, mode="w", format=encoding.container) as container:
        stream = container.add_stream(encoding.codec, rate=sample_rate, layout=layout)
        stream.bit_rate = encoding.bitrate
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T), format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _write(target, audio: torch.Tensor, audio_format: str, sample_rate: int) -> None:
    encoding = ENCODINGS[audio_format]
    data = audio.detach().float().cpu().numpy().T
    if encoding.pyav:
        _write_pyav(target, data, encoding, sample_rate)
        return
    level = _opus_level(encoding.bitrate, data.shape[1]) if encoding.codec == "OPUS" else None
    sf.write(target, data, sample_rate, format=encoding.container, subtype=encoding.codec, compression_level=level)


def file_path(path: str | Path, audio_format: str) -> Path:
    """``path`` with the suffix files of ``audio_format`` carry (".wav" for wav32, as upstream)."""
    path = Path(path)
    return path.with_suffix("." + ENCODINGS[audio_format].extension) if path.suffix == f".{audio_format}" else path


def save_audio(audio: torch.Tensor, path: str | Path, audio_format: str, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write [2, S] float audio in ``audio_format`` (``ENCODINGS``); a ``.wav32`` suffix becomes
    ``.wav``. Returns the path written."""
    path = file_path(path, audio_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(str(path), audio, audio_format, sample_rate)
    return path


def encode_audio(audio: torch.Tensor, audio_format: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The same encodings as ``save_audio``, into memory (for HTTP responses)."""
    buffer = io.BytesIO()
    _write(buffer, audio, audio_format, sample_rate)
    return buffer.getvalue()


@dataclass(frozen=True)
class StreamFormat:
    """A format audio is streamed in while it decodes (``StreamEncoder``): FFmpeg's muxer, encoder,
    rate and muxer options, and the HTTP media type."""

    container: str
    codec: str
    bitrate: int  # bit/s
    media_type: str
    options: Tuple[Tuple[str, str], ...] = ()


# Ogg Opus records the exact length (its last page's granule position); MP3 plays in browsers'
# MediaSource. The MP3 muxer's ID3 tag and Xing frame are left out: a stream cannot go back to fill
# in the Xing frame's counts, and MediaSource takes bare MPEG frames.
STREAM_FORMATS: Dict[str, StreamFormat] = {
    "opus": StreamFormat("ogg", "libopus", 96_000, "audio/ogg"),
    "mp3": StreamFormat("mp3", "libmp3lame", 128_000, "audio/mpeg", (("id3v2_version", "0"), ("write_xing", "0"))),
}


# What is not streamed, and why (the serving layer refuses these before a render starts).
NOT_STREAMED = {
    "extend": "an extension renders window after window and is normalised once at the end; it is not streamed",
    "tracks": "stems are not streamed (an accompaniment is the sum of several rendered tracks)",
}


class _Collector:
    """A write-only file for PyAV: what the muxer wrote since the last ``take``. Having no ``seek``,
    it makes the muxer write a stream (nothing is rewritten at the end)."""

    def __init__(self):
        self._data = bytearray()

    def write(self, data) -> int:
        self._data += bytes(data)
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._data)
        self._data.clear()
        return data


class StreamEncoder:
    """One song encoded piece by piece (``STREAM_FORMATS``): ``encode`` returns the bytes each piece
    completes (possibly none: the encoder keeps a few milliseconds back), ``finish`` the rest; the
    concatenation is one valid file. The encoder's state runs across pieces, so pieces of any length
    give the same stream as the whole song at once."""

    def __init__(self, stream_format: str, sample_rate: int = SAMPLE_RATE, channels: int = 2):
        import av

        spec = STREAM_FORMATS[stream_format]
        self.format, self.media_type = stream_format, spec.media_type
        self._layout = "stereo" if channels == 2 else "mono"
        self._out = _Collector()
        self._container = av.open(self._out, mode="w", format=spec.container, options=dict(spec.options))
        self._stream = self._container.add_stream(spec.codec, rate=sample_rate, layout=self._layout)
        self._stream.bit_rate = spec.bitrate
        self._rate, self._pts, self._closed = sample_rate, 0, False

    def encode(self, audio: torch.Tensor) -> bytes:
        """[C, S] float audio (the song's next samples) → the bytes it completes."""
        import av

        data = np.ascontiguousarray(audio.detach().float().cpu().numpy())
        if data.shape[-1] == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=self._layout)
        frame.sample_rate, frame.pts = self._rate, self._pts
        self._pts += data.shape[-1]
        self._mux(self._stream.encode(frame))
        return self._out.take()

    def finish(self) -> bytes:
        """The encoder's last packets and the container's end."""
        if self._closed:
            return b""
        self._closed = True
        self._mux(self._stream.encode(None))
        self._container.close()
        return self._out.take()

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)


def decode_audio(data: bytes, audio_format: str) -> Tuple[np.ndarray, int]:
    """An encoded file of ``audio_format`` → ([S, C] float32 samples, sample rate): libsndfile
    reads what it writes, PyAV (FFmpeg's decoder) reads AAC."""
    if not ENCODINGS[audio_format].pyav:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples, rate
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        frames = [frame.to_ndarray().reshape(stream.channels, -1) for frame in container.decode(stream)]
        rate = stream.sample_rate
    return np.concatenate(frames, axis=1).T.astype(np.float32), rate


def params_key(params: Dict[str, Any]) -> str:
    """UUID-shaped sha256 of the params (sorted JSON), as upstream's generate_uuid_from_params."""
    text = json.dumps(params, sort_keys=True, ensure_ascii=False, default=_key_default)
    return str(uuid.UUID(hashlib.sha256(text.encode()).hexdigest()[:32]))


def _key_default(value: Any) -> str:
    # in-memory audio enters the key as a digest: its repr would be huge and its bytes are the client's
    if is_audio_bytes(value):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    return f"<{type(value).__name__}>" if is_audio_file(value) else str(value)


def is_silent(audio: torch.Tensor, threshold: float = 1e-5) -> bool:
    return bool(audio.abs().max() <= threshold and audio.pow(2).mean().sqrt() <= threshold)
