"""The LM engine: ``LMEngine`` (``llm_engine``: continuous batching with paired CFG and constrained
decoding, the one engine on every device) and its parts: ``model`` (hand-written Qwen3 forward over a
static, row-indexed KV cache), ``graphs`` (bucketed decode steps, CUDA graphs on CUDA), ``masks``
(FSM states -> device mask plans), ``sampler`` (batched guided sampling on the device) and
``scheduler`` (continuous-batching bookkeeping)."""

from acestep.lm.engine.llm_engine import ENGINE_DEFAULTS, EngineSettings, LMEngine

__all__ = ["ENGINE_DEFAULTS", "EngineSettings", "LMEngine"]
