"""DCW: a wavelet-domain correction applied after each sampler step (Yu et al., "Elucidating the
SNR-t Bias of Diffusion Probabilistic Models", CVPR 2026, arXiv 2604.16044).

After a step from t, the new latent's frequency bands are pushed away from the data estimate
``denoised = x − v·t``: with ``xL, xH = DWT(x_next)`` and ``yL, yH = DWT(denoised)``,
``xL ← xL + λ·(xL − yL)`` (and/or the same on the high band), then ``x_next = IDWT(xL, xH)``.
The DWT is one level along time (latents [B, T, C]), zero-padded at the ends, in fp32.

Modes and their per-step λ: ``low`` t·scaler on the low band; ``high`` (1 − t)·scaler on the
high band; ``double`` both (low t·scaler, high (1 − t)·high_scaler); ``pix`` scaler on the
latent itself (no wavelet, no t factor).

The filter banks come from PyWavelets (``pywt.Wavelet(name).dec_lo`` ...); the transform is a
strided ``conv1d`` / ``conv_transpose1d`` pair laid out as ``pytorch_wavelets``' ``DWT1DForward(J=1,
mode="zero")`` / ``DWT1DInverse``, which upstream uses, so the numbers agree to fp32 rounding."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

StepFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DCWSettings:
    """One item's DCW knobs (GenerationParams.dcw_*); whether DCW runs at all is ``resolve_dcw``'s."""

    mode: str = "double"  # "low" | "high" | "double" | "pix"
    scaler: float = 0.05  # the low band's (low, double), the only one for high / pix
    high_scaler: float = 0.02  # the high band's, double mode only
    wavelet: str = "haar"  # a PyWavelets name (acestep.validation.DCW_WAVELETS)

    @property
    def active(self) -> bool:
        """False when every scaler the mode reads is 0 (the correction would be the identity)."""
        if self.mode == "double":
            return self.scaler != 0.0 or self.high_scaler != 0.0
        return self.scaler != 0.0


def resolve_dcw(enabled: Optional[bool], is_turbo: bool) -> bool:
    """The model-aware default: None means on for turbo, off for sft/base (whose output degrades
    with it); an explicit choice wins."""
    return is_turbo if enabled is None else bool(enabled)


@lru_cache(maxsize=None)
def _filters(wavelet: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(analysis [2, 1, L] reversed for correlation, synthesis [2, 1, L]) in fp32, CPU."""
    import pywt

    bank = pywt.Wavelet(wavelet)
    analysis = torch.tensor([bank.dec_lo[::-1], bank.dec_hi[::-1]], dtype=torch.float32).unsqueeze(1)
    synthesis = torch.tensor([bank.rec_lo, bank.rec_hi], dtype=torch.float32).unsqueeze(1)
    return analysis, synthesis


def dwt(x: torch.Tensor, wavelet: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-level DWT along T of x [B, T, C] (fp32, zero padding) → (low, high), each [B, C, T']."""
    analysis = _filters(wavelet)[0].to(x.device)
    batch, frames, channels = x.shape
    rows = x.float().transpose(1, 2).reshape(batch * channels, 1, frames)
    taps = analysis.shape[-1]
    out = (frames + taps - 1) // 2
    pad = 2 * (out - 1) - frames + taps
    if pad % 2:
        rows = F.pad(rows, (0, 1))
    bands = F.conv1d(rows, analysis, stride=2, padding=pad // 2).reshape(batch, channels, 2, -1)
    return bands[:, :, 0], bands[:, :, 1]


def idwt(low: torch.Tensor, high: torch.Tensor, wavelet: str, frames: int) -> torch.Tensor:
    """The inverse of ``dwt``: (low, high) [B, C, T'] → x [B, frames, C] (fp32)."""
    synthesis = _filters(wavelet)[1].to(low.device)
    batch, channels, coeffs = low.shape
    taps = synthesis.shape[-1]
    rows = torch.stack([low, high], dim=2).reshape(batch * channels, 2, coeffs)
    x = F.conv_transpose1d(rows, synthesis, stride=2, padding=taps - 2)
    return x.reshape(batch, channels, -1)[:, :, :frames].transpose(1, 2)


def _push(x_band: torch.Tensor, y_band: torch.Tensor, scale: float) -> torch.Tensor:
    return x_band + scale * (x_band - y_band) if scale != 0.0 else x_band


def dcw_correct(x_next: torch.Tensor, denoised: torch.Tensor, t: float, settings: DCWSettings) -> torch.Tensor:
    """The corrected latent (same shape and dtype as ``x_next`` [B, T, C]) after a step from ``t``."""
    if not settings.active:
        return x_next
    t = float(t)
    if settings.mode == "pix":
        return x_next + settings.scaler * (x_next - denoised)
    low_scale = t * settings.scaler if settings.mode in ("low", "double") else 0.0
    high_scaler = settings.high_scaler if settings.mode == "double" else settings.scaler
    high_scale = (1.0 - t) * high_scaler if settings.mode in ("high", "double") else 0.0
    if low_scale == 0.0 and high_scale == 0.0:
        return x_next
    x_low, x_high = dwt(x_next, settings.wavelet)
    y_low, y_high = dwt(denoised, settings.wavelet)
    x = idwt(_push(x_low, y_low, low_scale), _push(x_high, y_high, high_scale), settings.wavelet, x_next.shape[1])
    return x.to(x_next.dtype)


def corrected(step: StepFn, settings: Optional[DCWSettings]) -> StepFn:
    """Wrap a sampler step ``step(model_fn, x, t, t_next, ...)`` with DCW against the data estimate
    of the step's first velocity (as guidance wraps the model call); ``step`` itself when off."""
    if settings is None or not settings.active:
        return step

    def run(model_fn, x: torch.Tensor, t: float, t_next: float, *args, **kwargs) -> torch.Tensor:
        first: List[torch.Tensor] = []

        def recording(x_in: torch.Tensor, t_in: float) -> torch.Tensor:
            v = model_fn(x_in, t_in)
            if not first:
                first.append(v)
            return v

        x_next = step(recording, x, t, t_next, *args, **kwargs)
        return dcw_correct(x_next, x - first[0] * t, t, settings)

    return run
