"""Oobleck VAE around the DiT: tiled encode/decode and the official output post-processing."""

from __future__ import annotations

from typing import Optional

import torch

SAMPLE_RATE = 48000
HOP = 1920  # samples per latent frame (25 Hz)
ENCODE_TILE_S = 30.0
ENCODE_OVERLAP_S = 2.0
CPU_DECODE_WINDOW = 256
GPU_DECODE_WINDOW = 512
DECODE_OVERLAP = 64
TARGET_PEAK_DB = -1.0


# Peak activation memory of an untiled bf16 decode, per latent frame (measured at full size:
# 7.6 GiB for 120 s = 3000 frames on an H200).
UNTILED_BYTES_PER_FRAME = 2.7e6
UNTILED_MEMORY_FRACTION = 0.5


def decode_window(device: torch.device, frames: int = 0, batch: int = 1) -> int:
    """Untiled on CUDA when the decode fits in half the free memory (faster: no overlap work);
    otherwise windows of 512 frames (256 on CPU, as upstream)."""
    if device.type != "cuda":
        return CPU_DECODE_WINDOW
    free, _ = torch.cuda.mem_get_info(device)
    if frames and frames * UNTILED_BYTES_PER_FRAME <= UNTILED_MEMORY_FRACTION * free:
        return frames
    return GPU_DECODE_WINDOW


@torch.no_grad()
def decode(vae, latents: torch.Tensor, window: Optional[int] = None, overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """Latents [B, T, C] → audio [B, 2, T·1920] fp32, in windows of ``window`` frames whose
    ``overlap`` frames on each inner side are decoded and thrown away (as upstream)."""
    x = latents.transpose(1, 2).to(vae.dtype)
    frames = x.shape[-1]
    window = window or decode_window(latents.device, frames)
    if frames <= window:
        return torch.cat([vae.decode(item).sample.float() for item in x.split(1)])
    while window <= 2 * overlap:
        overlap //= 2
    core = window - 2 * overlap
    pieces = []
    for start in range(0, frames, core):
        lo, hi = max(start - overlap, 0), min(start + core + overlap, frames)
        audio = vae.decode(x[..., lo:hi]).sample.float()
        keep_from = (start - lo) * HOP
        keep_to = keep_from + (min(start + core, frames) - start) * HOP
        pieces.append(audio[..., keep_from:keep_to])
    return torch.cat(pieces, dim=-1)


@torch.no_grad()
def encode(vae, audio: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Audio [2, S] at 48 kHz → latents [T, C], sampled from the posterior (as upstream), in 30 s
    tiles with 2 s of overlap trimmed when the audio is longer than 30 s."""
    x = audio.unsqueeze(0).to(device=vae.device, dtype=vae.dtype)
    tile = int(ENCODE_TILE_S * SAMPLE_RATE)
    overlap = int(ENCODE_OVERLAP_S * SAMPLE_RATE) // HOP * HOP
    if x.shape[-1] <= tile:
        return vae.encode(x).latent_dist.sample(generator=generator)[0].transpose(0, 1)
    pieces, core = [], tile - 2 * overlap
    for start in range(0, x.shape[-1], core):
        lo, hi = max(start - overlap, 0), min(start + core + overlap, x.shape[-1])
        latents = vae.encode(x[..., lo:hi]).latent_dist.sample(generator=generator)[0]
        skip = (start - lo) // HOP
        take = (min(start + core, x.shape[-1]) - start + HOP - 1) // HOP
        pieces.append(latents[:, skip: skip + take])
    return torch.cat(pieces, dim=-1).transpose(0, 1)


def postprocess(audio: torch.Tensor) -> torch.Tensor:
    """Per item [2, S]: divide by the peak if it exceeds 1, then peak-normalize to −1 dBFS."""
    audio = audio.float()
    peak = audio.abs().amax(dim=(-2, -1), keepdim=True)
    audio = torch.where(peak > 1.0, audio / peak.clamp(min=1.0), audio)
    peak = audio.abs().amax(dim=(-2, -1), keepdim=True)
    gain = torch.where(peak < 1e-6, torch.ones_like(peak), 10 ** (TARGET_PEAK_DB / 20) / peak.clamp(min=1e-6))
    return audio * gain
