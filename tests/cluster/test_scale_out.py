"""Scale-out on a real multi-node Ray cluster (one machine): LM replicas on LM nodes, DiT replicas
on DiT nodes, the ingress elsewhere; the LM's plan passed to the DiT as a reference the ingress never
unpickles; each deployment autoscaling on its own load; a node lost with tasks in flight, and every
accepted task still ends done or failed with a code.

The tests share one cluster and run in file order (the node-loss tests change it last)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.cluster.conftest import AUTOSCALING, submit, task, wait_final
from tests.cluster.harness import replica_cpus, replica_nodes, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
LM, DIT, INGRESS = "LMDeployment", "DiTDeployment", "Ingress"
IN_FLIGHT = 8  # tasks a load keeps running: four per replica of the deployment it loads, at its max


def _kinds(cluster_app):
    nodes = replica_nodes(cluster_app.name)
    return {name: [cluster_app.nodes.kinds.get(node_id, "gone") for node_id in ids] for name, ids in nodes.items()}


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", timeout=30).json()["data"]["serve"]


def test_replicas_sit_on_their_own_kind_of_node(cluster_app):
    kinds = _kinds(cluster_app)
    assert kinds[LM] and set(kinds[LM]) == {"lm"}, kinds
    assert kinds[DIT] and set(kinds[DIT]) == {"dit"}, kinds
    assert kinds[INGRESS] and set(kinds[INGRESS]) == {"head"}, kinds


def test_the_plan_travels_lm_to_dit_without_the_ingress_unpickling_it(cluster_app):
    from ray import serve

    before = _stats(cluster_app.url)["plans_unpacked"]
    record = wait_final(cluster_app.url, [submit(cluster_app.url, thinking=True)])
    (final,) = record.values()
    assert final["phase"] == "done", final
    assert final["result"]["audios"], final
    assert _stats(cluster_app.url)["plans_unpacked"] == before == 0  # the ingress never held the codes
    dit = serve.get_deployment_handle(DIT, cluster_app.name).stats.remote().result(timeout_s=60)
    assert dit["plans_unpacked"] >= 1  # the DiT replica did


def _counts(cluster_app) -> dict:
    nodes = replica_nodes(cluster_app.name)
    return {LM: len(nodes[LM]), DIT: len(nodes[DIT])}


class Load:
    """Keeps ``in_flight`` tasks of one shape running from a thread; samples replica counts."""

    def __init__(self, cluster_app, in_flight: int, **fields):
        self.app, self.in_flight, self.fields = cluster_app, in_flight, fields
        self.samples, self.accepted = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        running = []
        while not self._stop.is_set():
            running = [t for t in running if task(self.app.url, t)["phase"] not in ("done", "failed")]
            if len(running) < self.in_flight:  # one a tick: tasks started together would move in lockstep
                running.append(submit(self.app.url, **self.fields))
                self.accepted.append(running[-1])
            time.sleep(0.5)

    def counts(self):
        self.samples.append(_counts(self.app))
        return self.samples[-1]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)


def _scale_shape(cluster_app, heavy: str, light: str, **fields):
    """Load that is ``heavy``-bound raises ``heavy`` to its max while ``light`` stays at its min; both
    come back down after the load stops."""
    high = AUTOSCALING["lm" if heavy == LM else "dit"]["max_replicas"]
    at_rest = {LM: 1, DIT: 1}
    wait_for(lambda: _counts(cluster_app) == at_rest, 240, "both deployments at 1 before the load")
    with Load(cluster_app, in_flight=IN_FLIGHT, **fields) as load:
        wait_for(lambda: load.counts()[heavy] == high, 240, f"{heavy} to scale to {high}")
        for _ in range(6):  # it stays up while the load lasts
            assert load.counts()[heavy] == high, load.samples
            time.sleep(0.5)
    assert {s[light] for s in load.samples} == {1}, load.samples
    wait_final(cluster_app.url, load.accepted, 300)
    wait_for(lambda: load.counts() == at_rest, 240, "both deployments to scale back to 1")


def test_dit_heavy_load_scales_the_dit_and_not_the_lm(cluster_app):
    # long songs, and nothing for the LM to write (no codes, no CoT): every task's time is DiT time
    _scale_shape(cluster_app, DIT, LM, thinking=False, use_cot_metas=False, duration=30, inference_steps=4)


def test_lm_heavy_load_scales_the_lm_and_not_the_dit(cluster_app):
    # codes and CoT for the shortest songs at one diffusion step: nearly every task's time is LM time
    _scale_shape(cluster_app, LM, DIT, thinking=True, duration=10, inference_steps=1)


@pytest.mark.parametrize("kind,deployment,fields", [
    ("dit", DIT, {"thinking": False, "duration": 30, "inference_steps": 4}),
    ("lm", LM, {"thinking": True, "duration": 10, "inference_steps": 2}),
])
def test_losing_a_node_loses_no_task(cluster_app, kind, deployment, fields):
    nodes = cluster_app.nodes
    doomed = nodes.of_kind(kind)
    nodes.add(kind, AUTOSCALING[kind]["max_replicas"], replica_cpus(cluster_app.config, kind))
    accepted = [submit(cluster_app.url, **fields) for _ in range(8)]
    wait_for(lambda: any(task(cluster_app.url, t)["phase"] == kind for t in accepted), 120, f"a task in {kind}")
    for node in doomed:
        nodes.remove(node)
    records = wait_final(cluster_app.url, accepted, 400)
    failed = {t: r["error"] for t, r in records.items() if r["phase"] == "failed"}
    assert all(failed.values()), failed  # a failure always names its code
    wait_for(lambda: (k := _kinds(cluster_app))[deployment] and set(k[deployment]) == {kind},
             180, f"{deployment} replicas on the remaining {kind} node")
    (after,) = wait_final(cluster_app.url, [submit(cluster_app.url, **fields)]).values()
    assert after["phase"] == "done", after
