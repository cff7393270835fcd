"""Fast-path fixtures: the tiny demo LM and one pt ``LLMHandler`` on it, built once per session.

The demo LM's random weights give near-uniform next-token distributions (logit std ~0.1 over
64,000 codes), where float-rounding differences of 1e-7 in the logits flip a sampled code about
once per 400 steps -- between the plain path run in two different batch layouts as much as
between the plain and the fast path (matmul results depend on the row count). The fixture
model's tied embedding is therefore scaled by 32 (a power of two: exact), which gives peaked,
trained-model-like distributions, so token equality tests the sampling semantics and not
rounding luck. ``SHARPEN`` documents the factor; the raw demo LM's match rate is measured in
the lead's report, not asserted."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME, write_demo_lm

SHARPEN = 32.0


@pytest.fixture(scope="session")
def lm_handler(tmp_path_factory):
    from acestep.llm_inference import LLMHandler

    root = tmp_path_factory.mktemp("lm_fast_checkpoints")
    write_demo_lm(root / DEMO_LM_DIRNAME, seed=0)
    handler = LLMHandler()
    _, ok = handler.initialize(str(root), DEMO_LM_DIRNAME, backend="pt", device="cpu")
    assert ok
    model = handler.llm.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the real checkpoint
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(SHARPEN)
    return handler


@pytest.fixture(scope="session")
def runner(lm_handler):
    """The plain path (``PtRunner``) the fast path must agree with."""
    return lm_handler.llm.runner


@pytest.fixture(scope="session")
def fast_engine(lm_handler):
    from acestep.lm.fast import build_fast_engine

    return build_fast_engine(lm_handler, max_rows=48, max_len=1024, chunk_size=64, check_fsm=True)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small CPU batches on a shared box: one thread (spin-waiting OpenMP threads are far slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


META = {"bpm": 90, "caption": "calm piano", "duration": 10, "keyscale": "C major", "language": "en",
        "timesignature": "4"}


@pytest.fixture(scope="session")
def make_request(lm_handler):
    """``make_request(phase, seed, cfg_scale=2.0, max_new_tokens=None, **params)``: a planner
    request (CoT phase 1 or codes phase 2, constrained) on the demo LM."""
    from acestep.lm import planner
    from acestep.params import GenerationParams

    def make(phase: str, seed: int, cfg_scale: float = 2.0, max_new_tokens=None, **params):
        params.setdefault("caption", "calm piano")
        params.setdefault("lyrics", "[Verse]\nhello")
        gp = GenerationParams(lm_cfg_scale=cfg_scale, **params)
        if phase == "cot":
            request = planner.cot_request(lm_handler, gp, {}, seed)
        else:
            request = planner.codes_request(lm_handler, gp, META, 10.0, seed)
        if max_new_tokens is not None:
            request.max_new_tokens = max_new_tokens
        return request

    return make
