"""``acestep serve --demo`` (the README's main command) in a subprocess: local Ray, demo checkpoints
written to the cache first, real HTTP, audio read back, clean stop on Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import soundfile as sf


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_acestep_serve_demo(tmp_path):
    port = _free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "acestep.cli", "serve", "--demo", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "acestep serve --demo did not come up"
            time.sleep(1)
        assert (tmp_path / "acestep" / "demo_checkpoints" / ".complete").exists()
        body = {"caption": "lofi beat", "duration": 10, "inference_steps": 2, "batch_size": 1, "thinking": False}
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        audio = httpx.get(url + response.json()["audios"][0]["url"], timeout=60)
        data, rate = sf.read(io.BytesIO(audio.content), always_2d=True)
        assert rate == 48000 and data.shape[1] == 2
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
