"""Songs streamed while they decode (``stream_format``, ``GET /v1/tasks/{id}/stream``, chat's
``stream``): the first audio bytes of a 60 s song arrive while the task is not done yet, the
concatenated stream decodes to the stored file's length, the SSE form carries the same bytes with
its end event, a reconnect resumes at a byte offset, and bad requests get 4xx naming the field.
Real local Ray + Serve (demo checkpoints), real HTTP, audio read back with soundfile.

Collected through tests/serve/test_app.py, whose app these tests share."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile as sf

from serve.streaming import StreamState

LONG_SONG = {"caption": "slow ambient pads", "duration": 60, "inference_steps": 2, "thinking": False,
             "batch_size": 1, "use_random_seed": False, "seeds": [11], "audio_format": "flac"}
MP3_PADDING = 2 * 1152  # an MP3 stream carries the encoder's delay and a padded last frame


def _samples(data: bytes) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    assert rate == 48000 and samples.shape[1] == 2
    return samples


@pytest.fixture(scope="module")
def streamed(client):
    """A 60 s song submitted with ``stream_format: opus`` and read through its raw stream as it is
    written: (task id, the stream's bytes, the task's phase when the first bytes arrived)."""
    response = client.post("/v1/tasks", json={**LONG_SONG, "stream_format": "opus"})
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    chunks, phase_at_first = [], None
    with client.stream("GET", f"/v1/tasks/{task_id}/stream") as stream:
        assert stream.status_code == 200 and stream.headers["content-type"] == "audio/ogg"
        for data in stream.iter_raw():
            if data and phase_at_first is None:
                phase_at_first = client.get(f"/v1/tasks/{task_id}").json()["phase"]
            chunks.append(data)
    return task_id, b"".join(chunks), phase_at_first


def test_a_60s_song_plays_before_its_task_is_done_and_streams_the_files_length(client, streamed):
    task_id, data, phase_at_first = streamed
    assert phase_at_first in ("dit", "encode"), f"the first audio arrived when the task was {phase_at_first}"
    # the song's stream is complete once its last window is written; the task is done after the file
    events = _events_until_final(client, task_id)
    status = client.get(f"/v1/tasks/{task_id}").json()
    assert status["phase"] == "done", status
    stored = client.get(status["result"]["audios"][0]["url"])
    assert stored.headers["content-type"] == "audio/flac"
    assert _samples(data).shape == _samples(stored.content).shape == (60 * 48000, 2)  # Ogg Opus: exact
    assert np.abs(_samples(data)).max() > 0
    # in the record, the chunks were counted before the audio was encoded and the task was done
    states = [(e["seq"], StreamState.of(e["detail"])) for e in events if StreamState.of(e["detail"])]
    first = min(seq for seq, state in states if state.chunks[0] > 0)
    assert first < min(e["seq"] for e in events if e["phase"] in ("encode", "done"))
    last = states[-1][1]
    assert last.ended == [True] and last.chunks[0] > 3 and last.format == "opus"


def _events_until_final(client, task_id):
    """The task's events; the event stream ends when the task is done or failed."""
    response = client.get(f"/v1/tasks/{task_id}/events")
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_the_stream_as_events_carries_the_same_bytes_and_resumes(client, streamed):
    task_id, data, _ = streamed
    url = f"/v1/tasks/{task_id}/stream"
    audio, end = _audio_events(client.get(url, headers={"Accept": "text/event-stream"}))
    assert b"".join(base64.b64decode(e["data"]) for e in audio) == data
    assert [e["offset"] for e in audio] == sorted(e["offset"] for e in audio) and audio[0]["offset"] == 0
    assert end == {"index": 0, "complete": True, "bytes": len(data)}
    middle = audio[2]["offset"] + 7
    assert client.get(url, params={"from": middle}).content == data[middle:]
    resumed, _ = _audio_events(client.get(url, headers={"Accept": "text/event-stream",
                                                        "Last-Event-ID": str(audio[1]["id"])}))
    assert b"".join(base64.b64decode(e["data"]) for e in resumed) == data[audio[1]["id"]:]


def _audio_events(response):
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    audio, end = [], None
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields.get("event") == "audio":
            audio.append({**json.loads(fields["data"]), "id": int(fields["id"])})
        elif fields.get("event") == "end":
            end = json.loads(fields["data"])
    return audio, end


def test_stream_refusals_name_the_field(client, streamed):
    task_id, _, _ = streamed
    plain = client.post("/v1/tasks", json={**LONG_SONG, "duration": 10})
    assert plain.status_code == 202, plain.text
    cases = [(f"/v1/tasks/{plain.json()['task_id']}/stream", {}, 409, "task_id"),
             ("/v1/tasks/nope/stream", {}, 404, None),
             (f"/v1/tasks/{task_id}/stream", {"index": 1}, 422, "index"),
             (f"/v1/tasks/{task_id}/stream", {"from": -1}, 422, "from")]
    for url, query, status, field in cases:
        response = client.get(url, params=query)
        assert response.status_code == status, (url, query, response.text)
        if field:
            assert response.json()["detail"][0]["loc"][-1] == field
    bodies = [{"stream_format": "wav"}, {"stream_format": "opus", "task_type": "extend", "extend_right_s": 5},
              {"stream_format": "opus", "task_type": "extract", "tracks": ["drums"]}]
    for extra in bodies:
        response = client.post("/v1/tasks", json={**LONG_SONG, "duration": 10, **extra,
                                                  "src_audio_base64": base64.b64encode(_wav(3.0)).decode()})
        assert response.status_code == 422, (extra, response.text)
        assert response.json()["detail"][0]["loc"][-1] == "stream_format", response.text


def _wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * 48000)) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone, tone], axis=1), 48000, format="WAV")
    return buffer.getvalue()


def test_chat_stream_sends_the_song_as_it_decodes_then_the_file(client):
    body = {"messages": [{"role": "user", "content": "<prompt>soft rain</prompt><lyrics>[inst]</lyrics>"}],
            "stream": True, "inference_steps": 2, "thinking": False, "audio_config": {"duration": 20, "format": "mp3"}}
    deltas = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas.append(json.loads(line[6:])["choices"][0]["delta"])
    pieces = [d["audio_chunk"] for d in deltas if d.get("audio_chunk")]
    final = [d["audio"] for d in deltas if d.get("audio")]
    assert pieces and len(final) == 1
    assert {(p["index"], p["format"]) for p in pieces} == {(0, "mp3")}
    first_piece = next(i for i, d in enumerate(deltas) if d.get("audio_chunk"))
    assert first_piece < next(i for i, d in enumerate(deltas) if d.get("audio")), "the stream comes before the file"
    streamed = _samples(b"".join(base64.b64decode(p["data"]) for p in pieces))
    stored = _samples(base64.b64decode(final[0][0]["audio_url"]["url"].split(",", 1)[1]))
    assert 0 <= streamed.shape[0] - 20 * 48000 <= MP3_PADDING and abs(stored.shape[0] - 20 * 48000) <= MP3_PADDING
