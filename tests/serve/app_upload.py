"""``upload_url`` through the real app: each encoded file goes from the DiT replica to a presigned PUT
URL of a real S3-compatible server (moto's, session fixture ``s3``), byte-equal to ``GET
/v1/audio/{key}``; a failing URL leaves the task done, the audio retrievable and the error recorded;
a count or address that does not fit the task is a 422 naming ``upload_url``. The app allows private
addresses (``ingress.webhooks.allow_private``), so loopback URLs pass the address rules. Collected
through tests/serve/test_app.py, whose app these share.
"""

from __future__ import annotations

import io
import socket
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import soundfile as sf

FAST = {"caption": "soft synth pad", "duration": 10, "inference_steps": 2, "thinking": False, "batch_size": 1,
        "audio_format": "flac"}


def _finished(client, task_id, timeout_s=300.0):
    deadline = time.time() + timeout_s  # a bound against hangs; nothing is timed
    while not (status := client.get(f"/v1/tasks/{task_id}").json())["finished"]:
        assert time.time() < deadline, status
        time.sleep(0.2)
    return status


def _signatures(urls):
    """The credential part of each presigned URL, which nothing may store or log."""
    return [value for url in urls for value in parse_qs(urlsplit(url).query)["Signature"]]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _logged(serve_app) -> str:
    return "".join(path.read_text(errors="replace") for path in serve_app.serve_logs.rglob("*") if path.is_file())


def test_native_and_release_tasks_put_each_audio_to_its_url(client, s3):
    bucket = s3.bucket()
    urls = [s3.presigned_put(bucket, f"native/{n}.flac") for n in range(2)]
    native = client.post("/v1/tasks", json={**FAST, "batch_size": 2, "upload_url": urls})
    assert native.status_code == 202, native.text
    release_url = s3.presigned_put(bucket, "release/song.mp3")
    release = client.post("/release_task", json={"prompt": "lofi", "audio_duration": 10, "inference_steps": 2,
                                                 "batch_size": 1, "upload_url": release_url})
    assert release.status_code == 200, release.text
    for task_id, targets, objects in ((native.json()["task_id"], urls, ["native/0.flac", "native/1.flac"]),
                                      (release.json()["data"]["task_id"], [release_url], ["release/song.mp3"])):
        status = _finished(client, task_id)
        assert status["phase"] == "done", status
        audios = status["result"]["audios"]
        assert [a["upload"] for a in audios] == [{"url": url.split("?")[0], "ok": True, "status": 200, "error": None,
                                                  "attempts": 1} for url in targets]
        for audio, name in zip(audios, objects):
            served = client.get(audio["url"])
            assert served.status_code == 200 and s3.read(bucket, name) == served.content
        assert not any(secret in str(status) for secret in _signatures(targets))
    assert sf.read(io.BytesIO(s3.read(bucket, "native/1.flac")))[0].shape == (10 * 48000, 2)


def test_a_failing_upload_url_leaves_the_task_done_with_the_error_recorded(client, serve_app, s3):
    bucket = s3.bucket()
    urls = [s3.presigned_put(bucket, "kept.flac"), s3.presigned_put(f"gone-{s3.port}", "lost.flac"),
            f"http://127.0.0.1:{_closed_port()}/bucket/lost.flac?Signature=closed-port-secret"]
    response = client.post("/v1/tasks", json={**FAST, "batch_size": 3, "upload_url": urls})
    assert response.status_code == 202, response.text
    status = _finished(client, response.json()["task_id"])
    assert status["phase"] == "done" and status["error"] is None, status
    kept, missing, closed = (audio["upload"] for audio in status["result"]["audios"])
    assert kept["ok"] and kept["attempts"] == 1
    assert missing == {"url": urls[1].split("?")[0], "ok": False, "status": 404, "error": "HTTP 404 NoSuchBucket",
                       "attempts": 1}
    assert closed == {"url": urls[2].split("?")[0], "ok": False, "status": None,
                      "error": "request failed: ConnectError", "attempts": 3}  # dit.upload_url.attempts
    for audio in status["result"]["audios"]:  # every file is still here
        served = client.get(audio["url"])
        assert served.status_code == 200 and sf.read(io.BytesIO(served.content))[0].shape == (10 * 48000, 2)
    assert s3.read(bucket, "kept.flac") == client.get(status["result"]["audios"][0]["url"]).content
    logged = _logged(serve_app)
    assert "NoSuchBucket" in logged  # the DiT replica logged the failures, by URL without query
    assert not any(secret in logged for secret in _signatures(urls[:2]) + ["closed-port-secret"])


@pytest.mark.parametrize("path, body, hint", [
    ("/v1/tasks", {**FAST, "batch_size": 2, "upload_url": "http://127.0.0.1:9/a"}, "exactly 2 URLs"),
    ("/v1/tasks", {**FAST, "batch_size": 1, "upload_url": ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]},
     "one URL"),
    ("/v1/tasks", {**FAST, "upload_url": "ftp://127.0.0.1/a"}, "http"),
    ("/v1/tasks", {**FAST, "batch_size": 2, "upload_url": ["http://127.0.0.1:9/a", "http://u:p@127.0.0.1:9/b"]},
     "entry 1"),
    ("/release_task", {"prompt": "x", "batch_size": 3, "upload_url": ["http://127.0.0.1:9/a"]}, "exactly 3 URLs"),
    ("/v1/tasks", {**FAST, "upload_url": 5}, "string"),
])
def test_upload_urls_that_do_not_fit_the_task_are_422_naming_the_field(client, path, body, hint):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][:2] == ["body", "upload_url"] and hint in detail["msg"], detail
