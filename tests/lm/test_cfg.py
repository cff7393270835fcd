"""Paired CFG: cond and uncond rows decode together, share each sampled token, and the result
equals an independent, uncached, unbatched reference decoder."""

from __future__ import annotations

import torch

from acestep.lm import fsm as F
from acestep.lm import planner
from acestep.lm.request import LMRequest
from acestep.lm.sampling import cfg_mix, sample_token
from acestep.params import GenerationParams


def reference_decode(model, tables, encode, request: LMRequest, stop_ids):
    """Full-sequence forwards (no cache, no padding, one sequence each), same sampling maths."""
    gen = torch.Generator().manual_seed(request.seed)
    state = F.new_state(request.fsm, tables, encode) if request.fsm is not None else None
    cond, uncond, out = list(request.prompt_ids), list(request.uncond_ids or []), []
    cfg = request.sampling
    with torch.no_grad():
        for _ in range(request.max_new_tokens):
            c = model(input_ids=torch.tensor([cond])).logits[0, -1]
            u = model(input_ids=torch.tensor([uncond])).logits[0, -1] if cfg.uses_cfg else None

            def scores_at(ids):
                return c[ids].float() if u is None else cfg_mix(c[ids], u[ids], cfg.cfg_scale)

            ids = F.allowed(state, tables, scores_at) if state is not None else torch.arange(c.numel())
            token = sample_token(scores_at(ids), ids, cfg, gen)
            out.append(token)
            if state is not None:
                F.advance(state, tables, token)
            cond.append(token)
            uncond.append(token)
            if token in stop_ids:
                break
    return out


class ForwardSpy:
    """Records the input ids of every forward of the runner's model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(kwargs["input_ids"].clone())

    def close(self):
        self.handle.remove()


def _encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def _cot_request(lm_handler, seed, cfg_scale, max_new_tokens=40):
    params = GenerationParams(caption="calm piano", lyrics="[Verse]\nhello", lm_cfg_scale=cfg_scale)
    request = planner.cot_request(lm_handler, params, {}, seed)
    request.max_new_tokens = max_new_tokens
    return request


def test_cfg_scale_one_is_plain_decoding_without_uncond_rows(lm_handler, runner, tables, tokenizer):
    request = _cot_request(lm_handler, seed=7, cfg_scale=1.0)
    assert request.uncond_ids is None
    spy = ForwardSpy(runner.model)
    try:
        tokens = runner.generate([request])[0]
    finally:
        spy.close()
    assert all(call.shape[0] == 1 + runner.ghost_rows for call in spy.calls)  # no unconditional row
    assert tokens == reference_decode(runner.model, tables, _encode(tokenizer), request, runner.stop_ids)


def test_cfg_pairs_share_tokens_and_match_reference(lm_handler, runner, tables, tokenizer):
    requests = [_cot_request(lm_handler, seed=s, cfg_scale=2.5) for s in (1, 2)]
    assert all(r.uncond_ids and r.uncond_ids != r.prompt_ids for r in requests)
    spy = ForwardSpy(runner.model)
    try:
        outputs = runner.generate(requests)
    finally:
        spy.close()
    prefill, steps = spy.calls[0], spy.calls[1:]
    ghosts = runner.ghost_rows  # idle rows at the end (see PtRunner.ghost_rows)
    assert prefill.shape[0] == 4 + ghosts  # [cond_0, cond_1, uncond_0, uncond_1, ghosts...]
    for step in steps:
        step = step[: step.shape[0] - ghosts]
        n = step.shape[0] // 2
        assert step.shape[0] == 2 * n and torch.equal(step[:n], step[n:])  # each pair got one token
    for request, tokens in zip(requests, outputs):
        assert tokens == reference_decode(runner.model, tables, _encode(tokenizer), request, runner.stop_ids)


def test_cfg_changes_the_codes(lm_handler, runner):
    meta = {"bpm": 90, "caption": "calm piano", "duration": 10, "keyscale": "C major", "language": "en",
            "timesignature": "4"}
    make = lambda scale: planner.codes_request(  # noqa: E731
        lm_handler, GenerationParams(caption="calm piano", lm_cfg_scale=scale), meta, 10.0, 3)
    plain, guided = runner.generate([make(1.0), make(3.0)])
    assert len(plain) == len(guided) == 51 and plain != guided


def test_mixed_cfg_and_plain_rows_equal_their_solo_runs(lm_handler, runner):
    requests = [_cot_request(lm_handler, 5, 2.0, 60), _cot_request(lm_handler, 6, 1.0, 60),
                _cot_request(lm_handler, 7, 3.0, 60)]
    together = runner.generate(requests)
    assert together == [runner.generate([r])[0] for r in requests]
