"""The multi-node app: one ``ray.cluster_utils.Cluster`` per test module (head + an LM node + a DiT
node), a real redis-server as the task store, the RayService's rendered Serve config deployed on it.

All nodes share this machine's network, so only the head runs an HTTP proxy (the cluster runs one per
node, each on its own host)."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

from tests.cluster.harness import REPO_ROOT, MultiNode, rendered_app, replica_cpus, replica_nodes, wait_for
from tests.serve.redis_server import start_redis

APP = "acestep"
# short windows so the replica counts move within a test; bounds that fit two replicas per node; a
# target of two, so that a deployment a load only passes through (its share of the tasks in flight
# well under a quarter, in bursts) stays at one replica
AUTOSCALING = {
    "lm": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
           "downscale_delay_s": 4, "look_back_period_s": 11},
    "dit": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
            "downscale_delay_s": 4, "look_back_period_s": 11},
    "ingress": {"min_replicas": 1, "max_replicas": 1},
}
# replicas report their load every half second (Serve's default is 10 s)
PUSH_INTERVALS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                  "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(config) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    http = config["http_options"]
    serve.start(http_options={"host": http["host"], "port": http["port"]}, proxy_location="HeadOnly")
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({**config, "proxy_location": "HeadOnly"}))

    def running():
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(f"deploy failed: {status.message}")
        return status is not None and status.status == "RUNNING"

    wait_for(running, 300, "the app to run")


@pytest.fixture(scope="module")
def cluster_app(demo_root, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster-state")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.update(PUSH_INTERVALS)  # every node inherits them
    port = _free_port()
    with start_redis(state_dir / "redis") as redis_url:
        config = rendered_app(demo_root, state_dir, redis_url, port, AUTOSCALING)
        nodes = MultiNode.start(AUTOSCALING["ingress"]["max_replicas"], replica_cpus(config, "ingress"))
        try:
            for kind in ("lm", "dit"):
                nodes.add(kind, AUTOSCALING[kind]["max_replicas"], replica_cpus(config, kind))
            deploy(config)
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _ok(f"{url}/health"), 120, "/health")
            yield SimpleNamespace(url=url, nodes=nodes, config=config, name=APP)
        finally:
            from ray import serve

            serve.shutdown()
            nodes.shutdown()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def submit(url: str, **fields) -> str:
    body = {"caption": "cluster test", "duration": 10, "thinking": False, "inference_steps": 2, **fields}
    response = httpx.post(f"{url}/v1/tasks", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def task(url: str, task_id: str) -> dict:
    response = httpx.get(f"{url}/v1/tasks/{task_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_final(url: str, task_ids, timeout_s: float = 300) -> dict:
    """{task id: final record}; fails naming the tasks still unfinished."""
    deadline = time.monotonic() + timeout_s
    records = {}
    while time.monotonic() < deadline:
        records = {t: task(url, t) for t in task_ids}
        if all(r["phase"] in ("done", "failed") for r in records.values()):
            return records
        time.sleep(1)
    stuck = {t: r["phase"] for t, r in records.items() if r["phase"] not in ("done", "failed")}
    raise AssertionError(f"tasks not final after {timeout_s:.0f} s: {stuck}")


__all__ = ["cluster_app", "submit", "task", "wait_final", "replica_nodes", "wait_for"]
