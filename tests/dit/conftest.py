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
