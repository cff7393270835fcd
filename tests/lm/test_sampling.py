"""Sampling maths: CFG formula, HF repetition penalty, top-p after temperature, per-row RNG."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from acestep.lm.request import SamplingConfig
from acestep.lm.sampling import (apply_allowed, cfg_mix, draw, repetition_penalty, sample_token,
                                 top_p_filter)


def test_cfg_mix_formula():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([2.0, -1.0])
    assert torch.allclose(cfg_mix(cond, uncond, 2.0), torch.tensor([0.0, 7.0]))
    assert torch.equal(cfg_mix(cond, uncond, 1.0), cond)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits, history = torch.randn(50), torch.tensor([3, 7, 7, 21])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history.unsqueeze(0), logits.unsqueeze(0).clone())[0]
    assert torch.allclose(repetition_penalty(logits, torch.arange(50), history, 1.3), expected)


def test_top_p_is_applied_after_temperature():
    # Untempered, token 0 alone holds > 50 % (upstream's PT order would always pick it);
    # at temperature 10 the distribution is flat and the nucleus holds many tokens.
    logits = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.isfinite(top_p_filter(logits.clone(), 0.5)).sum() == 1
    cfg = SamplingConfig(temperature=10.0, top_p=0.5)
    picks = {sample_token(logits, None, cfg, torch.Generator().manual_seed(s)) for s in range(40)}
    assert len(picks) > 1
    greedy = {sample_token(logits, None, SamplingConfig(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(s))
              for s in range(40)}
    assert greedy == {0}


def test_temperature_zero_is_argmax_and_top_k():
    logits = torch.tensor([0.1, 2.0, 1.9])
    assert sample_token(logits, torch.tensor([4, 5, 6]), SamplingConfig(temperature=0.0), torch.Generator()) == 5
    picks = {sample_token(logits, None, SamplingConfig(temperature=5.0, top_k=2), torch.Generator().manual_seed(s))
             for s in range(60)}
    assert picks == {1, 2}


def test_draw_depends_only_on_its_generator():
    probs = torch.softmax(torch.randn(1000), dim=0)
    first = [draw(probs, torch.Generator().manual_seed(s)) for s in range(20)]
    again = [draw(probs, torch.Generator().manual_seed(s)) for s in range(20)]
    assert first == again and len(set(first)) > 10
    assert draw(torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.Generator().manual_seed(1)) == 2


def test_apply_allowed_and_config_checks():
    row = torch.tensor([1.0, 2.0, 3.0])
    apply_allowed(row, torch.tensor([0, 2]))
    assert row[0] == 1.0 and row[2] == 3.0 and row[1] == float("-inf")
    with pytest.raises(ValueError):
        SamplingConfig(cfg_scale=0.5)
    assert SamplingConfig(top_p=1.0).effective_top_p is None and SamplingConfig(top_k=0).effective_top_k is None
