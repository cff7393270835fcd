"""The stream's two sides without Serve, on a real SQLite task store and a real audio store: the DiT
replica's writer (chunks in the store, counts in the task's events, one valid Ogg Opus file), the
ingress's reader (bytes as they appear, resumed at an offset, heartbeat ticks, ends at the song's
end, at a final task, at an expired chunk, and when the render started again after bytes went out),
the progress that only grows, and chat's audio_chunk deltas."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import soundfile as sf
import torch

from serve.compat import chat
from serve.store import open_task_store
from serve.store.audio import AudioStore
from serve.streaming import SongReader, StreamProgress, StreamState, StreamWriter, part_key

RATE = 48000


@pytest.fixture
def stores(tmp_path):
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    task_id, _ = store.create({})
    return store, AudioStore(str(tmp_path / "audio")), task_id


def _tone(seconds: float) -> torch.Tensor:
    t = torch.arange(int(seconds * RATE)) / RATE
    return 0.3 * torch.sin(2 * torch.pi * 330 * t).repeat(2, 1)


def _write(writer: StreamWriter, song: torch.Tensor, index: int = 0, piece: int = 5 * RATE) -> None:
    for start in range(0, song.shape[-1], piece):
        writer.piece(index, start, song[..., start:start + piece], song.shape[-1])


def _report(store, task_id, writer, progress=0.5):
    store.update(task_id, "dit", progress, "streaming", writer.state.detail())


def _read(reader: SongReader, until=None):
    async def run():
        out = []
        async for data in reader.chunks():
            out.append(data)
            if until is not None:
                until(out)
        return out

    return asyncio.run(asyncio.wait_for(run(), 60))


def test_the_writer_stores_one_valid_stream_and_reports_its_progress(stores):
    store, audio, task_id = stores
    reported = []
    writer = StreamWriter(audio, task_id, StreamState.new("opus", 2), reported.append)
    song = _tone(12.0)
    _write(writer, song, index=1)
    state = writer.close(timeout_s=60)
    assert state.ended == [False, True] and state.chunks[0] == 0 and state.chunks[1] >= 2
    assert reported == sorted(reported) and reported[-1] == pytest.approx(0.5)  # one of two songs written
    data = b"".join(audio.read(part_key(task_id, state.id, 1, n)) for n in range(state.chunks[1]))
    assert sf.info(io.BytesIO(data)).frames == song.shape[-1]
    assert StreamState.of(state.detail()) == state


def test_the_reader_follows_the_events_resumes_and_ends_with_the_song(stores):
    store, audio, task_id = stores
    writer = StreamWriter(audio, task_id, StreamState.new("opus", 1))
    _write(writer, _tone(12.0))
    state = writer.close(timeout_s=60)
    _report(store, task_id, writer)
    whole = b"".join(audio.read(part_key(task_id, state.id, 0, n)) for n in range(state.chunks[0]))
    reader = SongReader(store, audio, task_id, 0, poll_s=0.01)
    assert b"".join(_read(reader)) == whole and reader.complete and reader.position == len(whole)
    resumed = SongReader(store, audio, task_id, 0, offset=len(whole) // 2, poll_s=0.01)
    assert b"".join(_read(resumed)) == whole[len(whole) // 2:] and resumed.complete


def test_the_reader_ticks_while_quiet_and_stops_at_a_final_task(stores):
    store, audio, task_id = stores
    reader = SongReader(store, audio, task_id, 0, heartbeat_s=0.05, poll_s=0.01)

    def finish_after_two_ticks(out):
        if out.count(b"") == 2:
            store.fail(task_id, "cancelled", "cancelled")

    out = _read(reader, finish_after_two_ticks)
    assert out == [b"", b""] and not reader.complete


def test_a_restarted_render_ends_a_reader_that_had_bytes_and_is_followed_by_a_new_one(stores):
    store, audio, task_id = stores
    first = StreamWriter(audio, task_id, StreamState.new("opus", 1))
    first.piece(0, 0, _tone(6.0), 12 * RATE)  # half the song, then the replica was lost
    first.close(timeout_s=60)
    _report(store, task_id, first, 0.4)
    early = SongReader(store, audio, task_id, 0, poll_s=0.01)
    got = []

    def restart(out):
        if len(got) == 0 and out[-1]:
            got.append(out[-1])
            second = StreamWriter(audio, task_id, StreamState.new("opus", 1))
            _write(second, _tone(12.0))
            second.close(timeout_s=60)
            _report(store, task_id, second, 0.5)

    _read(early, restart)
    assert got and not early.complete  # it stopped rather than mix two renders' bytes
    late = SongReader(store, audio, task_id, 0, poll_s=0.01)
    assert sf.info(io.BytesIO(b"".join(_read(late)))).frames == 12 * RATE and late.complete


def test_an_expired_chunk_ends_the_stream(stores):
    store, audio, task_id = stores
    writer = StreamWriter(audio, task_id, StreamState.new("mp3", 1))
    _write(writer, _tone(12.0))
    state = writer.close(timeout_s=60)
    _report(store, task_id, writer)
    audio.delete(part_key(task_id, state.id, 0, 1))
    reader = SongReader(store, audio, task_id, 0, poll_s=0.01)
    assert len(_read(reader)) == 1 and not reader.complete


def test_progress_only_grows_and_carries_the_stream(stores):
    _, _, task_id = stores
    sent = []
    state = StreamState.new("opus", 1)
    progress = StreamProgress(lambda fraction, message, detail: sent.append((fraction, message, detail)), state)
    progress.diffusion(0.5, "diffusion step 4/8")
    progress.diffusion(1.0, "diffusion step 8/8")
    state.chunks[0] = 3
    progress.written(0.5)
    progress.written(1.0)
    fractions = [f for f, _, _ in sent]
    assert fractions == sorted(set(fractions)) and fractions[-1] == pytest.approx(1.0)
    assert sent[1][0] < 1.0, "the diffusion alone does not fill the DiT's share"
    assert sent[-1][2] == {"stream": {"id": state.id, "format": "opus", "chunks": [3], "ended": [False]}}


def test_chat_sends_audio_chunks_and_ticks_before_the_answer():
    async def audio():
        yield 0, "mp3", b"ab"
        yield 0, "mp3", b""
        yield 0, "mp3", b"cd"

    async def wait(seconds):
        return "## Metadata", [chat.data_url(b"abcd", "audio/mpeg")]

    async def run():
        return [c async for c in chat.stream("acestep/x", wait, 60.0, heartbeat_s=0.01, audio=audio())]

    deltas = [json.loads(c[6:])["choices"][0]["delta"] for c in asyncio.run(run())[:-1]]
    pieces = [d["audio_chunk"] for d in deltas if "audio_chunk" in d]
    assert [base64.b64decode(p["data"]) for p in pieces] == [b"ab", b"cd"]
    assert pieces[0] == {"index": 0, "format": "mp3", "data": "YWI="}
    assert deltas[2] == {"content": "."} and deltas[-2]["audio"][0]["type"] == "audio_url"
