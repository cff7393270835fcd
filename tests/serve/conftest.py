"""One local Ray + Serve app per test module (real deployments, demo checkpoints, real HTTP).

Ray start-up dominates (~8 s), so the app is module-scoped (one cluster for the whole module).
``RAY_AUTH_MODE=disabled`` and ``HF_HUB_OFFLINE=1`` come from tests/conftest.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from serve.cli import apply_overrides, load_serve_config
from serve.config import AppConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config_for_tests(checkpoints: str, port: int):
    """serve_config.yaml's app, pointed at the demo checkpoints."""
    http, app = apply_overrides(load_serve_config(), checkpoints=checkpoints, host="127.0.0.1", port=port)
    return http, app, AppConfig.model_validate(app["args"])


@pytest.fixture(scope="module")
def serve_app(demo_root):
    """The app deployed from serve_config.yaml the way `serve run serve_config.yaml` and KubeRay deploy
    it: the controller imports ``serve.app:build_app`` on a worker and calls it with the file's args."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    port = _free_port()
    http, app, config = app_config_for_tests(str(demo_root), port)
    schema = ServeDeploySchema.model_validate({**load_serve_config(), "http_options": http, "applications": [app]})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _get_global_client().deploy_apps(schema)
        _wait_running(app["name"])
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url)
        yield SimpleNamespace(url=url, name=app["name"], config=config, args=app["args"])
    finally:
        # serve.shutdown() first stops the driver-side handles' metrics pushers, which would otherwise
        # log "owner is unknown" errors after ray.shutdown(); it costs a few seconds.
        serve.shutdown()
        ray.shutdown()


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


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s}s")


@pytest.fixture(scope="module")
def client(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=300) as http:
        yield http
