"""GenerationParams (one per item, LM metadata already merged) → DiTItems: audio inputs (paths,
bytes or file objects) read and VAE-encoded, codes decoded to hints, task contexts built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from acestep.audio import load_audio, source_key
from acestep.dit import vae as vae_ops
from acestep.dit.codes import codes_to_hints, latents_to_hints, parse_audio_codes
from acestep.dit.conditioning import TextCondition
from acestep.dit.dcw import DCWSettings
from acestep.dit.flow_edit import FlowEditWindow
from acestep.dit.items import DiTItem, FlowEditSource, PostProcess, SamplingSettings
from acestep.dit.samplers import VelocityControls
from acestep.dit.tasks import (
    COVER_TASKS,
    SOURCE_TASKS,
    TIMBRE_FRAMES,
    Repaint,
    Window,
    repaint_config,
    resolve_instruction,
    resolve_window,
    seconds_to_frames,
    silence_frames,
    task_context,
)
from acestep.params import INSTRUMENTAL_LYRICS, AudioSource, GenerationParams

DEFAULT_DURATION_S = 30.0  # no duration, no LM, no source: 30 s, which is also what the metas say
REFERENCE_SEGMENT_S = 10


@dataclass
class EncodeCounts:
    """VAE encodes of audio inputs (a worker's stats): sources, and timbre references."""

    source: int = 0
    reference: int = 0


@dataclass
class SourceAudio:
    audio: torch.Tensor  # [2, S] at 48 kHz
    latents: torch.Tensor  # [T, C]

    @property
    def duration_s(self) -> float:
        return self.audio.shape[-1] / vae_ops.SAMPLE_RATE


def encode_source(bundle, source: AudioSource, seed: int) -> SourceAudio:
    audio, _ = load_audio(source)
    generator = torch.Generator(device=bundle.device).manual_seed(int(seed))
    return SourceAudio(audio, vae_ops.encode(bundle.vae, audio, generator).to(bundle.dtype))


def reference_timbre(bundle, source: Optional[AudioSource], seed: int) -> torch.Tensor:
    """[750, C]: three 10 s segments (front, middle, back) of the reference, tiled to ≥ 30 s and
    VAE-encoded; the silence latent when there is none. Fixed segments (upstream picks random
    offsets) keep results reproducible."""
    silence = bundle.silence_latent
    if not source:
        return silence_frames(silence, TIMBRE_FRAMES).to(bundle.dtype)
    audio, rate = load_audio(source)
    target = 3 * REFERENCE_SEGMENT_S * rate
    if audio.shape[-1] < target:
        audio = audio.repeat(1, math.ceil(target / audio.shape[-1]))
    seg, total = REFERENCE_SEGMENT_S * rate, audio.shape[-1]
    starts = [0, total // 3, max(total - seg, 0)]
    clip = torch.cat([audio[:, s: s + seg] for s in starts], dim=-1)
    generator = torch.Generator(device=bundle.device).manual_seed(int(seed))
    latents = vae_ops.encode(bundle.vae, clip, generator).to(bundle.dtype)
    return torch.cat([latents, silence_frames(silence, TIMBRE_FRAMES).to(latents)], 0)[:TIMBRE_FRAMES]


def _text(params: GenerationParams, instruction: str, duration_s: Optional[float],
          stems: bool = False) -> TextCondition:
    """``stems``: the SFT-stems checkpoint, whose caption carries the song-level global_caption."""
    lyrics = INSTRUMENTAL_LYRICS if params.instrumental else params.lyrics
    return TextCondition(instruction=instruction, caption=params.caption, lyrics=lyrics,
                         language=params.vocal_language or "unknown", bpm=params.bpm,
                         timesignature=params.timesignature, keyscale=params.keyscale, duration_s=duration_s,
                         global_caption=params.global_caption if stems else None,
                         mask_control=params.chunk_mask_mode == "explicit")


def _repaint(params: GenerationParams, window: Window, source: SourceAudio) -> Repaint:
    """The repaint item's config; its splice bounds are the requested seconds in samples."""
    rate = vae_ops.SAMPLE_RATE
    end = source.audio.shape[-1] if params.repainting_end < 0 else int(params.repainting_end * rate)
    config = repaint_config(params.repaint_mode, params.repaint_strength, params.repaint_latent_crossfade_frames,
                            params.repaint_wav_crossfade_sec)
    return Repaint(window, (int(params.repainting_start * rate), end), config)


def sampling_settings(params: GenerationParams) -> SamplingSettings:
    """The request's sampling knobs; ``retake_seed`` is read as resolved by ``prepare_request`` (an
    int or "a,b": one seed per item)."""
    timesteps = tuple(params.timesteps) if params.timesteps else None
    return SamplingSettings(steps=params.inference_steps, shift=params.shift, timesteps=timesteps,
                            method=params.infer_method, guidance_scale=params.guidance_scale, use_adg=params.use_adg,
                            cfg_interval=(params.cfg_interval_start, params.cfg_interval_end),
                            cover_strength=params.audio_cover_strength,
                            cover_noise_strength=params.cover_noise_strength, sampler_mode=params.sampler_mode,
                            controls=VelocityControls(params.velocity_norm_threshold, params.velocity_ema_factor),
                            dcw_enabled=params.dcw_enabled,
                            dcw=DCWSettings(params.dcw_mode, params.dcw_scaler, params.dcw_high_scaler,
                                            params.dcw_wavelet),
                            retake_variance=params.retake_variance, retake_seeds=retake_seeds(params.retake_seed),
                            flow_edit=FlowEditWindow(params.flow_edit_n_min, params.flow_edit_n_max,
                                                     params.flow_edit_n_avg) if params.flow_edit_morph else None)


def retake_seeds(value) -> Optional[tuple]:
    """An int or "a,b" string of retake seeds → a tuple of ints (None for None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(int(part) for part in value.split(",") if part.strip())
    return (int(value),)


def post_process(params: GenerationParams) -> PostProcess:
    """The item's latent and waveform post-processing settings."""
    return PostProcess(latent_shift=params.latent_shift, latent_rescale=params.latent_rescale,
                       normalize=params.enable_normalization, normalization_db=params.normalization_db,
                       fade_in_s=params.fade_in_duration, fade_out_s=params.fade_out_duration)


def _uses_source(params: GenerationParams) -> bool:
    """Whether the item reads its source audio: source tasks without codes, and every flow-edit
    item (the source is where the edit starts)."""
    if params.flow_edit_morph:
        return bool(params.src_audio)
    return params.task_type in SOURCE_TASKS and bool(params.src_audio) and not parse_audio_codes(params.audio_codes)


def _flow_edit(params: GenerationParams, target: TextCondition, source: Optional[SourceAudio],
               frames: int) -> Optional[FlowEditSource]:
    """A flow-edit item's source: the target's condition text with the source caption and lyrics."""
    if not params.flow_edit_morph or source is None:
        return None
    text = dataclasses.replace(target, caption=params.flow_edit_source_caption,
                               lyrics=params.flow_edit_source_lyrics)
    return FlowEditSource(text, source.latents[:frames])


def build_item(bundle, params: GenerationParams, seed: int, source: Optional[SourceAudio],
               timbre: torch.Tensor) -> DiTItem:
    task = params.task_type
    # text2music morph edits the source under silence context: LM codes would make it a cover
    codes = [] if params.flow_edit_morph and task == "text2music" else parse_audio_codes(params.audio_codes)
    instruction = resolve_instruction(task, params.instruction, bool(codes))
    silence = bundle.silence_latent.to(bundle.dtype)
    hints, window = None, None
    if codes:
        hints = codes_to_hints(bundle, codes)
        frames = max(hints.shape[0], seconds_to_frames(0))
        duration_s = params.duration if params.duration and params.duration > 0 else hints.shape[0] / 25
    elif (task in SOURCE_TASKS or params.flow_edit_morph) and source is not None:
        frames, duration_s = source.latents.shape[0], source.duration_s
        if task == "cover":  # cover-nofsq keeps the raw latents: no FSQ round trip
            hints = latents_to_hints(bundle, source.latents)
        if task in ("repaint", "lego"):
            window = resolve_window(params.repainting_start, params.repainting_end, frames)
    else:
        duration_s = params.duration if params.duration and params.duration > 0 else DEFAULT_DURATION_S
        frames = seconds_to_frames(duration_s)
    context_task = "text2music" if codes else task
    src, mask = task_context(context_task, frames, silence, source.latents if source else None, window,
                             params.chunk_mask_mode)
    is_cover = hints is not None
    fallback = None
    if (is_cover or task in COVER_TASKS) and params.audio_cover_strength < 1.0:
        fallback = _text(params, resolve_instruction("text2music", "", False), duration_s)
    stems = bool(getattr(bundle.transformer.config, "is_lego_sft", False))
    repaint = _repaint(params, window, source) if task == "repaint" and window is not None else None
    text = _text(params, instruction, duration_s, stems)
    return DiTItem(text=text, seed=seed, frames=frames, src_latents=src, chunk_mask=mask, timbre=timbre,
                   hints=hints[:frames] if is_cover else None, repaint=repaint,
                   source_audio=source.audio if repaint is not None else None, cover_fallback=fallback,
                   post=post_process(params), flow_edit=_flow_edit(params, text, source, frames))


def build_items(bundle, item_params: List[GenerationParams], seeds: List[int],
                counts: Optional[EncodeCounts] = None) -> List[DiTItem]:
    """One DiTItem per (params, seed). Audio inputs shared by the items are read and encoded once
    (with the first item's seed), and each item gets the same latents; ``counts`` counts the encodes."""
    counts = counts if counts is not None else EncodeCounts()
    sources: Dict[Any, SourceAudio] = {}
    timbres: Dict[Any, torch.Tensor] = {}
    items = []
    for params, seed in zip(item_params, seeds):
        source = None
        if _uses_source(params):
            key = source_key(params.src_audio)
            if key not in sources:
                sources[key] = encode_source(bundle, params.src_audio, seeds[0])
                counts.source += 1
            source = sources[key]
        key = source_key(params.reference_audio)
        if key not in timbres:
            timbres[key] = reference_timbre(bundle, params.reference_audio, seeds[0])
            counts.reference += bool(params.reference_audio)
        items.append(build_item(bundle, params, seed, source, timbres[key]))
    return items
