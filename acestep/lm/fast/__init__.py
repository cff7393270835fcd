"""The LM fast path: static KV cache, hand-written Qwen3 forward, CUDA-graph decode steps,
device-side guided sampling and constraints, continuous batching.

    engine = FastEngine(model, tables, encode, pad_id, max_rows=64, max_len=4096, chunk_size=8)
    engine.generate(requests)                  # == PtRunner.generate: ids per request, stop included
    rid = engine.add_request(request)          # continuous API
    while engine.has_unfinished():
        for done in engine.step():             # one token per running request
            tokens = engine.pop_result(done)
    build_fast_engine(llm_handler, **kw)       # from an initialized pt LLMHandler
    FastBackend(pt_backend, **kw)              # drop-in for PtBackend (handler.llm)

Modules: ``model`` (forward + cache), ``graphs`` (bucketed decode steps, CUDA graphs), ``masks``
(FSM -> device mask plans), ``sampler`` (batched sampling), ``scheduler`` (bookkeeping),
``engine`` (the loop), ``backend`` (the backend wrapper)."""

from acestep.lm.fast.backend import FastBackend
from acestep.lm.fast.engine import FastEngine, build_fast_engine

__all__ = ["FastBackend", "FastEngine", "build_fast_engine"]
