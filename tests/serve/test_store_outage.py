"""The task store killed under load: the app on a real Redis (append-only file, synced per write),
``kill -9`` with 8 tasks in flight, Redis restarted on the same directory. Every accepted task
ends ``done`` (≥ 95 %) or ``failed`` with a code; none is lost; routes answer 503 + Retry-After
while the store is down, never 500. (With the embedded default the store is a SQLite file that
every process opens itself: there is no store process to kill.)"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.conftest import deployed_app
from tests.serve.redis_server import RedisServer

SONG = {"caption": "lofi beat", "duration": 20, "inference_steps": 2, "batch_size": 1, "thinking": True}


@pytest.fixture(scope="module")
def redis_app(demo_root, tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), durable=True).start()
    try:
        for app in deployed_app(demo_root, tmp_path_factory.mktemp("redis-state"), store={"redis_url": server.url},
                                ingress={"lease_s": 3, "max_unfinished_tasks": 16}):
            app.redis = server
            yield app
    finally:
        server.stop()


def test_killing_the_task_store_loses_no_accepted_task(redis_app):
    with httpx.Client(base_url=redis_app.url, timeout=120, headers=redis_app.headers) as http:
        ids = []
        for index in range(8):
            response = http.post("/v1/tasks", json={**SONG, "seeds": [index], "use_random_seed": False})
            assert response.status_code == 202, response.text
            ids.append(response.json()["task_id"])
        redis_app.redis.kill()
        during = http.get(f"/v1/tasks/{ids[0]}")
        assert during.status_code == 503 and int(during.headers["retry-after"]) >= 1, during.text
        assert during.json()["detail"][0]["type"] == "store_unavailable"
        time.sleep(3)
        redis_app.redis.start()
        records = _wait_terminal(http, ids)
        done = sum(r["phase"] == "done" for r in records.values())
        for record in records.values():
            assert record["phase"] == "done" or record["error"], record
        assert done >= 0.95 * len(ids), {i: (r["phase"], r["error"]) for i, r in records.items()}
        after = http.post("/v1/generate", json={**SONG, "thinking": False, "duration": 10})
        assert after.status_code == 200, after.text


def _wait_terminal(http, ids, timeout_s=600.0):
    deadline, records = time.time() + timeout_s, {}
    while len(records) < len(ids):
        assert time.time() < deadline, f"not terminal: {set(ids) - set(records)}"
        for task_id in set(ids) - set(records):
            response = http.get(f"/v1/tasks/{task_id}")
            assert response.status_code in (200, 503), response.text  # 503 only while reconnecting
            if response.status_code == 200:
                assert response.json()["task_id"] == task_id
                if response.json()["finished"]:
                    records[task_id] = response.json()
        time.sleep(0.5)
    return records
