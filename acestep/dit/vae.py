"""Oobleck VAE around the DiT: tiled encode/decode and the official output post-processing (latent
shift/rescale before the decode; clip guard, peak normalisation and fades after it)."""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

from acestep.audio import HOP, SAMPLE_RATE
from acestep.devices import is_out_of_memory, release_cached_memory
from acestep.dit.items import PostProcess

logger = logging.getLogger(__name__)

ENCODE_TILE_S = 30.0
ENCODE_OVERLAP_S = 2.0
CPU_DECODE_WINDOW = 256
GPU_DECODE_WINDOW = 512
DECODE_OVERLAP = 64
# Floor of the out-of-memory retries' halving: the smallest tile that still decodes the whole
# overlap on both sides of its core, so a retry gives the same audio.
MIN_DECODE_WINDOW = 3 * DECODE_OVERLAP
SILENT_PEAK = 1e-6  # below this peak normalisation leaves the audio alone


# Peak activation memory of a bf16 decode, per latent frame in the call (measured untiled at full
# size: 7.6 GiB for 120 s = 3000 frames on an H200); a call is sized to half the free memory.
UNTILED_BYTES_PER_FRAME = 2.7e6
UNTILED_MEMORY_FRACTION = 0.5


class InPlaceSnake1d(Snake1d):
    """diffusers' Snake (x + sin²(αx)/β) with the same operations in the same order, bit for bit,
    in one buffer: no temporaries the size of the activations, about a quarter off a CPU decode."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return super().forward(hidden_states)  # in-place ops would break autograd
        alpha = torch.exp(self.alpha) if self.logscale else self.alpha
        beta = torch.exp(self.beta) if self.logscale else self.beta
        shape = hidden_states.shape
        x = hidden_states.reshape(shape[0], shape[1], -1)
        out = torch.mul(alpha, x)
        out.sin_().pow_(2)
        torch.mul((beta + 1e-9).reciprocal(), out, out=out)
        return out.add_(x).reshape(shape)


def use_inplace_snakes(vae) -> None:
    """Swap every Snake of ``vae`` for ``InPlaceSnake1d`` (same parameters, same output)."""
    for module in vae.modules():
        if type(module) is Snake1d:
            module.__class__ = InPlaceSnake1d


def decode_budget(device: torch.device) -> int:
    """Latent frames one VAE decode call may carry (summed over its batch): half the free memory
    on CUDA, one window elsewhere (on CPU a batch of tiles decodes slower than its tiles one by
    one: the activations leave the caches)."""
    if device.type != "cuda":
        return CPU_DECODE_WINDOW
    free, _ = torch.cuda.mem_get_info(device)
    return max(GPU_DECODE_WINDOW, int(UNTILED_MEMORY_FRACTION * free / UNTILED_BYTES_PER_FRAME))


def decode_window(device: torch.device, frames: int = 0, batch: int = 1) -> int:
    """Untiled on CUDA when ``batch`` decodes of ``frames`` fit the budget (faster: no overlap
    work); otherwise windows of 512 frames (256 on CPU, as upstream)."""
    if device.type != "cuda":
        return CPU_DECODE_WINDOW
    if frames and frames * batch <= decode_budget(device):
        return frames
    return GPU_DECODE_WINDOW


def decode(vae, latents: torch.Tensor, window: Optional[int] = None, overlap: int = DECODE_OVERLAP) -> torch.Tensor:
    """Latents [B, T, C] → audio [B, 2, T·1920] fp32, in windows of ``window`` frames whose
    ``overlap`` frames on each inner side are decoded and thrown away (as upstream)."""
    window = window or decode_window(latents.device, latents.shape[1], latents.shape[0])
    return torch.stack(decode_batch(vae, list(latents), window, overlap))


def tile_plan(frames: int, window: int, overlap: int = DECODE_OVERLAP) -> List[Tuple[int, int, int, int]]:
    """An item's tiles: (lo, hi) frames decoded, (keep_from, keep_to) samples kept."""
    if frames <= window:
        return [(0, frames, 0, frames * HOP)]
    while window <= 2 * overlap:
        overlap //= 2
    core, plan = window - 2 * overlap, []
    for start in range(0, frames, core):
        lo, hi = max(start - overlap, 0), min(start + core + overlap, frames)
        keep_from = (start - lo) * HOP
        plan.append((lo, hi, keep_from, keep_from + (min(start + core, frames) - start) * HOP))
    return plan


# A decoded window as it finishes: (item index, its first sample, its audio [2, n] fp32)
OnPiece = Callable[[int, int, torch.Tensor], None]


@torch.no_grad()
def decode_batch(vae, latents: List[torch.Tensor], window: Optional[int] = None,
                 overlap: int = DECODE_OVERLAP, budget: Optional[int] = None,
                 on_piece: Optional[OnPiece] = None) -> List[torch.Tensor]:
    """Latents [T_i, C] of several items → audio [2, T_i·1920] fp32 each, as each decodes alone:
    every item's tiles are planned alone, and tiles of equal length (whatever item they come
    from) are decoded together, at most ``decode_budget`` frames per call, so no tile ever sees
    another item's frames or any padding. ``budget`` overrides ``decode_budget``. ``on_piece``
    is called with each tile's kept audio as soon as its call returns (``acestep.dit.stream``).

    Out of memory, it retries with half the frames per call (tiles no longer than that), down to
    ``MIN_DECODE_WINDOW``, then once on the CPU (the VAE moved there for the call and back; that
    audio stays on the CPU); each retry logs one line. Every tile still decodes its overlap, so
    the audio is the same to float rounding."""
    device = latents[0].device
    window = window or decode_window(device, max(x.shape[0] for x in latents), len(latents))
    budget = budget or decode_budget(device)
    total = sum(x.shape[0] for x in latents)
    while True:
        try:
            return _decode_tiles(vae, latents, window, overlap, budget, on_piece)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_out_of_memory(error):
                raise
        # out of the except clause: the failed call's tensors, held by its traceback, are free now
        release_cached_memory(device)
        frames = min(max(window, budget), total)  # the most frames one call of that try could carry
        if frames <= MIN_DECODE_WINDOW:
            break
        smaller = max(frames // 2, MIN_DECODE_WINDOW)
        logger.warning("VAE decode out of memory at up to %d frames per call; retrying at %d", frames, smaller)
        window, budget = min(window, smaller), smaller
    logger.warning("VAE decode out of memory at %d frames per call; decoding on the CPU", frames)
    return _decode_on_cpu(vae, latents, overlap, on_piece)


def _decode_tiles(vae, latents: List[torch.Tensor], window: int, overlap: int, budget: int,
                  on_piece: Optional[OnPiece] = None) -> List[torch.Tensor]:
    plans = [tile_plan(x.shape[0], window, overlap) for x in latents]
    groups: Dict[int, List[Tuple[int, int]]] = {}
    for i, plan in enumerate(plans):
        for j, (lo, hi, _, _) in enumerate(plan):
            groups.setdefault(hi - lo, []).append((i, j))
    pieces: Dict[Tuple[int, int], torch.Tensor] = {}
    for length, members in groups.items():
        per_call = max(1, budget // length)
        for k in range(0, len(members), per_call):
            chunk = members[k:k + per_call]
            x = torch.stack([latents[i][plans[i][j][0]:plans[i][j][1]] for i, j in chunk]).transpose(1, 2)
            audio = vae.decode(x.to(vae.dtype)).sample.float()
            for (i, j), wav in zip(chunk, audio):
                lo, _, keep_from, keep_to = plans[i][j]
                pieces[(i, j)] = wav[..., keep_from:keep_to]
                if on_piece is not None:
                    on_piece(i, lo * HOP + keep_from, pieces[(i, j)])
    return [torch.cat([pieces[(i, j)] for j in range(len(plan))], dim=-1) for i, plan in enumerate(plans)]


def _decode_on_cpu(vae, latents: List[torch.Tensor], overlap: int, on_piece: Optional[OnPiece] = None
                   ) -> List[torch.Tensor]:
    """The last resort: the VAE on the CPU for this call (in CPU windows), then back where it was."""
    home = next(vae.parameters()).device
    vae.to("cpu")
    try:
        return _decode_tiles(vae, [x.cpu() for x in latents], CPU_DECODE_WINDOW, overlap, CPU_DECODE_WINDOW,
                             on_piece)
    finally:
        vae.to(home)


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


def transform_latents(latents: torch.Tensor, post: PostProcess) -> torch.Tensor:
    """``latents·latent_rescale + latent_shift`` (before the decode, as upstream); untouched at the
    defaults."""
    if post.latent_shift == 0.0 and post.latent_rescale == 1.0:
        return latents
    return latents * post.latent_rescale + post.latent_shift


def clip_guard(audio: torch.Tensor) -> torch.Tensor:
    """[2, S] fp32 divided by its peak when the peak exceeds 1 (upstream does this after every
    decode, whatever the normalisation setting)."""
    audio = audio.float()
    peak = audio.abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 1.0, audio / peak.clamp(min=1.0), audio)


def normalize_peak(audio: torch.Tensor, target_db: float) -> torch.Tensor:
    """Scale so the peak sits at ``target_db`` dBFS; near-silence (peak < 1e-6) is left as it is
    rather than amplified into noise."""
    peak = audio.abs().amax()
    if peak < SILENT_PEAK:
        return audio
    return audio * (10 ** (target_db / 20) / peak)


def fade_samples(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """A fade's length in samples (rounded, as upstream)."""
    return round(seconds * sample_rate)


def apply_fades(audio: torch.Tensor, fade_in: int, fade_out: int) -> torch.Tensor:
    """Linear ramps 0→1 over the first ``fade_in`` samples and 1→0 over the last ``fade_out``
    (each capped at the audio's length; where they overlap both apply)."""
    total = audio.shape[-1]
    fade_in, fade_out = min(max(fade_in, 0), total), min(max(fade_out, 0), total)
    if not fade_in and not fade_out:
        return audio
    audio = audio.clone()
    if fade_in:
        audio[..., :fade_in] *= torch.linspace(0.0, 1.0, fade_in, dtype=audio.dtype, device=audio.device)
    if fade_out:
        audio[..., total - fade_out:] *= torch.linspace(1.0, 0.0, fade_out, dtype=audio.dtype, device=audio.device)
    return audio


def postprocess(audio: torch.Tensor, post: PostProcess = PostProcess(), sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """One item's decoded [2, S]: the clip guard, then peak normalisation (when enabled), then the
    fades — upstream's order."""
    audio = clip_guard(audio)
    if post.normalize:
        audio = normalize_peak(audio, post.normalization_db)
    return apply_fades(audio, fade_samples(post.fade_in_s, sample_rate), fade_samples(post.fade_out_s, sample_rate))
