"""A multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``) laid out as the GPU cluster:
a head that advertises no model resources (it plays the cpu group, hosting the ingress), and worker
nodes of two kinds advertising the custom resources the GPU profile's deployments ask for (``lm_gpu``
on "lm" nodes, ``dit_gpu`` on "dit" nodes), with the CPUs their replicas take.

The app is the RayService's own Serve config (``cluster/render.py``: serve_config.yaml + the GPU
profile) with only what cannot exist here swapped: CUDA → CPU, the checkpoint volume → the demo
checkpoints, GPU counts → 0, the Redis and audio-volume addresses → a local redis-server and a
directory; plus the test's autoscaling bounds and windows.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("lm", "dit")
# a removed node is declared dead within seconds (Ray's default takes about half a minute)
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 3}


def load_render():
    spec = importlib.util.spec_from_file_location("cluster_render", REPO_ROOT / "cluster" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile_resources() -> Dict[str, Dict[str, float]]:
    """{"lm": {"lm_gpu": 1}, "dit": {"dit_gpu": 1}, "ingress": {"ingress_cpu": 1}}: what one replica of
    each asks for in the GPU profile."""
    app = load_render().serve_config()["applications"][0]["args"]
    return {kind: dict(app[kind]["deployment"]["ray_actor_options"]["resources"]) for kind in (*KINDS, "ingress")}


def rendered_app(checkpoints: str, state_dir: Path, redis_url: str, port: int,
                 autoscaling: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The cluster's Serve config (a ServeDeploySchema dict) with the swaps above."""
    config = copy.deepcopy(load_render().serve_config())
    app = config["applications"][0]
    args = app["args"]
    args.update(demo=False, checkpoints=str(checkpoints), state_dir=str(state_dir))
    args["store"] = {**args.get("store", {}), "redis_url": redis_url, "audio_url": str(state_dir / "audio")}
    for kind in KINDS:
        args[kind]["device"] = "cpu"
        args[kind]["deployment"]["ray_actor_options"]["num_gpus"] = 0
    for section, values in (autoscaling or {}).items():
        deployment = args[section]["deployment"]
        deployment["autoscaling_config"] = {**deployment["autoscaling_config"], **values}
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    return config


def replica_cpus(config: Dict[str, Any], kind: str) -> float:
    return float(config["applications"][0]["args"][kind]["deployment"]["ray_actor_options"].get("num_cpus", 1))


@dataclass
class MultiNode:
    """The cluster and which node is of which kind ("head", "lm", "dit")."""

    cluster: Any
    kinds: Dict[str, str] = field(default_factory=dict)  # node id → kind
    nodes: Dict[str, Any] = field(default_factory=dict)  # node id → ray._private.node.Node

    @classmethod
    def start(cls, ingress_replicas: int, cpus_per_replica: float) -> "MultiNode":
        from ray.cluster_utils import Cluster

        # the head doubles as the cpu group: Serve controller, proxy and ingress, never a model replica
        resources = {name: amount * ingress_replicas for name, amount in profile_resources()["ingress"].items()}
        cluster = Cluster(initialize_head=True, connect=True,
                          head_node_args={"num_cpus": cpus_per_replica * ingress_replicas, "resources": resources,
                                          "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
        nodes = cls(cluster)
        head = cluster.head_node
        nodes.kinds[head.node_id], nodes.nodes[head.node_id] = "head", head
        return nodes

    def add(self, kind: str, replicas: int, cpus_per_replica: float) -> Any:
        """A worker of ``kind`` with room for ``replicas`` replicas and nothing else."""
        resources = {name: amount * replicas for name, amount in profile_resources()[kind].items()}
        node = self.cluster.add_node(num_cpus=cpus_per_replica * replicas, resources=resources)
        self.cluster.wait_for_nodes()
        self.kinds[node.node_id], self.nodes[node.node_id] = kind, node
        return node

    def remove(self, node: Any) -> None:
        self.kinds.pop(node.node_id, None)
        self.nodes.pop(node.node_id, None)
        self.cluster.remove_node(node, allow_graceful=False)

    def of_kind(self, kind: str) -> List[Any]:
        return [self.nodes[node_id] for node_id, k in self.kinds.items() if k == kind]

    def shutdown(self) -> None:
        import ray

        ray.shutdown()  # the driver is attached to the head, which the cluster removes last
        self.cluster.shutdown()


def replica_nodes(app_name: str) -> Dict[str, List[str]]:
    """{deployment name: [node id of each RUNNING replica]} from the Serve controller."""
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    out: Dict[str, List[str]] = {}
    for name, deployment in details["applications"][app_name]["deployments"].items():
        out[name] = [r["node_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]
    assert serve.status().applications[app_name] is not None
    return out


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")
