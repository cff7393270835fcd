"""Stems over HTTP: one extract request for several tracks (``tracks``) comes back with one audio per
track, labelled, in order, from one source encode on the base DiT replica; bad ``tracks`` get a 422
naming the field and the allowed names. Real local Ray + Serve (demo checkpoints), real HTTP.

Collected through tests/serve/test_app.py, whose app (the demo's turbo + base, step-level
batching) these tests share."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile

import numpy as np
import pytest
import soundfile as sf

from acestep.stems import ALL_TRACKS
from tests.serve.conftest import wav_bytes as _wav_bytes

BASE = "acestep-v15-base"  # the demo app's base variant: extract goes there
STEM = {"task_type": "extract", "inference_steps": 4, "audio_format": "wav", "batch_size": 1, "seeds": [3],
        "use_random_seed": False}


def _audio(client, url):
    response = client.get(url)
    assert response.status_code == 200, response.text
    return sf.read(io.BytesIO(response.content), dtype="float32", always_2d=True)[0]


def _source_encodes(serve_app) -> int:
    from ray import serve

    handle = serve.get_deployment_handle(f"DiTDeployment-{BASE}", app_name=serve_app.name)
    return handle.stats.remote().result()["worker"]["vae_encodes"]["source"]


@pytest.fixture(scope="module")
def source_b64():
    return base64.b64encode(_wav_bytes(6.0)).decode()


def test_one_request_gives_each_track_labelled_in_order(client, serve_app, source_b64):
    before = _source_encodes(serve_app)
    response = client.post("/v1/generate", json={**STEM, "src_audio_base64": source_b64, "tracks": ["drums", "vocals"]})
    assert response.status_code == 200, response.text
    assert _source_encodes(serve_app) - before == 1
    output = response.json()
    assert output["metadata"]["models"]["dit"] == BASE
    assert [a["track"] for a in output["audios"]] == ["drums", "vocals"]
    assert [a["params"]["track"] for a in output["audios"]] == ["drums", "vocals"]
    assert output["audios"][0]["params"]["instruction"] == "Extract the DRUMS track from the audio:"
    stems = [_audio(client, a["url"]) for a in output["audios"]]
    assert all(s.shape == (6 * 48000, 2) for s in stems)
    # the official single-track request for the second track gives the same audio
    solo = client.post("/v1/generate", json={**STEM, "src_audio_base64": source_b64,
                                             "instruction": "Extract the VOCALS track from the audio:"})
    assert solo.status_code == 200, solo.text
    assert solo.json()["audios"][0]["track"] is None
    assert np.allclose(_audio(client, solo.json()["audios"][0]["url"]), stems[1], atol=2e-4)  # 16-bit WAV steps


def test_an_async_multipart_task_takes_the_dual_track_preset(client, source_b64):
    request = {**STEM, "tracks": "vocals+accompaniment", "audio_format": "flac"}
    response = client.post("/v1/tasks", data={"request": json.dumps(request)},
                           files={"src_audio": ("song.wav", base64.b64decode(source_b64), "audio/wav")})
    assert response.status_code == 202, response.text
    status_url = response.json()["status_url"]
    deadline = time.time() + 300  # a bound against hangs; nothing is timed
    while not (status := client.get(status_url).json())["finished"]:
        assert time.time() < deadline, status
        time.sleep(0.2)
    assert status["phase"] == "done", status
    audios = status["result"]["audios"]
    assert [a["track"] for a in audios] == ["vocals", "accompaniment"]
    assert all(_audio(client, a["url"]).shape == (6 * 48000, 2) for a in audios)
    # every stem in one zip, in result order, named by track; byte-equal to the files
    archive = client.get(f"/v1/tasks/{status['task_id']}/audios.zip")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as bundle:
        assert bundle.namelist() == ["01-vocals.flac", "02-accompaniment.flac"]
        for name, audio in zip(bundle.namelist(), audios):
            assert bundle.read(name) == client.get(audio["url"]).content
    assert client.get("/v1/tasks/" + "0" * 32 + "/audios.zip").status_code == 404


def test_task_types_say_what_a_chosen_dit_can_serve(client):
    served = {t["task_type"]: t for t in client.get("/v1/task_types").json()["tasks"]}
    assert served["extract"]["servable"] and served["extract"]["model"] == BASE and served["extract"]["stems"]
    turbo = {t["task_type"]: t for t in client.get("/v1/task_types", params={"model": "turbo"}).json()["tasks"]}
    assert not turbo["extract"]["servable"] and "acestep-v15-turbo is turbo" in turbo["extract"]["reason"]
    assert turbo["text2music"]["servable"] and turbo["text2music"]["model"] == "acestep-v15-turbo"
    unknown = client.get("/v1/task_types", params={"model": "nope"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["query", "model"]
    assert "acestep-v15-base" in unknown.json()["detail"][0]["msg"]  # names the served models


BAD_TRACKS = [
    ("/v1/generate", {"tracks": ["vocals", "theremin"]}, "entry 1 is not one of the names"),
    ("/v1/generate", {"tracks": "all, all"}, "entry 0 is not one of the names"),
    ("/v1/generate", {"tracks": ["drums"], "task_type": "complete"}, "null unless task_type is extract or lego"),
    ("/v1/tasks", {"tracks": "accompaniment", "task_type": "lego"}, "accompaniment only with task_type extract"),
]


@pytest.mark.parametrize("path, fields, hint", BAD_TRACKS)
def test_bad_tracks_get_422_naming_tracks_and_the_allowed_names(client, source_b64, path, fields, hint):
    body = {**STEM, "src_audio_base64": source_b64, **fields}
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"][-1] == "tracks", detail
    message = json.dumps(detail)
    assert hint in message
    if "entry" in hint:
        assert all(name in message for name in ALL_TRACKS + ("accompaniment", "vocals+accompaniment"))


def test_a_tracks_value_of_the_wrong_type_is_a_422_naming_tracks(client, source_b64):
    response = client.post("/v1/generate", json={**STEM, "src_audio_base64": source_b64, "tracks": {"a": 1}})
    assert response.status_code == 422, response.text
    assert "tracks" in str(response.json()["detail"][0]["loc"])
