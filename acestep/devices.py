"""Where a model runs and in what precision: one rule for the DiT and the LM handlers."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, Optional, Union

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


def is_out_of_memory(error: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA's is the same class), or a ``RuntimeError`` whose message
    says "out of memory" (what other backends and some CUDA kernels raise)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def release_cached_memory(device: Union[str, torch.device]) -> None:
    """On CUDA, hand the caching allocator's unused blocks back to the driver (for the other
    models and processes on the card); nothing elsewhere. Costly if done every step: callers do
    it when their worker goes idle."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def device_memory(device: Optional[Union[str, torch.device]]) -> Dict[str, Any]:
    """This process's memory on ``device``. On CUDA: ``allocated_bytes`` (live tensors),
    ``reserved_bytes`` (held by the caching allocator) and ``peak_allocated_bytes`` (the most
    allocated since the process started), as torch's allocator counts them; elsewhere those three
    are None. On every device ``process_rss_bytes`` and ``process_peak_rss_bytes``: the whole
    process's resident host memory now and at its peak (None where the OS does not say)."""
    kind = torch.device(device).type if device is not None else "cpu"
    cuda = kind == "cuda" and torch.cuda.is_available()
    index = torch.device(device) if cuda else None
    return {"device": str(device) if device is not None else "cpu",
            "allocated_bytes": torch.cuda.memory_allocated(index) if cuda else None,
            "reserved_bytes": torch.cuda.memory_reserved(index) if cuda else None,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(index) if cuda else None,
            "process_rss_bytes": _rss_bytes(), "process_peak_rss_bytes": _peak_rss_bytes()}


def _rss_bytes() -> Optional[int]:
    try:  # Linux: resident pages are the second field
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
