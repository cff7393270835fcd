"""Extend over HTTP (local Ray + Serve on the demo checkpoints, real HTTP): the native generate body
and the task route take ``extend_left_s`` / ``extend_right_s``; the LM plans the new part; bad values
are a 422 naming the field and its range. Collected through tests/serve/test_app.py, whose app these
tests share."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf

RATE = 48000
CROSSFADE = int(0.025 * RATE)  # the balanced repaint mode's waveform crossfade


@pytest.fixture(scope="module")
def extend_source_b64(source_audio):
    with open(source_audio, "rb") as file:
        return base64.b64encode(file.read()).decode()


def test_generate_extends_the_upload_with_the_lm_planning_the_new_part(client, source_audio, extend_source_b64):
    body = {"task_type": "extend", "src_audio_base64": extend_source_b64, "extend_right_s": 4.0,
            "caption": "a calm outro",
            "lyrics": "[outro]\ngoodnight harbour", "bpm": 90, "thinking": True, "use_cot_caption": False,
            "batch_size": 1, "seeds": [3], "use_random_seed": False, "audio_format": "wav32"}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    (plan,) = result["metadata"]["plans"]
    assert plan["metadata"]["duration"] == 4 and plan["metadata"]["bpm"] == 90  # the new part, the source's bpm
    (audio,) = result["audios"]
    assert audio["params"]["audio_codes"].count("<|audio_code_") == 20
    fetched = client.get(audio["url"])
    assert fetched.status_code == 200
    data, rate = sf.read(io.BytesIO(fetched.content), dtype="float32", always_2d=True)
    source, _ = sf.read(source_audio, dtype="float32", always_2d=True)
    assert rate == RATE and data.shape == (source.shape[0] + 4 * RATE, 2)
    # the source comes back, times the song's one normalisation gain, up to the crossfade
    kept, expected = data[: source.shape[0] - CROSSFADE], source[: -CROSSFADE]
    gain = float((kept * expected).sum() / (expected * expected).sum())
    assert np.abs(kept - gain * expected).max() <= 1e-6
    assert np.abs(data[-3 * RATE:]).max() > 1e-3


BAD = [
    ("/v1/generate", {"extend_right_s": -2.0}, "extend_right_s", "0 to 1200"),
    ("/v1/tasks", {"extend_left_s": 5000}, "extend_left_s", "0 to 1200"),
    ("/v1/generate", {"extend_right_s": 0.0}, "extend_right_s", "> 0"),
    ("/v1/tasks", {"extend_right_s": 1190.0}, "extend_right_s", "1200"),
]


@pytest.mark.parametrize("path,fields,field,hint", BAD, ids=[f"{p}:{f}:{h}" for p, _, f, h in BAD])
def test_bad_extensions_are_422_naming_the_field(client, extend_source_b64, path, fields, field, hint):
    body = {"task_type": "extend", "src_audio_base64": extend_source_b64, "thinking": False, **fields}
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in str(item["loc"]) for item in detail), detail
    assert hint in json.dumps(detail), detail


def test_an_extension_needs_a_source_and_the_schema_states_the_range(client):
    response = client.post("/v1/generate", json={"task_type": "extend", "extend_right_s": 5.0})
    assert response.status_code == 422 and "src_audio" in str(response.json()["detail"][0]["loc"])
    for path in ("/v1/generate", "/v1/tasks"):
        body = client.get("/openapi.json").json()["paths"][path]["post"]["requestBody"]
        fields = body["content"]["application/json"]["schema"]["properties"]
        for name in ("extend_left_s", "extend_right_s"):
            assert (fields[name]["minimum"], fields[name]["maximum"]) == (0.0, 1200.0)
