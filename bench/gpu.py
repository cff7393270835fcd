"""``python -m bench.gpu [--tiny] [--out FILE.json] [--budget-s N] [--sections dit,vae,...]``

Every model built from its real config with random weights on the device; each figure is printed
beside its off-the-shelf baseline measured in the same run, so ratios are comparable. Results are
written after every section (JSON + a markdown table beside it), so a deadline still leaves numbers.
This module only gathers the sections (each lives in its own module) and runs them under watchdogs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from bench import adapters, dit_serving, e2e, forwards, lm, memory, quantization, serving, stems
from bench.common import Bench, Deadline, to_markdown, watchdog

__all__ = ["Bench", "SECTIONS", "SECTION_CAPS_S", "main", "run_sections"]

Section = Callable[[Bench, torch.dtype, int], None]  # (bench, dtype, iters)


def _lm(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    lm.run(bench, dtype, repeats=iters)


def _e2e(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    e2e.run(bench, dtype)


def _quick_when_tiny(run) -> Section:
    """A serving section, which repeats whole workloads instead of ``iters``: its quick workload
    at tiny size."""
    def section(bench: Bench, dtype: torch.dtype, iters: int) -> None:
        run(bench, dtype, quick=bench.tiny)

    return section


SECTIONS: Dict[str, Section] = {
    "dit": forwards.bench_dit, "vae": forwards.bench_vae, "encoders": forwards.bench_encoders, "lm": _lm,
    "memory": memory.bench_memory, "e2e": _e2e, "dit-serving": _quick_when_tiny(dit_serving.run),
    "lm-serving": _quick_when_tiny(serving.run),
    "adapters": _quick_when_tiny(adapters.run), "samplers": forwards.bench_samplers,
    "quantization": _quick_when_tiny(quantization.run), "stems": _quick_when_tiny(stems.run)}
# The most a section may take at full size (seconds) before the watchdog moves on to the next; a
# section also never runs past the global budget. Sized so that all of them fit one device call.
SECTION_CAPS_S = {"dit": 90, "vae": 45, "encoders": 20, "lm": 120, "memory": 150, "e2e": 90, "dit-serving": 90,
                  "lm-serving": 90, "adapters": 45, "samplers": 20, "quantization": 90, "stems": 90}


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
