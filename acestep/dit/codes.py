"""5 Hz audio codes ↔ 25 Hz latents, through the checkpoint's FSQ tokenizer and detokenizer."""

from __future__ import annotations

import re
from typing import List

import torch

MAX_AUDIO_CODE = 63999
CODE_PATTERN = re.compile(r"<\|audio_code_(\d+)\|>")
FRAMES_PER_CODE = 5  # pool_window_size: one 5 Hz code per five 25 Hz latent frames


def parse_audio_codes(text: str) -> List[int]:
    """All ``<|audio_code_N|>`` values in ``text``, clamped to the codebook [0, 63999]."""
    return [min(max(int(value), 0), MAX_AUDIO_CODE) for value in CODE_PATTERN.findall(text or "")]


def format_audio_codes(codes) -> str:
    return "".join(f"<|audio_code_{int(c)}|>" for c in codes)


@torch.no_grad()
def codes_to_hints(bundle, codes: List[int]) -> torch.Tensor:
    """Codes → 25 Hz "LM hint" latents [5·n, C] (quantizer.project_out, then the detokenizer)."""
    device, dtype = bundle.device, bundle.dtype
    indices = torch.tensor(codes, dtype=torch.long, device=device).view(1, -1, 1)
    quantized = bundle.audio_tokenizer.quantizer.get_output_from_indices(indices).to(dtype)
    return bundle.audio_token_detokenizer(quantized)[0]


@torch.no_grad()
def latents_to_codes(bundle, latents: torch.Tensor) -> List[int]:
    """25 Hz latents [T, C] → 5 Hz codes (padded to a multiple of 5 with silence-latent frames)."""
    device, dtype = bundle.device, bundle.dtype
    silence = bundle.silence_latent.to(device=device, dtype=dtype)
    _, indices = bundle.audio_tokenizer.tokenize(latents.unsqueeze(0).to(device=device, dtype=dtype), silence)
    return [int(v) for v in indices[0, :, 0].tolist()]


@torch.no_grad()
def latents_to_hints(bundle, latents: torch.Tensor) -> torch.Tensor:
    """The cover bottleneck: tokenize then detokenize source latents [T, C] → hints [T, C]."""
    device, dtype = bundle.device, bundle.dtype
    silence = bundle.silence_latent.to(device=device, dtype=dtype)
    quantized, _ = bundle.audio_tokenizer.tokenize(latents.unsqueeze(0).to(device=device, dtype=dtype), silence)
    return bundle.audio_token_detokenizer(quantized.to(dtype))[0, : latents.shape[0]]
