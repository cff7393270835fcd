"""Stems over HTTP: one extract request for several tracks (``tracks``) comes back with one audio per
track, labelled, in order, from one source encode on the base DiT replica; bad ``tracks`` get a 422
naming the field and the allowed names. Real local Ray + Serve (demo checkpoints), real HTTP."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from acestep.stems import ALL_TRACKS
from tests.serve.conftest import deployed_app
from tests.serve.test_app import _wav_bytes

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
def serve_app(demo_root, tmp_path_factory):
    """The conftest's app (its ``client`` too) with the base variant beside the turbo default, and the
    GPU profile's step-level batching, so the tracks share forwards."""
    batch = {"max_forward_rows": 16, "max_row_frames": 96000, "max_padding": 0.25}
    yield from deployed_app(demo_root, tmp_path_factory.mktemp("stems-state"),
                            dit={"extra_models": [BASE], "batch": batch})


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
