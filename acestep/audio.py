"""Audio files in and out (soundfile), and the result key (a hash of the params)."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from math import gcd
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 48000
AUDIO_FORMATS = ("flac", "wav", "mp3")
_SUBTYPES = {"flac": "PCM_24", "wav": "FLOAT", "mp3": None}


class AudioLoadError(ValueError):
    """A source or reference audio file cannot be read or holds no sound."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> Tuple[torch.Tensor, int]:
    """Read any file soundfile reads → stereo float32 [2, S] at ``sample_rate``, clamped to [−1, 1].

    Mono is duplicated, channels beyond two are dropped (as upstream)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for unreadable input
        raise AudioLoadError(f"cannot read audio file {path}: {error}") from error
    if data.shape[0] == 0:
        raise AudioLoadError(f"audio file {path} is empty")
    if data.shape[1] == 1:
        data = np.repeat(data, 2, axis=1)
    data = data[:, :2].T
    if rate != sample_rate:
        from scipy.signal import resample_poly

        factor = gcd(rate, sample_rate)
        data = resample_poly(data, sample_rate // factor, rate // factor, axis=1).astype(np.float32)
    return torch.from_numpy(np.clip(data, -1.0, 1.0)).contiguous(), sample_rate


def audio_duration(path: str | Path) -> float:
    try:
        info = sf.info(str(path))
    except Exception as error:
        raise AudioLoadError(f"cannot read audio file {path}: {error}") from error
    return info.frames / info.samplerate


def _write(target, audio: torch.Tensor, audio_format: str, sample_rate: int) -> None:
    data = audio.detach().float().cpu().numpy().T
    sf.write(target, data, sample_rate, format=audio_format.upper(), subtype=_SUBTYPES[audio_format])


def save_audio(audio: torch.Tensor, path: str | Path, audio_format: str, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write [2, S] float audio as flac (24-bit), wav (float) or mp3."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(str(path), audio, audio_format, sample_rate)
    return path


def encode_audio(audio: torch.Tensor, audio_format: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The same encodings as ``save_audio``, into memory (for HTTP responses)."""
    buffer = io.BytesIO()
    _write(buffer, audio, audio_format, sample_rate)
    return buffer.getvalue()


def params_key(params: Dict[str, Any]) -> str:
    """UUID-shaped sha256 of the params (sorted JSON), as upstream's generate_uuid_from_params."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
    return str(uuid.UUID(digest[:32]))


def is_silent(audio: torch.Tensor, threshold: float = 1e-5) -> bool:
    return bool(audio.abs().max() <= threshold and audio.pow(2).mean().sqrt() <= threshold)
