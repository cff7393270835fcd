"""The transformers backend (default; CPU and CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch

from acestep.lm.engine import LMRequest, PtRunner
from acestep.lm.vocab import build_token_tables


def load_causal_lm(model_dir: Path, device: str, dtype: torch.dtype):
    """Stock transformers Qwen3 classes only: never trust_remote_code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    return model.to(device).eval()


class PtBackend:
    name = "pt"

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, tokenizer, max_duration: int):
        self._setup(load_causal_lm(model_dir, device, dtype), tokenizer, max_duration)

    @classmethod
    def from_model(cls, model, tokenizer, max_duration: int) -> "PtBackend":
        """Wrap an already-built causal LM (benchmarks build full-size random models in memory)."""
        backend = cls.__new__(cls)
        backend._setup(model.eval(), tokenizer, max_duration)
        return backend

    def _setup(self, model, tokenizer, max_duration: int) -> None:
        self.model = model
        tables = build_token_tables(tokenizer, int(self.model.config.vocab_size), max_duration)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tables.eos_id
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.runner = PtRunner(self.model, tables, encode, pad_id)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def generate(self, requests: Sequence[LMRequest]) -> List[List[int]]:
        return self.runner.generate(requests)

    def close(self) -> None:
        self.model = None
        self.runner = None
