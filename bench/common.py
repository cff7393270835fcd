"""What every benchmark shares: the result collector (``Bench``), timing helpers, the markdown
table, the per-section watchdog and the command line of a section run on its own. Section modules
import from here, never from ``bench.gpu``, which only gathers them."""

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
from typing import Callable, Dict

import torch


class Deadline(Exception):
    """A section ran out of its time (the global budget or its own cap)."""


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
