"""Engine fixtures: the tiny demo LM and one pt ``LLMHandler`` on it, built once per session.

Two kinds of equality are tested:
- a request's tokens among batch-mates equal its solo run, exactly, on the raw random demo LM
  (whose near-uniform logits would let any 1e-7 rounding difference flip a sample): the engine's
  eager steps are batch-invariant by construction (``fast/graphs.py``);
- the engine's tokens equal the plain transformers path's (same sampling, FSM and CFG maths). The
  plain path pads prompts and attends over padded ranges, which rounds differently, so this runs
  on ``peaked``: a copy of the demo LM whose tied embedding is scaled by 16 (exact), giving
  peaked, trained-like distributions that still produce varied codes."""

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

    root = tmp_path_factory.mktemp("lm_engine_checkpoints")
    write_demo_lm(root / DEMO_LM_DIRNAME, seed=0)
    handler = LLMHandler()
    _, ok = handler.initialize(str(root), DEMO_LM_DIRNAME, backend="pt", device="cpu")
    assert ok
    model = handler.llm.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the real checkpoint
    return handler


PEAK = 16.0


@pytest.fixture(scope="session")
def peaked(lm_handler):
    """The demo LM's weights with the tied embedding scaled by ``PEAK``, and the handler's tables."""
    import copy
    from types import SimpleNamespace

    backend = lm_handler.llm
    model = copy.deepcopy(backend.model)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(PEAK)
    return SimpleNamespace(model=model, tables=backend.tables, encode=backend.encode, pad_id=backend.pad_id)


@pytest.fixture(scope="session")
def runner(peaked):
    """The plain path (``PtRunner``) the engine must agree with, on the peaked model."""
    from acestep.lm.plain import PtRunner

    return PtRunner(peaked.model, peaked.tables, peaked.encode, peaked.pad_id)


@pytest.fixture(scope="session")
def fast_engine(peaked):
    return make_engine(peaked, max_rows=48, max_len=1024, max_admit_per_step=64, check_fsm=True)


def make_engine(backend, **settings):
    """A fresh ``LMEngine`` on a backend's (or ``peaked``'s) model and tables; the handler's own
    engine keeps running."""
    from acestep.lm.engine import EngineSettings, LMEngine

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
