"""Many requests rendered together share DiT batches only where that changes nothing."""

from __future__ import annotations

import torch

from acestep.inference import GenerationConfig, GenerationParams, RenderJob, prepare_request, render_music_batch


def _job(caption, seed, **fields):
    params, config, seeds = prepare_request(
        GenerationParams(thinking=False, caption=caption, duration=10, **fields),
        GenerationConfig(batch_size=1, seeds=[seed], use_random_seed=False))
    return RenderJob(params, config, seeds)


def test_requests_share_batches_and_match_their_solo_results(turbo_handler):
    calls = []
    original = turbo_handler.render_items

    def counting(items, settings, progress=None):
        calls.append(len(items))
        return original(items, settings, progress)

    jobs = [_job("song 1", 1), _job("song 2", 2), _job("song 3 with a much longer caption than the others", 3),
            _job("song 4", 4, shift=3.0)]
    turbo_handler.render_items = counting
    try:
        together = render_music_batch(turbo_handler, jobs)
    finally:
        turbo_handler.render_items = original
    assert all(r.success for r in together)
    assert sorted(calls) == [1, 1, 2]  # digits are single tokens: "song N" captions batch; longer caption and other shift alone
    for job, result in zip(jobs, together):
        alone = render_music_batch(turbo_handler, [job])[0]
        assert torch.allclose(alone.audios[0]["tensor"], result.audios[0]["tensor"], atol=1e-4)
        assert result.audios[0]["params"]["seed"] == job.seeds[0]


def test_a_bad_job_fails_alone(turbo_handler, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    good = _job("fine", 5)
    broken = RenderJob(GenerationParams(task_type="cover", src_audio=str(bad), thinking=False),
                       GenerationConfig(batch_size=1), [6])
    results = render_music_batch(turbo_handler, [good, broken])
    assert results[0].success and len(results[0].audios) == 1
    assert not results[1].success and "broken.wav" in results[1].error
