"""Logits maths shared by the pt and vLLM backends: paired CFG, constraints, penalties, sampling.

Per-step order (the official PT backend's, with its bugs fixed):
CFG mix in fp32 → constrained-decoding mask → repetition penalty (HF formula, over the
conditional row's prompt + completion) → temperature → top-k → top-p → sample.
Fixes: upstream's GPU backend never applied top-p or the repetition penalty (B1), and its PT
backend applied top-p to the *untempered* logits; here top-p is applied after temperature (vLLM
semantics). Each row samples from its own ``torch.Generator``, so a row's tokens do not depend on
the other rows of its batch (upstream seeded one global RNG per item, or not at all on GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling knobs of one request (``None``/0 disable top-k/top-p, as upstream)."""

    temperature: float = 0.85
    cfg_scale: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.cfg_scale < 1.0:
            raise ValueError(f"lm_cfg_scale must be >= 1.0, got {self.cfg_scale}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    @property
    def effective_top_k(self) -> Optional[int]:
        return int(self.top_k) if self.top_k else None

    @property
    def effective_top_p(self) -> Optional[float]:
        return self.top_p if self.top_p and 0.0 < self.top_p < 1.0 else None


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``uncond + scale·(cond − uncond)`` in fp32; ``scale`` is [B, 1]."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def apply_allowed(row: torch.Tensor, allowed: Optional[torch.Tensor]) -> None:
    """Mask one row in place: ``allowed`` is a long id tensor, a [V] bool mask or ``None``."""
    if allowed is None:
        return
    if allowed.dtype == torch.bool:
        row.masked_fill_(~allowed, NEG_INF)
        return
    keep = row[allowed]
    row.fill_(NEG_INF)
    row[allowed] = keep


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor`` per row; ``history`` [B, L] ids, ``penalty`` [B, 1]."""
    if bool((penalty == 1.0).all()):
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def apply_top_k(logits: torch.Tensor, top_k: Sequence[Optional[int]]) -> torch.Tensor:
    for i, k in enumerate(top_k):
        if k and k < logits.shape[-1]:
            kth = torch.topk(logits[i], k).values[-1]
            logits[i] = logits[i].masked_fill(logits[i] < kth, NEG_INF)
    return logits


def apply_top_p(logits: torch.Tensor, top_p: Sequence[Optional[float]]) -> torch.Tensor:
    """Nucleus filter on (tempered) logits; the most likely token always survives."""
    for i, p in enumerate(top_p):
        if p is None:
            continue
        sorted_logits, order = torch.sort(logits[i], descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum > p
        remove[1:] = remove[:-1].clone()
        remove[0] = False
        logits[i] = logits[i].masked_fill(remove.scatter(0, order, remove), NEG_INF)
    return logits


def sample_rows(logits: torch.Tensor, temperatures: Sequence[float], top_k: Sequence[Optional[int]],
                top_p: Sequence[Optional[float]], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Temperature → top-k → top-p → one multinomial draw per row from that row's generator."""
    temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=logits.device).unsqueeze(1)
    logits = apply_top_p(apply_top_k(logits / temps, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    out: List[int] = []
    for i, gen in enumerate(generators):
        if temperatures[i] <= 0:
            out.append(int(logits[i].argmax()))
        else:
            out.append(int(torch.multinomial(probs[i], 1, generator=gen)))
    return torch.tensor(out, dtype=torch.long, device=logits.device)
