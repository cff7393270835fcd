"""Serving-shaped LM section: text2music planning (CoT + codes, CFG 2.0, batch_size 1) for requests
that arrive over time, in-process on one ``LLMHandler`` (no Ray), under two scheduling policies:

- "engine service" (what Serve runs now): each request calls ``LLMHandler.plan`` on its own thread
  at its arrival time; its engine requests join the running batch between decode steps;
- "waves" (the previous serving behaviour, emulated here only): the requests that arrived while a
  wave ran form the next wave (at most 8); a wave submits all its CoT requests and waits for all,
  then all its codes requests and waits for all; the next wave starts when it has finished.

Both policies drive the same engine with the same requests (same prompts, same seeds), so the
figures differ by scheduling alone. Two workloads: mixed durations arriving over a few seconds
(p50/p95 latency = finish - arrival, songs/min), and a short song arriving just after a long one
(the short one's latency over its solo latency).

``python -m bench.serving [--quick] [--tiny | --full]``; ``bench.gpu`` runs it as ``lm-serving``."""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from acestep.lm import planner
from acestep.lm.parsing import count_codes, parse_lm_output
from acestep.params import GenerationConfig, GenerationParams
from bench.common import standalone
from bench.lm import CAPTION, lm_handler, model_label, song_params

MIXED_SECTION = "lm serving (mixed arrivals)"
SHORT_SECTION = "lm serving (short behind long)"
WAVE_MAX = 8  # the previous serving's most requests per LM batch
WORKLOAD_SEED = 20261202
LEAD_S = 0.05  # lets every request thread start before the first arrival


@dataclass(frozen=True)
class Arrival:
    index: int  # also the request's seed
    seconds: int
    offset_s: float  # arrival time after the run's start


@dataclass(frozen=True)
class Outcome:
    arrival: Arrival
    latency_s: float  # finish - arrival
    finished_s: float  # finish - the run's start
    codes: int

    @property
    def complete(self) -> bool:
        return self.codes == self.arrival.seconds * 5


def mixed_workload(quick: bool) -> List[Arrival]:
    """Durations evenly spread over the range in a seeded shuffled order, seeded arrival offsets."""
    count, shortest, longest, spread_s = (4, 10, 20, 0.5) if quick else (16, 10, 240, 4.0)
    rng = random.Random(WORKLOAD_SEED)
    durations = [round(shortest + (longest - shortest) * i / (count - 1)) for i in range(count)]
    rng.shuffle(durations)
    offsets = sorted(round(rng.uniform(0.0, spread_s), 3) for _ in range(count))
    offsets[0] = 0.0  # the clock starts with the first arrival
    return [Arrival(i, seconds, offset) for i, (seconds, offset) in enumerate(zip(durations, offsets))]


def _params(arrival: Arrival) -> GenerationParams:
    lyrics = f"[Verse]\nsong {arrival.index} under the neon sky\n[Chorus]\nwe keep on running"
    return song_params(f"{CAPTION}, take {arrival.index}", lyrics, arrival.seconds)


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# -- the two policies ----------------------------------------------------------------------------
def engine_service(handler, arrivals: Sequence[Arrival]) -> List[Outcome]:
    """One thread per request calling ``LLMHandler.plan`` at its arrival time."""
    origin = time.perf_counter() + LEAD_S

    def one(arrival: Arrival) -> Outcome:
        arrived = origin + arrival.offset_s
        _sleep_until(arrived)
        config = GenerationConfig(batch_size=1, seeds=[arrival.index], use_random_seed=False)
        plan = handler.plan(_params(arrival), config, [arrival.index])[0]
        done = time.perf_counter()
        return Outcome(arrival, done - arrived, done - origin, count_codes(plan.audio_codes))

    with ThreadPoolExecutor(max_workers=len(arrivals), thread_name_prefix="bench-request") as pool:
        return list(pool.map(one, arrivals))


def waves(handler, arrivals: Sequence[Arrival], max_wave: int = WAVE_MAX) -> List[Outcome]:
    """Waves of the requests that arrived meanwhile; a wave's requests all finish with it."""
    origin = time.perf_counter()
    queue, outcomes = deque(sorted(arrivals, key=lambda a: a.offset_s)), []
    while queue:
        _sleep_until(origin + queue[0].offset_s)
        now = time.perf_counter() - origin
        wave = []
        while queue and queue[0].offset_s <= now and len(wave) < max_wave:
            wave.append(queue.popleft())
        codes = run_wave(handler, wave)
        done = time.perf_counter() - origin
        outcomes += [Outcome(a, done - a.offset_s, done, n) for a, n in zip(wave, codes)]
    return sorted(outcomes, key=lambda o: o.arrival.index)


def _results(futures) -> List[List[int]]:
    wait(futures)
    return [future.result() for future in futures]


def run_wave(handler, wave: Sequence[Arrival]) -> List[int]:
    """Phase 1 for all, then phase 2 for all, built and parsed as ``acestep.lm.planner`` does."""
    params = [_params(a) for a in wave]
    users = [planner.user_metadata_from_params(p) for p in params]
    cot = _results([handler.submit(planner.cot_request(handler, p, u, a.index))
                    for p, u, a in zip(params, users, wave)])
    metadata = []
    for ids in cot:
        parsed, _ = parse_lm_output(handler.decode(ids))
        if not parsed:
            raise RuntimeError("LM phase 1 produced no metadata")
        metadata.append(parsed)
    codes = _results([handler.submit(planner.codes_request(handler, p, m, planner.codes_target(u, m), a.index))
                      for p, u, m, a in zip(params, users, metadata, wave)])
    return [count_codes(parse_lm_output(handler.decode(ids))[1]) for ids in codes]


MODES: Dict[str, Callable] = {"engine service": engine_service, "waves": waves}


# -- figures -------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _engine_counts(handler) -> Dict[str, int]:
    stats = handler.stats()
    return {"steps": stats["steps"], "tokens": stats["tokens"]}


def mixed_row(mode: str, outcomes: List[Outcome], before: Dict[str, int], after: Dict[str, int]) -> Dict:
    latencies = [o.latency_s for o in outcomes]
    songs = sum(o.complete for o in outcomes)
    wall = max(o.finished_s for o in outcomes)
    steps = after["steps"] - before["steps"]
    return {"mode": mode, "requests": len(outcomes), "songs": songs,
            "durations_s": f"{min(o.arrival.seconds for o in outcomes)}-{max(o.arrival.seconds for o in outcomes)}",
            "arrivals_over_s": round(max(o.arrival.offset_s for o in outcomes), 2),
            "p50_latency_s": round(percentile(latencies, 0.5), 3), "p95_latency_s": round(percentile(latencies, 0.95), 3),
            "wall_s": round(wall, 3), "songs_per_min": round(60 * songs / wall, 2),
            # requests decoding together per engine step (tokens counts one per running request)
            "mean_requests_per_step": round((after["tokens"] - before["tokens"]) / steps, 2) if steps else 0}


def bench_mixed(bench, handler, quick: bool) -> None:
    arrivals = mixed_workload(quick)
    rows = {}
    for mode, policy in MODES.items():
        bench.check_time()
        before = _engine_counts(handler)
        outcomes = policy(handler, arrivals)
        rows[mode] = mixed_row(mode, outcomes, before, _engine_counts(handler))
    engine, old = rows["engine service"], rows["waves"]
    engine["p50_vs_waves"] = _ratio(engine["p50_latency_s"], old["p50_latency_s"])
    engine["p95_vs_waves"] = _ratio(engine["p95_latency_s"], old["p95_latency_s"])
    engine["songs_per_min_vs_waves"] = _ratio(engine["songs_per_min"], old["songs_per_min"])
    for row in rows.values():
        bench.add(MIXED_SECTION, {"model": model_label(bench.tiny), **row})
    print(f"  engine service / waves: p50 latency x{engine['p50_vs_waves']}, p95 latency x{engine['p95_vs_waves']}, "
          f"songs/min x{engine['songs_per_min_vs_waves']}", flush=True)


def bench_short_behind_long(bench, handler, quick: bool) -> None:
    long_s, short_s, gap_s, solo_runs = (30, 10, 0.5, 1) if quick else (240, 10, 1.0, 3)
    short_alone = Arrival(1, short_s, 0.0)
    pair = [Arrival(0, long_s, 0.0), Arrival(1, short_s, gap_s)]
    for mode, policy in MODES.items():
        bench.check_time()
        solo = statistics.median(policy(handler, [short_alone])[0].latency_s for _ in range(solo_runs))
        outcomes = {o.arrival.index: o for o in policy(handler, pair)}
        short, long = outcomes[1], outcomes[0]
        bench.add(SHORT_SECTION, {"model": model_label(bench.tiny), "mode": mode, "long_s": long_s,
                                  "short_s": short_s, "short_arrives_after_s": gap_s,
                                  "songs": int(short.complete) + int(long.complete),
                                  "short_solo_latency_s": round(solo, 3), "short_latency_s": round(short.latency_s, 3),
                                  "short_slowdown_vs_solo": _ratio(short.latency_s, solo),
                                  "long_latency_s": round(long.latency_s, 3)})


def _ratio(numerator: float, denominator: float):
    return round(numerator / denominator, 2) if denominator > 0 else None


def run(bench, dtype: torch.dtype, quick: bool = False) -> None:
    handler = lm_handler(bench.tiny, bench.device, dtype)
    try:
        warm = Arrival(99, 10, 0.0)  # first steps, kernels and graphs are paid for here, not measured
        engine_service(handler, [warm])
        waves(handler, [warm])
        bench_mixed(bench, handler, quick)
        bench.save()
        bench_short_behind_long(bench, handler, quick)
    finally:
        handler.unload()


def main(argv: List[str] | None = None) -> int:
    return standalone(argv, "python -m bench.serving", __doc__.split("\n\n")[0], "bench/results/serving.json", run)


if __name__ == "__main__":
    raise SystemExit(main())
