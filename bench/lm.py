"""LM decode section of bench.gpu: ms per step of our engines (the fast path, and the plain pt
runner) at 2/16/32 rows (CFG pairs) on a 600-token prompt, beside transformers ``generate``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from acestep.checkpoints.bundle import load_tokenizer
from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME, write_demo_lm
from acestep.lm.engine import LMRequest
from acestep.lm.fsm import FsmSpec
from acestep.lm.sampling import SamplingConfig
from acestep.llm_inference import LLMHandler
from bench import models

LM_NAME = "acestep-5Hz-lm-1.7B"


def lm_handler(tiny: bool, device: torch.device, dtype: torch.dtype) -> LLMHandler:
    """Tiny: the demo LM folder. Full: a random 1.7B from the real config + the demo tokenizer."""
    root = Path(tempfile.mkdtemp(prefix="acestep-bench-lm-"))
    write_demo_lm(root / DEMO_LM_DIRNAME)
    handler = LLMHandler()
    if tiny:
        handler.initialize(str(root), DEMO_LM_DIRNAME, device=str(device), dtype=dtype, fast_path=False)
    else:
        handler.attach_model(models.build_lm(LM_NAME, False, device, dtype), load_tokenizer(root / DEMO_LM_DIRNAME),
                             fast_path=False)
    return handler


def _requests(pairs: int, prompt_len: int, codes: int):
    prompt = [100 + (i * 7) % 400 for i in range(prompt_len)]
    return [LMRequest(prompt_ids=prompt, uncond_ids=prompt[: prompt_len // 2], seed=i, max_new_tokens=codes + 1,
                      sampling=SamplingConfig(temperature=0.85, cfg_scale=2.0, top_p=0.9),
                      fsm=FsmSpec(phase="codes", target_codes=codes)) for i in range(pairs)]


def ms_per_step(bench, generate, pairs: int, prompt_len: int, codes: int) -> float:
    from bench.gpu import median_ms

    short = median_ms(lambda: generate(_requests(pairs, prompt_len, 1)), bench.device, 2)
    full = median_ms(lambda: generate(_requests(pairs, prompt_len, codes)), bench.device, 2)
    return round((full - short) / (codes - 1), 3)


def run(bench, dtype: torch.dtype) -> None:
    from acestep.lm.fast.engine import FastEngine

    handler = lm_handler(bench.tiny, bench.device, dtype)
    runner = handler.llm.runner
    prompt_len, codes = (32, 16) if bench.tiny else (600, 64)
    rows_list = [2, 4] if bench.tiny else [2, 16, 32]
    engine = FastEngine(runner.model, runner.tables, runner.encode, runner.pad_id, max_rows=max(rows_list),
                        max_len=prompt_len + codes + 8)
    if bench.device.type == "cuda":
        engine.capture_cuda_graphs()
    for rows in rows_list:
        bench.check_time()
        fast = ms_per_step(bench, engine.generate, rows // 2, prompt_len, codes)
        plain = ms_per_step(bench, runner.generate, rows // 2, prompt_len, codes)
        bench.add("lm decode (our engines)", {"model": LM_NAME + (" (demo)" if bench.tiny else ""), "rows": rows,
                                              "fast_path_ms_per_step": fast, "plain_pt_ms_per_step": plain,
                                              "speedup": round(plain / fast, 2)})
