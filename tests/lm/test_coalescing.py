"""Concurrent requests' LM decodes coalesce into shared engine batches, with unchanged plans."""

from __future__ import annotations

from acestep.inference import GenerationConfig, GenerationParams, RenderJob, plan_music, plan_music_batch


def _job(caption, seed, **fields):
    params = GenerationParams(caption=caption, duration=10, bpm=100, keyscale="C major", timesignature="4", **fields)
    return RenderJob(params, GenerationConfig(batch_size=1), [seed])


def test_plans_coalesce_and_are_reproducible(lm_handler):
    jobs = [_job("song one", 1), _job("song two, longer caption", 2), _job("three", 3, lm_cfg_scale=1.0)]
    batches = []
    outcomes = plan_music_batch(lm_handler, jobs, on_engine_batch=batches.append)
    assert max(batches) == 3  # the three requests' phase-2 decodes ran as one engine batch
    again = plan_music_batch(lm_handler, jobs)
    for job, outcome, repeat in zip(jobs, outcomes, again):
        assert outcome.plans[0].audio_codes == repeat.plans[0].audio_codes
        assert outcome.plans[0].audio_codes.count("<|audio_code_") == 50
        assert outcome.plans[0].seed == job.seeds[0]
    # Rows are computed as they would be alone (own positions, mask, generator); CPU kernels may
    # still round a row differently inside a different batch shape, so only the start is compared.
    solo = plan_music(lm_handler, jobs[0].params, jobs[0].config, jobs[0].seeds)
    assert outcomes[0].plans[0].audio_codes[:100] == solo.plans[0].audio_codes[:100]


def test_a_failing_request_fails_alone(lm_handler):
    bad = _job("bad", 4)
    bad.seeds = []  # no items: the planner rejects it
    outcomes = plan_music_batch(lm_handler, [_job("good", 5), bad])
    assert outcomes[0].plans and isinstance(outcomes[1], Exception)
