"""DiT-side fixtures shared by the batching tests: the demo modules behind a worker that puts every
running row into one padded forward, so items of any length share steps."""

from __future__ import annotations

import pytest

from acestep.dit.batch import DiTLimits
from acestep.handler import AceStepHandler

ONE_FORWARD = DiTLimits(max_padding=100.0)  # never split by length: every row in one padded forward


@pytest.fixture(scope="session")
def turbo_mixer(turbo_handler):
    handler = AceStepHandler.from_bundle(turbo_handler.bundle, ONE_FORWARD)
    yield handler
    handler.loop.close()


@pytest.fixture(scope="session")
def base_mixer(base_handler):
    handler = AceStepHandler.from_bundle(base_handler.bundle, ONE_FORWARD)
    yield handler
    handler.loop.close()


def prepare_each(handler, specs, first_seed: int, source_audio=None, needs_source=lambda spec: False):
    """[(item, settings)]: each spec prepared as its own one-item request (seeds ``first_seed``, +1,
    ...), with ``source_audio`` added to the specs ``needs_source`` picks."""
    from acestep.dit.prepare import sampling_settings
    from acestep.inference import GenerationConfig, GenerationParams, prepare_request

    out = []
    for i, spec in enumerate(specs):
        spec = dict(spec, src_audio=source_audio) if needs_source(spec) else spec
        params, _, seeds = prepare_request(GenerationParams(thinking=False, **spec),
                                           GenerationConfig(batch_size=1, seeds=[first_seed + i], use_random_seed=False))
        out.append((handler.prepare([params], seeds)[0], sampling_settings(params)))
    return out


def run_together(handler, pairs):
    """``pairs`` run on one fresh running batch → (final latents, batch steps taken, tracks, batch)."""
    from acestep.dit.running import RunningBatch

    batch = RunningBatch(handler.bundle, ONE_FORWARD)
    tracks = [batch.track(item, settings) for item, settings in pairs]
    steps = 0
    while batch.has_work:
        batch.step()
        steps += 1
    return [t.x for t in tracks], steps, tracks, batch
