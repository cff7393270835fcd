"""LLMHandler.initialize / plan: which phases run, what each LMPlan holds, errors."""

from __future__ import annotations

import pytest
import torch

from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME
from acestep.llm_inference import LLMHandler
from acestep.lm import constants as C
from acestep.lm import planner
from acestep.lm.parsing import count_codes
from acestep.params import GenerationConfig, GenerationParams, LMPlan


def test_initialize_pt_on_cpu(lm_handler):
    assert lm_handler.is_initialized and lm_handler.llm_initialized
    assert lm_handler.llm_backend == "pt" and lm_handler.device == "cpu"
    assert lm_handler.dtype == torch.float32 and next(lm_handler.llm.model.parameters()).dtype == torch.float32
    assert type(lm_handler.llm.model).__name__ == "Qwen3ForCausalLM"
    assert lm_handler.max_duration == 180 and lm_handler.max_model_len == 4096


def test_initialize_errors(lm_checkpoints):
    handler = LLMHandler()
    with pytest.raises(FileNotFoundError, match="not found"):
        handler.initialize(str(lm_checkpoints), "acestep-5Hz-lm-missing", device="cpu")
    with pytest.raises(ValueError, match="backend"):
        handler.initialize(str(lm_checkpoints), DEMO_LM_DIRNAME, backend="mlx", device="cpu")
    assert not handler.is_initialized
    with pytest.raises(RuntimeError, match="not initialized"):
        handler.plan(GenerationParams(), GenerationConfig(batch_size=1), [1])


def test_vllm_backend_falls_back_to_pt_without_cuda(lm_checkpoints):
    handler = LLMHandler()
    status, ok = handler.initialize(str(lm_checkpoints), DEMO_LM_DIRNAME, backend="vllm", device="cpu")
    assert ok and handler.llm_backend == "pt" and "Backend: pt" in status


def test_seed_count_must_match_batch(lm_handler):
    with pytest.raises(ValueError, match="seeds"):
        lm_handler.plan(GenerationParams(), GenerationConfig(batch_size=2), [1])


def test_user_metadata_from_params():
    params = GenerationParams(bpm=120, keyscale=" N/A ", timesignature=" 3 ", duration=30.7)
    assert planner.user_metadata_from_params(params) == {"bpm": 120, "timesignature": "3", "duration": 30}
    assert planner.user_metadata_from_params(GenerationParams(bpm=0, duration=-1.0)) == {}
    assert planner.has_all_metas({"bpm": 1, "keyscale": "C major", "timesignature": "4", "duration": 10})
    assert not planner.has_all_metas({"bpm": 1, "keyscale": "C major", "timesignature": "4"})


def test_token_budget():
    assert planner.token_budget(10, 100, 4096) == 550
    assert planner.token_budget(5, 100, 4096) == 550  # clamp(d, 10, 600)
    assert planner.token_budget(None, 100, 4096) == 3996  # prompt + completion fit the context
    assert planner.token_budget(None, 10, 4096) == 4032  # upstream's max_model_len - 64
    with pytest.raises(ValueError):
        planner.token_budget(None, 5000, 4096)


def test_all_four_metas_skip_phase1(lm_handler):
    params = GenerationParams(caption="rock", bpm=100, keyscale="E minor", timesignature="4", duration=10)
    plans = lm_handler.plan(params, GenerationConfig(batch_size=2, allow_lm_batch=True), [1, 2])
    for plan in plans:
        assert isinstance(plan, LMPlan)
        assert plan.metadata == {"bpm": 100, "keyscale": "E minor", "timesignature": "4", "duration": 10}
        assert plan.phase1_time == 0.0 and plan.phase2_time > 0
        assert count_codes(plan.audio_codes) == 50
    assert [p.seed for p in plans] == [1, 2]


def test_thinking_off_or_user_codes_skip_phase2(lm_handler):
    config = GenerationConfig(batch_size=1)
    (plan,) = lm_handler.plan(GenerationParams(caption="rock", duration=10, thinking=False), config, [5])
    assert plan.audio_codes == "" and plan.phase2_time == 0.0 and plan.metadata["duration"] == 10
    codes = "<|audio_code_1|><|audio_code_2|>"
    (plan,) = lm_handler.plan(GenerationParams(caption="rock", duration=10, audio_codes=codes), config, [5])
    assert plan.audio_codes == "" and plan.phase1_time > 0


def test_no_cot_metas_and_no_user_metas_is_not_an_error(lm_handler):
    params = GenerationParams(use_cot_metas=False, thinking=False)
    (plan,) = lm_handler.plan(params, GenerationConfig(batch_size=1), [9])
    assert plan.metadata == {} and plan.audio_codes == "" and plan.phase1_time == 0.0  # upstream crashed here (use_cot_metas=False without metas)


def test_codes_follow_the_cot_duration_when_user_gave_none(lm_handler):
    (plan,) = lm_handler.plan(GenerationParams(caption="short jingle"), GenerationConfig(batch_size=1), [4])
    duration = plan.metadata["duration"]
    assert C.DURATION_MIN <= duration <= lm_handler.max_duration
    assert count_codes(plan.audio_codes) == duration * 5  # upstream ignored the CoT duration
    assert plan.metadata["vocal_language"] == plan.metadata["language"]  # upstream never passed the LM's language on
