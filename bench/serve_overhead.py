"""What Serve adds on top of the library for one request: the same demo request (10 s,
inference_steps 8, batch_size 1, flac, fixed seed) through ``generate_music`` in-process and through
``POST /v1/generate`` (plus fetching the file) against the Serve app on a local Ray, with thinking on
and off; medians of repeated runs and the HTTP / in-process ratio.

With ``--concurrent N`` it measures serving instead: N thinking requests of mixed durations
(``DURATIONS`` cycled, distinct seeds) posted to ``/v1/generate`` at once; wall time, songs/min,
p50/p95 latency and the DiT's forward sharing when the checkout reports it.

Standalone only (it starts Ray): ``python bench/serve_overhead.py [--repeats 5] [--device cuda]``;
``--quick`` is its smoke run (one timed run per figure, 2 sampling steps: it checks, not measures).
It only uses APIs an older checkout has too (``generate_music``, ``serve.app.build_app``,
``serve.cli.load_serve_config`` / ``apply_overrides``, ``serve.config.AppConfig``, the
``/v1/generate`` route), so it measures that checkout when it comes first on PYTHONPATH:
``PYTHONPATH=/path/to/old/checkout python /path/to/this/checkout/bench/serve_overhead.py``.
The Serve replicas import the checkout the driver imported. Both sides use the same checkpoints
(written once) and the same intra-op thread count (``--threads``; Ray would otherwise give the
CPU profile's fractional-CPU replicas one thread while the in-process run took every core)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run by file path, this folder is sys.path[0]: drop it so nothing here shadows a top-level module
# and the workers Ray starts do not inherit it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

REQUEST = {"caption": "calm piano with soft strings", "lyrics": "[verse]\nhello night\n[chorus]\nstay a while",
           "duration": 10, "inference_steps": 8, "batch_size": 1, "audio_format": "flac",
           "use_random_seed": False, "seeds": [1]}
DURATIONS = (10, 12, 15, 18, 20, 24, 27, 30)
QUICK = {"repeats": 1, "inference_steps": 2}  # the smoke run: the fewest runs and steps that still go end to end
MIN_REPEATS = 5  # a median of fewer is noise on a shared box


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve_overhead.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per figure (at least {MIN_REPEATS}, the default; "
                             f"{QUICK['repeats']} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['repeats']} timed run per "
                                                             f"figure, {QUICK['inference_steps']} sampling steps")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, in-process and in the replicas")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="override the config's LM and DiT device (cuda: half a GPU each)")
    parser.add_argument("--config", type=Path, default=None, help="Serve config file (default: the checkout's)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    parser.add_argument("--demo-dir", default=None, help="demo checkpoints folder (default: a fresh temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--concurrent", type=int, default=0,
                        help="serving mode: this many thinking requests of mixed durations at once")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK["repeats"] if args.quick else MIN_REPEATS
    elif args.repeats < MIN_REPEATS and not args.quick:
        parser.error(f"--repeats must be at least {MIN_REPEATS} (or use --quick)")
    args.request = {**REQUEST, "inference_steps": QUICK["inference_steps"]} if args.quick else dict(REQUEST)
    return args


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_entry(args: argparse.Namespace, port: int):
    """(http options, application entry, AppConfig) from the checkout's serve config + overrides."""
    from serve.cli import apply_overrides, load_serve_config
    from serve.config import AppConfig

    http, app = apply_overrides(load_serve_config(args.config), demo=True, host="127.0.0.1", port=port)
    app_args = app.setdefault("args", {})
    app_args["demo_dir"] = args.demo_dir
    # one DiT: the demo's base variant (`acestep serve --demo` adds it for lego/extract/complete)
    # would be one more replica to start that no request here uses
    app_args.setdefault("dit", {})["extra_models"] = []
    if "state_dir" in AppConfig.model_fields:  # older checkouts keep tasks in an actor
        app_args["state_dir"] = args.state_dir
    if args.device:
        for part in ("lm", "dit"):
            settings = app_args.setdefault(part, {})
            settings["device"] = args.device
            options = settings.setdefault("deployment", {}).setdefault("ray_actor_options", {})
            options["num_gpus"] = 0.5 if args.device == "cuda" else 0
    return http, app, AppConfig.model_validate(app_args)


def _median(values):
    import statistics

    return round(statistics.median(values), 3)


def _timed(fn, repeats: int) -> float:
    """Median ms of ``repeats`` runs after one untimed warm-up run."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return _median(times)


def load_handlers(config):
    """The LM and DiT handlers exactly as the Serve replicas load them."""
    try:
        from serve.deployments import load_dit, load_lm
    except ImportError:  # a checkout without these helpers: the same loaders by hand
        load_lm = load_dit = None
    if load_lm is not None:
        llm = _load(load_lm, config, config.lm.model) if config.lm.enabled else None
        return llm, _load(load_dit, config, config.dit.model)
    from acestep.handler import AceStepHandler
    from acestep.llm_inference import LLMHandler

    root = str(config.checkpoint_root())
    dit = AceStepHandler()
    dit.initialize_service(root, config.dit.model, device=config.dit.device)
    llm = None
    if config.lm.enabled:
        llm = LLMHandler()
        llm.initialize(root, lm_model_path=config.lm.model, backend=config.lm.backend, device=config.lm.device)
    return llm, dit


def _load(loader, config, model: str):
    """A Serve loader called as the replicas call it: current ones take the model folder to load
    (a deployment per model), older checkouts' took the config alone."""
    import inspect

    if "model" in inspect.signature(loader).parameters:
        return loader(config, model)
    return loader(config)


def library_inputs(request: dict, thinking: bool):
    """The request body split into the library's GenerationParams / GenerationConfig."""
    import dataclasses

    from acestep.inference import GenerationConfig, GenerationParams

    body = {**request, "thinking": thinking}
    config_fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    params = GenerationParams(**{k: v for k, v in body.items() if k not in config_fields})
    return params, GenerationConfig(**{k: v for k, v in body.items() if k in config_fields})


def measure_in_process(config, request: dict, repeats: int, scratch: Path) -> dict:
    from acestep.inference import generate_music

    llm, dit = load_handlers(config)
    figures = {}
    for thinking in (True, False):
        params, gen_config = library_inputs(request, thinking)

        def once():
            result = generate_music(dit, llm, params, gen_config, save_dir=str(scratch))
            if not result.success:
                raise RuntimeError(f"generate_music failed: {result.error}")

        figures[thinking] = _timed(once, repeats)
    if llm is not None and hasattr(llm, "unload"):
        llm.unload()  # frees the device before the replicas load their copies
    return figures


def start_serve(args: argparse.Namespace, http: dict, app: dict, config) -> str:
    import ray
    from ray import serve

    import serve as serve_package
    from serve.app import build_app

    checkout = str(Path(serve_package.__file__).resolve().parents[1])
    # replicas inherit the environment: make them import the checkout this driver imported
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=args.num_cpus, num_gpus=1 if args.device == "cuda" else None,
             include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http["port"]})
    serve.run(build_app(config), name=app.get("name", "acestep"), route_prefix=app.get("route_prefix", "/"))
    url = f"http://127.0.0.1:{http['port']}"
    _wait_healthy(url)
    return url


def _wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s}s")


def measure_http(url: str, request: dict, repeats: int) -> dict:
    """Median ms of POST /v1/generate alone and of POST plus fetching the audio file."""
    import time

    import httpx

    figures = {}
    with httpx.Client(base_url=url, timeout=900) as client:
        for thinking in (True, False):
            post, total = [], []
            for run in range(repeats + 1):  # run 0 warms up
                start = time.perf_counter()
                response = client.post("/v1/generate", json={**request, "thinking": thinking})
                if response.status_code != 200:
                    raise RuntimeError(f"/v1/generate answered {response.status_code}: {response.text[:300]}")
                posted = time.perf_counter()
                audio = client.get(response.json()["audios"][0]["url"])
                audio.raise_for_status()
                done = time.perf_counter()
                if run:
                    post.append((posted - start) * 1000)
                    total.append((done - start) * 1000)
            figures[thinking] = {"post": _median(post), "total": _median(total)}
    return figures


def concurrent_bodies(request: dict, count: int) -> list:
    return [{**request, "thinking": True, "duration": DURATIONS[i % len(DURATIONS)], "seeds": [100 + i]}
            for i in range(count)]


def measure_concurrent(url: str, request: dict, count: int) -> dict:
    """One warm-up request, then ``count`` requests posted at once, each fetched when answered."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(client, body):
        start = time.perf_counter()
        response = client.post("/v1/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/v1/generate answered {response.status_code}: {response.text[:300]}")
        client.get(response.json()["audios"][0]["url"]).raise_for_status()
        return time.perf_counter() - start

    limits = httpx.Limits(max_connections=count + 2)
    with httpx.Client(base_url=url, timeout=1800, limits=limits) as client:
        one(client, concurrent_bodies(request, 1)[0])
        start = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            latencies = sorted(pool.map(lambda body: one(client, body), concurrent_bodies(request, count)))
        wall = time.perf_counter() - start
        stats = client.get("/v1/stats").json()
    native = stats.get("data", {}).get("serve", stats) if isinstance(stats, dict) else {}  # enveloped since 2026-12
    dit = native.get("dit") or {}
    worker = dit.get("worker", {}) if isinstance(dit, dict) else {}
    return {"requests": count, "durations_s": sorted(b["duration"] for b in concurrent_bodies(request, count)),
            "wall_s": round(wall, 2), "songs_per_min": round(count * 60 / wall, 2),
            "p50_s": round(latencies[len(latencies) // 2], 2),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
            "dit_items_per_forward": worker.get("items_per_forward"), "dit_stats": dit}


def report(in_process: dict, http: dict) -> list:
    rows = []
    for thinking in (True, False):
        local, remote = in_process[thinking], http[thinking]
        rows.append({"thinking": thinking, "in_process_ms": local, "http_post_ms": remote["post"],
                     "http_post_and_fetch_ms": remote["total"],
                     "http_over_in_process": round(remote["total"] / local, 3),
                     "http_post_over_in_process": round(remote["post"] / local, 3)})
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch at import, here and in the replicas
    import json
    from bench import scratch_dir

    import torch

    torch.set_num_threads(args.threads)
    scratch = scratch_dir("acestep-serve-overhead-")
    args.demo_dir = args.demo_dir or str(scratch / "demo_checkpoints")
    args.state_dir = str(scratch / "state")
    http, app, config = app_entry(args, args.port or _free_port())
    print(f"checkpoints: {config.checkpoint_root()}; threads: {args.threads}; repeats: {args.repeats}", flush=True)
    in_process = None if args.concurrent else measure_in_process(config, args.request, args.repeats, scratch / "audio")
    import ray
    from ray import serve

    try:
        url = start_serve(args, http, app, config)
        measured = (measure_concurrent(url, args.request, args.concurrent) if args.concurrent
                    else measure_http(url, args.request, args.repeats))
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    if args.concurrent:
        print(json.dumps(measured, indent=2))
        result = {"concurrent": measured, "request": args.request, "threads": args.threads}
    else:
        result = {"rows": report(in_process, measured), "request": args.request, "threads": args.threads,
                  "repeats": args.repeats}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
