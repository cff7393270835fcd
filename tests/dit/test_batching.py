"""Concurrent requests share the DiT worker's running batch, whatever their lengths and settings,
and each gets the audio it gets alone; a failing or cancelled request leaves the others alone."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from acestep.inference import GenerationConfig, GenerationParams, RenderJob, prepare_request, render_music_batch


def _job(caption, seed, duration=10, **fields):
    params, config, seeds = prepare_request(
        GenerationParams(thinking=False, caption=caption, duration=duration, **fields),
        GenerationConfig(batch_size=1, seeds=[seed], use_random_seed=False))
    return RenderJob(params, config, seeds)


def _wait_for(condition, timeout_s: float = 120.0) -> None:
    """Poll with a generous bound (a guard against hangs; nothing is timed)."""
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition never held"
        time.sleep(0.01)


@contextmanager
def held(handler):
    """Keep the handler's worker thread busy until the block ends, so everything submitted inside
    it is admitted together."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        holding.set()
        release.wait()

    blocker = handler.loop.call(hold)
    # until the loop thread runs ``hold``, it could still take the block's submissions in the same
    # wake-up as the call, and hold them where nobody sees them waiting
    assert holding.wait(120), "the worker thread never ran the hold"
    try:
        yield
    finally:
        release.set()
        blocker.result()


def test_requests_of_any_length_and_settings_share_forwards_and_match_their_solo_results(turbo_handler):
    jobs = [_job("song 1", 1), _job("song 2", 2, duration=11),
            _job("song 3 with a much longer caption than the others", 3, duration=12),
            _job("song 4", 4, shift=3.0)]
    before = dict(turbo_handler.stats()["items_per_forward"])
    with held(turbo_handler):
        results = {}
        thread = threading.Thread(target=lambda: results.update(together=render_music_batch(turbo_handler, jobs)))
        thread.start()
        _wait_for(lambda: turbo_handler.stats()["waiting"] == 4)  # submitted; the worker is still held
    thread.join()
    together = results["together"]
    assert all(r.success for r in together)
    after = turbo_handler.stats()["items_per_forward"]
    assert after.get(4, 0) - before.get(4, 0) == 8  # all four in every one of the 8 turbo steps
    for job, result in zip(jobs, together):
        alone = render_music_batch(turbo_handler, [job])[0]
        assert torch.allclose(alone.audios[0]["tensor"], result.audios[0]["tensor"], atol=1e-4)
        assert result.audios[0]["params"]["seed"] == job.seeds[0]
        assert result.audios[0]["tensor"].shape[-1] == job.params.duration * 48000


def test_a_bad_job_fails_alone(turbo_handler, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    good = _job("fine", 5)
    broken = RenderJob(GenerationParams(task_type="cover", src_audio=str(bad), thinking=False),
                       GenerationConfig(batch_size=1), [6])
    results = render_music_batch(turbo_handler, [good, broken])
    assert results[0].success and len(results[0].audios) == 1
    assert not results[1].success and "broken.wav" in results[1].error


def test_a_cancelled_request_leaves_the_batch_and_its_mates_finish(turbo_handler):
    from acestep.inference import submit_render

    long, short = _job("long", 7, duration=30), _job("short", 8)
    steps = []
    with held(turbo_handler):
        doomed = submit_render(turbo_handler, long, progress=lambda f, desc: steps.append(desc))
        kept = submit_render(turbo_handler, short)
    _wait_for(lambda: steps)
    assert doomed.cancel()
    output = kept.result(timeout=120)
    assert len(output.audios) == 1 and doomed.cancelled()
    stats = turbo_handler.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


POISON = 7.0  # a source-latent value no real item has: the injected fault's mark


@pytest.fixture
def poisoned_forward(turbo_handler, monkeypatch):
    """The DiT's input projection raises for a forward that carries a row whose context (source
    latents) is all ``POISON``: a fault below intake, in the model, on one item's own data."""
    conv = turbo_handler.bundle.transformer.proj_in_conv
    real = conv.forward
    channels = turbo_handler.bundle.silence_latent.shape[-1]

    def forward(x):  # [B, 2C + C, T]: the context's source latents come first
        if (x[:, :channels] == POISON).flatten(1).all(dim=1).any():
            raise RuntimeError("poisoned row")
        return real(x)

    monkeypatch.setattr(conv, "forward", forward)


def test_an_item_whose_forward_raises_fails_alone_and_its_seven_mates_are_unchanged(turbo_handler, poisoned_forward):
    from dataclasses import replace

    from acestep.dit.batch import DiTLimits
    from acestep.dit.prepare import sampling_settings
    from acestep.handler import AceStepHandler

    handler = AceStepHandler.from_bundle(turbo_handler.bundle, DiTLimits(max_forward_rows=8))
    try:
        params = GenerationParams(thinking=False, caption="mates", duration=10)
        settings = sampling_settings(params)
        items = handler.prepare([params] * 8, list(range(20, 28)))
        bad = replace(items[3], src_latents=torch.full_like(items[3].src_latents, POISON))
        good = items[:3] + items[4:]

        def render_each(batch):
            with held(handler):
                futures = [handler.loop.submit([item], settings) for item in batch]
            return futures

        alone = [f.result(timeout=120) for f in render_each(good)]
        before = dict(handler.stats()["items_per_forward"])
        futures = render_each(items[:3] + [bad] + items[4:])
        with pytest.raises(RuntimeError, match="poisoned row"):
            futures[3].result(timeout=120)
        mates = [f.result(timeout=120) for f in futures[:3] + futures[4:]]
    finally:
        handler.loop.close()
    assert handler.stats()["items_per_forward"].get(7, 0) - before.get(7, 0) == 7  # steps 2..8 without it
    for want, got in zip(alone, mates):
        assert got.audios[0].shape == want.audios[0].shape
        assert torch.allclose(got.audios[0], want.audios[0], atol=1e-5)  # step 1 ran in smaller forwards
