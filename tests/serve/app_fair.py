"""Fair share through the real app: one key floods the queue, another key's single song is not held
back behind the flood (the task store's claim order, the LM engine's and DiT batch's admission all
take turns over keys). The order of finishing is asserted, never a time. Collected through
tests/serve/test_app.py, whose app these share.
"""

from __future__ import annotations

import httpx

from tests.serve.conftest import read_store_until

TINY = {"caption": "short loop", "duration": 10, "inference_steps": 1, "batch_size": 1, "thinking": False,
        "use_cot_metas": False}


def _finish_order(serve_app, task_ids, timeout_s=600.0):
    """``task_ids`` in the order they reached done (a bounded wait; every one must finish done)."""
    records = read_store_until(serve_app, lambda store: [store.get(task_id) for task_id in task_ids],
                               lambda records: all(r.finished for r in records), timeout_s, period_s=0.5)
    unfinished = {r.task_id: (r.phase, r.error) for r in records if r.phase != "done"}
    assert not unfinished, unfinished
    return [r.task_id for r in sorted(records, key=lambda r: r.updated_at)]


def test_a_keys_flood_does_not_hold_back_another_keys_song(serve_app):
    def submit(http):
        response = http.post("/v1/tasks", json=TINY)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    keys = serve_app.keys
    with httpx.Client(base_url=serve_app.url, timeout=120, headers={"Authorization": f"Bearer {keys['alice']}"}) as a, \
            httpx.Client(base_url=serve_app.url, timeout=120, headers={"Authorization": f"Bearer {keys['bob']}"}) as b:
        flood = [submit(a) for _ in range(40)]
        song = submit(b)
    order = _finish_order(serve_app, [*flood, song])
    assert order.index(song) < order.index(flood[-5]), (order.index(song), [order.index(t) for t in flood])
