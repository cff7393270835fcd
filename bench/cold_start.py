"""Cold start after scale to zero: one demo request sent while the LM and DiT deployments have no
replica (``min_replicas: 0``; request sent → task done, both replicas starting on the way), then the
same request again warm, on a local Ray with the Serve app of serve_config.yaml; seconds per run,
their medians and the difference (what a client waits for the cold start).

Standalone (it starts Ray): ``python -m bench.cold_start [--repeats 3] [--quick] [--out FILE]``;
``--quick`` is its smoke run (one pair, 2 sampling steps: it checks, not measures; its test is the
end-to-end scale-to-zero test, so each row also says what /ready answered at zero and how long the
cold song's audio is).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

REQUEST = {"caption": "calm piano with soft strings", "lyrics": "[Instrumental]", "duration": 10,
           "inference_steps": 8, "batch_size": 1, "audio_format": "wav", "thinking": True,
           "use_random_seed": False, "seeds": [1]}
QUICK = {"repeats": 1, "inference_steps": 2}
ROLES = ("LMDeployment", "DiTDeployment")  # the default LM's and DiT's deployments
IDLE_S = 2.0  # here, how long a deployment stays idle before its last replica stops (README: 600 s)


def scale_to_zero(idle_s: float = IDLE_S) -> Dict[str, Any]:
    """The LM and DiT autoscaling that lets both reach zero replicas ``idle_s`` after their last request."""
    return {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": idle_s, "downscale_to_zero_delay_s": idle_s}


def wait_for_model_info(client, timeout_s: float = 300.0) -> None:
    """Until the ingress knows every served DiT's family (GET /v1/info): it asks each DiT once, waking
    one at zero, so a deployment seen at zero before then is about to start."""
    deadline = time.monotonic() + timeout_s
    while any(model["is_turbo"] is None for model in client.get("/v1/info").json()["models"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ingress did not learn the DiTs' families within {timeout_s:g}s")
        time.sleep(0.5)


def wait_for_zero(client, deployments: Sequence[str] = ROLES, timeout_s: float = 300.0) -> float:
    """Seconds until none of ``deployments`` has a replica, running or on its way (/ready: no running
    replica and Serve's status HEALTHY, not UPSCALING or DOWNSCALING); TimeoutError after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        report = client.get("/ready").json()
        counts, status = report["running_replicas"], report["status"]
        if all(counts.get(name) == 0 and status.get(name) == "HEALTHY" for name in deployments):
            return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{', '.join(deployments)} were not idle at zero after {timeout_s:g}s: {report}")


def wait_for_running(client, deployments: Sequence[str] = ROLES, timeout_s: float = 300.0) -> float:
    """Seconds until the ingress's view (/ready, refreshed every 2 s) shows a running replica of each
    of ``deployments``: from then on a request is warm there (TimeoutError after ``timeout_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        counts = client.get("/ready").json()["running_replicas"]
        if all(counts.get(name, 0) > 0 for name in deployments):
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(f"{', '.join(deployments)} had no running replica after {timeout_s:g}s: {counts}")


def task_events(client, task_id: str) -> List[Dict[str, Any]]:
    """A finished task's stored events, read from its event stream (it replays them, then ends)."""
    events = []
    with client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def timed_song(client, body: Dict[str, Any]) -> Dict[str, Any]:
    """POST /v1/generate timed (sent → done), then the task's events: {seconds, output, events}."""
    start = time.perf_counter()
    response = client.post("/v1/generate", json=body)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"/v1/generate answered {response.status_code}: {response.text[:300]}")
    output = response.json()
    return {"seconds": seconds, "output": output, "events": task_events(client, output["task_id"])}


def cold_starts(events: List[Dict[str, Any]]) -> List[str]:
    """The deployments a task's events say it waited for (``queued: cold start``)."""
    from serve.pipeline import COLD_START

    return [event["detail"]["cold_start"] for event in events if event["message"] == COLD_START]


def start_wait_s(events: List[Dict[str, Any]]) -> float:
    """Seconds from a task's first cold-start note to the first event after its last one (the
    replica it waited for answering); 0 without a note."""
    from serve.pipeline import COLD_START

    notes = [i for i, event in enumerate(events) if event["message"] == COLD_START]
    if not notes or notes[-1] + 1 >= len(events):
        return 0.0
    return events[notes[-1] + 1]["time"] - events[notes[0]]["time"]


def at_zero(client, settle_s: float = 5.0) -> Dict[str, Any]:
    """Both deployments idle at zero, and still there ``settle_s`` later (the ingress's view, which
    refreshes every 2 s, must not wake them): /ready's answer then (status code and report)."""
    wait_for_zero(client)
    time.sleep(settle_s)
    wait_for_zero(client, timeout_s=0.5)  # TimeoutError: something woke them
    ready = client.get("/ready")
    return {**ready.json(), "http_status": ready.status_code}


def audio_seconds(client, output: Dict[str, Any]) -> float:
    """The first audio of a /v1/generate answer, fetched and read back: its length in seconds."""
    import io

    import soundfile as sf

    info = sf.info(io.BytesIO(client.get(output["audios"][0]["url"]).content))
    return round(info.frames / info.samplerate, 3)


def measure(client, body: Dict[str, Any], repeats: int) -> List[Dict[str, Any]]:
    """``repeats`` pairs: the request once both deployments are at zero (and stay there), then again
    once the ingress sees their replicas running (warm)."""
    rows = []
    wait_for_model_info(client)
    for run in range(repeats):
        ready = at_zero(client)
        cold = timed_song(client, body)
        wait_for_running(client)
        warm = timed_song(client, body)
        rows.append({"run": run + 1, "cold_s": round(cold["seconds"], 2), "warm_s": round(warm["seconds"], 2),
                     "start_wait_s": round(start_wait_s(cold["events"]), 2),
                     "waited_for": "+".join(cold_starts(cold["events"])) or "-",
                     "warm_waited_for": "+".join(cold_starts(warm["events"])) or "-",
                     "cold_phases": [event["phase"] for event in cold["events"]],
                     "cold_audio_s": audio_seconds(client, cold["output"]),
                     "ready_at_zero": {key: ready.get(key) for key in ("http_status", "scaled_to_zero", "unavailable")},
                     "load_avg_1m": round(os.getloadavg()[0], 1)})
        print(f"[cold_start] {rows[-1]}", flush=True)
    return rows


def summary(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    cold = statistics.median(row["cold_s"] for row in rows)
    warm = statistics.median(row["warm_s"] for row in rows)
    return {"cold_s": round(cold, 2), "warm_s": round(warm, 2), "cold_start_s": round(cold - warm, 2),
            "cold_over_warm": round(cold / warm, 2)}


def table(rows: List[Dict[str, Any]], medians: Dict[str, float]) -> str:
    lines = ["| run | cold s (sent at zero → done) | warm s | cold − warm s | note → replica's first event s "
             "| waited for | load avg |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['cold_s']} | {r['warm_s']} | {round(r['cold_s'] - r['warm_s'], 2)} | "
              f"{r['start_wait_s']} | {r['waited_for']} | {r['load_avg_1m']} |" for r in rows]
    lines.append(f"| median | {medians['cold_s']} | {medians['warm_s']} | {medians['cold_start_s']} | "
                 f"| {medians['cold_over_warm']}x warm | |")
    return "\n".join(lines)


def app_config(scratch: Path, port: int):
    """(http options, application entry, AppConfig): serve_config.yaml's app, demo checkpoints, one
    DiT, LM and DiT allowed to scale to zero."""
    from serve.cli import apply_overrides, load_serve_config
    from serve.config import AppConfig

    http, app = apply_overrides(load_serve_config(), demo=True, host="127.0.0.1", port=port)
    args = app["args"]
    args.update(demo_dir=str(scratch / "demo_checkpoints"), state_dir=str(scratch / "state"))
    for role in ("lm", "dit"):
        deployment = args.setdefault(role, {}).setdefault("deployment", {})
        deployment["autoscaling_config"] = {**deployment.get("autoscaling_config", {}), **scale_to_zero()}
    args["dit"]["extra_models"] = []
    return http, app, AppConfig.model_validate(args)


def start(app: Dict[str, Any], config, port: int, num_cpus: int) -> str:
    """A local Ray with the app's runtime_env, the app deployed, its URL once /ready answers 200."""
    import httpx
    import ray
    from ray import serve

    import serve as serve_package
    from serve.app import build_app

    checkout = str(Path(serve_package.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))
    env = (app.get("runtime_env") or {}).get("env_vars") or {}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=app.get("name", "acestep"), route_prefix=app.get("route_prefix", "/"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/ready did not answer 200 within 300 s")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="cold/warm pairs (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one pair, 2 sampling steps")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (QUICK["repeats"] if args.quick else 3)
    args.request = {**REQUEST, "inference_steps": QUICK["inference_steps"]} if args.quick else dict(REQUEST)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx
    import ray
    from ray import serve

    from bench import scratch_dir

    with socket.socket() as sock:  # a free port for the app's HTTP proxy
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, app, config = app_config(scratch_dir("acestep-cold-start-"), port)
    try:
        url = start(app, config, port, args.num_cpus)
        with httpx.Client(base_url=url, timeout=900) as client:
            rows = measure(client, args.request, args.repeats)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    medians = summary(rows)
    print(table(rows, medians))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "median": medians, "request": args.request,
                                        "idle_s": IDLE_S}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
