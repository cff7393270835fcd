"""The vLLM backend's pieces, tested the same whether or not vLLM is installed: its import boundary
(the module loads without vLLM, the backend then fails naming it, the handler falls back to pt off
CUDA), its per-request processor drives the same FSM as the pt runner, its settings travel as plain
data, CFG is refused with a clear error."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import logging
import sys
import types

import pytest
import torch

from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME
from acestep.lm import planner
from acestep.lm import vllm_backend as V
from acestep.lm.fsm import FsmSpec
from acestep.lm.sampling import sample_token
from acestep.params import GenerationParams


class _NoVllm(importlib.abc.MetaPathFinder):
    """Answers every ``vllm`` import as an uninstalled package does."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM made unimportable for one test, installed or not (modules already imported forgotten)."""
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoVllm(), *sys.meta_path])
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # the backend sets it before importing vLLM


def _fresh_backend_module(monkeypatch):
    """A new copy of the backend module, imported under the current ``sys.modules``/``meta_path``
    (the one the other tests use stays as it is)."""
    spec = importlib.util.spec_from_file_location("acestep_vllm_backend_copy", V.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_module_imports_without_vllm(no_vllm, monkeypatch):
    copy = _fresh_backend_module(monkeypatch)
    assert copy.AceStepFsmLogitsProcessor.__mro__[1] is object
    spec = FsmSpec(phase="cot")
    assert copy.spec_from_extra_args(copy.spec_to_extra_args(spec, 60)) == spec


def test_module_builds_on_vllms_processor_base_when_present(monkeypatch):
    base = type("AdapterLogitsProcessor", (), {})
    parts = ("vllm", "vllm.v1", "vllm.v1.sample", "vllm.v1.sample.logits_processor")
    for name in parts:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[parts[-1]].AdapterLogitsProcessor = base
    assert _fresh_backend_module(monkeypatch).AceStepFsmLogitsProcessor.__mro__[1] is base


def test_backend_without_vllm_fails_naming_it(no_vllm, lm_dir):
    with pytest.raises(ImportError, match="vllm") as missing:
        V.VllmBackend(lm_dir, torch.bfloat16, 4096, 240)
    assert missing.value.name == "vllm"


def test_vllm_backend_off_cuda_falls_back_to_pt(no_vllm, lm_checkpoints, caplog):
    from acestep.llm_inference import LLMHandler

    handler = LLMHandler()
    with caplog.at_level(logging.WARNING, logger="acestep"):
        status, ok = handler.initialize(str(lm_checkpoints), DEMO_LM_DIRNAME, backend="vllm", device="cpu")
    try:
        assert ok and "Backend: pt" in status and handler.llm_backend == handler.llm.name == "pt"
        assert "falling back to the pt backend" in caplog.text
    finally:
        handler.unload()


def test_spec_round_trips_through_extra_args():
    spec = FsmSpec(phase="cot", skip_caption=True, stop_at_reasoning=True, user_metadata={"bpm": 120})
    extra = json.loads(json.dumps(V.spec_to_extra_args(spec, 240)))  # plain JSON data
    assert V.spec_from_extra_args(extra) == spec and extra[V.MAX_DURATION_KEY] == 240
    assert V.spec_from_extra_args(None) is None and V.spec_from_extra_args({"other": 1}) is None


def test_cfg_requests_are_refused_naming_pt(lm_handler):
    params = GenerationParams(caption="x", lm_cfg_scale=2.0)
    with pytest.raises(ValueError, match="backend='pt'"):
        V.check_vllm_request(planner.cot_request(lm_handler, params, {}, 1))
    V.check_vllm_request(planner.cot_request(lm_handler, GenerationParams(caption="x", lm_cfg_scale=1.0), {}, 1))


def test_request_processor_matches_the_pt_runner(lm_handler, runner, tables, tokenizer):
    request = planner.cot_request(lm_handler, GenerationParams(caption="calm", lm_cfg_scale=1.0), {}, 21)
    request.max_new_tokens = 80
    expected = runner.generate([request])[0]
    processor = V.FsmRequestProcessor(request.fsm, tables, lambda t: tokenizer.encode(t, add_special_tokens=False))
    gen = torch.Generator().manual_seed(request.seed)
    ids, out = list(request.prompt_ids), []
    with torch.no_grad():
        for _ in range(request.max_new_tokens):
            row = runner.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            row = processor(out, row)  # vLLM hands the output ids so far and a full logits row
            allowed = torch.nonzero(torch.isfinite(row)).flatten()
            token = sample_token(row[allowed], allowed, request.sampling, gen)
            out.append(token)
            ids.append(token)
            if token in runner.stop_ids:
                break
    assert out == expected


def _fake_vllm(monkeypatch, calls):
    """Minimal stand-ins for the vLLM classes the backend touches (in place of vLLM, installed or not)."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # the backend sets it; not left to later tests
    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class AsyncEngineArgs:
        def __init__(self, **kwargs):
            calls["engine_args"] = kwargs

    class FakeEngine:
        async def generate(self, request_id, prompt, sampling_params):
            calls.setdefault("params", []).append(sampling_params)
            out = types.SimpleNamespace(token_ids=[len(prompt["prompt_token_ids"]), sampling_params.seed, 7])
            yield types.SimpleNamespace(outputs=[out])

        def shutdown(self):
            calls["shutdown"] = True

    class AsyncLLM:
        @classmethod
        def from_engine_args(cls, args):
            return FakeEngine()

    modules = {"vllm": types.ModuleType("vllm"), "vllm.engine": types.ModuleType("vllm.engine"),
               "vllm.engine.arg_utils": types.ModuleType("vllm.engine.arg_utils"),
               "vllm.v1": types.ModuleType("vllm.v1"), "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
               "vllm.v1.engine.async_llm": types.ModuleType("vllm.v1.engine.async_llm")}
    modules["vllm"].SamplingParams = SamplingParams
    modules["vllm.engine.arg_utils"].AsyncEngineArgs = AsyncEngineArgs
    modules["vllm.v1.engine.async_llm"].AsyncLLM = AsyncLLM
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_backend_plumbing_with_a_fake_engine(monkeypatch, lm_handler, lm_dir):
    calls = {}
    _fake_vllm(monkeypatch, calls)
    backend = V.VllmBackend(lm_dir, torch.bfloat16, 4096, 240, stop_token_ids=[5, 6])
    try:
        params = GenerationParams(caption="x", lm_cfg_scale=1.0, lm_top_k=0, lm_top_p=0.9)
        requests = [planner.cot_request(lm_handler, params, {"bpm": 99}, seed) for seed in (11, 12)]
        outputs = backend.generate(requests)
    finally:
        backend.close()
    assert outputs == [[len(r.prompt_ids), r.seed, 7] for r in requests]
    args = calls["engine_args"]
    assert args["dtype"] == "bfloat16" and args["trust_remote_code"] is False
    assert args["logits_processors"] == [V.AceStepFsmLogitsProcessor]
    sp = calls["params"][0]
    assert (sp.top_k, sp.top_p, sp.stop_token_ids, sp.skip_special_tokens) == (0, 0.9, [5, 6], False)
    assert V.spec_from_extra_args(sp.extra_args) == requests[0].fsm and sp.extra_args[V.MAX_DURATION_KEY] == 240
    assert calls["shutdown"] is True
