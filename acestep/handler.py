"""AceStepHandler: owns the DiT side's loaded modules (DiT, condition encoder, audio tokenizer /
detokenizer, VAE, text encoder). Thin: loading is in ``acestep.checkpoints``, sampling in
``acestep.dit``."""

from __future__ import annotations

import logging
import threading
from typing import List, Optional, Tuple

import torch

from acestep.checkpoints.bundle import DiTBundle, load_dit_bundle
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.dit.attention import use_band_attention
from acestep.dit.codes import format_audio_codes, latents_to_codes
from acestep.dit.prepare import build_items, encode_source, sampling_settings
from acestep.dit.conditioning import encoder_lengths
from acestep.dit.runner import DiTItem, Progress, RenderOutput, SamplingSettings, render
from acestep.params import GenerationParams

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA with bf16 support (fp16 otherwise), fp32 elsewhere (as upstream)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class AceStepHandler:
    """The DiT side of the seed API (``dit_handler``)."""

    def __init__(self):
        self.bundle: Optional[DiTBundle] = None
        self.config_path: Optional[str] = None
        self._lock = threading.Lock()  # one batch at a time per handler; Serve batches across requests

    def initialize_service(self, project_root: str, config_path: str = "acestep-v15-turbo", device: str = "auto",
                           use_flash_attention: bool = False, compile_model: bool = False,
                           offload_to_cpu: bool = False, offload_dit_to_cpu: bool = False,
                           dtype: Optional[torch.dtype] = None, attention: str = "auto") -> Tuple[str, bool]:
        """Load ``config_path`` (a DiT folder under ``project_root``/checkpoints, under
        ``project_root``, an absolute path, or a diffusers repo folder). Returns (status, True);
        raises FileNotFoundError / CheckpointMismatchError when it cannot load.

        ``attention``: "band" runs sliding layers on FlexAttention, "dense" on SDPA with the dense
        mask, "auto" picks band on CUDA (``use_flash_attention=True`` forces band).
        ``compile_model`` compiles each DiT block with torch.compile (fewer launches per step)."""
        resolved = resolve_device(device)
        checkpoint = resolve_dit_checkpoint(project_root, config_path)
        self.bundle = load_dit_bundle(checkpoint, dtype=dtype or default_dtype(resolved), device=resolved)
        self.config_path = str(config_path)
        if attention not in ("auto", "band", "dense"):
            raise ValueError(f"attention={attention!r}: expected 'auto', 'band' or 'dense'")
        if use_flash_attention or attention == "band" or (attention == "auto" and resolved.type == "cuda"):
            use_band_attention(self.bundle.transformer)
        if compile_model:
            for block in self.bundle.transformer.layers:
                block.compile()
        if offload_to_cpu or offload_dit_to_cpu:
            logger.info("CPU offload is not used: each deployment keeps its models resident")
        status = f"DiT {checkpoint.name} ({checkpoint.layout} layout) loaded on {resolved} as {self.bundle.dtype}"
        logger.info(status)
        return status, True

    @classmethod
    def from_bundle(cls, bundle: DiTBundle) -> "AceStepHandler":
        """A handler around already-loaded modules (benchmarks build random full-size ones)."""
        handler = cls()
        handler.bundle = bundle
        return handler

    @property
    def is_initialized(self) -> bool:
        return self.bundle is not None

    @property
    def is_turbo(self) -> bool:
        return self._require().is_turbo

    @property
    def model_name(self) -> str:
        return self._require().checkpoint.name

    def _require(self) -> DiTBundle:
        if self.bundle is None:
            raise RuntimeError("AceStepHandler is not initialized: call initialize_service(...) first")
        return self.bundle

    def render(self, item_params: List[GenerationParams], seeds: List[int],
               progress: Optional[Progress] = None) -> RenderOutput:
        """Render one audio per (params, seed); all items share the first params' sampling settings."""
        return self.render_items(self.prepare(item_params, seeds), sampling_settings(item_params[0]), progress)

    def prepare(self, item_params: List[GenerationParams], seeds: List[int]) -> List[DiTItem]:
        """Read and encode audio inputs, decode codes, build task contexts: one DiTItem per seed."""
        bundle = self._require()
        with self._lock:
            return build_items(bundle, item_params, seeds)

    def render_items(self, items: List[DiTItem], settings: SamplingSettings,
                     progress: Optional[Progress] = None) -> RenderOutput:
        bundle = self._require()
        with self._lock:
            return render(bundle, items, settings, progress)

    def batch_key(self, item: DiTItem, settings: SamplingSettings) -> Tuple:
        """Items with equal keys can share one DiT batch and give the results they give alone:
        same sampling settings, latent length and encoder length (the DiT masks no padding)."""
        return (settings, item.frames, item.cover_fallback is not None,
                encoder_lengths(self._require().tokenizer, item.text))

    def convert_src_audio_to_codes(self, audio_path: str, seed: int = 0) -> str:
        """Source audio → 5 Hz code string (VAE encode, then the FSQ tokenizer)."""
        bundle = self._require()
        with self._lock:
            source = encode_source(bundle, audio_path, seed)
            return format_audio_codes(latents_to_codes(bundle, source.latents))
