"""``LLMHandler``: the 5 Hz LM behind the seed API (``acestep.llm_inference.LLMHandler``).

It loads the checkpoint's tokenizer (the chat template renders every prompt) and one backend
(``pt``: transformers, default, CPU/GPU; ``vllm``: optional extra, CUDA only), and offers
``plan`` (text2music phases 1+2 per item) plus the understand / create / format generations.
Failures raise exceptions; ``initialize`` keeps upstream's ``(status_message, success)`` return."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from acestep.lm import constants as C
from acestep.lm import modes, planner
from acestep.lm import prompts as P
from acestep.lm.engine import LMRequest
from acestep.lm.sampling import SamplingConfig
from acestep.params import GenerationConfig, GenerationParams, LMPlan

logger = logging.getLogger(__name__)

DEFAULT_LM_MODEL = "acestep-5Hz-lm-1.7B"
BACKENDS = ("pt", "vllm")


def resolve_device(device: str) -> str:
    """``auto`` → cuda if available else cpu; an unavailable cuda falls back to cpu (warned)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA requested but unavailable; the LM runs on CPU")
        return "cpu"
    return device


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith(("cuda", "xpu")) else torch.float32


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
        self.fast_path: Optional[bool] = None  # None: on CUDA
        self.max_rows = 64
        self._render = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return self.llm_initialized

    def initialize(self, checkpoint_dir: str, lm_model_path: Optional[str] = None, backend: str = "pt",
                   device: str = "auto", offload_to_cpu: bool = False, dtype: Optional[torch.dtype] = None,
                   max_duration: Optional[int] = None, max_model_len: int = C.DEFAULT_MAX_MODEL_LEN,
                   fast_path: Optional[bool] = None, max_rows: int = 64) -> Tuple[str, bool]:
        """Load tokenizer + model from ``checkpoint_dir/lm_model_path``; returns (status, True).

        ``fast_path`` (default: on CUDA) runs the pt backend on ``acestep.lm.fast`` (static KV cache
        of ``max_rows`` slots, CUDA-graph decode steps, device-side constraints, continuous batching).
        Raises FileNotFoundError / ValueError / RuntimeError instead of upstream's (❌…, False)."""
        self.fast_path, self.max_rows = fast_path, int(max_rows)
        if backend not in BACKENDS:
            raise ValueError(f"unknown LM backend {backend!r}; expected one of {BACKENDS}")
        if offload_to_cpu:
            logger.warning("offload_to_cpu is not supported by this LM handler; ignored")
        path = Path(checkpoint_dir) / (lm_model_path or DEFAULT_LM_MODEL)
        if not path.is_dir():
            raise FileNotFoundError(f"5Hz LM model not found at {path}")
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.max_duration = int(max_duration or C.max_duration_for_vram(_total_vram_gb(self.device)))
        self.max_model_len = int(max_model_len)
        if backend == "vllm" and not self.device.startswith("cuda"):
            logger.warning("the vllm backend needs CUDA; falling back to the pt backend on %s", self.device)
            backend = "pt"
        self._load(path, backend)
        engine = type(self.llm).__name__
        status = f"✅ 5Hz LM initialized\nModel: {path}\nBackend: {backend} ({engine})\nDevice: {self.device}"
        return status, True

    def _load(self, path: Path, backend: str) -> None:
        from transformers import AutoTokenizer

        self.unload()
        self.llm_tokenizer = AutoTokenizer.from_pretrained(str(path))
        if not getattr(self.llm_tokenizer, "chat_template", None):
            raise RuntimeError(f"the tokenizer in {path} has no chat template")
        self._render = P.chat_renderer(self.llm_tokenizer)
        if backend == "vllm":
            from acestep.lm.backends.vllm_backend import VllmBackend

            tok = self.llm_tokenizer
            stops = [i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None]
            self.llm = VllmBackend(path, self.dtype, self.max_model_len, self.max_duration, stop_token_ids=stops)
        else:
            from acestep.lm.backends.pt_backend import PtBackend

            self.llm = self._maybe_fast(PtBackend(path, self.device, self.dtype, self.llm_tokenizer,
                                                  self.max_duration))
        self.llm_backend, self.model_path, self.llm_initialized = backend, path, True

    def attach_model(self, model, tokenizer, max_duration: Optional[int] = None,
                     fast_path: Optional[bool] = None, max_rows: int = 64) -> None:
        """Use an in-memory causal LM + tokenizer (pt backend) instead of loading a folder."""
        from acestep.lm.backends.pt_backend import PtBackend

        self.unload()
        self.fast_path, self.max_rows = fast_path, int(max_rows)
        self.llm_tokenizer = tokenizer
        self._render = P.chat_renderer(tokenizer)
        param = next(model.parameters())
        self.device, self.dtype = str(param.device), param.dtype
        self.max_duration = int(max_duration or C.max_duration_for_vram(_total_vram_gb(self.device)))
        self.llm = self._maybe_fast(PtBackend.from_model(model, tokenizer, self.max_duration))
        self.llm_backend, self.llm_initialized = "pt", True

    def _maybe_fast(self, pt_backend):
        use_fast = self.fast_path if self.fast_path is not None else self.device.startswith("cuda")
        if not use_fast:
            return pt_backend
        from acestep.lm.fast.backend import FastBackend

        return FastBackend(pt_backend, max_rows=self.max_rows, max_len=self.max_model_len)

    def unload(self) -> None:
        if self.llm is not None and hasattr(self.llm, "close"):
            self.llm.close()
        self.llm, self.llm_initialized, self.llm_backend = None, False, None

    def _require(self) -> None:
        if not self.llm_initialized:
            raise RuntimeError("5Hz LM not initialized; call LLMHandler.initialize() first")

    # -- text <-> ids (the planner's LMContext) ---------------------------------------------
    def render(self, messages, add_generation_prompt: bool) -> str:
        self._require()
        return self._render(messages, add_generation_prompt)

    def tokenize(self, text: str) -> List[int]:
        return self.llm_tokenizer(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        # Never skip special tokens: the audio codes are special tokens.
        return self.llm_tokenizer.decode(list(ids), skip_special_tokens=False)

    def generate_texts(self, requests: Sequence[LMRequest]) -> List[str]:
        self._require()
        return [self.decode(ids) for ids in self.llm.generate(list(requests))]

    # -- text2music --------------------------------------------------------------------------
    def plan(self, params: GenerationParams, config: GenerationConfig, seeds: List[int]) -> List[LMPlan]:
        """Phase 1 (CoT) and phase 2 (codes) per item; see ``acestep.lm.planner``."""
        self._require()
        return planner.plan(self, params, config, seeds)

    def has_all_metas(self, user_metadata: Optional[Dict[str, Any]]) -> bool:
        return planner.has_all_metas(user_metadata)

    # -- understand / create / format ------------------------------------------------------
    @staticmethod
    def _sampling(temperature: float, top_k, top_p, repetition_penalty: float) -> SamplingConfig:
        return SamplingConfig(temperature=temperature, top_k=top_k or None,
                              top_p=top_p if top_p and top_p < 1.0 else None, repetition_penalty=repetition_penalty)

    @staticmethod
    def _seed(seed: Optional[int]) -> int:
        return random.randint(0, 2**32 - 1) if seed is None or seed < 0 else int(seed)

    def understand_audio_from_codes(self, audio_codes: str, temperature: float = 0.3, top_k=None, top_p=None,
                                    repetition_penalty: float = 1.0, use_constrained_decoding: bool = True,
                                    seed: Optional[int] = None) -> Dict[str, Any]:
        self._require()
        sampling = self._sampling(temperature, top_k, top_p, repetition_penalty)
        return modes.understand(self, audio_codes, sampling, self._seed(seed), use_constrained_decoding)

    def create_sample_from_query(self, query: str, instrumental: bool = False, vocal_language: Optional[str] = None,
                                 temperature: float = 0.85, top_k=None, top_p=None, repetition_penalty: float = 1.0,
                                 use_constrained_decoding: bool = True, seed: Optional[int] = None) -> Dict[str, Any]:
        self._require()
        sampling = self._sampling(temperature, top_k, top_p, repetition_penalty)
        return modes.create_sample(self, query, instrumental, vocal_language, sampling, self._seed(seed),
                                   use_constrained_decoding)

    def format_sample_from_input(self, caption: str, lyrics: str, user_metadata: Optional[Dict[str, Any]] = None,
                                 temperature: float = 0.85, top_k=None, top_p=None, repetition_penalty: float = 1.0,
                                 use_constrained_decoding: bool = True, seed: Optional[int] = None) -> Dict[str, Any]:
        self._require()
        sampling = self._sampling(temperature, top_k, top_p, repetition_penalty)
        return modes.format_sample(self, caption, lyrics, user_metadata, sampling, self._seed(seed),
                                   use_constrained_decoding)
