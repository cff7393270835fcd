"""The chat-completions and client-path pieces that need no Ray: message reading, the request →
upstream body mapping, the answer shapes, the SSE stream, the allow-listed directories."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os

import pytest

from serve.compat import chat
from serve.edge import client_paths
from serve.compat import release as compat
from serve.driver import TaskFailure
from serve.edge.errors import FieldError
from serve.edge.intake import ValidationFailed


def _request(**fields):
    return chat.parse_request({"messages": [{"role": "user", "content": "x"}], **fields})


def test_tags_lyrics_and_free_text_are_read_as_the_official_adapter_does():
    tagged = chat.read_messages(_request(messages=[{"role": "user", "content":
                                "<prompt>soft ballad</prompt>\n<lyrics>[Verse]\nhello</lyrics> piano"}]).messages)
    assert (tagged.prompt, tagged.lyrics, tagged.sample_query) == ("soft ballad piano", "[Verse]\nhello", "")
    lyrics = chat.read_messages(_request(messages=[{"role": "user", "content": "[Chorus]\nla la"}]).messages)
    assert (lyrics.prompt, lyrics.lyrics, lyrics.sample_query) == ("", "[Chorus]\nla la", "")
    short_lines = "\n".join(["walking down", "the street", "feeling the", "beat tonight"])
    assert chat.read_messages(_request(messages=[{"role": "user", "content": short_lines}]).messages).lyrics
    free = chat.read_messages(_request(messages=[{"role": "system", "content": "be nice"},
                                                 {"role": "user", "content": "an upbeat summer song"}]).messages)
    assert (free.prompt, free.sample_query) == ("", "an upbeat summer song")
    parts = chat.read_messages(_request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "<prompt>cover it</prompt>"},
        {"type": "input_audio", "input_audio": {"data": "QUJD", "format": "wav"}}]}]).messages)
    assert parts.prompt == "cover it" and parts.audios == ["QUJD"]


def test_explicit_lyrics_or_sample_mode_decide_what_the_text_is():
    found = chat.read_messages(_request(messages=[{"role": "user", "content": "dreamy lo-fi"}]).messages)
    with_lyrics = chat.resolve_input(_request(lyrics="[verse]\nhi"), found)
    assert (with_lyrics.prompt, with_lyrics.lyrics, with_lyrics.sample_query) == ("dreamy lo-fi", "[verse]\nhi", "")
    tagged = chat.read_messages(_request(messages=[{"role": "user", "content": "<prompt>jazz</prompt>"}]).messages)
    sample = chat.resolve_input(_request(sample_mode=True), tagged)
    assert (sample.prompt, sample.sample_query) == ("", "jazz")


def test_chat_request_maps_onto_the_upstream_release_body_and_library_params():
    request = _request(audio_config={"bpm": 85, "duration": 30, "instrumental": True, "format": "wav",
                                     "key_scale": "C major", "time_signature": "4", "vocal_language": "fr"},
                       temperature=0.9, top_p=0.95, seed="3,4", batch_size=2, use_format=True,
                       cover_noise_strength=0.3)
    found = chat.ChatInput(prompt="lo-fi beat", tagged=True)
    params, config, extras = compat.to_library(chat.release_body(request, found))
    assert (params.caption, params.lyrics, params.bpm, params.duration) == ("lo-fi beat", "[inst]", 85, 30.0)
    assert (params.keyscale, params.timesignature, params.vocal_language) == ("C major", "4", "fr")
    assert (params.lm_temperature, params.lm_top_p, params.inference_steps, params.thinking) == (0.9, 0.95, 8, False)
    assert (config.batch_size, config.audio_format, config.seeds) == (2, "wav", [3, 4])
    assert params.cover_noise_strength == 0.3  # a field upstream's chat adapter reads
    explicit = extras.pop("explicit")  # what the body set; the model's preset fills the rest
    assert "inference_steps" not in explicit and {"bpm", "duration", "lm_temperature"} <= set(explicit)
    assert extras == {"use_format": True}
    _, config, extras = compat.to_library(chat.release_body(_request(seed=7), chat.ChatInput(sample_query="a song")))
    assert config.seeds == [7] and not config.use_random_seed and config.batch_size == 1
    assert extras["sample_mode"] and extras["sample_query"] == "a song"


def test_chat_sets_only_what_its_adapter_changes():
    body = chat.release_body(_request(), chat.ChatInput(prompt="x", tagged=True))
    assert body == {"prompt": "x", "batch_size": 1}
    params, config, _ = compat.to_library(body)
    official_params, official_config, _ = compat.to_library({"prompt": "x"})
    assert params == official_params and config == dataclasses.replace(official_config, batch_size=1)
    # values a client sets pass on, falsy ones too
    body = chat.release_body(_request(use_cot_caption=False, top_k=0, thinking=False, repainting_start=0,
                                      audio_config={"instrumental": False}), chat.ChatInput(prompt="x", tagged=True))
    assert {"use_cot_caption": False, "lm_top_k": 0, "thinking": False, "repainting_start": 0.0,
            "instrumental": False}.items() <= body.items()


def test_input_audio_is_routed_by_task_type_and_bounded():
    wav = base64.b64encode(b"RIFF....WAVE").decode()
    found = chat.ChatInput(audios=[f"data:audio/wav;base64,{wav}", wav])
    assert set(chat.audio_uploads(_request(task_type="cover"), found, 1 << 20)) == {"src_audio", "reference_audio"}
    with pytest.raises(FieldError) as raised:
        chat.audio_uploads(_request(), found, 1 << 20)  # text2music takes one (the reference)
    assert raised.value.status_code == 422 and list(raised.value.loc) == ["body", "messages"]
    with pytest.raises(FieldError) as raised:
        chat.audio_uploads(_request(task_type="cover"), chat.ChatInput(audios=["A" * 4000]), 1000)
    assert raised.value.status_code == 413
    with pytest.raises(FieldError):
        chat.audio_uploads(_request(task_type="cover"), chat.ChatInput(audios=["not base64!"]), 1000)


def test_bad_chat_fields_name_the_field_and_unknown_models_are_refused():
    for body, field in (({"messages": "hi"}, "messages"), ({}, "messages"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                        ({"messages": [], "temperature": 5}, "temperature"),
                        ({"messages": [], "audio_config": {"bpm": "fast"}}, "bpm")):
        with pytest.raises(ValidationFailed) as raised:
            chat.parse_request(body)
        assert field in json.dumps(raised.value.detail())
    assert chat.no_input(_request(), chat.ChatInput()) and not chat.no_input(_request(sample_mode=True), chat.ChatInput())


def test_content_markdown_and_completion_shape():
    item = {"prompt": "warm folk", "lyrics": "[verse]\nhome",
            "metas": {"bpm": 90, "duration": 30.0, "keyscale": "G major", "timesignature": "N/A"}}
    text = chat.content_markdown(item)
    assert text == ("## Metadata\n**Caption:** warm folk\n**BPM:** 90\n**Duration:** 30.0s\n**Key:** G major"
                    "\n\n## Lyrics\n[verse]\nhome")
    assert chat.content_markdown({"lyrics": "[inst]"}) == "Music generated successfully."
    answer = chat.completion("acestep/x", text, [chat.data_url(b"abc", "audio/mpeg")])
    message = answer["choices"][0]["message"]
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert message["audio"][0]["audio_url"]["url"] == "data:audio/mpeg;base64,YWJj"
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def _collect(wait, deadline_s=60.0):
    async def run():
        return [chunk async for chunk in chat.stream("acestep/x", wait, deadline_s, heartbeat_s=0.01)]

    chunks = asyncio.run(run())
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(c[6:])["choices"][0] for c in chunks[:-1]]


def test_stream_sends_heartbeats_then_content_audio_and_done():
    answers = iter([None, None, ("## Metadata", [chat.data_url(b"x", "audio/wav")])])

    async def wait(seconds):
        await asyncio.sleep(seconds)
        return next(answers)

    choices = _collect(wait)
    deltas = [c["delta"] for c in choices]
    assert deltas[0] == {"role": "assistant", "content": "Generating music"}
    assert [d.get("content") for d in deltas[1:3]] == [".", "."]
    assert deltas[3] == {"content": "\n\n## Metadata"} and deltas[4]["audio"][0]["type"] == "audio_url"
    assert choices[-1]["finish_reason"] == "stop"


def test_stream_reports_a_failed_task_with_its_code():
    async def wait(seconds):
        raise TaskFailure("invalid_audio", "the source is not audio")

    choices = _collect(wait)
    assert choices[-2]["delta"]["content"] == "\n\nError: invalid_audio: the source is not audio"
    assert choices[-1]["finish_reason"] == "error"


def test_allowed_audio_dirs_resolve_real_paths_inside_only(tmp_path):
    allowed, outside = tmp_path / "shared", tmp_path / "private"
    allowed.mkdir(), outside.mkdir()
    (allowed / "song.wav").write_bytes(b"RIFF")
    (outside / "secret.wav").write_bytes(b"RIFF")
    os.symlink(outside / "secret.wav", allowed / "link.wav")
    dirs = [str(allowed)]
    assert client_paths.allowed_path(str(allowed / "song.wav"), dirs) == str((allowed / "song.wav").resolve())
    for value in (str(outside / "secret.wav"), f"{allowed}/../private/secret.wav", str(allowed / "link.wav"),
                  f"file://{allowed}/song.wav", "http://example.com/a.wav", "song.wav", str(allowed)):
        assert client_paths.allowed_path(value, dirs) is None, value
    assert client_paths.allowed_path(str(allowed / "song.wav"), []) is None  # off by default
    assert client_paths.read_allowed("src_audio_path", str(allowed / "song.wav"), 100) == b"RIFF"
    with pytest.raises(FieldError) as raised:
        client_paths.read_allowed("src_audio_path", str(allowed / "song.wav"), 2)
    assert raised.value.status_code == 413
    os.mkfifo(allowed / "pipe.wav")
    with pytest.raises(FieldError) as raised:
        client_paths.read_allowed("src_audio_path", str(allowed / "pipe.wav"), 100)
    assert raised.value.status_code == 400 and "regular" in raised.value.message


def test_analysis_modes_pick_upstream_records():
    _, _, extras = compat.to_library({"prompt": "x", "full_analysis_only": "true", "analysis_only": True})
    assert extras["analysis"] == "full_analysis_only"
    _, _, extras = compat.to_library({"extractCodesOnly": 1, "fullAnalysisOnly": True})
    assert extras["analysis"] == "extract_codes_only"
    metadata = {"bpm": 100, "caption": "dub", "genres": "reggae", "lyrics": "[inst]", "keyscale": "A minor"}
    full = compat.analysis_record("full_analysis_only", metadata, "<|audio_code_1|>", "", "", "lm")
    assert full["status_message"] == "Full Hardware Analysis Success" and full["genre"] == "reggae"
    assert full["audio_paths"] == [] and full["metas"] == metadata and full["prompt"] == "dub"
    codes = compat.analysis_record("extract_codes_only", {}, "<|audio_code_1|>", "", "", "lm")
    assert codes["audio_codes"] == "<|audio_code_1|>" and codes["status_message"] == "Audio Codes Extraction Success"
    record = {"created_at": 1.0, "phase": "done", "progress": 1.0,
              "result": {"audios": [], "metadata": {"analysis": full}}}
    assert compat.query_items(record, {}) == (1, [full])
    only = compat.analysis_record("analysis_only", metadata, "", "cap", "lyr", "lm")
    status, items = compat.query_items({**record, "result": {"audios": [], "metadata": {"analysis": only}}}, {})
    assert status == 1 and items[0]["file"] == "" and items[0]["metas"]["bpm"] == 100
    assert items[0]["stage"] == "succeeded" and items[0]["dit_model"] == "None (Analysis Only)"
