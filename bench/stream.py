"""Audio streamed while it decodes, through the Serve app over HTTP: one demo song (60 s, 8 steps,
thinking off, flac) submitted with ``stream_format: opus`` and read through ``GET
/v1/tasks/{id}/stream`` as it is written, beside the same song without a stream. Reported: seconds
from the POST to the first audio bytes, to the stream's end and to the task's done; first audio /
done; done with / without the stream (what streaming costs); and the stream's and the stored file's
decoded lengths (equal for Ogg Opus).

Standalone only (it starts Ray and the demo app): ``python -m bench.stream [--quick] [--out FILE]``;
``--quick`` is its smoke run (a 20 s song, 2 steps: it checks, not measures)."""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

SONG = {"caption": "slow ambient pads", "duration": 60, "inference_steps": 8, "thinking": False, "batch_size": 1,
        "use_random_seed": False, "seeds": [11], "audio_format": "flac"}
QUICK = {"duration": 20, "inference_steps": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a 20 s song, 2 steps")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads in the replicas")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="the LM and DiT device")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.request = {**SONG, **QUICK} if args.quick else dict(SONG)
    args.config = args.port = None
    return args


def _samples(data: bytes) -> int:
    import soundfile as sf

    return sf.info(io.BytesIO(data)).frames


def _done(client, task_id: str) -> Dict:
    """The task's record once final (its event stream ends there)."""
    client.get(f"/v1/tasks/{task_id}/events").raise_for_status()
    return client.get(f"/v1/tasks/{task_id}").json()


def streamed_run(client, request: Dict) -> Dict:
    started = time.perf_counter()
    response = client.post("/v1/tasks", json={**request, "stream_format": "opus"})
    response.raise_for_status()
    task_id, first, chunks = response.json()["task_id"], None, []
    with client.stream("GET", f"/v1/tasks/{task_id}/stream") as stream:
        stream.raise_for_status()
        for data in stream.iter_raw():
            if data and first is None:
                first = time.perf_counter() - started
            chunks.append(data)
    stream_end = time.perf_counter() - started
    status = _done(client, task_id)
    done = time.perf_counter() - started
    if status["phase"] != "done" or first is None:
        raise RuntimeError(f"streamed task ended {status['phase']}: {status.get('message')}")
    stored = client.get(status["result"]["audios"][0]["url"]).content
    return {"first_audio_s": round(first, 3), "stream_end_s": round(stream_end, 3), "done_s": round(done, 3),
            "stream_samples": _samples(b"".join(chunks)), "file_samples": _samples(stored)}


def plain_run(client, request: Dict) -> float:
    started = time.perf_counter()
    response = client.post("/v1/tasks", json=request)
    response.raise_for_status()
    status = _done(client, response.json()["task_id"])
    if status["phase"] != "done":
        raise RuntimeError(f"task ended {status['phase']}: {status.get('message')}")
    return round(time.perf_counter() - started, 3)


def measure(url: str, request: Dict) -> Dict:
    import httpx

    with httpx.Client(base_url=url, timeout=1800) as client:
        plain_run(client, {**request, "duration": 10, "seeds": [1]})  # warm-up: every replica's first call
        plain = plain_run(client, request)
        streamed = streamed_run(client, request)
    return {"song_s": request["duration"], "steps": request["inference_steps"], **streamed,
            "first_audio_over_done": round(streamed["first_audio_s"] / streamed["done_s"], 3),
            "done_without_stream_s": plain, "done_with_over_without": round(streamed["done_s"] / plain, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from bench import scratch_dir
    from bench.serve_overhead import _free_port, app_entry, start_serve

    scratch = scratch_dir("acestep-stream-")
    args.demo_dir, args.state_dir = str(scratch / "demo_checkpoints"), str(scratch / "state")
    http, app, config = app_entry(args, _free_port())
    import ray
    from ray import serve

    row: Optional[Dict] = None
    try:
        row = measure(start_serve(args, http, app, config), args.request)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    print("| " + " | ".join(row) + " |\n|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"row": row, "request": args.request, "threads": args.threads}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
