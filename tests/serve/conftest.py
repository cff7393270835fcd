"""One local Ray + Serve app per test module (real deployments, demo checkpoints, real HTTP).

Ray start-up dominates (~8 s), so the app is module-scoped (one cluster for the whole module).
``RAY_AUTH_MODE=disabled`` and ``HF_HUB_OFFLINE=1`` come from tests/conftest.py.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import httpx
import numpy as np
import pytest
import soundfile as sf

from serve.cli import apply_overrides, load_serve_config
from serve.config import AppConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_store_until(serve_app, read, ready, timeout_s: float, period_s: float = 0.2):
    """``read(store)`` on the app's task store until ``ready(value)`` or ``timeout_s`` passed (a
    bounded wait); the last value either way."""
    from serve.store import open_task_store

    store = open_task_store(serve_app.config.task_store_url())
    try:
        deadline = time.time() + timeout_s
        while True:
            value = read(store)
            if ready(value) or time.time() > deadline:
                return value
            time.sleep(period_s)
    finally:
        store.close()


def wav_bytes(seconds=3.0, rate=48000) -> bytes:
    """A stereo 220 Hz tone as WAV bytes (an upload)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone, tone], axis=1), rate, format="WAV")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config_for_tests(checkpoints: str, port: int, state_dir: str, **overrides):
    """serve_config.yaml's app, pointed at the demo checkpoints and a state directory of its own;
    ``overrides`` are merged into the app's args one section deep (e.g. ``ingress={...}``)."""
    http, app = apply_overrides(load_serve_config(), checkpoints=checkpoints, host="127.0.0.1", port=port)
    app["args"]["state_dir"] = state_dir
    for section, values in overrides.items():
        app["args"][section] = {**app["args"].get(section, {}), **values}
    return http, app, AppConfig.model_validate(app["args"])


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory, source_audio):
    """A server directory requests may name files in (``ingress.allowed_audio_dirs``), with one take."""
    directory = tmp_path_factory.mktemp("shared-audio")
    shutil.copy(source_audio, directory / "take1.wav")
    return directory


@pytest.fixture(scope="module")
def serve_app(demo_root, tmp_path_factory, shared_dir):
    """The app deployed from serve_config.yaml the way `serve run serve_config.yaml` and KubeRay deploy
    it: the controller imports ``serve.app:build_app`` on a worker and calls it with the file's args."""
    # the GPU profile's step-level batching (the CPU profile renders one row at a time), so the
    # tests see songs share DiT forwards; the base variant beside turbo, as `acestep serve --demo`
    # serves it (extract, lego and complete go there)
    batch = {"max_forward_rows": 16, "max_row_frames": 96000, "max_padding": 0.25}
    # webhooks may call the tests' loopback receiver, signed with the default key's own secret
    hooks = tmp_path_factory.mktemp("webhooks") / "secrets"
    hooks.write_text(f"default:whsec-{secrets.token_urlsafe(16)}\n")
    yield from deployed_app(demo_root, tmp_path_factory.mktemp("state"),
                            dit={"batch": batch, "extra_models": ["acestep-v15-base"]},
                            ingress={"allowed_audio_dirs": [str(shared_dir)],
                                     "webhooks": {"allow_private": True, "secrets_file": str(hooks)}})


def deployed_app(demo_root, state_dir, metrics_report_ms: Optional[int] = None, **overrides):
    """Start a local Ray (its own, even when another cluster runs on this machine; its metrics agent on
    a free port; workers report metrics every ``metrics_report_ms``, else at Ray's default), deploy
    the app with API keys (one from ACESTEP_API_KEY, named "default", and two from a keys file),
    yield its handle data, stop everything."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    keys = {"default": f"k-{secrets.token_urlsafe(16)}", "alice": f"a-{secrets.token_urlsafe(16)}",
            "bob": f"b-{secrets.token_urlsafe(16)}"}
    keys_file = Path(state_dir) / "api_keys"
    keys_file.write_text(f"alice:{keys['alice']}\nbob:{keys['bob']}\n")
    os.environ["ACESTEP_API_KEY"] = keys["default"]  # the replicas inherit it, as under `acestep serve`
    overrides["ingress"] = {"api_keys_file": str(keys_file), **overrides.get("ingress", {})}
    port = _free_port()
    http, app, config = app_config_for_tests(str(demo_root), port, str(state_dir), **overrides)
    serve_config = load_serve_config()
    schema = ServeDeploySchema.model_validate({**serve_config, "http_options": http, "applications": [app]})
    metrics_port = _free_port()
    system = {"metrics_report_interval_ms": metrics_report_ms} if metrics_report_ms else None
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config=system)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=serve_config.get("logging_config"))
        _get_global_client().deploy_apps(schema)
        _wait_running(app["name"])
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        logs_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
        yield SimpleNamespace(url=url, name=app["name"], config=config, args=app["args"], state_dir=state_dir,
                              keys=keys, headers={"Authorization": f"Bearer {keys['default']}"},
                              metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", serve_logs=logs_dir)
    finally:
        # serve.shutdown() first stops the driver-side handles' metrics pushers, which would otherwise
        # log "owner is unknown" errors after ray.shutdown(); it costs a few seconds.
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("ACESTEP_API_KEY", None)


def _wait_running(name: str, timeout_s: float = 240.0) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(status.message)
        time.sleep(0.5)
    raise TimeoutError(f"application {name!r} not RUNNING within {timeout_s}s")


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Until /ready: every deployment has a running replica and the task store answers."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/ready did not answer 200 within {timeout_s}s")


@pytest.fixture(scope="module")
def client(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=300, headers=serve_app.headers) as http:
        yield http
