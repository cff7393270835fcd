"""Task webhooks through the real app: a native task and a ``/release_task`` task each reach a loopback
receiver exactly once, signed with the key's secret; a URL the rules refuse is a 422 naming
``webhook_url``. The app allows private addresses (``ingress.webhooks.allow_private``) so that the
receiver may listen on loopback. Collected through tests/serve/test_app.py, whose app these share.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.conftest import read_store_until
from tests.serve.hook_receiver import Receiver

FAST = {"caption": "soft synth pad", "duration": 10, "inference_steps": 2, "batch_size": 1, "thinking": False}


@pytest.fixture
def hook(serve_app):
    secrets_file = Path(serve_app.args["ingress"]["webhooks"]["secrets_file"])
    receiver = Receiver(secrets_file.read_text().strip().split(":", 1)[1])
    yield receiver
    receiver.close()


def _settled(serve_app, delivery_ids, timeout_s=60.0):
    """The deliveries as the app's task store has them, once none is pending (bounded wait)."""
    return read_store_until(serve_app, lambda store: [store.get_delivery(d) for d in delivery_ids],
                            lambda found: all(d is not None and d.state != "pending" for d in found), timeout_s)


def test_native_and_release_tasks_are_delivered_once_signed(client, serve_app, hook):
    native = client.post("/v1/tasks", json={**FAST, "webhook_url": hook.url})
    assert native.status_code == 202, native.text
    release = client.post("/release_task", json={"prompt": "lofi", "audio_duration": 10, "inference_steps": 2,
                                                 "webhook_url": hook.url})
    assert release.status_code == 200, release.text
    ids = [native.json()["task_id"], release.json()["data"]["task_id"]]
    copies = hook.wait_for(ids)
    assert sorted(copies) == sorted(f"{task_id}.done" for task_id in ids)
    for task_id in ids:
        [body] = copies[f"{task_id}.done"]  # exactly one: nothing failed, so nothing was re-sent
        task = json.loads(body)["task"]
        assert (task["task_id"], task["phase"]) == (task_id, "done")
        assert task == client.get(f"/v1/tasks/{task_id}").json()  # the public record, as GET shows it
    settled = _settled(serve_app, sorted(copies))
    assert [(d.state, d.attempts, d.key_name) for d in settled] == [("delivered", 1, "default")] * 2
    assert len(hook.received) == 2


@pytest.mark.parametrize("url, reason", [("ftp://127.0.0.1/h", "http"), ("http://u:p@127.0.0.1/h", "credentials"),
                                         ("http://[::1/h", "valid URL")])
def test_refused_webhook_urls_are_422_naming_the_field(client, url, reason):
    for path, body in (("/v1/tasks", {**FAST, "webhook_url": url}), ("/release_task", {"prompt": "x", "webhook_url": url})):
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["body", "webhook_url"] and reason in detail["msg"], detail
