"""LM decode section of bench.gpu: ms per decode step of the codes phase on one model and one real
planner prompt (``planner.codes_request``), measured three ways in the same run:

- transformers ``generate`` with its own classifier-free guidance (``guidance_scale=2.0``, the
  unconditional prompt as ``negative_prompt_ids``) and a codes-only logits processor: the
  off-the-shelf baseline doing the same work;
- our ``LMEngine`` (static KV cache, CUDA graphs on GPU), driven directly;
- the plain transformers path (``PtRunner``, DynamicCache), the engine's test oracle.

All three sample with temperature 0.85 and top-p 0.9 under CFG 2.0 and emit audio codes only.
ms/step = (t(N tokens) - t(1 token)) / (N - 1), so the prefill cancels out; each t is a median."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import List, Optional

import torch

from acestep.checkpoints.bundle import load_tokenizer
from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME, write_demo_lm
from acestep.lm import planner
from acestep.lm.engine import ENGINE_DEFAULTS, EngineSettings
from acestep.lm.fsm import FsmSpec
from acestep.lm.request import LMRequest
from acestep.llm_inference import LLMHandler
from acestep.params import GenerationParams
from bench import models, scratch_dir
from bench.common import median_ms

LM_NAME = "acestep-5Hz-lm-1.7B"
TINY_LABEL = "demo LM (random, vocab 66,108)"
FULL_LABEL = f"{LM_NAME} config, random weights"
SECTION = "lm decode (codes phase, CFG 2.0)"
CFG_SCALE, TEMPERATURE, TOP_P = 2.0, 0.85, 0.9
REPEATS = 5  # timed runs per figure (their median) unless --iters says otherwise
CAPTION = "energetic synth pop with driving drums and bright leads"
METADATA = {"bpm": 120, "keyscale": "C major", "timesignature": "4", "duration": 30, "language": "en"}


@functools.lru_cache(maxsize=1)
def demo_lm_root() -> Path:
    """A checkpoints root holding the demo LM folder (written once per process)."""
    root = scratch_dir("acestep-bench-lm-")
    write_demo_lm(root / DEMO_LM_DIRNAME)
    return root


def lm_handler(tiny: bool, device: torch.device, dtype: torch.dtype,
               engine: EngineSettings = ENGINE_DEFAULTS, quantization: Optional[str] = None) -> LLMHandler:
    """Tiny: the demo LM through the real loader. Full: a random 1.7B from the real config with the
    demo tokenizer (same special tokens as the real one); the same weights for every call (seeded)."""
    root = demo_lm_root()
    handler = LLMHandler()
    if tiny:
        handler.initialize(str(root), DEMO_LM_DIRNAME, device=str(device), dtype=dtype, engine=engine,
                           quantization=quantization)
    else:
        torch.manual_seed(0)
        handler.attach_model(models.build_lm(LM_NAME, False, device, dtype), load_tokenizer(root / DEMO_LM_DIRNAME),
                             engine=engine, quantization=quantization)
    return handler


def model_label(tiny: bool) -> str:
    return TINY_LABEL if tiny else FULL_LABEL


def song_params(caption: str, lyrics: str, seconds: float) -> GenerationParams:
    """Text2music with thinking and the sampling every figure here uses."""
    return GenerationParams(caption=caption, lyrics=lyrics, duration=seconds, thinking=True,
                            lm_cfg_scale=CFG_SCALE, lm_temperature=TEMPERATURE, lm_top_p=TOP_P, lm_top_k=0)


def codes_phase_request(handler: LLMHandler, min_prompt_tokens: int = 0) -> LMRequest:
    """A planner codes-phase request; lyrics grow until the conditional prompt has enough tokens."""
    lines = ["[Verse]", "neon lights over the quiet city"]
    while True:
        params = song_params(CAPTION, "\n".join(lines), METADATA["duration"])
        request = planner.codes_request(handler, params, dict(METADATA), float(METADATA["duration"]), seed=0)
        if len(request.prompt_ids) >= min_prompt_tokens:
            return request
        lines += [f"line {len(lines)} of the verse keeps the night awake", "we run until the morning comes"]


def with_codes(base: LMRequest, pairs: int, codes: int) -> List[LMRequest]:
    """``pairs`` CFG requests on ``base``'s prompts emitting exactly ``codes`` codes (then EOS)."""
    return [dataclasses.replace(base, seed=i, fsm=FsmSpec(phase="codes", target_codes=codes),
                                max_new_tokens=codes + 1) for i in range(pairs)]


class CodesOnly:
    """LogitsProcessor for ``generate``: every token but the audio codes is masked out."""

    def __init__(self, code_ids: torch.Tensor, vocab: int, device: torch.device):
        self.banned = torch.ones(vocab, dtype=torch.bool, device=device)
        self.banned[code_ids.to(device)] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.banned, float("-inf"))


def generate_cfg(model, base: LMRequest, pairs: int, tokens: int, codes_only: CodesOnly, pad_id: int):
    """transformers ``generate`` with its own CFG on ``pairs`` copies of the prompt."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids = torch.tensor([base.prompt_ids] * pairs, device=device)
    negative = torch.tensor([base.uncond_ids] * pairs, device=device)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), negative_prompt_ids=negative,
                          negative_prompt_attention_mask=torch.ones_like(negative), guidance_scale=CFG_SCALE,
                          do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=tokens,
                          min_new_tokens=tokens, logits_processor=LogitsProcessorList([codes_only]),
                          pad_token_id=pad_id)


def ms_per_step(device: torch.device, run, tokens: int, repeats: int = REPEATS) -> float:
    """(median t(tokens) - median t(1)) / (tokens - 1); ``run(n)`` generates n tokens per row."""
    one = median_ms(lambda: run(1), device, repeats)
    full = median_ms(lambda: run(tokens), device, repeats)
    return round((full - one) / (tokens - 1), 3)


@torch.no_grad()
def run(bench, dtype: torch.dtype, repeats: int = REPEATS) -> None:
    rows_list = [2, 8] if bench.tiny else [2, 16, 32]
    tokens = 24 if bench.tiny else 64
    handler = lm_handler(bench.tiny, bench.device, dtype, EngineSettings(max_rows=max(rows_list)))
    try:
        backend = handler.llm
        base = codes_phase_request(handler, 0 if bench.tiny else 600)
        codes_only = CodesOnly(backend.tables.code_ids, backend.vocab_size, bench.device)
        engine, plain = backend.engine, backend.plain_runner()
        if bench.device.type == "cuda":
            engine.capture_cuda_graphs()
        for rows in rows_list:
            bench.check_time()
            pairs = rows // 2
            # n codes then EOS: n + 1 tokens, so t(N) - t(1) is N - 1 decode steps, as for generate
            ours = ms_per_step(bench.device, lambda n: engine.generate(with_codes(base, pairs, n)), tokens, repeats)
            reference = ms_per_step(bench.device, lambda n: plain.generate(with_codes(base, pairs, n)), tokens,
                                    repeats)
            baseline = ms_per_step(bench.device, lambda n: generate_cfg(backend.model, base, pairs, n, codes_only,
                                                                       backend.pad_id), tokens, repeats)
            bench.add(SECTION, {"model": model_label(bench.tiny), "rows": rows, "cfg_pairs": pairs,
                                "prompt_tokens": len(base.prompt_ids), "uncond_tokens": len(base.uncond_ids),
                                "new_tokens": tokens, "generate_cfg_ms_per_step": baseline,
                                "engine_ms_per_step": ours, "plain_pt_ms_per_step": reference,
                                "speedup_vs_generate": _ratio(baseline, ours),
                                "speedup_vs_plain": _ratio(reference, ours)})
            print(f"  rows {rows}: engine is {_ratio(baseline, ours)}x transformers generate (CFG), "
                  f"{_ratio(reference, ours)}x the plain pt path", flush=True)
    finally:
        handler.unload()


def _ratio(numerator: float, denominator: float):
    return round(numerator / denominator, 2) if denominator > 0 else None
