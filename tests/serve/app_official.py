"""The official ACE-Step server's routes and shapes, as its existing clients use them: release and
poll, download ``base + file``, the service routes in their envelopes, the chat-completions mode
(plain and streamed), the analysis modes, and every way a client may name a path.

Real local Ray, demo checkpoints, real HTTP; the app lets requests name files in one allow-listed
directory (``ingress.allowed_audio_dirs``: the ``shared_dir`` fixture). Collected through
tests/serve/test_app.py, whose app these tests share.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from serve.compat import release as compat

FAST = {"inference_steps": 2, "batch_size": 1, "thinking": False}


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=300, headers=serve_app.headers) as client:
        yield client


def _wav_bytes(seconds=12.0, rate=48000):
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 555 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone, tone], axis=1), rate, format="WAV")
    return buffer.getvalue()


def _decode(data: bytes):
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, rate


def _poll(http, task_id, timeout_s=240):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        response = http.post("/query_result", json={"task_id_list": [task_id]})
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        assert item["task_id"] == task_id
        if item["status"] != 0:
            return item
        time.sleep(0.5)
    raise TimeoutError(task_id)


def _release(http, **kwargs):
    response = http.post("/release_task", **kwargs)
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] == 200 and envelope["error"] is None and envelope["data"]["status"] == "queued"
    return envelope["data"]["task_id"]


# -- release, poll, download -------------------------------------------------------------------------


def test_release_task_json_then_download_base_plus_file(http, serve_app):
    # shaped like the upstream API docs' example
    body = {"prompt": "upbeat pop with guitar", "lyrics": "[verse]\nla la la", "audio_duration": 10,
            "key_scale": "C major", "time_signature": "4", "param_obj": json.dumps({"bpm": 120}), **FAST}
    item = _poll(http, _release(http, json=body))
    assert item["status"] == 1, item
    files = json.loads(item["result"])
    assert len(files) == 1 and files[0]["status"] == 1 and files[0]["stage"] == "succeeded"
    assert files[0]["metas"]["bpm"] == 120 and files[0]["metas"]["keyscale"] == "C major"
    assert files[0]["file"].startswith("/v1/audio?path=%2F")
    download = httpx.get(serve_app.url + files[0]["file"], headers=serve_app.headers)
    assert download.status_code == 200 and download.headers["content-type"] == "audio/mpeg"  # upstream default
    samples, rate = _decode(download.content)
    assert rate == 48000 and samples.shape[1] == 2
    # only the file name is used: a different directory in front of it names the same stored file
    name = files[0]["file"].rsplit("%2F", 1)[-1]
    assert http.get("/v1/audio", params={"path": "/elsewhere/x/" + name}).status_code == 200
    # a returned file handed back as the next task's source: looked up by key, no path opened
    rework = _release(http, json={"prompt": "rework", "task_type": "repaint", "repainting_start": 2,
                                  "repainting_end": 6, "src_audio_path": files[0]["file"], **FAST})
    assert _poll(http, rework)["status"] == 1


def test_release_task_form_and_multipart(http):
    form = {"prompt": "rework", "task_type": "repaint", "repainting_start": "2", "repainting_end": "6",
            "inference_steps": "2", "batch_size": "1", "audio_format": "wav"}
    files = {"ctx_audio": ("source.wav", _wav_bytes(12.0), "audio/wav")}
    item = _poll(http, _release(http, data=form, files=files))
    assert item["status"] == 1, item
    download = http.get(json.loads(item["result"])[0]["file"])
    samples, rate = _decode(download.content)
    assert rate == 48000 and abs(samples.shape[0] / rate - 12.0) < 0.5
    urlencoded = _release(http, data={"prompt": "quiet harp", "audio_duration": "10", "inference_steps": "2",
                                      "batch_size": "1"})
    assert _poll(http, urlencoded)["status"] == 1


def test_query_result_known_unknown_and_missing_ids_in_order(http):
    known = _release(http, json={"prompt": "short drum loop", "audio_duration": 10, **FAST})
    _poll(http, known)
    asked = ["nope", known, "nada"]
    for response in (http.post("/query_result", json={"task_id_list": asked}),
                     http.post("/query_result", data={"task_id_list": json.dumps(asked)})):
        data = response.json()["data"]
        assert response.status_code == 200 and [item["task_id"] for item in data] == asked
        assert data[0]["task_id"] == "nope" and data[0]["status"] == 2  # failed: a poller stops
        assert json.loads(data[0]["result"])[0]["error"] == data[0]["progress_text"] == compat.UNKNOWN_TASK
        assert data[1]["status"] == 1 and json.loads(data[1]["result"])[0]["file"]
    for body in ({}, {"task_id_list": {"not": "a list"}}, {"task_id_list": [1, 2]}):
        response = http.post("/query_result", json=body)
        assert response.status_code == 200 and response.json()["data"] == [], body


# -- service routes -------------------------------------------------------------------------------------


def test_service_routes_answer_in_the_official_shapes(http):
    health = http.get("/health").json()
    assert health["code"] == 200 and health["data"]["status"] == "ok" and health["data"]["service"] == "ACE-Step API"
    assert health["data"]["loaded_model"] == "acestep-v15-turbo" and health["data"]["llm_initialized"]
    for path in ("/v1/models", "/api/v1/models"):
        listed = http.get(path).json()
        assert listed["object"] == "list" and listed["data"][0]["id"] == "acestep/acestep-v15-turbo", path
    inventory = http.get("/v1/model_inventory").json()["data"]
    assert inventory["default_model"] == "acestep-v15-turbo" and inventory["models"][0]["is_loaded"]
    assert "lego" not in inventory["models"][0]["supported_task_types"]  # turbo cannot do lego
    assert "cover-nofsq" in inventory["models"][0]["supported_task_types"]  # but covers without FSQ, as upstream
    stats = http.get("/v1/stats").json()
    assert stats["code"] == 200 and {"total", "queued", "running", "succeeded", "failed"} <= set(stats["data"]["jobs"])
    assert {"queue_size", "queue_maxsize", "avg_job_seconds"} <= set(stats["data"]) and "serve" in stats["data"]


def test_format_input_random_sample_and_init_take_json_and_form(http):
    for send in ({"json": {"prompt": "latin pop", "lyrics": "[verse]\nhola", "param_obj": {"bpm": 95}}},
                 {"data": {"prompt": "latin pop", "lyrics": "[verse]\nhola", "param_obj": json.dumps({"bpm": 95}),
                           "time_signature": "4"}}):
        formatted = http.post("/format_input", **send)
        assert formatted.status_code == 200, formatted.text
        envelope = formatted.json()
        if envelope["code"] == 200:  # the random demo LM may write no usable answer: upstream's code 500
            assert {"caption", "lyrics", "bpm", "key_scale", "time_signature", "duration", "vocal_language"} == \
                set(envelope["data"])
        else:
            assert envelope["code"] == 500 and envelope["error"]
    bad = http.post("/format_input", json={"prompt": "x", "temperature": "hot"})
    assert bad.status_code == 422 and "temperature" in bad.text
    for send, field in (({"json": {"sample_type": "simple_mode"}}, "description"),
                        ({"data": {"sample_type": "custom_mode"}}, "caption")):
        example = http.post("/create_random_sample", **send).json()
        assert example["code"] == 200 and field in example["data"]
    for route in ("/v1/init", "/v1/reinitialize"):
        assert http.post(route, json={"model": "acestep-v15-turbo"}).json()["code"] == 200
        refused = http.post(route, data={"model": "acestep-v15-sft"}).json()
        assert refused["code"] == 400 and "acestep-v15-turbo" in refused["error"]


def test_bad_values_are_refused_naming_the_field_as_sent_with_the_one_sampling_rule(http):
    message = [{"role": "user", "content": "x"}]
    cases = [("/v1/generate", {"json": {"caption": "x", "lm_temperature": 2.5}}, "lm_temperature", "0.0 to 2.0"),
             ("/release_task", {"json": {"prompt": "x", "lm_temperature": 2.5}}, "lm_temperature", "0.0 to 2.0"),
             ("/release_task", {"data": {"prompt": "x", "lm_temperature": "2.5"}}, "lm_temperature", "0.0 to 2.0"),
             ("/v1/chat/completions", {"json": {"messages": message, "temperature": 2.5}}, "temperature", "0.0 to 2.0"),
             ("/v1/format_sample", {"json": {"caption": "x", "temperature": 2.5}}, "temperature", "0.0 to 2.0"),
             ("/format_input", {"data": {"prompt": "x", "temperature": "2.5"}}, "temperature", "0.0 to 2.0"),
             ("/release_task", {"data": {"prompt": "x", "audioDuration": "5"}}, "audioDuration", "10 to 600"),
             ("/release_task", {"json": {"prompt": "x", "param_obj": {"key": "H major"}}}, "key", "C major")]
    for route, send, field, allowed in cases:
        response = http.post(route, **send)
        assert response.status_code == 422, (route, send, response.text)
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["body", field] and allowed in detail["msg"], (route, send, detail)


# -- chat completions ----------------------------------------------------------------------------------


def _chat_audio(message_audio):
    url = message_audio[0]["audio_url"]["url"]
    header, payload = url.split(",", 1)
    return header, _decode(base64.b64decode(payload))


def test_chat_completions_tagged_prompt_returns_markdown_and_audio(http):
    # Caption shows the caption used, as upstream: the request's own when the LM may not rewrite it.
    body = {"model": "acestep/acestep-v15-turbo", "inference_steps": 2, "use_cot_caption": False,
            "messages": [{"role": "user", "content": "<prompt>gentle acoustic ballad</prompt>"
                                                     "<lyrics>[Verse 1]\nSunlight through the window</lyrics>"}],
            "audio_config": {"duration": 10, "bpm": 80, "format": "wav", "vocal_language": "en"}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "acestep/acestep-v15-turbo"
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant" and answer["choices"][0]["finish_reason"] == "stop"
    assert "**Caption:** gentle acoustic ballad" in message["content"] and "**BPM:** 80" in message["content"]
    assert "## Lyrics\n[Verse 1]\nSunlight through the window" in message["content"]
    header, (samples, rate) = _chat_audio(message["audio"])
    assert header == "data:audio/wav;base64" and rate == 48000 and samples.shape[1] == 2
    assert abs(samples.shape[0] / rate - 10.0) < 0.5


def _sse_chunks(response):
    chunks, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunks.append(json.loads(line[6:]))
    assert done, "the stream ends with data: [DONE]"
    return chunks


def test_chat_completions_stream_description_in_sample_mode(http):
    body = {"messages": [{"role": "user", "content": "a cheerful guitar piece"}], "stream": True,
            "inference_steps": 2, "audio_config": {"instrumental": True, "duration": 10, "format": "flac"}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = _sse_chunks(response)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant" and chunks[0]["object"] == "chat.completion.chunk"
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    audio = [d["audio"] for d in deltas if d.get("audio")]
    assert len(audio) == 1 and deltas[-2].get("audio"), "the audio comes in the last chunk before the finish"
    header, (samples, rate) = _chat_audio(audio[0])
    assert header == "data:audio/flac;base64" and rate == 48000 and samples.shape[1] == 2
    assert any("## Metadata" in (d.get("content") or "") for d in deltas)


def test_chat_completions_input_audio_is_the_cover_source(http):
    source = base64.b64encode(_wav_bytes(6.0)).decode()
    body = {"task_type": "cover", "inference_steps": 2, "audio_config": {"format": "wav"},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "<prompt>make it jazz</prompt>"},
                {"type": "input_audio", "input_audio": {"data": source, "format": "wav"}}]}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    _, (samples, rate) = _chat_audio(response.json()["choices"][0]["message"]["audio"])
    assert abs(samples.shape[0] / rate - 6.0) < 0.5, "a cover follows its source's length"


def test_chat_completions_refusals_are_4xx_and_keys_apply(http, serve_app):
    cases = [({"messages": []}, 400, "messages"), ({"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
             ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
             ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@@"}}]}]},
              422, "input_audio"),
             ({"messages": [{"role": "user", "content": "x"}], "audio_config": {"duration": "long"}}, 422, "duration"),
             ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                 "data": base64.b64encode(b"not audio at all" * 64).decode()}}]}]}, 422, "reference_audio")]
    for body, status, field in cases:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == status and field in response.text, (body, response.text)
    anonymous = httpx.post(serve_app.url + "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "x"}]})
    assert anonymous.status_code == 401


# -- analysis modes ---------------------------------------------------------------------------------


def test_full_analysis_extract_codes_and_analysis_only(http):
    upload = {"ctx_audio": ("take.wav", _wav_bytes(6.0), "audio/wav")}
    full = json.loads(_poll(http, _release(http, data={"full_analysis_only": "true"}, files=upload))["result"])
    assert len(full) == 1 and full[0]["status_message"] == "Full Hardware Analysis Success"
    assert full[0]["audio_paths"] == [] and isinstance(full[0]["metas"], dict)
    assert {"bpm", "keyscale", "timesignature", "duration", "genre", "prompt", "lyrics", "language"} <= set(full[0])
    codes = json.loads(_poll(http, _release(http, data={"extract_codes_only": "1"}, files=upload))["result"])
    assert codes[0]["status_message"] == "Audio Codes Extraction Success"
    # 6 s at 5 codes per second
    assert codes[0]["audio_codes"].count("<|audio_code_") == 30 and codes[0]["audio_paths"] == []
    only = _poll(http, _release(http, json={"prompt": "warm jazz trio", "analysis_only": True}))
    item = json.loads(only["result"])[0]
    assert only["status"] == 1 and item["file"] == "" and item["dit_model"] == "None (Analysis Only)"
    assert set(item["metas"]) == {"bpm", "duration", "genres", "keyscale", "timesignature"}
    missing = http.post("/release_task", json={"full_analysis_only": True})
    assert missing.status_code == 422 and "src_audio" in missing.text


# -- client-named paths -----------------------------------------------------------------------------


def test_client_paths_outside_the_allowed_directory_are_refused(http, shared_dir, tmp_path):
    outside = tmp_path / "private.wav"
    outside.write_bytes(_wav_bytes(3.0))
    os.symlink(outside, shared_dir / "link.wav")
    for value in (str(outside), f"{shared_dir}/../{outside.parent.name}/private.wav", str(shared_dir / "link.wav"),
                  f"file://{shared_dir}/take1.wav", "http://127.0.0.1:1/take1.wav", "take1.wav", str(shared_dir),
                  str(shared_dir / "missing.wav")):
        response = http.post("/release_task", json={"prompt": "x", "task_type": "repaint", "src_audio_path": value,
                                                    **FAST})
        assert response.status_code == 400 and "src_audio_path" in response.text, (value, response.text)
        assert str(outside) not in response.text


def test_allow_listed_file_is_read_like_an_upload(http, shared_dir):
    task_id = _release(http, json={"prompt": "rework", "task_type": "repaint", "repainting_start": 2,
                                   "repainting_end": 6, "audio_format": "wav",
                                   "src_audio_path": str(shared_dir / "take1.wav"), **FAST})
    item = _poll(http, task_id)
    assert item["status"] == 1, item
    samples, rate = _decode(http.get(json.loads(item["result"])[0]["file"]).content)
    assert abs(samples.shape[0] / rate - 12.0) < 0.5, "the repaint keeps the named file's length"
    (shared_dir / "notes.wav").write_bytes(b"this is text, not audio" * 10)
    refused = http.post("/release_task", json={"prompt": "x", "task_type": "cover", **FAST,
                                               "src_audio_path": str(shared_dir / "notes.wav")})
    assert refused.status_code == 422 and "src_audio" in refused.text
