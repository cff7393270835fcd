"""Hand-written Qwen3 forward over a static, row-indexed KV cache (gpt-fast style).

The weights are the loaded transformers ``Qwen3ForCausalLM``'s own tensors (no copies). The KV cache
is two module buffers, ``[layers, rows, kv_heads, max_len, head_dim]`` stored flat per layer: row
``i`` of a decode step is cache row ``i``, written in place with ``index_copy_`` at that row's own
position, so rows at different positions share one step and a CUDA graph of the step only ever
touches buffers. Ops follow transformers' Qwen3 (RMSNorm in fp32, q/k RMSNorm per head, RoPE from
the model's ``inv_freq``, GQA, tied head), so fp32 logits match it to float rounding.

Decode attention: ``"sdpa"`` (``scaled_dot_product_attention`` with ``enable_gqa``, what
transformers runs; default on CPU) or ``"gqa"`` (default on CUDA: the query heads of each KV head
are one matrix, so both matmuls read the cache in place -- no repeat of K/V to all heads, no
gather of the rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Qwen3Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float

    @classmethod
    def of(cls, config) -> Qwen3Dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, config.vocab_size, float(config.rms_norm_eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``Qwen3RMSNorm`` (variance in fp32, scale in the input dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    """References to one decoder layer's weights (never copied)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm.weight, attn.k_norm.weight
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj


class FastQwen3(nn.Module):
    """Qwen3 forward for prefill (one row, T tokens) and decode (rows ``0..B-1``)."""

    def __init__(self, hf_model, max_rows: int, max_len: int, decode_attention: str | None = None):
        super().__init__()
        core = hf_model.model
        self.dims = Qwen3Dims.of(hf_model.config)
        self.max_rows, self.max_len = int(max_rows), int(max_len)
        self.embed = core.embed_tokens.weight
        self.norm = core.norm.weight
        self.head = hf_model.lm_head.weight  # tied: the embedding itself
        self.layers: list[_Layer] = [_Layer(layer) for layer in core.layers]
        rotary = core.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        d = self.dims
        dtype, device = self.embed.dtype, self.embed.device
        shape = (d.layers, self.max_rows * d.kv_heads * self.max_len, d.head_dim)  # [row, kv head, pos] flat
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.decode_attention = decode_attention or ("gqa" if device.type == "cuda" else "sdpa")
        if self.decode_attention not in ("sdpa", "gqa"):
            raise ValueError(f"decode_attention must be 'sdpa' or 'gqa', got {decode_attention!r}")

    # -- pieces ------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos, sin):
        """x [R, T, hidden] -> q [R, H, T, D], k/v [R, T, KVH, D] (k roped)."""
        d = self.dims
        R, T = x.shape[:2]
        q = rms_norm(layer.q(x).view(R, T, d.heads, d.head_dim), layer.q_norm, d.eps).transpose(1, 2)
        k = rms_norm(layer.k(x).view(R, T, d.kv_heads, d.head_dim), layer.k_norm, d.eps).transpose(1, 2)
        v = layer.v(x).view(R, T, d.kv_heads, d.head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k.transpose(1, 2), v

    def _flat(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache indices of (row, every kv head, position) for ``rows``/``positions`` [N]: [N * KVH]."""
        heads = torch.arange(self.dims.kv_heads, device=rows.device)
        return ((rows[:, None] * self.dims.kv_heads + heads) * self.max_len + positions[:, None]).reshape(-1)

    def _write(self, index: int, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [R, T, KVH, D] into the rows ``flat`` (``_flat`` of the R*T tokens)."""
        D = self.dims.head_dim
        self.k_cache[index].index_copy_(0, flat, k.reshape(-1, D))
        self.v_cache[index].index_copy_(0, flat, v.reshape(-1, D))

    def _rows(self, cache: torch.Tensor, index: int) -> torch.Tensor:
        """One layer's cache as [rows, KVH, max_len, D] (a view)."""
        return cache[index].view(self.max_rows, self.dims.kv_heads, self.max_len, self.dims.head_dim)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        return layer.down(F.silu(layer.gate(x)) * layer.up(x))

    def _attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        gqa = self.dims.heads != self.dims.kv_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=self.dims.head_dim ** -0.5, enable_gqa=gqa)

    def _attend_grouped(self, q, k, v, mask) -> torch.Tensor:
        """One query token per row: q [B, H, 1, D], k/v [B, KVH, L, D] views of the cache, mask
        [B, 1, 1, L]. transformers' eager attention (softmax in fp32), heads grouped per KV head."""
        B, H, _, D = q.shape
        kvh = k.shape[1]
        scores = torch.matmul(q.reshape(B, kvh, H // kvh, D), k.transpose(-1, -2)) * self.dims.head_dim ** -0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(probs, v).reshape(B, H, 1, D)

    def _blocks(self, x, positions, flat, attend) -> torch.Tensor:
        cos, sin = self._rope(positions, x.dtype)
        R, T = x.shape[:2]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.ln1, self.dims.eps)
            q, k, v = self._qkv(layer, h, cos, sin)
            self._write(i, flat, k, v)
            out = attend(i, q).transpose(1, 2).reshape(R, T, -1)
            x = x + layer.o(out)
            x = x + self._mlp(layer, rms_norm(x, layer.ln2, self.dims.eps))
        return rms_norm(x, self.norm, self.dims.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head).float()

    # -- entry points ------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, row: int) -> torch.Tensor:
        """Run one prompt ``ids`` [T] into cache row ``row`` (positions 0..T-1); fp32 logits [V]
        of its last token."""
        T = ids.numel()
        positions = torch.arange(T, device=ids.device)
        flat = self._flat(torch.full_like(positions, row), positions)

        def attend(i, q):
            k, v = (self._rows(c, i)[row:row + 1, :, :T] for c in (self.k_cache, self.v_cache))
            return self._attend(q, k, v, None, causal=True)

        hidden = self._blocks(F.embedding(ids[None], self.embed), positions[None], flat, attend)
        return self.logits(hidden[0, -1])

    def prefill_many(self, prompts: list[list[int]], rows: list[int]) -> torch.Tensor:
        """Several prompts in one forward (right-padded to the longest; causal attention never
        sees the padding, whose cache writes land past each prompt and are overwritten before
        any decode step attends to them). fp32 logits [len(prompts), V] of each last token."""
        device = self.embed.device
        R, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((R, T), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids = ids.to(device, non_blocking=True)
        row_ids = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        positions = torch.arange(T, device=device).expand(R, T)
        flat = self._flat(row_ids[:, None].expand(R, T).reshape(-1), positions.reshape(-1))

        def attend(i, q):
            k, v = (self._rows(c, i)[row_ids, :, :T] for c in (self.k_cache, self.v_cache))
            return self._attend(q, k, v, None, causal=True)

        hidden = self._blocks(F.embedding(ids, self.embed), positions, flat, attend)
        last = torch.tensor([len(p) - 1 for p in prompts]).to(device, non_blocking=True)
        return self.logits(hidden[torch.arange(R, device=device), last])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
               row_lengths: list[int] | None = None) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (``B = tokens.numel()``) at its own position;
        attends over cache positions ``< kv_len`` that are ``<=`` the row's position. fp32 logits
        [B, V]. Only static shapes and in-place buffer writes: CUDA-graph capturable.

        ``row_lengths`` (eager steps): row ``r`` attends over exactly its own ``row_lengths[r]``
        keys in a call of its own (rows beyond the list are idle padding and attend to nothing).
        Attention reductions round differently over a longer, masked key range, so this keeps a
        row's result independent of its batch-mates' positions."""
        B = tokens.numel()
        flat = self._flat(torch.arange(B, device=tokens.device), positions)
        mask = (torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]

        def attend(i, q):
            k, v = (self._rows(c, i)[:B, :, :kv_len] for c in (self.k_cache, self.v_cache))
            if row_lengths is not None:
                out = torch.zeros_like(q)
                for r, length in enumerate(row_lengths):
                    out[r:r + 1] = self._attend(q[r:r + 1], k[r:r + 1, :, :length], v[r:r + 1, :, :length],
                                                None, causal=False)
                return out
            if self.decode_attention == "gqa":
                return self._attend_grouped(q, k, v, mask)
            return self._attend(q, k, v, mask, causal=False)

        hidden = self._blocks(F.embedding(tokens[:, None], self.embed), positions[:, None], flat, attend)
        return self.logits(hidden[:, 0])
