"""Where a model runs and in what precision: one rule for the DiT and the LM handlers."""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)


def resolve_device(device: Optional[Union[str, torch.device]] = "auto") -> torch.device:
    """``auto`` (or nothing) → CUDA when there is one, else the CPU; CUDA asked for on a machine
    without it falls back to the CPU with a warning."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA requested but unavailable; running on the CPU")
        return torch.device("cpu")
    return resolved


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on CUDA with bf16 support (fp16 otherwise) and on XPU, fp32 elsewhere (as upstream)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if kind == "xpu" else torch.float32
