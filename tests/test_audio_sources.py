"""Audio inputs as paths, bytes or binary file objects: the same audio, the same durations, the same
validation, and messages that never carry the uploaded bytes."""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from acestep.audio import AudioLoadError, audio_duration, load_audio, params_key, source_key
from acestep.inference import GenerationConfig, GenerationParams, prepare_request
from acestep.validation import ValidationError

GARBAGE = b"\x13\x37 definitely not audio " * 40


def _sources(path: str):
    data = Path(path).read_bytes()
    return {"str": path, "path": Path(path), "bytes": data, "bytearray": bytearray(data),
            "memoryview": memoryview(data), "bytesio": io.BytesIO(data), "file": open(path, "rb")}


@pytest.mark.parametrize("fixture", ["source_audio", "reference_audio"])  # 48 kHz stereo, 44.1 kHz mono
def test_every_kind_of_source_reads_the_same(request, fixture):
    path = request.getfixturevalue(fixture)
    expected, rate = load_audio(path)
    duration = audio_duration(path)
    for kind, source in _sources(path).items():
        audio, source_rate = load_audio(source)
        assert source_rate == rate and torch.equal(audio, expected), kind
        assert audio_duration(source) == duration, kind
        if hasattr(source, "close"):
            source.close()


def test_file_objects_are_read_from_the_start_and_left_where_they_were(source_audio):
    with open(source_audio, "rb") as stream:
        stream.seek(100)
        audio, _ = load_audio(stream)
        assert stream.tell() == 100
        assert audio_duration(stream) == 12.0 and stream.tell() == 100
    assert torch.equal(audio, load_audio(source_audio)[0])


def test_unreadable_uploads_never_echo_their_bytes():
    for source in (GARBAGE, io.BytesIO(GARBAGE), memoryview(GARBAGE)):
        for read in (load_audio, audio_duration):
            with pytest.raises(AudioLoadError) as info:
                read(source)
            message = str(info.value)
            assert "uploaded audio" in message and "not audio" not in message and "\\x" not in message
            assert "BytesIO" not in message and "0x" not in message


def test_wrong_kinds_of_source_are_refused():
    class Unseekable(io.RawIOBase):
        def readable(self):
            return True

    for source in (Unseekable(), io.StringIO("text"), 42):
        with pytest.raises(AudioLoadError):
            load_audio(source)


def _repaint(src_audio, **fields) -> GenerationParams:
    return GenerationParams(task_type="repaint", src_audio=src_audio, **fields)


def test_prepare_request_checks_the_repaint_window_against_uploaded_bytes(source_audio):
    data = Path(source_audio).read_bytes()
    with pytest.raises(ValidationError) as info:
        prepare_request(_repaint(data, repainting_start=2, repainting_end=30), GenerationConfig())
    assert info.value.field == "repainting_end" and "12.00" in str(info.value)
    with pytest.raises(ValidationError) as info:
        prepare_request(_repaint(io.BytesIO(data), repainting_start=13), GenerationConfig())
    assert info.value.field == "repainting_start"
    params, _, _ = prepare_request(_repaint(data, repainting_start=2, repainting_end=6), GenerationConfig())
    assert params.src_audio is data  # the upload is not copied


def test_prepare_request_reads_file_objects_into_bytes(source_audio, reference_audio):
    stream = io.BytesIO(Path(source_audio).read_bytes())
    original = _repaint(stream, reference_audio=bytearray(Path(reference_audio).read_bytes()), repainting_start=2)
    params, _, _ = prepare_request(original, GenerationConfig())
    assert params.src_audio == Path(source_audio).read_bytes() and isinstance(params.reference_audio, bytes)
    assert original.src_audio is stream and stream.tell() == 0  # the caller's params are untouched
    with open(source_audio, "rb") as handle:  # a real file cannot be deep-copied; its bytes can
        params, _, _ = prepare_request(_repaint(handle, repainting_start=2), GenerationConfig())
    assert params.src_audio == Path(source_audio).read_bytes()


def test_empty_or_unreadable_bytes_are_refused_without_echoing_them():
    with pytest.raises(ValidationError) as info:
        prepare_request(_repaint(b""), GenerationConfig())
    assert info.value.field == "src_audio" and "non-empty" in str(info.value)
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(reference_audio=bytearray()), GenerationConfig())
    assert info.value.field == "reference_audio"
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="cover", src_audio=GARBAGE), GenerationConfig())
    message = str(info.value)
    assert info.value.field == "src_audio" and "uploaded audio" in message and "not audio" not in message
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="cover", src_audio=12), GenerationConfig())
    assert info.value.field == "src_audio"


def test_params_with_bytes_copy_and_hash_cheaply():
    data = bytes(range(256)) * 40_000  # 10 MB
    params = GenerationParams(task_type="cover", src_audio=data, reference_audio=data)
    assert copy.deepcopy(params).src_audio is data
    assert dataclasses.replace(params, caption="x").reference_audio is data
    key = params_key(params.to_dict())
    assert key == params_key(dataclasses.replace(params, src_audio=bytes(data)).to_dict())
    assert key != params_key(dataclasses.replace(params, src_audio=data[:-1]).to_dict())
    assert source_key(data) == source_key(bytes(data)) and source_key("a.wav") == source_key(Path("a.wav"))
    view = memoryview(bytearray(b"abc"))
    assert source_key(view) == source_key(view) and source_key(None) is None


def test_dit_conditioning_is_the_same_for_bytes_and_paths(turbo_handler, tmp_path):
    from tests.conftest import write_tone

    path = write_tone(tmp_path / "short.wav", 3.0)
    data = Path(path).read_bytes()
    config = GenerationConfig(use_random_seed=False, batch_size=1, seeds=[3])
    items = []
    for source in (path, data, io.BytesIO(data)):
        params, _, seeds = prepare_request(_repaint(source, repainting_start=1, repainting_end=2, thinking=False),
                                           config)
        items.append(turbo_handler.prepare([params], seeds)[0])
    for item in items[1:]:
        assert torch.equal(item.src_latents, items[0].src_latents)
        assert torch.equal(item.source_audio, items[0].source_audio) and item.repaint == items[0].repaint
