"""Logits maths shared by the pt and vLLM backends: paired CFG, constraints, penalties, sampling.

Per-step order (the official PT backend's, with its bugs fixed):
CFG mix in fp32 → constrained-decoding mask → repetition penalty (HF formula, over the
conditional row's prompt + completion) → temperature → top-k → top-p → sample.
Fixes: upstream's GPU backend never applied top-p or the repetition penalty, and its PT
backend applied top-p to the *untempered* logits; here top-p is applied after temperature (vLLM
semantics). Each row draws from its own ``torch.Generator`` (inverse-CDF sampling from one
uniform per step), so a row's tokens do not depend on the other rows of its batch (upstream
seeded one global RNG per item, or not at all on GPU).

The pt runner samples over the allowed ids only (a gathered sub-vector): masked tokens have
probability 0, so this equals masking the full row, at a fraction of the cost."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from acestep.lm.request import SamplingConfig

NEG_INF = float("-inf")


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale·(cond − uncond)`` in fp32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def apply_allowed(row: torch.Tensor, allowed: Optional[torch.Tensor]) -> None:
    """Mask one full logits row in place to the allowed ids (``None`` = no constraint)."""
    if allowed is None:
        return
    keep = row[allowed]
    row.fill_(NEG_INF)
    row[allowed] = keep


def repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor`` on the logits of ``ids`` (ids seen in ``history``)."""
    seen = torch.isin(ids, history)
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sort_descending(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(t, -1, descending=True, stable=True)``: ties keep index order, so the plain
    path's 1-D rows and the engine's padded ``[R, W]`` rows sort alike. On CPU the order comes from
    one numpy sort of unique int64 keys (order-preserving bits of the value, then the index),
    several times faster than torch's CPU sort with indices on 64,000-wide rows."""
    if t.device.type != "cpu" or t.shape[-1] >= 1 << 20:
        return torch.sort(t, dim=-1, descending=True, stable=True)
    flat = (t.float() + 0.0).contiguous()  # -0.0 ties with 0.0, as in torch.sort
    bits = flat.numpy().view(np.int32).astype(np.int64)
    ordered = bits ^ ((bits >> 31) & 0x7FFF_FFFF)  # ascending ints == ascending floats
    keys = ((-ordered) << 20) | np.arange(t.shape[-1], dtype=np.int64)
    keys.sort(axis=-1)
    order = torch.from_numpy(keys & ((1 << 20) - 1))
    return t.gather(-1, order), order


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    if not k or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of the sorted distribution reaching ``p``."""
    if p is None:
        return logits
    sorted_logits, order = sort_descending(logits)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    remove = cum > p
    remove[1:] = remove[:-1].clone()
    remove[0] = False  # the most likely token always survives
    return logits.masked_fill(remove.scatter(0, order, remove), NEG_INF)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Inverse-CDF draw of one index from ``probs`` with one uniform from ``generator``."""
    cdf = probs.cumsum(0)
    # The uniform comes from the row's CPU generator (one stream on every device, shared with the
    # fast path); only the CDF lives on the model's device.
    u = torch.rand((), generator=generator, dtype=cdf.dtype).to(cdf.device) * cdf[-1]
    return int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp(max=probs.numel() - 1))


def sample_token(logits: torch.Tensor, ids: Optional[torch.Tensor], cfg: SamplingConfig,
                 generator: torch.Generator, history: Optional[torch.Tensor] = None) -> int:
    """One token from the allowed ``ids`` (``None``: all) with ``logits`` their guided logits."""
    logits = logits.float()
    if ids is None:
        ids = torch.arange(logits.numel(), device=logits.device)
    if cfg.repetition_penalty != 1.0 and history is not None:
        logits = repetition_penalty(logits, ids, history, cfg.repetition_penalty)
    if cfg.temperature <= 0:
        return int(ids[logits.argmax()])
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.effective_top_k), cfg.effective_top_p)
    return int(ids[draw(torch.softmax(logits, dim=-1), generator)])
