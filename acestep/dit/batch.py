"""What may share a DiT batch, and how items of different lengths share one.

The rule: any items may share a batch whatever their duration, caption or lyrics, source,
reference or repaint window, sampling settings or current step. Everything the sampler does is
per row (each row carries its own timestep, schedule, guidance state, noise generator and
condition), and the transformer sees the rows padded to a common length with masks:

- latents and context are zero-padded per row to ``bucket_frames`` of the longest row (multiples
  of ``FRAME_BUCKET`` latent frames, which bounds the padding waste and the number of shapes);
- self-attention (full and sliding layers) masks padded keys; a padded query sees itself too, so
  no softmax row is empty;
- cross-attention masks padded encoder tokens (each row's encoder states are computed alone);
- outputs are cropped back per row.

So a row's velocity equals its solo run's to float rounding, and the sampler state (kept in fp32)
does too. ``DiTLimits`` bounds the running batch (rows, and rows x padded frames) and the padding
one forward may carry (``forward_groups`` splits the running rows into forwards of similar
lengths); the running batch (``acestep.dit.running``) admits waiting items first come first served while
they fit."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from acestep.devices import resolve_device

FRAME_BUCKET = 8  # latent frames (0.32 s); a multiple of the DiT's patch size
CPU_FORWARD_ROWS = 1  # on a CPU a batched forward costs its rows' solo forwards plus padding (BENCHMARKS.md)
GPU_FORWARD_ROWS = 32  # 32 songs of 120 s (turbo, no CFG) in one forward on one GPU


@dataclass(frozen=True)
class DiTLimits:
    """How much one running batch may hold. An item over the limits alone still runs, alone."""

    max_forward_rows: int = 16  # rows per forward; an item under CFG (base / sft models) takes two
    max_row_frames: int = 16 * 6000  # rows x padded latent frames (25 per second): 16 rows of 240 s
    max_padding: float = 0.25  # padded frames of one forward over its real frames, minus one

    def fits(self, rows: int, row_frames: int) -> bool:
        return rows <= self.max_forward_rows and row_frames <= self.max_row_frames

    @classmethod
    def for_device(cls, device="auto") -> "DiTLimits":
        """The limits for a torch device or its name ("auto": CUDA when there is one): one row per
        forward on a CPU, where batching loses, ``GPU_FORWARD_ROWS`` on a GPU."""
        # a named device counts as named (a GPU profile read on a CPU box); only "auto" looks around
        kind = resolve_device(device).type if device in (None, "", "auto") else torch.device(device).type
        return cls(max_forward_rows=CPU_FORWARD_ROWS if kind == "cpu" else GPU_FORWARD_ROWS)


def bucket_frames(frames: int) -> int:
    return -(-int(frames) // FRAME_BUCKET) * FRAME_BUCKET


def forward_groups(frames: Sequence[int], max_padding: float) -> List[List[int]]:
    """Split rows (indices into ``frames``) into forwards, longest first: a row joins the current
    forward while that forward's padded frames stay within ``1 + max_padding`` of its real frames,
    so a short song never pays for a long one's length many times over."""
    groups: List[List[int]] = []
    real = 0
    for i in sorted(range(len(frames)), key=lambda i: -frames[i]):
        if groups and (len(groups[-1]) + 1) * bucket_frames(frames[groups[-1][0]]) <= (1 + max_padding) * (real + frames[i]):
            groups[-1].append(i)
            real += frames[i]
        else:
            groups.append([i])
            real = frames[i]
    return groups


def pad_rows(rows: Sequence[torch.Tensor], length: Optional[int] = None) -> torch.Tensor:
    """Stack [L_i, ...] tensors zero-padded to [B, length, ...] (default: the longest)."""
    length = max(r.shape[0] for r in rows) if length is None else length
    return torch.stack([F.pad(r, (0, 0) * (r.dim() - 1) + (0, length - r.shape[0])) for r in rows])


def key_mask(lengths: Sequence[int], length: int, device) -> torch.Tensor:
    """[B, length] bool: True on each row's first ``lengths[b]`` positions."""
    return torch.arange(length, device=device)[None, :] < torch.tensor(list(lengths), device=device)[:, None]


def self_attention_masks(lengths: Sequence[int], length: int, window: int, device, dtype):
    """Additive [B, 1, L, L] masks (full, sliding) over patches: valid keys, and the query itself."""
    idx = torch.arange(length, device=device)
    keep = key_mask(lengths, length, device)[:, None, None, :] | (idx[:, None] == idx[None, :])[None, None]
    band = ((idx[:, None] - idx[None, :]).abs() <= window)[None, None]
    low = torch.finfo(dtype).min
    full = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, low)
    sliding = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~(keep & band), low)
    return full, sliding


@lru_cache(maxsize=64)
def band_block_mask(lengths: tuple, length: int, window: int, device: str):
    """The sliding layers' FlexAttention mask for padded rows (see ``acestep.dit.attention``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    valid = torch.tensor(lengths, device=device)

    def band(batch, head, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= window) & ((kv_idx < valid[batch]) | (q_idx == kv_idx))

    return create_block_mask(band, B=len(lengths), H=None, Q_LEN=length, KV_LEN=length, device=device)


def masked_forward(transformer, hidden: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
                   context: torch.Tensor, frames: Sequence[int], state_lengths: Sequence[int]) -> torch.Tensor:
    """``AceStepTransformer1DModel.forward`` for padded rows: ``frames[b]`` valid latent frames and
    ``state_lengths[b]`` valid encoder tokens per row. Velocity [B, T, C]; rows past their frames
    hold padding values."""
    from acestep.dit.attention import BandAttnProcessor
    from diffusers.models.transformers.ace_step_transformer import _ace_step_rotary_freqs

    m = transformer
    temb_t, proj_t = m.time_embed(timestep)
    temb_r, proj_r = m.time_embed_r(timestep - timestep)
    temb, proj = temb_t + temb_r, proj_t + proj_r
    x = torch.cat([context, hidden], dim=-1)
    length = x.shape[1]
    assert length % m.patch_size == 0, "pad rows to a multiple of the patch size (bucket_frames)"
    x = m.proj_in_conv(x.transpose(1, 2)).transpose(1, 2)
    enc = m.condition_embedder(states)
    patches = x.shape[1]
    patch_lengths = [-(-int(f) // m.patch_size) for f in frames]
    cos_sin = _ace_step_rotary_freqs(patches, m.head_dim, m.rope_theta, x.device, x.dtype)
    full, sliding = self_attention_masks(patch_lengths, patches, m.config.sliding_window, x.device, x.dtype)
    cross = key_mask(state_lengths, enc.shape[1], x.device)[:, None, None, :]
    for i, layer in enumerate(m.layers):
        mask = full
        if m.layer_types[i] == "sliding_attention":
            mask = sliding
            if isinstance(layer.self_attn.processor, BandAttnProcessor):
                mask = band_block_mask(tuple(patch_lengths), patches, m.config.sliding_window, str(x.device))
        x = layer(hidden_states=x, position_embeddings=cos_sin, temb=proj, attention_mask=mask,
                  encoder_hidden_states=enc, encoder_attention_mask=cross)
    shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (m.norm_out(x) * (1 + scale) + shift).type_as(x)
    return m.proj_out_conv(x.transpose(1, 2)).transpose(1, 2)[:, :length]


def velocity(transformer, hidden: List[torch.Tensor], timesteps: Sequence[float], states: List[torch.Tensor],
             contexts: List[torch.Tensor]) -> List[torch.Tensor]:
    """One DiT forward over rows of any lengths: row ``b`` is latents ``hidden[b]`` [T_b, C] at
    ``timesteps[b]`` with encoder states [S_b, D] and context [T_b, 2C]; its velocity [T_b, C]
    (fp32). Equal lengths run the stock forward; otherwise ``masked_forward``."""
    dtype, device = transformer.dtype, hidden[0].device
    frames = [h.shape[0] for h in hidden]
    state_lengths = [s.shape[0] for s in states]
    t = torch.tensor(list(timesteps), device=device, dtype=dtype)
    if len(set(frames)) == 1 and len(set(state_lengths)) == 1:
        out = transformer(hidden_states=torch.stack(hidden).to(dtype), timestep=t, timestep_r=t,
                          encoder_hidden_states=torch.stack(states), context_latents=torch.stack(contexts),
                          return_dict=False)[0]
    else:
        length = bucket_frames(max(frames))
        out = masked_forward(transformer, pad_rows(hidden, length).to(dtype), t, pad_rows(states, max(state_lengths)),
                             pad_rows(contexts, length), frames, state_lengths)
    return [out[b, :f].float() for b, f in enumerate(frames)]
