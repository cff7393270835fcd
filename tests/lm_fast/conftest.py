"""Engine fixtures: the tiny demo LM and one pt ``LLMHandler`` on it, built once per session.

Token equality between the engine and the plain path (and between a request's solo run and its
run among batch-mates) holds on the raw random demo LM, whose near-uniform logits would let any
1e-7 rounding difference flip a sample: both paths run CPU GEMMs with at least 4 rows
(``graphs.MIN_EAGER_ROWS``), where the kernels' rounding no longer depends on the row count."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME, write_demo_lm


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
    return handler


@pytest.fixture(scope="session")
def runner(lm_handler):
    """The plain path (``PtRunner``) the engine must agree with."""
    return lm_handler.llm.plain_runner()


@pytest.fixture(scope="session")
def fast_engine(lm_handler):
    return make_engine(lm_handler, max_rows=48, max_len=1024, max_admit_per_step=64, check_fsm=True)


def make_engine(handler, **settings):
    """A fresh ``LMEngine`` on the handler's model and tables (the handler's own engine keeps running)."""
    from acestep.lm.engine import EngineSettings, LMEngine

    backend = handler.llm
    return LMEngine(backend.model, backend.tables, backend.encode, backend.pad_id, EngineSettings(**settings))


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
    """``make_request(phase, seed, cfg_scale=2.0, max_new_tokens=None, duration=10, **params)``: a
    planner request (CoT phase 1, or codes phase 2 for ``duration`` seconds; constrained) on the demo LM."""
    from acestep.lm import planner
    from acestep.params import GenerationParams

    def make(phase: str, seed: int, cfg_scale: float = 2.0, max_new_tokens=None, duration: int = 10, **params):
        params.setdefault("caption", "calm piano")
        params.setdefault("lyrics", "[Verse]\nhello")
        gp = GenerationParams(lm_cfg_scale=cfg_scale, **params)
        if phase == "cot":
            request = planner.cot_request(lm_handler, gp, {}, seed)
        else:
            request = planner.codes_request(lm_handler, gp, {**META, "duration": duration}, float(duration), seed)
        if max_new_tokens is not None:
            request.max_new_tokens = max_new_tokens
        return request

    return make
