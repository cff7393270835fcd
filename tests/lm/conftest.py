"""LM fixtures: the tiny demo LM written once per session, one initialized pt handler."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME, write_demo_lm


@pytest.fixture(scope="session")
def lm_checkpoints(tmp_path_factory):
    """A checkpoints folder holding only ``acestep-5Hz-lm-0.6B`` (the demo LM)."""
    root = tmp_path_factory.mktemp("lm_checkpoints")
    write_demo_lm(root / DEMO_LM_DIRNAME, seed=0)
    return root


@pytest.fixture(scope="session")
def lm_dir(lm_checkpoints):
    return lm_checkpoints / DEMO_LM_DIRNAME


@pytest.fixture(scope="session")
def lm_handler(lm_checkpoints):
    from acestep.llm_inference import LLMHandler

    handler = LLMHandler()
    status, ok = handler.initialize(str(lm_checkpoints), DEMO_LM_DIRNAME, backend="pt", device="cpu")
    assert ok and "pt" in status
    return handler


@pytest.fixture(scope="session")
def tokenizer(lm_handler):
    return lm_handler.llm_tokenizer


@pytest.fixture(scope="session")
def runner(lm_handler):
    """The plain transformers path on the handler's model (the oracle the engine is held to)."""
    return lm_handler.llm.plain_runner()


@pytest.fixture(scope="session")
def tables(runner):
    return runner.tables


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small-batch CPU decoding on a shared 2-core box: OpenMP spin-waiting with 2 threads made
    it up to ~70x slower than 1 thread under load. Restored after each module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
