"""The LM fast path: static KV cache, hand-written Qwen3 forward, CUDA-graph decode steps,
device-side guided sampling and constraints, continuous batching (``FastEngine``)."""

from acestep.lm.fast.backend import FastBackend
from acestep.lm.fast.engine import FastEngine, build_fast_engine

__all__ = ["FastBackend", "FastEngine", "build_fast_engine"]
