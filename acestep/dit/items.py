"""What goes into and comes out of the DiT: prepared items (``DiTItem``), sampling settings and
the per-request ``RenderOutput``. Plain data (tensors, no files, no request parsing); the
``acestep.dit.worker.DiTWorker`` samples and decodes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from acestep.dit.conditioning import TextCondition
from acestep.dit.dcw import DCWSettings
from acestep.dit.flow_edit import FlowEditWindow
from acestep.dit.samplers import VelocityControls
from acestep.dit.tasks import Repaint
from acestep.params import GenerationParams

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class PostProcess:
    """One item's output post-processing, in the order it applies: ``x·latent_rescale +
    latent_shift`` on the latents before the VAE decode; then, on the waveform, peak
    normalisation to ``normalization_db`` dBFS (when ``normalize``), then linear fades
    (seconds, 0 = none). Defaults are GenerationParams'."""

    latent_shift: float = GenerationParams.latent_shift
    latent_rescale: float = GenerationParams.latent_rescale
    normalize: bool = GenerationParams.enable_normalization
    normalization_db: float = GenerationParams.normalization_db
    fade_in_s: float = GenerationParams.fade_in_duration
    fade_out_s: float = GenerationParams.fade_out_duration


@dataclass
class FlowEditSource:
    """A flow-edit item's source: the text describing it (V_src's condition) and its VAE latents,
    where the edit starts."""

    text: TextCondition
    latents: torch.Tensor  # [T, C]


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
    repaint: Optional[Repaint] = None  # this item's window and repaint mode (items of a batch differ)
    source_audio: Optional[torch.Tensor] = None  # [2, S], for the repaint waveform splice
    cover_fallback: Optional[TextCondition] = None  # text2music condition once cover strength runs out
    post: PostProcess = PostProcess()  # latent and waveform post-processing (``acestep.dit.vae``)
    flow_edit: Optional[FlowEditSource] = None  # set with SamplingSettings.flow_edit: a flow-edit morph item


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs shared by a request's items (all from one GenerationParams)."""

    steps: int = 8
    shift: float = 1.0
    timesteps: Optional[tuple] = None
    method: str = "ode"
    guidance_scale: float = 7.0
    use_adg: bool = False
    cfg_interval: tuple = (0.0, 1.0)
    cover_strength: float = 1.0
    cover_noise_strength: float = 0.0  # > 0: start from the source re-noised to t ≈ 1 − strength
    sampler_mode: str = "euler"  # or "heun": a corrector evaluation per step (ODE only)
    controls: VelocityControls = VelocityControls()
    dcw_enabled: Optional[bool] = None  # None: the model's default (acestep.dit.dcw.resolve_dcw)
    dcw: DCWSettings = DCWSettings()
    retake_variance: float = 0.0  # > 0: the noise is mixed with the retake seed's
    retake_seeds: Optional[tuple] = None  # one resolved retake seed per item of the request
    adapters: Optional[tuple] = None  # an AdapterSetting; None: the handler's default (``AceStepHandler.lora_setting``)
    flow_edit: Optional[FlowEditWindow] = None  # set: flow-edit morph (``acestep.dit.flow_edit``)

    def retake_seed(self, index: int) -> Optional[int]:
        """Item ``index``'s retake seed; None when retake is off (variance 0 or no seeds)."""
        if self.retake_variance <= 0 or not self.retake_seeds:
            return None
        return int(self.retake_seeds[index if index < len(self.retake_seeds) else 0])

    def edit_seed(self, index: int, seed: int) -> int:
        """The seed of item ``index``'s flow-edit noise draws: its retake seed when one is given
        (whatever the retake variance; the first one + index past the list's end), else its seed."""
        if not self.retake_seeds:
            return int(seed)
        if index < len(self.retake_seeds):
            return int(self.retake_seeds[index])
        return int(self.retake_seeds[0]) + index


@dataclass
class RenderOutput:
    audios: List[torch.Tensor]  # per item [2, S_i] fp32 CPU, post-processed
    latents: torch.Tensor  # [B, T, C]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    time_costs: Dict[str, float] = field(default_factory=dict)
