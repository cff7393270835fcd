"""DiT adapters: what switching costs and what a mixed stream of adapters does to throughput,
in-process on one ``AceStepHandler`` (no Ray), in one run:

- "load": reading + converting an official-layout LoRA and injecting it (``load_lora``);
- "first request after load" vs "warm request" with the same adapter, and a request without one;
- one stream of N requests at once, all naming one adapter, then the same N spread over 4
  adapters (requests with different adapters never share a forward, so the mixed stream runs
  more, smaller forwards).

``python -m bench.adapters [--quick] [--tiny | --full]`` (full size: the 2B turbo DiT with random
weights and rank-32 adapters on every attention projection, 60 s songs)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import List

import torch

from acestep.checkpoints.demo import real_config
from acestep.checkpoints.demo_lora import write_demo_lora
from acestep.dit.prepare import sampling_settings
from acestep.params import GenerationParams
from bench.common import standalone
from bench.e2e import build_dit_handler

SECTION = "dit adapters (switch cost, mixed stream)"


def _submit(handler, name, seed: int, seconds: float, steps: int = 8):
    params = GenerationParams(caption="a song with strings", duration=seconds, thinking=False, inference_steps=steps)
    settings = replace(sampling_settings(params), adapters=((name, 1.0),) if name else ())
    return handler.submit([params], [seed], settings)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _stream(handler, names: List[str], count: int, seconds: float) -> float:
    """Wall seconds for ``count`` requests submitted at once, adapters cycling through ``names``."""
    started = time.perf_counter()
    futures = [_submit(handler, names[i % len(names)], i, seconds) for i in range(count)]
    for future in futures:
        future.result()
    return time.perf_counter() - started


def run(bench, dtype: torch.dtype, quick: bool = False) -> None:
    handler = build_dit_handler(bench.tiny, bench.device, dtype)
    seconds, rank = (10.0, 4) if bench.tiny else (60.0, 32)
    config = None if bench.tiny else real_config("acestep-v15-turbo")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_demo_lora(Path(tmp) / f"a{i}", rank=rank, alpha=2 * rank, seed=i, config=config)
                 for i in range(4)]
        _submit(handler, None, 0, seconds).result()  # warm-up: first kernels are not measured
        load_s = _timed(lambda: handler.load_lora(str(paths[0]), "a0", activate=False))
        first_s = _timed(lambda: _submit(handler, "a0", 1, seconds).result())
        warm_s = _timed(lambda: _submit(handler, "a0", 2, seconds).result())
        plain_s = _timed(lambda: _submit(handler, None, 3, seconds).result())
        bench.add(SECTION, {"measure": "switch", "load_s": round(load_s, 4), "first_request_s": round(first_s, 4),
                            "warm_request_s": round(warm_s, 4), "no_adapter_request_s": round(plain_s, 4),
                            "first_vs_warm": round(first_s / warm_s, 3), "adapter_vs_none": round(warm_s / plain_s, 3)})
        for i, path in enumerate(paths[1:], start=1):
            handler.load_lora(str(path), f"a{i}", activate=False)
        bench.check_time()
        count = 4 if quick else 8
        one = _stream(handler, ["a0"], count, seconds)
        four = _stream(handler, ["a0", "a1", "a2", "a3"], count, seconds)
        bench.add(SECTION, {"measure": "mixed stream", "requests": count, "song_s": seconds,
                            "one_adapter_songs_per_min": round(60 * count / one, 2),
                            "four_adapters_songs_per_min": round(60 * count / four, 2),
                            "four_vs_one": round(one / four, 3),
                            "forwards_by_adapters": handler.stats()["forwards_by_adapters"]})
    handler.loop.close()


def main(argv: List[str] | None = None) -> int:
    return standalone(argv, "python -m bench.adapters", __doc__.split("\n\n")[0], "bench/results/adapters.json", run)


if __name__ == "__main__":
    raise SystemExit(main())
