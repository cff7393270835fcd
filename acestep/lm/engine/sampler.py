"""Batched guided sampling on the device, one row per request (``acestep.lm.sampling`` semantics).

Per row, in the plain path's order: CFG mix in fp32 → the FSM's decision and allowed set →
repetition penalty → temperature → top-k → top-p → inverse-CDF draw with the row's uniform.

The plain path samples a gathered sub-vector: the allowed ids in ascending order. Here each row's
allowed ids are compacted the same way (``cumsum`` + ``scatter``) into a ``[R, V]`` vector padded
with ``-inf``, so the softmax / cumsum reductions see the same values in the same positions as the
plain path's sub-vector, and the draw (``searchsorted(cdf, u·cdf[-1], right)`` clamped to the last
allowed id) picks the same index. Everything stays on the device; the caller syncs once on the
returned ``[R, 2]`` (token, decision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from acestep.lm.sampling import sort_descending

NEG_INF = float("-inf")


@dataclass
class SampleInputs:
    """Per-row step inputs (all on the device, R rows).

    ``cond``/``uncond``: rows of the logits buffer; ``plan`` [R, 4] long (if_true, if_false,
    predicate, decide); ``argmax_one``/``greedy`` bool; ``scale``/``temperature``/``penalty``/
    ``top_p``/``uniform`` fp32 (top_p > 1 = off); ``top_k`` long (V = off); ``width``: no row
    allows more ids than this (the host knows it from the plans; the compacted vectors are cut to it)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    plan: torch.Tensor
    argmax_one: torch.Tensor
    greedy: torch.Tensor
    scale: torch.Tensor
    temperature: torch.Tensor
    penalty: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    uniform: torch.Tensor
    width: int
    use_top_k: bool = False
    use_top_p: bool = False
    # what the host knows about all rows at once (each lets a step skip whole-batch passes)
    any_decision: bool = True  # some row's allowed set depends on an argmax decision
    any_penalty: bool = True  # some row has a repetition penalty != 1
    any_greedy: bool = True
    shared_ids: torch.Tensor | None = None  # every row allows exactly these ids (ascending)


def guided_logits(logits: torch.Tensor, x: SampleInputs) -> torch.Tensor:
    """``uncond + s·(cond − uncond)`` in fp32; a row without CFG has ``uncond == cond`` (exactly cond)."""
    cond, uncond = logits[x.cond].float(), logits[x.uncond].float()
    return uncond + x.scale[:, None] * (cond - uncond)


def allowed_masks(guided: torch.Tensor, table: torch.Tensor, x: SampleInputs):
    """The allowed mask [R, V] of each row and its decision token (argmax over ``decide``)."""
    decide = table[x.plan[:, 3]]
    decision = guided.masked_fill(~decide, NEG_INF).argmax(-1)
    predicate = table[x.plan[:, 2], decision]
    rows = torch.where(predicate, x.plan[:, 0], x.plan[:, 1])
    vocab = torch.arange(guided.shape[1], device=guided.device)
    allowed = torch.where(x.argmax_one[:, None], vocab[None, :] == decision[:, None], table[rows])
    return allowed, decision


def compact(allowed: torch.Tensor, width: int):
    """Allowed ids of each row in ascending order, left-aligned: ids [R, width], count [R]."""
    R, V = allowed.shape
    position = allowed.long().cumsum(-1) - 1
    count = (position[:, -1] + 1).clamp(max=width)
    target = torch.where(allowed, position.clamp(max=width), torch.full_like(position, width))
    ids = torch.zeros((R, width + 1), dtype=torch.long, device=allowed.device)
    ids.scatter_(1, target, torch.arange(V, device=allowed.device).expand(R, V))
    return ids[:, :width], count


def top_k_top_p(t: torch.Tensor, k: torch.Tensor, p: torch.Tensor, use_k: bool, use_p: bool) -> torch.Tensor:
    """``top_p_filter(top_k_filter(t, k), p)`` per row, from one descending sort."""
    sorted_t, order = sort_descending(t)
    if use_k:
        kth = sorted_t.gather(1, (k.clamp(max=t.shape[1]) - 1)[:, None])
        t, sorted_t = t.masked_fill(t < kth, NEG_INF), sorted_t.masked_fill(sorted_t < kth, NEG_INF)
    if not use_p:
        return t
    cum = torch.softmax(sorted_t, dim=-1).cumsum(-1)
    remove = cum > p[:, None]
    remove = torch.cat([torch.zeros_like(remove[:, :1]), remove[:, :-1]], dim=1)
    return t.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _candidates(guided: torch.Tensor, table: torch.Tensor, x: SampleInputs):
    """Each row's allowed ids (ascending, padded), their guided logits (-inf padding), a validity
    mask, the count per row and the decision token."""
    if x.shared_ids is not None and not x.any_decision:
        ids = x.shared_ids.expand(guided.shape[0], -1)
        vals = guided.index_select(1, x.shared_ids)
        count = torch.full((guided.shape[0],), ids.shape[1], dtype=torch.long, device=guided.device)
        return ids, vals, None, count, torch.zeros_like(count)
    allowed, decision = allowed_masks(guided, table, x)
    ids, count = compact(allowed, x.width)
    width = torch.arange(ids.shape[1], device=ids.device)
    valid = width[None, :] < count[:, None]
    return ids, guided.gather(1, ids).masked_fill(~valid, NEG_INF), valid, count, decision


def sample(logits: torch.Tensor, table: torch.Tensor, seen: torch.Tensor, x: SampleInputs) -> torch.Tensor:
    """[R, 2] long: the sampled token and the FSM decision token of each row. ``seen`` [R, V] bool
    marks the ids in the row's prompt + completion (repetition penalty)."""
    guided = guided_logits(logits, x)
    ids, vals, valid, count, decision = _candidates(guided, table, x)
    if x.any_penalty:
        pen = x.penalty[:, None]
        hit = seen.gather(1, ids) if valid is None else seen.gather(1, ids) & valid
        vals = torch.where(hit, torch.where(vals < 0, vals * pen, vals / pen), vals)
    greedy_pick = vals.argmax(-1) if x.any_greedy else None
    t = vals / x.temperature[:, None]
    if x.use_top_k or x.use_top_p:
        t = top_k_top_p(t, x.top_k, x.top_p, x.use_top_k, x.use_top_p)
    cdf = torch.softmax(t, dim=-1).cumsum(-1)
    u = x.uniform * cdf[:, -1]
    drawn = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    drawn = torch.minimum(drawn, count - 1)
    pick = torch.where(x.greedy, greedy_pick, drawn) if x.any_greedy else drawn
    return torch.stack([ids.gather(1, pick[:, None])[:, 0], decision], dim=1)
