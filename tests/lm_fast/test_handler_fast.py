"""LLMHandler runs its pt backend on the fast path when asked (default on CUDA)."""

from __future__ import annotations

from acestep.inference import GenerationConfig, GenerationParams
from acestep.llm_inference import LLMHandler


def test_handler_plans_on_the_fast_path(lm_handler, tmp_path):
    root = lm_handler.model_path.parent
    fast = LLMHandler()
    status, ok = fast.initialize(str(root), lm_handler.model_path.name, backend="pt", device="cpu", fast_path=True,
                                 max_rows=8)
    assert ok and "FastBackend" in status and type(fast.llm).__name__ == "FastBackend"
    plain = LLMHandler()
    plain.initialize(str(root), lm_handler.model_path.name, backend="pt", device="cpu")
    assert type(plain.llm).__name__ == "PtBackend"  # CPU default: the plain path
    params = GenerationParams(caption="fast path song", duration=10, lm_cfg_scale=2.0)
    plans = fast.plan(params, GenerationConfig(batch_size=2), [3, 4])
    assert [p.seed for p in plans] == [3, 4]
    for plan in plans:
        assert plan.audio_codes.count("<|audio_code_") == 50
        assert 30 <= plan.metadata["bpm"] <= 300 and plan.metadata["keyscale"]
