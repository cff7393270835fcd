"""Soak: the Serve app held at 80 % of its admission bound for N minutes (CI runs only ``--quick``).

``python -m bench.soak [--minutes 5] [--bound 20]`` starts a local Ray and the demo app (its own
state directory, a small record cap and audio budget), keeps ``0.8 × bound`` tasks unfinished by
submitting a new one whenever one ends, and every 15 s (and at the end) samples the resident memory
of every Ray process and the size of the state directory. It reports 5xx answers (the goal: none),
each process's RSS growth from minute 2 to the end (goal: < 10 %), and the store's size over time
(goal: bounded by the caps). Linux only (RSS from /proc).

``--quick`` is its smoke run: a few seconds of load at a small bound, held until a few tasks have
finished; it checks that the soak runs (no RSS growth figure: that needs minutes) and writes a
results file only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run by path: nothing in bench/ may shadow a top-level module

from bench import scratch_dir  # noqa: E402

SONG = {"caption": "soak test loop", "duration": 10, "inference_steps": 2, "batch_size": 1, "thinking": True,
        "audio_format": "flac"}
FULL = {"minutes": 5.0, "bound": 20, "sample_s": 15.0, "min_finished": 0, "out": Path("bench/results/soak-cpu.json")}
QUICK = {"minutes": 0.2, "bound": 5, "sample_s": 4.0, "min_finished": 4, "out": None}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: defaults {_shown(QUICK)}")
    parser.add_argument("--minutes", type=float, help=f"how long to hold the load (default {FULL['minutes']})")
    parser.add_argument("--bound", type=int, help=f"ingress.max_unfinished_tasks (default {FULL['bound']})")
    parser.add_argument("--sample-s", type=float, help=f"seconds between memory samples (default {FULL['sample_s']})")
    parser.add_argument("--min-finished", type=int,
                        help="keep the load on past --minutes until this many tasks have finished (default 0)")
    parser.add_argument("--out", type=Path, help=f"results JSON (default {FULL['out']}; none with --quick)")
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def _shown(settings: dict) -> str:
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in settings.items() if value is not None)


def ray_processes(root: int) -> Dict[int, str]:
    """pid → a short name, for every Ray process (workers, raylet, GCS, proxies) descending from
    ``root``: the local Ray this soak started is its driver's child, and another Ray on the same
    machine must not count."""
    found, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            # the name in /proc/PID/stat may hold spaces and parentheses: the parent pid follows the last ')'
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if "ray::" in command or "raylet" in command or "gcs_server" in command:
            found[int(entry.name)] = Path(command.split()[0]).name[:60]  # raylet, gcs_server, ray::...
    return {pid: name for pid, name in found.items() if _descends(pid, root, parents)}


def _descends(pid: int, root: int, parents: Dict[int, int]) -> bool:
    seen = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == root:
            return True
    return False


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def start(bound: int, state: Path, demo_dir: Path) -> str:
    import ray
    from ray import serve

    from bench.serve_overhead import _free_port, _wait_healthy
    from serve.app import build_app
    from serve.config import AppConfig

    config = AppConfig.model_validate({
        "demo": True, "demo_dir": str(demo_dir), "state_dir": str(state),
        "lm": {"device": "cpu", "deployment": {"ray_actor_options": {"num_cpus": 0.5}}},
        "dit": {"device": "cpu", "extra_models": [],  # the demo's base DiT: no request here uses it
                "deployment": {"ray_actor_options": {"num_cpus": 0.5}}},
        "ingress": {"max_unfinished_tasks": bound, "deployment": {"ray_actor_options": {"num_cpus": 0.25}}},
        "store": {"max_records": 200, "max_audio_mb": 20, "task_ttl_s": 120}})
    port = _free_port()
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # its own Ray, never one it finds
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="acestep", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    return url


def sample(t_s: float, finished: int, state: Path) -> dict:
    """Every Ray process's RSS and the state directory's size now."""
    taken = {"t_s": round(t_s, 1), "finished": finished,
             "rss_mb": {f"{name}#{pid}": round(rss_mb(pid), 1) for pid, name in ray_processes(os.getpid()).items()},
             "state_mb": round(dir_mb(state), 2)}
    print(f"t={taken['t_s']}s finished={finished} state={taken['state_mb']} MB", flush=True)
    return taken


def hold(url: str, args: argparse.Namespace, state: Path) -> dict:
    """Keep 80 % of the bound unfinished for ``args.minutes``; sample memory and store size."""
    import httpx

    target = max(1, int(0.8 * args.bound))
    statuses: Dict[int, int] = {}
    samples: List[dict] = []
    live: List[str] = []
    begin = last_sample = time.monotonic()
    finished = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() - begin < args.minutes * 60 or finished < args.min_finished:
            while len(live) < target:
                response = client.post("/v1/tasks", json={**SONG, "seeds": [len(statuses)], "use_random_seed": False})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code != 202:
                    break
                live.append(response.json()["task_id"])
            for task_id in list(live):
                record = client.get(f"/v1/tasks/{task_id}")
                statuses[record.status_code] = statuses.get(record.status_code, 0) + 1
                if record.status_code != 200 or record.json()["finished"]:
                    live.remove(task_id)
                    finished += 1
            if time.monotonic() - last_sample >= args.sample_s:
                last_sample = time.monotonic()
                samples.append(sample(last_sample - begin, finished, state))
            time.sleep(0.5)
    samples.append(sample(time.monotonic() - begin, finished, state))  # growth is measured to the end
    return {"statuses": statuses, "samples": samples, "finished": finished, "target_unfinished": target}


def growth(samples: List[dict], after_s: float = 120.0) -> Dict[str, float]:
    """Per process: RSS at the end over RSS at the first sample after ``after_s`` (−1 if it vanished)."""
    later = [s for s in samples if s["t_s"] >= after_s]
    if len(later) < 2:
        return {}
    first, last = later[0]["rss_mb"], later[-1]["rss_mb"]
    return {name: round(last.get(name, -1.0) / mb, 3) if mb else 0.0 for name, mb in first.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = scratch_dir("acestep-soak-")
    state = scratch / "state"
    import ray
    from ray import serve

    try:
        url = start(args.bound, state, scratch / "demo_checkpoints")
        result = hold(url, args, state)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    ratios = growth(result["samples"])
    server_errors = sum(n for code, n in result["statuses"].items() if code >= 500)
    sizes = [s["state_mb"] for s in result["samples"]]
    summary = {"minutes": args.minutes, "bound": args.bound, "finished": result["finished"],
               "server_errors": server_errors, "statuses": result["statuses"],
               "max_rss_growth_after_2_min": max(ratios.values(), default=None),
               "state_mb_max": max(sizes, default=0.0), "state_mb_last": sizes[-1] if sizes else 0.0}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rss_growth": ratios, **result}, indent=2))
    return 0 if server_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
