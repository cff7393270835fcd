"""End-to-end sections of bench.gpu: ``generate_music`` for one song with thinking, and songs per
minute at N concurrent requests through what the Serve deployments run (``plan_music_batch``: one
planner thread per request on the one LM engine, then ``render_music_batch``), in-process (no Ray
on the GPU machine)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from acestep.checkpoints.bundle import DiTBundle, load_tokenizer
from acestep.checkpoints.demo import write_demo_checkpoints
from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.dit.attention import use_band_attention
from acestep.handler import AceStepHandler
from acestep.inference import (
    GenerationConfig,
    GenerationParams,
    RenderJob,
    generate_music,
    plan_music_batch,
    prepare_request,
    render_music_batch,
)
from acestep.llm_inference import LLMHandler
from bench import models, scratch_dir

LM_NAME = "acestep-5Hz-lm-1.7B"


def build_handlers(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The DiT handler (``build_dit_handler``) and an LM handler: the demo LM (tiny) or a random
    full-size 1.7B model with the demo tokenizer (same special tokens as the real one)."""
    root = demo_root()
    dit, llm = build_dit_handler(tiny, device, dtype, root), LLMHandler()
    if tiny:
        llm.initialize(str(root), DEMO_LM_DIRNAME, backend="pt", device=str(device), dtype=dtype)
    else:
        llm.attach_model(models.build_lm(LM_NAME, False, device, dtype), load_tokenizer(root / DEMO_LM_DIRNAME))
    return dit, llm


def demo_root() -> Path:
    root = scratch_dir("acestep-bench-")
    write_demo_checkpoints(root)
    return root


def build_dit_handler(tiny: bool, device: torch.device, dtype: torch.dtype,
                      root: Optional[Path] = None) -> AceStepHandler:
    """Tiny: the demo checkpoints (under ``root``, else written now) through the real loaders.
    Full: random full-size DiT, VAE and text encoder from the real configs in memory, with the
    demo text tokenizer."""
    root = root or demo_root()
    if tiny:
        dit = AceStepHandler()
        dit.initialize_service(str(root), "acestep-v15-turbo", device=str(device), dtype=dtype)
        return dit
    checkpoint = resolve_dit_checkpoint(root, "acestep-v15-turbo")
    bundle = DiTBundle(vae=models.build_vae(False, device, dtype),
                       text_encoder=models.build_text_encoder(False, device, dtype),
                       tokenizer=load_tokenizer(checkpoint.tokenizer_dir), checkpoint=checkpoint,
                       **models.build_dit(False, device, dtype))
    if device.type == "cuda":
        use_band_attention(bundle.transformer)
    return AceStepHandler.from_bundle(bundle)


def _song(seconds: int, index: int = 0) -> GenerationParams:
    return GenerationParams(caption=f"energetic synth pop song number {index}", lyrics="[Verse]\nla la la",
                            duration=seconds, thinking=True, lm_cfg_scale=2.0, shift=3.0)


def bench_end_to_end(bench, dit, llm, seconds: int) -> None:
    bench.check_time()
    config = GenerationConfig(batch_size=1, seeds=[1], use_random_seed=False)
    started = time.perf_counter()
    result = generate_music(dit, llm, _song(seconds), config)
    wall = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(result.error)
    costs = {k: round(v, 3) for k, v in result.extra_outputs["time_costs"].items()}
    bench.add("generate_music end to end", {"song_s": seconds, "batch": 1, "wall_s": round(wall, 3), **costs})


def bench_throughput(bench, dit, llm, seconds: int, concurrent: int) -> None:
    bench.check_time()
    jobs = []
    for i in range(concurrent):
        params, config, seeds = prepare_request(_song(seconds, i), GenerationConfig(batch_size=1, seeds=[i],
                                                                                    use_random_seed=False))
        jobs.append(RenderJob(params, config, seeds))
    started = time.perf_counter()
    outcomes = plan_music_batch(llm, jobs)
    planned = time.perf_counter()
    for job, outcome in zip(jobs, outcomes):
        if isinstance(outcome, Exception):
            raise outcome
        job.params, job.plans, job.lm_time_costs = outcome.params, outcome.plans, outcome.time_costs
    results = render_music_batch(dit, jobs)
    done = time.perf_counter()
    songs = sum(len(r.audios) for r in results if r.success)
    bench.add("throughput (in-process batching engines)", {
        "song_s": seconds, "concurrent": concurrent, "songs": songs, "lm_s": round(planned - started, 3),
        "dit_s": round(done - planned, 3), "songs_per_min": round(60 * songs / (done - started), 2),
        # a peak over the engine's life; the concurrent planning here is its largest batch
        "lm_peak_rows_in_use": llm.stats()["peak_rows_in_use"]})


def run(bench, dtype: torch.dtype) -> None:
    dit, llm = build_handlers(bench.tiny, bench.device, dtype)
    seconds = 10 if bench.tiny else 120
    bench_end_to_end(bench, dit, llm, seconds)
    bench.save()
    bench_throughput(bench, dit, llm, seconds, 4 if bench.tiny else 32)
