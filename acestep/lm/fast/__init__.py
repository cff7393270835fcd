"""The parts of ``acestep.lm.engine.LMEngine`` (the one LM engine, on every device):

``model`` (hand-written Qwen3 forward over a static, slot-indexed KV cache), ``graphs`` (bucketed
decode steps, CUDA graphs on CUDA), ``masks`` (FSM states -> device mask plans), ``sampler``
(batched guided sampling on the device) and ``scheduler`` (continuous-batching bookkeeping)."""
