"""Everything the DiT side needs, loaded from one checkpoint (either layout) onto one device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from diffusers import AutoencoderOobleck
from torch import nn

from acestep.checkpoints.layout import DiTCheckpoint
from acestep.checkpoints.loader import load_diffusers_module, load_official_dit
from acestep.checkpoints.mapping import DIT_COMPONENTS
from acestep.dit import vae as vae_ops


@dataclass
class DiTBundle:
    """Loaded DiT-side modules. ``transformer`` etc. are diffusers modules; ``text_encoder`` is a
    transformers Qwen3Model and ``tokenizer`` its tokenizer."""

    transformer: nn.Module
    condition_encoder: nn.Module
    audio_tokenizer: nn.Module
    audio_token_detokenizer: nn.Module
    vae: AutoencoderOobleck
    text_encoder: nn.Module
    tokenizer: Any
    checkpoint: DiTCheckpoint

    @property
    def is_turbo(self) -> bool:
        return bool(self.transformer.config.is_turbo)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def silence_latent(self) -> torch.Tensor:
        return self.condition_encoder.silence_latent


def load_text_encoder(folder, dtype: Optional[torch.dtype], device: torch.device):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), dtype=dtype or "auto").to(device).eval().requires_grad_(False)
    return model


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_dit_bundle(checkpoint: DiTCheckpoint, dtype: Optional[torch.dtype] = None,
                    device: str | torch.device = "cpu") -> DiTBundle:
    device = torch.device(device)
    if checkpoint.layout == "official":
        modules: Dict[str, nn.Module] = load_official_dit(checkpoint.dit_dir, dtype=dtype, device=device)
    else:
        modules = {name: load_diffusers_module(checkpoint.dit_dir / name, cls, dtype=dtype, device=device)
                   for name, cls in DIT_COMPONENTS.items()}
    vae = load_diffusers_module(checkpoint.vae_dir, AutoencoderOobleck, dtype=dtype, device=device)
    vae_ops.use_inplace_snakes(vae)
    text_encoder = load_text_encoder(checkpoint.text_encoder_dir, dtype, device)
    return DiTBundle(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(checkpoint.tokenizer_dir),
                     checkpoint=checkpoint, **modules)

