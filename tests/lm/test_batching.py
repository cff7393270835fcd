"""Batching and seeds: per-item seeds make the LM deterministic whatever the chunking."""

from __future__ import annotations

from acestep.lm import planner
from acestep.lm.parsing import count_codes
from acestep.params import GenerationConfig, GenerationParams

PARAMS = GenerationParams(caption="lofi hip hop beat", lyrics="[Instrumental]", duration=10)


def _key(plan):
    return plan.seed, plan.metadata, plan.audio_codes


def test_chunked_batches_equal_single_runs(lm_handler):
    seeds = [101, 202, 303, 404, 505]
    batched = lm_handler.plan(PARAMS, GenerationConfig(batch_size=5, allow_lm_batch=True, lm_batch_chunk_size=3), seeds)
    single = lm_handler.plan(PARAMS, GenerationConfig(batch_size=5, allow_lm_batch=False), seeds)
    assert [_key(p) for p in batched] == [_key(p) for p in single]
    for plan in batched:
        assert plan.metadata["duration"] == 10 and count_codes(plan.audio_codes) == 50
        assert plan.phase1_time > 0 and plan.phase2_time > 0
    assert len({p.audio_codes for p in batched}) == 5


def test_same_seed_same_output_different_seed_different(lm_handler):
    config = GenerationConfig(batch_size=3, allow_lm_batch=True)
    a, b, c = lm_handler.plan(PARAMS, config, [42, 42, 43])
    assert _key(a)[1:] == _key(b)[1:]
    assert (a.metadata, a.audio_codes) != (c.metadata, c.audio_codes)
    (again,) = lm_handler.plan(PARAMS, GenerationConfig(batch_size=1), [42])
    assert _key(again) == _key(a)


def test_rows_of_different_prompt_lengths_batch_like_singles(lm_handler, runner):
    captions = ["a", "a much longer caption about strings, brass, choir and a thundering percussion section", ""]
    requests = []
    for i, caption in enumerate(captions):
        request = planner.cot_request(lm_handler, GenerationParams(caption=caption, lyrics="la"), {}, 9 + i)
        request.max_new_tokens = 50
        requests.append(request)
    assert len({len(r.prompt_ids) for r in requests}) == 3
    assert runner.generate(requests) == [runner.generate([r])[0] for r in requests]
