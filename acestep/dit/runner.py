"""One batch through the DiT: encode conditions, sample, decode. Items come fully prepared
(``DiTItem``); everything here is tensors, no files and no request parsing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from acestep.dit import vae as vae_ops
from acestep.dit.conditioning import TextCondition, encode_conditions
from acestep.dit.guidance import guided
from acestep.dit.samplers import sample
from acestep.dit.schedules import build_schedule
from acestep.dit.tasks import (
    REPAINT_CROSSFADE_FRAMES,
    REPAINT_INJECT_RATIO,
    REPAINT_WAV_CROSSFADE_S,
    Window,
    crossfade_mask,
    silence_frames,
    splice_waveform,
)

Progress = Callable[[float, str], None]


@dataclass
class DiTItem:
    """One audio to render."""

    text: TextCondition
    seed: int
    frames: int
    src_latents: torch.Tensor  # [T, C]
    chunk_mask: torch.Tensor  # [T]
    timbre: torch.Tensor  # [750, C]
    hints: Optional[torch.Tensor] = None  # [T, C]; set → cover: the context uses the hints
    repaint: Optional[Window] = None
    source_audio: Optional[torch.Tensor] = None  # [2, S], for the repaint waveform splice
    cover_fallback: Optional[TextCondition] = None  # text2music condition once cover strength runs out


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs shared by a batch (all from one GenerationParams)."""

    steps: int = 8
    shift: float = 1.0
    timesteps: Optional[tuple] = None
    method: str = "ode"
    guidance_scale: float = 7.0
    use_adg: bool = False
    cfg_interval: tuple = (0.0, 1.0)
    cover_strength: float = 1.0


@dataclass
class RenderOutput:
    audios: List[torch.Tensor]  # per item [2, S_i] fp32 CPU, post-processed
    latents: torch.Tensor  # [B, T, C]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    time_costs: Dict[str, float] = field(default_factory=dict)


def _pad(rows: List[torch.Tensor], frames: int, filler: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cat([r, filler[: frames - r.shape[0]].to(r)], 0) if r.shape[0] < frames else r[:frames]
                        for r in rows])


def build_context(items: List[DiTItem], frames: int, silence: torch.Tensor, use_hints: bool = True) -> torch.Tensor:
    """[B, T, 2C]: (hints if cover else source latents) | chunk mask repeated over channels."""
    fill = silence_frames(silence, frames)
    src = _pad([i.hints if use_hints and i.hints is not None else i.src_latents for i in items], frames, fill)
    ones = torch.ones(frames, device=silence.device, dtype=silence.dtype)
    mask = _pad([i.chunk_mask for i in items], frames, ones)
    return torch.cat([src, mask.unsqueeze(-1).expand_as(src)], dim=-1)


def _model_fns(transformer, states: torch.Tensor, context: torch.Tensor, null_emb: Optional[torch.Tensor]):
    dtype = transformer.dtype

    def forward(x, t, enc, ctx):
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
        return transformer(hidden_states=x.to(dtype), timestep=t_vec, timestep_r=t_vec, encoder_hidden_states=enc,
                           context_latents=ctx, return_dict=False)[0].float()

    def cond_fn(x, t):
        return forward(x, t, states, context)

    def pair_fn(x, t):
        null = null_emb.to(states).expand_as(states)
        v = forward(torch.cat([x, x]), t, torch.cat([states, null]), torch.cat([context, context]))
        return v.chunk(2)

    return cond_fn, pair_fn


def _switch_after(first, second, calls_before_switch: int):
    """Use ``first`` for the first n model calls (one per sampling step), then ``second``."""
    calls = {"n": 0}

    def model_fn(x, t):
        calls["n"] += 1
        return first(x, t) if calls["n"] <= calls_before_switch else second(x, t)

    return model_fn


def _seeded_generators(items: List[DiTItem], device) -> List[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(i.seed)) for i in items]


def _noise(generators, frames: int, channels: int, device, dtype=torch.float32) -> torch.Tensor:
    return torch.cat([torch.randn((1, frames, channels), generator=g, device=device, dtype=dtype) for g in generators])


class _Condition:
    """Encoder states + context for one set of text conditions, turned into a guided model_fn."""

    def __init__(self, bundle, items, texts, context, settings: SamplingSettings):
        timbre = torch.stack([i.timbre for i in items])
        self.states, self.mask = encode_conditions(bundle, texts, timbre)
        self.context = context
        null = bundle.condition_encoder.null_condition_emb
        cond_fn, pair_fn = _model_fns(bundle.transformer, self.states, context, null)
        use_cfg = not bundle.is_turbo and settings.guidance_scale > 1.0
        self.model_fn = (guided(pair_fn, cond_fn, settings.guidance_scale, settings.cfg_interval, settings.use_adg)
                         if use_cfg else cond_fn)


def _repaint_callback(items, noise, clean, steps: int):
    windows = [i.repaint for i in items]
    if not any(windows):
        return None
    frames = noise.shape[1]
    keep = torch.stack([crossfade_mask(w, frames, 0, noise.device) if w else torch.ones(frames, device=noise.device)
                        for w in windows]).unsqueeze(-1)
    inject_steps = round(REPAINT_INJECT_RATIO * steps)

    def callback(i, t_next, x):
        if i < inject_steps and t_next > 0:
            return keep * x + (1 - keep) * (t_next * noise + (1 - t_next) * clean)
        return None

    return callback


def _finish_repaint(items, latents, clean):
    frames = latents.shape[1]
    for b, item in enumerate(items):
        if item.repaint:
            soft = crossfade_mask(item.repaint, frames, REPAINT_CROSSFADE_FRAMES, latents.device).unsqueeze(-1)
            latents[b] = soft * latents[b] + (1 - soft) * clean[b]
    return latents


@torch.no_grad()
def render(bundle, items: List[DiTItem], settings: SamplingSettings, progress: Optional[Progress] = None,
           decode_window: Optional[int] = None) -> RenderOutput:
    """Sample every item's latents in one batch and decode them to post-processed audio."""
    started = time.perf_counter()
    device, silence = bundle.device, bundle.silence_latent.to(bundle.device)
    frames = max(i.frames for i in items)
    channels = silence.shape[-1]
    main = _Condition(bundle, items, [i.text for i in items], build_context(items, frames, silence), settings)
    timesteps = build_schedule(is_turbo=bundle.is_turbo, steps=settings.steps, shift=settings.shift,
                               timesteps=settings.timesteps, dtype=bundle.dtype)
    steps = len(timesteps) - 1
    model_fn = main.model_fn
    if settings.cover_strength < 1.0 and any(i.cover_fallback for i in items):
        texts = [i.cover_fallback or i.text for i in items]
        fallback_ctx = build_context(items, frames, silence, use_hints=False)
        fallback = _Condition(bundle, items, texts, fallback_ctx, settings)
        model_fn = _switch_after(main.model_fn, fallback.model_fn, int(steps * settings.cover_strength))
    encoded = time.perf_counter()

    generators = _seeded_generators(items, device)
    noise = _noise(generators, frames, channels, device)
    clean = _pad([i.src_latents.float() for i in items], frames, silence_frames(silence, frames).float())

    def on_step(i, t_next, x):
        if progress is not None:
            progress((i + 1) / steps, f"diffusion step {i + 1}/{steps}")
        return repaint(i, t_next, x) if repaint else None

    repaint = _repaint_callback(items, noise, clean, steps)
    latents = sample(model_fn, noise.clone(), timesteps, settings.method,
                     noise_fn=lambda x: _noise(generators, frames, channels, device), callback=on_step)
    latents = _finish_repaint(items, latents, clean)
    if not torch.isfinite(latents).all():
        raise RuntimeError("the DiT produced NaN/Inf latents")
    sampled = time.perf_counter()

    audio = vae_ops.decode(bundle.vae, latents.to(bundle.dtype), window=decode_window)
    audios = []
    for b, item in enumerate(items):
        wav = audio[b, :, : item.frames * vae_ops.HOP]
        if item.repaint is not None and item.source_audio is not None:
            wav = splice_waveform(wav, item.source_audio, item.repaint, REPAINT_WAV_CROSSFADE_S)
        audios.append(vae_ops.postprocess(wav).cpu())
    done = time.perf_counter()
    return RenderOutput(
        audios=audios, latents=latents.cpu(),
        extras={"encoder_hidden_states": main.states.cpu(), "encoder_attention_mask": main.mask.cpu(),
                "context_latents": main.context.cpu(), "src_latents": clean.cpu(),
                "chunk_masks": main.context[..., -1].cpu()},
        time_costs={"encoder_time_cost": encoded - started, "diffusion_time_cost": sampled - encoded,
                    "diffusion_per_step_time_cost": (sampled - encoded) / max(steps, 1),
                    "vae_decode_time_cost": done - sampled, "total_time_cost": done - started},
    )
