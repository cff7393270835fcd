"""``python -m bench.gpu [--tiny] [--out FILE.json] [--budget-s N] [--sections dit,vae,...]``

Every model built from its real config with random weights on the device; each figure is printed
beside its off-the-shelf baseline measured in the same run, so ratios are comparable. Results are
written after every section (JSON + a markdown table beside it), so a deadline still leaves numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from bench import models
from acestep.dit.attention import use_band_attention, use_dense_attention
from acestep.dit import vae as vae_ops


class Deadline(Exception):
    pass


class Bench:
    """Collects rows per section and rewrites the output files after each section."""

    def __init__(self, out: Path, budget_s: float, device: torch.device, tiny: bool):
        self.out, self.device, self.tiny = out, device, tiny
        self.deadline = time.monotonic() + budget_s
        self.results: Dict = {"device": _device_name(device), "date": datetime.date.today().isoformat(),
                              "commit": _commit(), "tiny": tiny, "sections": {}}

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise Deadline()

    def add(self, section: str, row: Dict) -> None:
        self.results["sections"].setdefault(section, []).append(row)
        print(f"[{section}] " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2))
        self.out.with_suffix(".md").write_text(to_markdown(self.results))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def to_markdown(results: Dict) -> str:
    lines = [f"device: {results['device']} · date: {results['date']} · commit: {results['commit']}"
             + (" · TINY models" if results["tiny"] else ""), ""]
    for section, rows in results["sections"].items():
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"### {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def grid(tiny: bool):
    return [(10, 1), (20, 2)] if tiny else [(30, 1), (120, 1), (240, 1), (30, 8), (120, 8), (240, 8)]


@torch.no_grad()
def bench_dit(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    modules = models.build_dit(bench.tiny, bench.device, dtype)
    transformer = modules["transformer"]
    channels = transformer.config.audio_acoustic_hidden_dim
    encoder_width = transformer.config.hidden_size
    for seconds, batch in grid(bench.tiny):
        bench.check_time()
        frames = seconds * 25
        inputs = dict(hidden_states=torch.randn(batch, frames, channels, device=bench.device, dtype=dtype),
                      timestep=torch.full((batch,), 0.5, device=bench.device, dtype=dtype),
                      timestep_r=torch.full((batch,), 0.5, device=bench.device, dtype=dtype),
                      encoder_hidden_states=torch.randn(batch, 200, encoder_width, device=bench.device, dtype=dtype),
                      context_latents=torch.randn(batch, frames, 2 * channels, device=bench.device, dtype=dtype),
                      return_dict=False)
        use_dense_attention(transformer)
        baseline = median_ms(lambda: transformer(**inputs), bench.device, iters)
        use_band_attention(transformer)
        ours = median_ms(lambda: transformer(**inputs), bench.device, iters, warmup=2)
        bench.add("dit ms/forward", {"song_s": seconds, "batch": batch, "diffusers_dense_ms": baseline,
                                     "ours_band_ms": ours, "speedup": round(baseline / ours, 2)})
    use_dense_attention(transformer)


@torch.no_grad()
def bench_vae(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    vae = models.build_vae(bench.tiny, bench.device, dtype)
    channels = vae.config.decoder_input_channels
    for seconds in ([10, 20] if bench.tiny else [30, 120, 240]):
        bench.check_time()
        latents = torch.randn(1, seconds * 25, channels, device=bench.device, dtype=dtype)
        baseline = median_ms(lambda: vae_ops.decode(vae, latents, window=512), bench.device, iters)
        if bench.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bench.device)
        start_mem = torch.cuda.memory_allocated(bench.device) if bench.device.type == "cuda" else 0
        ours = median_ms(lambda: vae_ops.decode(vae, latents), bench.device, iters)
        peak = (torch.cuda.max_memory_allocated(bench.device) - start_mem) / 2**30 if bench.device.type == "cuda" else 0
        bench.add("vae decode", {"song_s": seconds, "tiled_512_ms": baseline, "ours_ms": ours,
                                 "ours_window": vae_ops.decode_window(bench.device, seconds * 25),
                                 "ours_peak_gib": round(peak, 2), "speedup": round(baseline / ours, 2)})


@torch.no_grad()
def bench_encoders(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    bench.check_time()
    text_encoder = models.build_text_encoder(bench.tiny, bench.device, dtype)
    ids = torch.randint(0, 1000, (1, 256), device=bench.device)
    text_ms = median_ms(lambda: text_encoder(input_ids=ids), bench.device, iters)
    modules = models.build_dit(bench.tiny, bench.device, dtype)
    encoder = modules["condition_encoder"]
    width = encoder.config.text_hidden_dim
    timbre = encoder.config.timbre_hidden_dim
    args = dict(text_hidden_states=torch.randn(1, 256, width, device=bench.device, dtype=dtype),
                text_attention_mask=torch.ones(1, 256, dtype=torch.bool, device=bench.device),
                lyric_hidden_states=torch.randn(1, 400, width, device=bench.device, dtype=dtype),
                lyric_attention_mask=torch.ones(1, 400, dtype=torch.bool, device=bench.device),
                refer_audio_acoustic_hidden_states_packed=torch.randn(1, 750, timbre, device=bench.device, dtype=dtype),
                refer_audio_order_mask=torch.zeros(1, dtype=torch.long, device=bench.device))
    cond_ms = median_ms(lambda: encoder(**args), bench.device, iters)
    bench.add("encoders", {"text_encoder_256_tokens_ms": text_ms, "condition_encoder_ms": cond_ms})


def bench_lm(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    from bench.lm import run

    run(bench, dtype, repeats=iters)


def bench_lm_serving(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    from bench.serving import run

    run(bench, dtype, quick=bench.tiny)


def bench_dit_serving(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    from bench.dit_serving import run

    run(bench, dtype, quick=bench.tiny)


def bench_adapters(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    from bench.adapters import run

    run(bench, dtype, quick=bench.tiny)


def bench_e2e(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    from bench.e2e import run

    run(bench, dtype)


SECTIONS = {"dit": bench_dit, "vae": bench_vae, "encoders": bench_encoders, "lm": bench_lm,
            "e2e": bench_e2e, "dit-serving": bench_dit_serving, "lm-serving": bench_lm_serving,
            "adapters": bench_adapters}
# The most a section may take at full size (seconds) before the watchdog moves on to the next; a
# section also never runs past the global budget. Sized so that all of them fit one device call.
SECTION_CAPS_S = {"dit": 90, "vae": 45, "encoders": 20, "lm": 120, "e2e": 90, "dit-serving": 90,
                  "lm-serving": 90, "adapters": 45}


@contextlib.contextmanager
def watchdog(seconds: float):
    """Raise ``Deadline`` in the main thread once ``seconds`` have passed (SIGALRM): a section stuck
    in Python (a compile, a long loop) gives up its remaining time. A hang inside one native call
    is the outer ``timeout``'s to end (scripts/gpu-check.sh)."""
    if seconds <= 0:
        raise Deadline()

    def expire(signum, frame):
        raise Deadline()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_sections(bench: Bench, names: List[str], dtype: torch.dtype, iters: int, section_scale: float) -> None:
    """Each section under its own watchdog (its cap × ``section_scale``, at most what the global
    budget has left); a section that runs out is recorded in ``skipped`` and the next one starts.
    Results are saved after every section."""
    for name in names:
        left = bench.deadline - time.monotonic()
        try:
            with watchdog(min(SECTION_CAPS_S[name] * section_scale, left)):
                SECTIONS[name](bench, dtype, iters)
        except Deadline:
            reason = "deadline" if left <= SECTION_CAPS_S[name] * section_scale else "section cap"
            bench.results.setdefault("skipped", []).append(f"{name}: {reason}")
        bench.save()


def standalone(argv, prog: str, description: str, out: str, run) -> int:
    """The command line of a serving section run on its own: ``run(bench, dtype, quick=...)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests (a smoke run)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="tiny", action="store_true", default=None, help="demo models (default on CPU)")
    size.add_argument("--full", dest="tiny", action="store_false", help="full-size configs (default on CUDA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=out)
    parser.add_argument("--budget-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tiny = device.type != "cuda" if args.tiny is None else args.tiny
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = Bench(Path(args.out), args.budget_s, device, tiny)
    run(bench, dtype, quick=args.quick)
    bench.save()
    print(to_markdown(bench.results))
    return 0


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke run)")
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--budget-s", type=float, default=480.0, help="global deadline for all sections")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--section-scale", type=float, default=None,
                        help="multiplies every section's cap (SECTION_CAPS_S); default 1 at full size, no caps with --tiny")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections.split(",") if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = Bench(Path(args.out), args.budget_s, device, args.tiny)
    scale = args.section_scale if args.section_scale is not None else (float("inf") if args.tiny else 1.0)
    run_sections(bench, args.sections.split(","), dtype, args.iters, scale)
    print(to_markdown(bench.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
