"""What goes into and comes out of the DiT: prepared items (``DiTItem``), sampling settings, the
per-request ``RenderOutput``, and the VAE decode of finished latents. Everything here is tensors,
no files and no request parsing; sampling itself runs on a ``DiTWorker`` driven by a
``WorkerLoop`` (``acestep.dit.worker`` / ``acestep.dit.loop``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from acestep.dit import vae as vae_ops
from acestep.dit.batch import pad_rows
from acestep.dit.conditioning import TextCondition
from acestep.dit.tasks import REPAINT_WAV_CROSSFADE_S, Window, splice_waveform

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
    adapters: Optional[tuple] = None  # an AdapterSetting; None: the handler's default (``AceStepHandler.lora_setting``)


@dataclass
class RenderOutput:
    audios: List[torch.Tensor]  # per item [2, S_i] fp32 CPU, post-processed
    latents: torch.Tensor  # [B, T, C]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    time_costs: Dict[str, float] = field(default_factory=dict)


def collect(tracks, audios: List[torch.Tensor], time_costs: Dict[str, float]) -> RenderOutput:
    """One request's ``RenderOutput`` from its finished worker tracks and decoded audio."""
    main = [t.main for t in tracks]
    return RenderOutput(
        audios=audios, latents=pad_rows([t.x for t in tracks]).cpu(),
        extras={"encoder_hidden_states": pad_rows([m[0] for m in main]).cpu(),
                "encoder_attention_mask": pad_rows([m[1] for m in main]).cpu(),
                "context_latents": pad_rows([m[2] for m in main]).cpu(),
                "src_latents": pad_rows([t.clean for t in tracks]).cpu(),
                "chunk_masks": pad_rows([m[2][..., -1] for m in main]).cpu()},
        time_costs=time_costs)


def decode_items(bundle, items: List[DiTItem], latents: List[torch.Tensor],
                 window: Optional[int] = None) -> List[torch.Tensor]:
    """Latents [T_i, C] per item → post-processed audio [2, T_i·1920] (CPU), decoded together
    (``vae.decode_batch``); repaint items get the source waveform spliced back outside the window."""
    decoded = vae_ops.decode_batch(bundle.vae, [x.to(bundle.dtype) for x in latents], window)
    audios = []
    for item, wav in zip(items, decoded):
        if item.repaint is not None and item.source_audio is not None:
            wav = splice_waveform(wav, item.source_audio, item.repaint, REPAINT_WAV_CROSSFADE_S)
        audios.append(vae_ops.postprocess(wav).cpu())
    return audios
