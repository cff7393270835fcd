"""vLLM backend (``pip install acestep-serve[vllm]``; CUDA only). vLLM is imported only here.

Engine: ``vllm.v1.engine.async_llm.AsyncLLM`` on a private event-loop thread, so the handler
stays synchronous. Constraints: ``AceStepFsmLogitsProcessor``, a vLLM v1 logits processor that
wraps one ``FsmRequestProcessor`` per request; the request's FSM settings travel in
``SamplingParams.extra_args["acestep_fsm"]``. The tensor logic is the pt backend's (``acestep.lm.fsm``
+ ``acestep.lm.sampling.apply_allowed``) and ``FsmRequestProcessor`` is plain Python, tested
without vLLM. It targets the V1 model runner's logits-processor interface
(``VLLM_USE_V2_MODEL_RUNNER=0`` is set before the engine starts).

Paired CFG is not offered here: vLLM schedules and samples each request on its own, so a cond and
an uncond request cannot be guaranteed to decode in lock-step with one shared token (preemption,
chunked prefill and row reordering break the pairing). Requests with ``lm_cfg_scale != 1`` raise
a ValueError naming the ``pt`` backend, which implements exact paired CFG.

Sampling differs from the pt backend only where vLLM's sampler does: penalties and top-k/top-p
are vLLM's (top-p after temperature, as on pt), and rows draw from vLLM's per-request seeded RNG.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import uuid
from pathlib import Path
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from acestep.lm import fsm as F
from acestep.lm.request import LMRequest
from acestep.lm.sampling import apply_allowed
from acestep.lm.vocab import TokenTables, build_token_tables

FSM_KEY = "acestep_fsm"
MAX_DURATION_KEY = "acestep_max_duration"

try:  # the engine process imports this module by reference; keep it importable without vLLM
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor as _AdapterBase
except ImportError:  # pragma: no cover - vLLM is an optional extra
    _AdapterBase = object


def spec_to_extra_args(spec: F.FsmSpec, max_duration: int) -> Dict[str, Any]:
    """An FsmSpec as plain data for ``SamplingParams.extra_args``."""
    data = dataclasses.asdict(spec)
    data["user_metadata"] = dict(spec.user_metadata) if spec.user_metadata else None
    return {FSM_KEY: data, MAX_DURATION_KEY: int(max_duration)}


def spec_from_extra_args(extra_args: Optional[Dict[str, Any]]) -> Optional[F.FsmSpec]:
    if not extra_args or FSM_KEY not in extra_args:
        return None
    return F.FsmSpec(**extra_args[FSM_KEY])


class FsmRequestProcessor:
    """vLLM request-level processor ``(output_ids, logits[V]) -> logits`` driving one FSM.

    vLLM hands over the request's output ids so far; tokens not yet seen advance the FSM."""

    def __init__(self, spec: F.FsmSpec, tables: TokenTables, encode):
        self.tables = tables
        self.state = F.new_state(spec, tables, encode)
        self.consumed = 0

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.consumed:]:
            F.advance(self.state, self.tables, int(token))
        self.consumed = len(output_ids)
        apply_allowed(logits, F.allowed(self.state, self.tables, lambda ids: logits[ids]))
        return logits


class AceStepFsmLogitsProcessor(_AdapterBase):
    """Batch-level adapter (vLLM v1 ``AdapterLogitsProcessor``) creating one FSM per request."""

    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self._vocab_size = vllm_config.model_config.get_vocab_size()
        self._device = device
        self._tables: Dict[int, TokenTables] = {}

    def _tables_for(self, max_duration: int) -> TokenTables:
        if max_duration not in self._tables:
            tables = build_token_tables(self._tokenizer, self._vocab_size, max_duration)
            self._tables[max_duration] = tables.to(self._device)
        return self._tables[max_duration]

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        spec = spec_from_extra_args(params.extra_args)
        if spec is None:
            return None
        tables = self._tables_for(int(params.extra_args.get(MAX_DURATION_KEY, 600)))
        encode = lambda text: self._tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        return FsmRequestProcessor(spec, tables, encode)


def check_vllm_request(request: LMRequest) -> None:
    if request.sampling.uses_cfg:
        raise ValueError(
            f"lm_cfg_scale={request.sampling.cfg_scale} needs paired CFG decoding, which the vllm backend "
            "does not implement; initialize the LLMHandler with backend='pt' (exact paired CFG) or use lm_cfg_scale=1")


class VllmBackend:
    name = "vllm"

    def __init__(self, model_dir: Path, dtype: torch.dtype, max_model_len: int, max_duration: int,
                 stop_token_ids: Sequence[int] = (), gpu_memory_utilization: float = 0.5):
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the V1 logits-processor interface
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.max_duration = max_duration
        self.stop_token_ids = [int(i) for i in stop_token_ids]  # EOS and pad, as the pt runner
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="acestep-vllm-loop", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(model=str(model_dir), dtype=str(dtype).replace("torch.", ""),
                               max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                               trust_remote_code=False, logits_processors=[AceStepFsmLogitsProcessor])
        self.engine = self._call(self._make_engine(AsyncLLM, args))

    @staticmethod
    async def _make_engine(async_llm_cls, args):
        return async_llm_cls.from_engine_args(args)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _sampling_params(self, request: LMRequest):
        from vllm import SamplingParams

        cfg = request.sampling
        extra = spec_to_extra_args(request.fsm, self.max_duration) if request.fsm is not None else None
        return SamplingParams(
            temperature=max(cfg.temperature, 0.0), top_k=cfg.effective_top_k or 0, top_p=cfg.effective_top_p or 1.0,
            repetition_penalty=cfg.repetition_penalty, seed=int(request.seed) & 0x7FFF_FFFF,
            max_tokens=request.max_new_tokens, stop_token_ids=self.stop_token_ids, skip_special_tokens=False, spaces_between_special_tokens=False,
            detokenize=False, extra_args=extra)

    async def _one(self, request: LMRequest, on_step: Optional[Callable[[int], None]]) -> List[int]:
        # Cancelling the task (the caller cancelled its future) closes the stream; AsyncLLM then
        # aborts the request and frees its KV blocks.
        final = None
        async for out in self.engine.generate(request_id=uuid.uuid4().hex,
                                              prompt={"prompt_token_ids": list(request.prompt_ids)},
                                              sampling_params=self._sampling_params(request)):
            final = out
            if on_step is not None:
                on_step(len(out.outputs[0].token_ids))
        return list(final.outputs[0].token_ids) if final is not None else []

    def submit(self, request: LMRequest, on_step: Optional[Callable[[int], None]] = None) -> Future:
        check_vllm_request(request)
        return asyncio.run_coroutine_threadsafe(self._one(request, on_step), self._loop)

    def generate(self, requests: Sequence[LMRequest]) -> List[List[int]]:
        return [future.result() for future in [self.submit(r) for r in requests]]

    def stats(self) -> Dict[str, Any]:
        return {"backend": self.name}

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
            self.engine = None
        self._loop.call_soon_threadsafe(self._loop.stop)
