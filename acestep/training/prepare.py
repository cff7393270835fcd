"""One song → a ``PreparedSample``: the audio's VAE latents, and the condition-encoder states and
text2music context a render of the same caption, lyrics and metas computes (``acestep.dit``'s own
text path, silence timbre), so the adapter trains on exactly what it will see at inference.

Auto-labels: the audio's latents → 5 Hz codes → the LM's ``understand_music`` (caption, bpm, key,
time signature, language, lyrics). A song's own text (its sidecar) wins field by field; labels fill
what it leaves out. The text rules themselves (tags, genres, labels written back) are
``acestep.training.labels``."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from acestep.audio import load_audio
from acestep.dit import vae as vae_ops
from acestep.dit.codes import format_audio_codes, latents_to_codes
from acestep.dit.conditioning import TextCondition, encode_conditions
from acestep.dit.tasks import TIMBRE_FRAMES, default_instruction, silence_frames
from acestep.params import INSTRUMENTAL_LYRICS, AudioSource
from acestep.training.labels import SongText
from acestep.training.samples import PreparedSample

LABEL_TEMPERATURE = 0.3  # the official "analysis only" path's understand temperature


def condition(text: SongText, duration_s: float) -> TextCondition:
    """The text2music condition a render of this song would use."""
    return TextCondition(instruction=default_instruction("text2music"), caption=text.caption,
                         lyrics=text.lyrics or INSTRUMENTAL_LYRICS, language=text.language or "unknown",
                         bpm=text.bpm, timesignature=text.timesignature, keyscale=text.keyscale, duration_s=duration_s)


@torch.no_grad()
def encode_audio(bundle, source: AudioSource, seed: int, max_seconds: Optional[float] = None) -> torch.Tensor:
    """Audio (its first ``max_seconds``) → VAE latents [T, C] (a posterior sample drawn with ``seed``)."""
    audio, rate = load_audio(source)
    if max_seconds is not None:
        audio = audio[:, : int(max_seconds * rate)]
    generator = torch.Generator(device=bundle.device).manual_seed(int(seed))
    return vae_ops.encode(bundle.vae, audio, generator).to(bundle.dtype)


@torch.no_grad()
def prepare_sample(bundle, latents: torch.Tensor, text: SongText, metadata: Dict[str, Any]) -> PreparedSample:
    """Latents + text → a sample: encoder states of the song's condition (silence timbre, as a render
    without a reference) and the text2music context (silence latents, chunk mask ones)."""
    frames = latents.shape[0]
    silence = bundle.silence_latent.to(device=bundle.device, dtype=bundle.dtype)
    timbre = silence_frames(silence, TIMBRE_FRAMES).unsqueeze(0)
    states, _ = encode_conditions(bundle, [condition(text, frames / 25.0)], timbre)
    src = silence_frames(silence, frames)
    context = torch.cat([src, torch.ones_like(src)], dim=-1)
    return PreparedSample(latents, states[0], context, {**metadata, **text.__dict__})


def auto_labels(bundle, llm_handler, latents: torch.Tensor, seed: int) -> Dict[str, Any]:
    """The LM's reading of the audio (``understand_music`` on its codes); raises when it fails."""
    from acestep.inference import understand_music

    codes = format_audio_codes(latents_to_codes(bundle, latents))
    result = understand_music(llm_handler, codes, temperature=LABEL_TEMPERATURE, seed=seed)
    if not result.success:
        raise RuntimeError(f"auto-labels: {result.error}")
    return {"caption": result.caption, "lyrics": result.lyrics, "bpm": result.bpm, "keyscale": result.keyscale,
            "timesignature": result.timesignature, "language": result.language}


