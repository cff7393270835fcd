"""``LLMHandler``: the 5 Hz LM behind the seed API (``acestep.llm_inference.LLMHandler``).

It loads the checkpoint's tokenizer (the chat template renders every prompt) and one backend that
owns one long-lived engine (``pt``: transformers weights on our ``LMEngine``, CPU and CUDA;
``vllm``: optional extra, CUDA only). Everything the LM does goes through ``submit``: text2music
planning (``plan``), and the understand / create / format helpers of ``acestep.lm.api``.
Concurrent callers share the engine's running batch. Failures raise exceptions; ``initialize``
keeps upstream's ``(status_message, success)`` return."""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from acestep.checkpoints.layout import resolve_lm_dir
from acestep.fairness import Share
from acestep.devices import default_dtype, resolve_device
from acestep.lm import constants as C
from acestep.lm import planner
from acestep.lm import prompts as P
from acestep.lm.engine import ENGINE_DEFAULTS, EngineSettings
from acestep.lm.request import Cancellation, LMRequest, StepCallback
from acestep.params import GenerationConfig, GenerationParams, LMPlan
from acestep.quantize import check_quantization, quantize_modules

logger = logging.getLogger(__name__)

BACKENDS = ("pt", "vllm")


def _total_vram_gb(device: str) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 1024**3


class LLMHandler:
    """The 5 Hz LM: prompts, constrained paired-CFG decoding, two-phase planning."""

    def __init__(self, persistent_storage_path: Optional[str] = None):
        self.persistent_storage_path = persistent_storage_path
        self.llm = None  # the backend object
        self.llm_tokenizer = None
        self.llm_initialized = False
        self.llm_backend: Optional[str] = None
        self.device = "cpu"
        self.dtype = torch.float32
        self.max_model_len = C.DEFAULT_MAX_MODEL_LEN
        self.max_duration = C.DURATION_MAX
        self.model_path: Optional[Path] = None
        self._render = None
        self._tokenizer_lock = threading.Lock()  # planners of concurrent requests share the tokenizer

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return self.llm_initialized

    def initialize(self, checkpoint_dir: str, lm_model_path: str = C.DEFAULT_LM_MODEL, backend: str = "pt",
                   device: str = "auto", offload_to_cpu: bool = False, dtype: Optional[torch.dtype] = None,
                   max_duration: Optional[int] = None, max_model_len: int = C.DEFAULT_MAX_MODEL_LEN,
                   engine: EngineSettings = ENGINE_DEFAULTS, quantization: Optional[str] = None) -> Tuple[str, bool]:
        """Load tokenizer + model from ``checkpoint_dir/lm_model_path``; returns (status, True).

        ``engine`` sets the pt engine's limits (KV rows, admissions per step, kernels); its
        ``max_len`` is ``max_model_len``. Raises FileNotFoundError (naming the LM folders that
        exist) / ValueError / RuntimeError instead of upstream's (❌…, False). ``offload_to_cpu``
        (pt backend): the weights wait on the CPU while the engine has no work (``acestep.offload``).
        ``quantization`` quantizes the decoder layers' Linear weights (``acestep.quantize``; pt backend only)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown LM backend {backend!r}; expected one of {BACKENDS}")
        path = resolve_lm_dir(checkpoint_dir, lm_model_path or C.DEFAULT_LM_MODEL)
        self.device = str(resolve_device(device))
        self.dtype = dtype or default_dtype(self.device)
        self.max_duration = int(max_duration or C.max_duration_for_vram(_total_vram_gb(self.device)))
        self.max_model_len = int(max_model_len)
        if backend == "vllm" and not self.device.startswith("cuda"):
            logger.warning("the vllm backend needs CUDA; falling back to the pt backend on %s", self.device)
            backend = "pt"
        if offload_to_cpu and backend == "vllm":
            logger.info("offload_to_cpu: the vllm backend manages its own memory; its weights stay resident")
        if check_quantization(quantization, self.device) and backend != "pt":
            raise ValueError(f"quantization={quantization!r}: only the pt LM backend quantizes; backend is {backend!r}")
        self._load(path, backend, engine, offload_to_cpu, quantization)
        status = f"✅ 5Hz LM initialized\nModel: {path}\nBackend: {backend}\nDevice: {self.device}"
        return status, True

    def _load(self, path: Path, backend: str, engine: EngineSettings, offload_to_cpu: bool = False,
              quantization: Optional[str] = None) -> None:
        from transformers import AutoTokenizer

        self.unload()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if backend == "vllm":
            from acestep.lm.vllm_backend import VllmBackend

            stops = [i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
            llm = VllmBackend(path, self.dtype, self.max_model_len, self.max_duration, stop_token_ids=stops)
        else:
            from acestep.lm.backend import PtBackend, load_causal_lm

            model = load_causal_lm(path, self.device, self.dtype)
            quantize_modules(model.model, quantization)  # before the engine holds the weights; the tied head stays
            llm = PtBackend(model, tokenizer, self.max_duration, self._engine_settings(engine), self._tokenizer_lock,
                            offload_to_cpu)
        self._attach(llm, tokenizer, backend)
        self.model_path = path

    def attach_model(self, model, tokenizer, max_duration: Optional[int] = None,
                     engine: EngineSettings = ENGINE_DEFAULTS, offload_to_cpu: bool = False,
                     quantization: Optional[str] = None) -> None:
        """Use an in-memory causal LM + tokenizer (pt backend) instead of loading a folder, with
        ``initialize``'s ``offload_to_cpu`` and ``quantization``."""
        from acestep.lm.backend import PtBackend

        self.unload()
        param = next(model.parameters())
        self.device, self.dtype = str(param.device), param.dtype
        check_quantization(quantization, self.device)
        quantize_modules(model.model, quantization)
        self.max_duration = int(max_duration or C.max_duration_for_vram(_total_vram_gb(self.device)))
        backend = PtBackend(model, tokenizer, self.max_duration, self._engine_settings(engine), self._tokenizer_lock,
                            offload_to_cpu)
        self._attach(backend, tokenizer, "pt")

    def _engine_settings(self, engine: EngineSettings) -> EngineSettings:
        return dataclasses.replace(engine, max_len=self.max_model_len)

    def _attach(self, llm, tokenizer, backend: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise RuntimeError("the LM tokenizer has no chat template")
        self.llm_tokenizer, self._render = tokenizer, P.chat_renderer(tokenizer)
        self.llm, self.llm_backend, self.llm_initialized = llm, backend, True

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm, self.llm_initialized, self.llm_backend = None, False, None

    def _require(self) -> None:
        if not self.llm_initialized:
            raise RuntimeError("5Hz LM not initialized; call LLMHandler.initialize() first")

    # -- the planner's LMContext ------------------------------------------------------------
    def render(self, messages, add_generation_prompt: bool) -> str:
        self._require()
        return self._render(messages, add_generation_prompt)

    def tokenize(self, text: str) -> List[int]:
        with self._tokenizer_lock:  # transformers resets the Rust tokenizer's state per call
            return self.llm_tokenizer(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        # Never skip special tokens: the audio codes are special tokens.
        with self._tokenizer_lock:
            return self.llm_tokenizer.decode(list(ids), skip_special_tokens=False)

    def submit(self, request: LMRequest, on_step: Optional[StepCallback] = None) -> Future:
        """Queue one generation in the engine; the future resolves to its generated ids."""
        self._require()
        return self.llm.submit(request, on_step)

    def stats(self) -> Dict[str, Any]:
        """The engine's rows, queue, steps and per-group peaks (``LMEngine.stats``)."""
        self._require()
        return self.llm.stats()

    # -- text2music --------------------------------------------------------------------------
    def plan(self, params: GenerationParams, config: GenerationConfig, seeds: List[int],
             progress: Optional[planner.ProgressCallback] = None, cancel: Optional[Cancellation] = None,
             group: Optional[str] = None, share: Share = Share()) -> List[LMPlan]:
        """Phase 1 (CoT) and phase 2 (codes) per item; see ``acestep.lm.planner``."""
        self._require()
        return planner.plan(self, params, config, seeds, progress, cancel, group, share)

    def has_all_metas(self, user_metadata: Optional[Dict[str, Any]]) -> bool:
        return planner.has_all_metas(user_metadata)
