"""Serving-shaped DiT + VAE section: N requests of mixed durations and captions (what the LM hands
the DiT for thinking traffic: no two alike) arriving at once, in-process on one ``AceStepHandler``
(no Ray), two ways in the same run:

- "worker" (what Serve and Ray Data run now): every request is submitted at once
  (``acestep.inference.submit_render``); they share the worker's running batch (padded, masked);
- "serial batch 1" (what such traffic got before: distinct lengths never shared a batch): one
  request at a time, each alone in every forward.

Same requests, same seeds, same handler: the figures differ by batching alone. Reported: songs/min,
seconds of DiT+VAE per song, p50/p95 latency (finish - submission), items per forward.

``python -m bench.dit_serving [--quick] [--tiny | --full]``; ``bench.gpu`` runs it as ``dit-serving``
(full size: the 2B turbo DiT and the VAE with random weights, songs of 60-180 s, mean 120 s)."""

from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch

from acestep.inference import GenerationConfig, GenerationParams, RenderJob, prepare_request, submit_render
from bench.common import standalone
from bench.e2e import build_dit_handler
from bench.serving import percentile

SECTION = "dit serving (mixed requests at once)"
TINY_SECONDS = (10, 20, 30, 47)
QUICK_TINY_SECONDS = (10, 13, 16, 20)  # still not all in one forward (max_padding 0.25)
FULL_SECONDS = (60, 90, 120, 150, 180)  # mean 120 s


def workload(count: int, seconds: Sequence[int]) -> List[RenderJob]:
    """``count`` requests: durations cycling through ``seconds``, captions of growing length."""
    jobs = []
    for i in range(count):
        caption = "a song " + " ".join(["with strings, brass and a choir"] * (i % 4))
        params = GenerationParams(caption=caption, lyrics="[verse]\nla la la" * (1 + i % 3),
                                  duration=seconds[i % len(seconds)], thinking=False)
        jobs.append(RenderJob(*prepare_request(params, GenerationConfig(batch_size=1, seeds=[i],
                                                                          use_random_seed=False))))
    return jobs


def _worker(handler, jobs: List[RenderJob]) -> List[float]:
    started = time.perf_counter()
    finished: Dict[int, float] = {}
    futures = [submit_render(handler, job) for job in jobs]
    for i, future in enumerate(futures):
        future.add_done_callback(lambda _f, i=i: finished.setdefault(i, time.perf_counter()))
    for future in futures:
        future.result()
    return [finished[i] - started for i in range(len(jobs))]


def _serial(handler, jobs: List[RenderJob]) -> List[float]:
    started, latencies = time.perf_counter(), []
    for job in jobs:
        submit_render(handler, job).result()
        latencies.append(time.perf_counter() - started)
    return latencies


MODES = {"worker": _worker, "serial batch 1": _serial}


def _forwards(handler) -> Dict[int, int]:
    return {int(k): v for k, v in handler.stats()["items_per_forward"].items()}


def row(mode: str, jobs: List[RenderJob], latencies: List[float], before: Dict[int, int],
        after: Dict[int, int]) -> Dict:
    wall = max(latencies)
    forwards = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
    items = sum(k * v for k, v in forwards.items())
    durations = [int(job.params.duration) for job in jobs]
    return {"mode": mode, "concurrent": len(jobs), "durations_s": f"{min(durations)}-{max(durations)}",
            "mean_song_s": round(sum(durations) / len(durations), 1), "wall_s": round(wall, 3),
            "songs_per_min": round(60 * len(jobs) / wall, 2), "s_per_song": round(wall / len(jobs), 4),
            "p50_latency_s": round(percentile(latencies, 0.5), 3),
            "p95_latency_s": round(percentile(latencies, 0.95), 3),
            "mean_items_per_forward": round(items / max(sum(forwards.values()), 1), 2),
            "max_items_per_forward": max(forwards, default=0)}


def bench_concurrent(bench, handler, count: int, seconds: Sequence[int]) -> None:
    jobs = workload(count, seconds)
    rows = {}
    for mode, policy in MODES.items():
        bench.check_time()
        before = _forwards(handler)
        latencies = policy(handler, jobs)
        if bench.device.type == "cuda":
            torch.cuda.synchronize(bench.device)
        rows[mode] = row(mode, jobs, latencies, before, _forwards(handler))
    worker, serial = rows["worker"], rows["serial batch 1"]
    worker["songs_per_min_vs_serial"] = round(worker["songs_per_min"] / serial["songs_per_min"], 2)
    worker["p95_vs_serial"] = round(worker["p95_latency_s"] / serial["p95_latency_s"], 2)
    for values in rows.values():
        bench.add(SECTION, values)


def run(bench, dtype: torch.dtype, quick: bool = False) -> None:
    handler = build_dit_handler(bench.tiny, bench.device, dtype)
    seconds = (QUICK_TINY_SECONDS if quick else TINY_SECONDS) if bench.tiny else FULL_SECONDS
    submit_render(handler, workload(1, seconds)[0]).result()  # warm-up: first kernels are not measured
    counts = (4,) if quick else ((8, 16) if bench.tiny else (8, 32))
    for count in counts:
        bench_concurrent(bench, handler, count, seconds)
        bench.save()
    handler.loop.close()


def main(argv: List[str] | None = None) -> int:
    return standalone(argv, "python -m bench.dit_serving", __doc__.split("\n\n")[0], "bench/results/dit-serving.json", run)


if __name__ == "__main__":
    raise SystemExit(main())
