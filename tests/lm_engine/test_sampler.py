"""Batched device sampling equals the plain path's per-row ``sample_token`` given the same uniform:
CFG mix, allowed sets (1 to V ids), repetition penalty, temperature, top-k, top-p, greedy."""

from __future__ import annotations

import torch

from acestep.lm.engine import masks as M
from acestep.lm.engine.sampler import SampleInputs, sample
from acestep.lm.request import SamplingConfig
from acestep.lm.sampling import cfg_mix, sample_token

V = 3000
CONFIGS = [
    SamplingConfig(temperature=0.85, cfg_scale=2.5),
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7, cfg_scale=1.5, top_k=40),
    SamplingConfig(temperature=1.2, top_p=0.9),
    SamplingConfig(temperature=0.9, cfg_scale=3.0, top_k=200, top_p=0.8, repetition_penalty=1.3),
    SamplingConfig(temperature=0.0, cfg_scale=2.0, repetition_penalty=0.8),
    SamplingConfig(temperature=0.5, top_k=5000),  # k above the allowed count: no filter
    SamplingConfig(temperature=1.0, top_p=0.3, repetition_penalty=1.1),
]
SIZES = (1, 7, 40, 900, V)


def _inputs(cfgs, plans, table, uniforms):
    rows = len(cfgs)
    return SampleInputs(
        cond=torch.arange(rows), uncond=torch.tensor([rows + i if c.uses_cfg else i for i, c in enumerate(cfgs)]),
        plan=torch.tensor([[p.if_true, p.if_false, p.predicate, p.decide] for p in plans]),
        argmax_one=torch.zeros(rows, dtype=torch.bool), greedy=torch.tensor([c.temperature <= 0 for c in cfgs]),
        scale=torch.tensor([c.cfg_scale for c in cfgs]),
        temperature=torch.tensor([c.temperature if c.temperature > 0 else 1.0 for c in cfgs]),
        penalty=torch.tensor([c.repetition_penalty for c in cfgs]),
        top_k=torch.tensor([c.effective_top_k or V for c in cfgs]),
        top_p=torch.tensor([c.effective_top_p or 2.0 for c in cfgs]),
        uniform=uniforms, width=max(p.width(table) for p in plans),
        use_top_k=any(c.effective_top_k for c in cfgs), use_top_p=any(c.effective_top_p for c in cfgs))


def test_batched_sampling_equals_sample_token():
    gen = torch.Generator().manual_seed(0)
    table = M.MaskTable(V, "cpu")
    rows, checked = len(CONFIGS), 0
    for trial in range(15):
        logits = torch.randn((2 * rows, V), generator=gen) * 2
        sets = [torch.randperm(V, generator=gen)[:SIZES[(trial + i) % len(SIZES)]].sort().values for i in range(rows)]
        histories = [torch.randint(0, V, (50,), generator=gen) for _ in range(rows)]
        seen = torch.zeros((rows, V), dtype=torch.bool)
        for i, history in enumerate(histories):
            seen[i, history] = True
        seeds = [trial * 100 + i for i in range(rows)]
        uniforms = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(s)) for s in seeds])
        plans = [M.RowPlan.static(table.row(s)) for s in sets]
        got = sample(logits, table.masks[: table.size], seen, _inputs(CONFIGS, plans, table, uniforms))
        for i, cfg in enumerate(CONFIGS):
            ids = sets[i]
            scores = cfg_mix(logits[i, ids], logits[rows + i, ids], cfg.cfg_scale) if cfg.uses_cfg else logits[i, ids]
            want = sample_token(scores, ids, cfg, torch.Generator().manual_seed(seeds[i]), histories[i])
            assert int(got[i, 0]) == want, (trial, i, cfg)
            checked += 1
    assert checked == 15 * rows


def test_decisions_pick_the_guided_argmax():
    """``argmax_one`` rows allow only the argmax over their decide set; branch rows pick the
    predicate's side by the argmax's membership."""
    table = M.MaskTable(50, "cpu")
    decide = table.row(torch.tensor([3, 10, 20, 30]))
    cont = table.row(torch.tensor([10, 11, 12]))
    other = table.row(torch.tensor([40]))
    logits = torch.zeros((3, 50))
    logits[:, 10], logits[2, 30] = 5.0, 9.0
    plans = [M.RowPlan(M.EMPTY, M.EMPTY, M.EMPTY, decide, True), M.RowPlan(cont, other, cont, decide, False),
             M.RowPlan(cont, other, cont, decide, False)]
    cfgs = [SamplingConfig(temperature=0.0)] * 3
    x = _inputs(cfgs, plans, table, torch.zeros(3))
    x.argmax_one = torch.tensor([True, False, False])
    x.width = 3
    out = sample(logits, table.masks[: table.size], torch.zeros((3, 50), dtype=torch.bool), x).tolist()
    assert out[0] == [10, 10]  # the argmax itself
    assert out[1][1] == 10 and out[1][0] in (10, 11, 12)  # argmax 10 is a continuation: cont set
    assert out[2] == [40, 30]  # argmax 30 is not: the other set
