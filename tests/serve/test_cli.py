"""``acestep serve --demo`` (the README's main command) in a subprocess: local Ray, demo checkpoints
written to the cache first, a key, real HTTP, audio read back, a drain on SIGTERM, and a restart
on the same state directory that finishes the queued tasks."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

from pathlib import Path

import httpx
import soundfile as sf
import yaml

from acestep.dit.tasks import TASK_TYPES
from tests.serve.hook_receiver import Receiver

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(tmp_path, port, *extra, env=None):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           **(env or {})}
    env.pop("ACESTEP_API_KEY", None)
    command = [sys.executable, "-m", "acestep.cli", "serve", "--demo", "--port", str(port), *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "acestep serve --demo did not come up"
        time.sleep(1)


def _stop(process, sig=signal.SIGTERM) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


SONG = {"caption": "lofi beat", "duration": 10, "inference_steps": 2, "batch_size": 1, "thinking": False}


def test_a_public_host_without_a_key_is_refused(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("ACESTEP_API_KEY", None)
    result = subprocess.run([sys.executable, "-m", "acestep.cli", "serve", "--demo", "--host", "0.0.0.0"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--api-key" in result.stderr


def test_acestep_serve_demo_with_a_key_drains_on_sigterm_and_resumes_its_queue(tmp_path):
    """The README's command with a key: every task type servable (the demo serves its base DiT
    beside turbo); SIGTERM with 4 tasks queued (one driver slot), exit 0; the
    same command on the same state directory finishes all 4, and each task's webhook reaches a
    loopback receiver under one delivery id, signed with the server's secret, across the restart."""
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    ingress = config["applications"][0]["args"]["ingress"]
    ingress["max_drives"] = 1
    ingress["webhooks"] = {"allow_private": True}  # the receiver is on loopback
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    state, key, port = tmp_path / "state", "cli-test-key", _free_port()
    args = ("--state-dir", str(state), "--api-key", key, "--config", str(config_path))
    headers = {"Authorization": f"Bearer {key}"}
    receiver = Receiver("cli-test-webhook-secret")
    env = {"ACESTEP_WEBHOOK_SECRET": receiver.secret}
    process, url = _start(tmp_path, port, *args, env=env)
    try:
        assert (tmp_path / "acestep" / "demo_checkpoints" / ".complete").exists()
        catalog = httpx.get(f"{url}/v1/task_types", headers=headers, timeout=30)
        assert catalog.status_code == 200, catalog.text
        tasks = catalog.json()["tasks"]
        assert len(tasks) == len(TASK_TYPES) and all(task["servable"] for task in tasks), tasks  # the demo serves base too
        assert {task["model"] for task in tasks} == {"acestep-v15-turbo", "acestep-v15-base"}
        assert httpx.post(f"{url}/v1/generate", json=SONG, timeout=30).status_code == 401
        response = httpx.post(f"{url}/v1/generate", json=SONG, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        audio = httpx.get(url + response.json()["audios"][0]["url"], headers=headers, timeout=60)
        data, rate = sf.read(io.BytesIO(audio.content), always_2d=True)
        assert rate == 48000 and data.shape[1] == 2
        song = {**SONG, "duration": 30, "webhook_url": receiver.url}
        ids = [httpx.post(f"{url}/v1/tasks", json=song, headers=headers, timeout=60).json()["task_id"]
               for _ in range(4)]
        phases = [httpx.get(f"{url}/v1/tasks/{i}", headers=headers, timeout=30).json()["phase"] for i in ids]
        assert phases.count("queued") >= 3, phases  # one driver slot: the rest wait in the store
    finally:
        code = _stop(process)
    output = process.stdout.read()
    assert code == 0, output
    assert key not in output
    process, url = _start(tmp_path, port, *args, env=env)
    try:
        deadline = time.time() + 600
        while True:
            phases = [httpx.get(f"{url}/v1/tasks/{i}", headers=headers, timeout=30).json()["phase"] for i in ids]
            if all(phase == "done" for phase in phases):
                break
            assert "failed" not in phases, phases
            assert time.time() < deadline, phases
            time.sleep(1)
        deliveries = receiver.wait_for(ids, timeout_s=120)
        assert sorted(deliveries) == sorted(f"{task_id}.done" for task_id in ids), deliveries
    finally:
        receiver.close()
        assert _stop(process, signal.SIGINT) == 0


def test_sigterm_while_the_models_load_stops_cleanly(tmp_path):
    """SIGTERM once the HTTP proxy answers but before the app is ready (the models are loading): the
    server stops with exit 0 and says so, instead of aborting mid-start."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("ACESTEP_API_KEY", None)
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "acestep.cli", "serve", "--demo", "--port", str(port),
                                "--state-dir", str(tmp_path / "state")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code
            break  # the proxy answers: Serve is up, the app is being deployed
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the HTTP proxy never came up"
        time.sleep(0.2)
    assert ready != 200, "the app was already ready: this test needs the loading window"
    code = _stop(process)
    output = process.stdout.read()
    assert code == 0, output
    assert "stopping before the app was ready" in output and "stopped" in output
