"""Sliding-window self-attention on a fused kernel (FlexAttention with a band block mask) instead
of SDPA with a dense additive mask, which gets no flash kernel and touches every L×L entry.

The band is |i − j| ≤ window (the official dense mask). Only sliding layers' self-attention
changes; full layers and cross-attention keep diffusers' processor."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.ace_step_transformer import AceStepAttnProcessor2_0
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

_compiled_flex = None


def _flex_kernel(device: torch.device):
    """Compiled on CUDA (the fused kernel); eager elsewhere (a reference implementation)."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


@lru_cache(maxsize=32)
def band_block_mask(length: int, window: int, device: str) -> BlockMask:
    def band(batch, head, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    return create_block_mask(band, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


class BandAttnProcessor(AceStepAttnProcessor2_0):
    """Self-attention of a sliding layer through FlexAttention; anything else as diffusers does."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        window = getattr(attn, "sliding_window", None)
        is_cross = attn.is_cross_attention and encoder_hidden_states is not None
        if is_cross or window is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.kv_heads, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.kv_heads, attn.head_dim))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
        length = hidden_states.shape[1]
        if isinstance(attention_mask, BlockMask):  # padded rows' band (acestep.dit.batch)
            mask = attention_mask
        else:
            mask = band_block_mask(length, int(window), str(hidden_states.device))
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        out = _flex_kernel(hidden_states.device)(query, key, value, block_mask=mask, scale=attn.scaling,
                                                 enable_gqa=attn.heads != attn.kv_heads)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def use_band_attention(transformer) -> int:
    """Route every sliding layer's self-attention through FlexAttention. Returns how many."""
    count = 0
    for layer in transformer.layers:
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            layer.self_attn.set_processor(BandAttnProcessor())
            count += 1
    return count


def use_dense_attention(transformer) -> None:
    for layer in transformer.layers:
        layer.self_attn.set_processor(AceStepAttnProcessor2_0())
