"""Accepted tasks are never lost: overload, a full queue and replica kills, against a real local Ray.

The app has a small admission bound and short leases so a killed ingress's tasks are re-driven
within seconds. Every accepted task must end ``done`` (or ``failed`` with a code); none stuck, none
unknown. Bounds on waiting are generous: they guard against hangs, no timing is asserted.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.serve.conftest import deployed_app
from tests.serve.hook_receiver import Receiver

BOUND = 8
SONG = {"caption": "lofi beat", "duration": 10, "inference_steps": 2, "batch_size": 1, "thinking": False}
CODES = ("replica_died", "overloaded", "invalid_audio", "internal", "cancelled")


WEBHOOK_SECRET = "whsec-resilience"


@pytest.fixture(scope="module")
def tough_app(demo_root, tmp_path_factory):
    # webhooks to the tests' loopback receiver; a short delivery lease re-sends a killed ingress's claims soon
    secrets_file = tmp_path_factory.mktemp("webhooks") / "secrets"
    secrets_file.write_text(f"default:{WEBHOOK_SECRET}\n")
    webhooks = {"allow_private": True, "secrets_file": str(secrets_file), "lease_s": 5, "timeout_s": 3}
    yield from deployed_app(demo_root, tmp_path_factory.mktemp("tough-state"),
                            ingress={"max_unfinished_tasks": BOUND, "max_sync_requests": 2, "lease_s": 3,
                                     "request_timeout_s": 300, "webhooks": webhooks})


@pytest.fixture
def hook():
    receiver = Receiver(WEBHOOK_SECRET)
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def http(tough_app):
    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=tough_app.url, timeout=300, headers=tough_app.headers, limits=limits) as client:
        yield client


def _submit(http, count, **changes):
    ids = []
    for index in range(count):
        response = http.post("/v1/tasks", json={**SONG, "seeds": [index], "use_random_seed": False, **changes})
        assert response.status_code == 202, response.text
        ids.append(response.json()["task_id"])
    return ids


def _wait_terminal(http, ids, timeout_s=600.0):
    deadline = time.time() + timeout_s
    records = {}
    while time.time() < deadline:
        for task_id in ids:
            if task_id in records:
                continue
            response = http.get(f"/v1/tasks/{task_id}")
            assert response.status_code == 200, f"task {task_id} became unknown: {response.text}"
            if response.json()["finished"]:
                records[task_id] = response.json()
        if len(records) == len(ids):
            return records
        time.sleep(0.5)
    stuck = {task_id: http.get(f"/v1/tasks/{task_id}").json()["phase"] for task_id in ids if task_id not in records}
    raise AssertionError(f"tasks not terminal: {stuck}")


def _check_outcomes(records):
    done = sum(r["phase"] == "done" for r in records.values())
    for record in records.values():
        if record["phase"] == "failed":
            assert record["error"] in CODES or record["error"].startswith("timeout:"), record
            assert "Error" not in record["message"] and "/" not in record["message"], record["message"]
    return done


def _wait_phase(http, ids, phases, timeout_s=300.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(http.get(f"/v1/tasks/{i}").json()["phase"] in phases for i in ids):
            return
        time.sleep(0.1)
    raise AssertionError(f"no task reached {phases}")


def _kill(app_name, deployment):
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no {deployment} replica")


def test_overload_at_four_times_the_bound_refuses_with_retry_after(tough_app, http):
    def post(index):
        path = "/v1/generate" if index % 8 == 0 else "/v1/tasks"
        return http.post(path, json={**SONG, "seeds": [index], "use_random_seed": False})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(post, range(4 * BOUND)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 202, 429, 503}, statuses
    refused = [r for r in responses if r.status_code in (429, 503)]
    assert refused, "4x the bound must be refused in part"
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["detail"][0]["type"] in ("overloaded", "draining")
    accepted = [r.json()["task_id"] for r in responses if r.status_code == 202]
    assert accepted and len(accepted) <= BOUND
    _check_outcomes(_wait_terminal(http, accepted))


def _unfinished(http, ids) -> int:
    return sum(not http.get(f"/v1/tasks/{task_id}").json()["finished"] for task_id in ids)


def test_info_routes_answer_with_the_queue_at_its_bound(tough_app, http):
    ids = _submit(http, BOUND, duration=30)
    assert http.post("/v1/tasks", json=SONG).status_code == 429, "the queue is at its bound"
    for path in ("/v1/models", "/v1/stats", "/ready", "/health"):
        response = http.get(path, timeout=10)
        assert response.status_code == 200, (path, response.text)
    # the earlier tests' tasks are all finished, so the store's unfinished tasks are these; they only
    # ever finish, so the count /v1/stats reads lies between two counts taken around it
    before = _unfinished(http, ids)
    data = http.get("/v1/stats").json()["data"]
    after = _unfinished(http, ids)
    tasks = data["serve"]["store"]["tasks"]
    running = tasks["lm"] + tasks["dit"] + tasks["encode"]
    assert after <= tasks["queued"] + running <= before <= BOUND, (after, tasks, before)
    assert (data["jobs"]["queued"], data["jobs"]["running"], data["queue_maxsize"]) == (tasks["queued"], running, BOUND)
    _check_outcomes(_wait_terminal(http, ids))


@pytest.mark.parametrize("deployment,phases,changes", [
    ("LMDeployment", ("lm",), {"thinking": True, "duration": 20}),
    ("DiTDeployment", ("dit",), {"duration": 30}),
    ("Ingress", ("lm", "dit"), {"duration": 20}),
])
def test_replica_kill_loses_no_task(tough_app, http, hook, deployment, phases, changes):
    ids = _submit(http, BOUND, webhook_url=hook.url, **changes)
    _wait_phase(http, ids, phases)
    _kill(tough_app.name, deployment)
    records = _wait_terminal(http, ids)
    done = _check_outcomes(records)
    # one replica's death costs no task: LM/DiT calls are retried, an ingress's tasks re-driven
    assert done == len(ids), {i: (r["phase"], r["error"]) for i, r in records.items()}
    # and no webhook: one delivery id per task, every copy signed and alike (receivers de-duplicate on the id)
    copies = hook.wait_for(ids)
    assert sorted(copies) == sorted(f"{task_id}.done" for task_id in ids)
    assert all(len(set(bodies)) == 1 for bodies in copies.values())
    after = http.post("/v1/generate", json=SONG)
    assert after.status_code == 200, after.text
