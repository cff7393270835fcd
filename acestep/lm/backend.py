"""LM backends behind one interface: ``submit(request, on_step) -> Future[list[int]]`` (generated ids,
stop token included), ``stats()``, ``close()``.

- ``PtBackend`` (default, CPU and CUDA): a transformers ``Qwen3ForCausalLM`` (stock classes, never
  trust_remote_code) driven by our ``LMEngine`` through one ``StepLoop`` thread; with
  ``offload_to_cpu`` its weights wait on the CPU while the engine has no work.
- ``acestep.lm.vllm_backend.VllmBackend`` (optional extra, CUDA only, ``lm_cfg_scale == 1`` only)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch

from acestep.devices import release_cached_memory
from acestep.lm.engine import ENGINE_DEFAULTS, EngineSettings, LMEngine
from acestep.lm.plain import PtRunner
from acestep.lm.request import LMRequest, StepCallback
from acestep.lm.vocab import build_token_tables
from acestep.memory import LM_PHASES
from acestep.offload import IdleOffload, Offloader
from acestep.steploop import StepLoop


class LMBackend(Protocol):
    name: str

    def submit(self, request: LMRequest, on_step: Optional[StepCallback] = None) -> Future: ...
    def stats(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...


def load_causal_lm(model_dir: Path, device: str, dtype: torch.dtype):
    """Stock transformers Qwen3 classes only: never trust_remote_code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    return model.to(device).eval()


class IdleRelease(IdleOffload):
    """``IdleOffload`` (a no-op without offloaded modules) that also hands CUDA's cached blocks
    back to the driver whenever the engine runs out of work."""

    def step(self) -> list:
        try:
            return super().step()
        finally:
            if not self.stepper.has_work:
                release_cached_memory(self.offloader.device)


class PtBackend:
    """A loaded causal LM, its token tables, and the one engine (plus loop) that decodes on it."""

    name = "pt"

    def __init__(self, model, tokenizer, max_duration: int, settings: EngineSettings = ENGINE_DEFAULTS,
                 tokenizer_lock: Optional[threading.Lock] = None, offload_to_cpu: bool = False):
        self.model = model.eval()
        self.tables = build_token_tables(tokenizer, int(self.model.config.vocab_size), max_duration)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.tables.eos_id
        lock = tokenizer_lock or threading.Lock()  # shared with the handler's planner threads

        def encode(text: str) -> List[int]:
            with lock:
                return tokenizer.encode(text, add_special_tokens=False)

        self.encode = encode
        if offload_to_cpu:  # a CUDA graph holds the weights' device addresses, which each offload changes
            settings = dataclasses.replace(settings, use_cuda_graphs=False)
        # built with the weights on the device: its caches and tables are allocated there
        self.engine = LMEngine(self.model, self.tables, self.encode, self.pad_id, settings)
        self.offloader = Offloader({"lm": self.model}, LM_PHASES, ("lm",) if offload_to_cpu else (),
                                   self.engine.device)
        self.loop = StepLoop(IdleRelease(self.engine, self.offloader, "lm"), "acestep-lm-engine")

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def submit(self, request: LMRequest, on_step: Optional[StepCallback] = None) -> Future:
        """The future of ``request``'s generated ids (stop token included). Raises ValueError at
        once for a request the engine can never run."""
        self.engine.check(request)
        return self.loop.submit(request, on_step)

    def plain_runner(self) -> PtRunner:
        """The plain transformers path on the same model and tables (the tests' oracle, bench's baseline)."""
        return PtRunner(self.model, self.tables, self.encode, self.pad_id)

    def generate(self, requests: Sequence[LMRequest]) -> List[List[int]]:
        """Submit all, wait for all (they decode together, joining as rows free up)."""
        return [future.result() for future in [self.submit(r) for r in requests]]

    def stats(self) -> Dict[str, Any]:
        return self.loop.stats()

    def close(self) -> None:
        self.loop.close()
