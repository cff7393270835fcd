"""Songs streamed while they decode, whatever replica serves the stream.

A task asks for it with ``stream_format`` (``acestep.audio.STREAM_FORMATS``: opus, mp3). The DiT
replica rendering it takes each song's audio window by window as the VAE decodes it
(``acestep.dit.stream``), encodes it as one Ogg Opus or MP3 stream per song and writes the bytes
each window completes to the audio store as numbered chunks (``part_key``); after each chunk it
reports the chunk counts in the task's progress events (``detail.stream``: ``StreamState``). A
stream reader (``SongReader``) on any ingress replica tails those events and reads the chunks, so a
client may connect to any replica, late or again (resuming at a byte offset), until the chunks
expire with the task (the audio store's TTL). Each render of a task has its own stream id: a render
that starts again (its replica died) writes a new stream, and a reader that already sent bytes of
the old one ends there.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

import torch

from acestep.audio import NOT_STREAMED, STREAM_FORMATS, StreamEncoder
from serve.edge.errors import FieldError
from serve.store.records import FINAL_PHASES

log = logging.getLogger(__name__)

STREAM_FIELD = "stream_format"  # the request field, kept in the task's extras
STREAM_SHARE = 0.05  # the part of the DiT's progress that writing the stream takes, after the diffusion


def part_key(task_id: str, stream_id: str, index: int, seq: int) -> str:
    """The audio-store key of chunk ``seq`` of song ``index`` of one render's stream."""
    return f"stream-{task_id}-{stream_id}-{index}-{seq:06d}"


def stream_extras(requested: Optional[str], params) -> Dict[str, str]:
    """A task's extras for ``stream_format`` (already one of the formats): {} when not asked; 422
    naming it for the tasks whose songs cannot be streamed (extend, stems)."""
    if not requested:
        return {}
    reason = why_not_streamed(params)
    if reason is not None:
        raise FieldError(STREAM_FIELD, f"{STREAM_FIELD}: {reason}")
    return {STREAM_FIELD: requested}


def why_not_streamed(params) -> Optional[str]:
    """Why a request's songs cannot be streamed, or None when they can."""
    if params.task_type == "extend":
        return NOT_STREAMED["extend"]
    if params.tracks is not None:
        return NOT_STREAMED["tracks"]
    return None


@dataclass
class StreamState:
    """One render's stream as its task's events carry it: its id and format, and per song the chunks
    written so far and whether the song's stream is complete."""

    id: str
    format: str
    chunks: List[int]
    ended: List[bool]

    @classmethod
    def new(cls, stream_format: str, songs: int) -> "StreamState":
        return cls(uuid.uuid4().hex[:12], stream_format, [0] * songs, [False] * songs)

    @classmethod
    def of(cls, detail: Optional[Dict[str, Any]]) -> Optional["StreamState"]:
        """The state an event's detail carries, or None."""
        found = (detail or {}).get("stream")
        if not isinstance(found, dict):
            return None
        return cls(str(found["id"]), str(found["format"]), [int(n) for n in found["chunks"]],
                   [bool(e) for e in found["ended"]])

    def detail(self) -> Dict[str, Any]:
        return {"stream": asdict(self)}


class StreamProgress:
    """A streaming render's DiT progress: the diffusion's fraction (the worker's reports) and the
    share of the songs' audio written, in one number that only grows, each event carrying the
    stream's state. ``emit(fraction of the DiT part, message, detail)``; thread-safe."""

    def __init__(self, emit: Callable[[float, str, Dict[str, Any]], None], state: StreamState):
        self._emit, self.state = emit, state
        self._diffusion, self._written, self._message = 0.0, 0.0, ""
        self._lock = threading.Lock()

    def diffusion(self, fraction: float, desc: str = "") -> None:
        """The worker's progress callback."""
        with self._lock:
            self._diffusion, self._message = min(max(float(fraction), 0.0), 1.0), str(desc)
            self._send()

    def written(self, fraction: float) -> None:
        """The writer's report after each chunk: ``fraction`` of the songs' samples are in the store."""
        with self._lock:
            self._written = min(max(float(fraction), 0.0), 1.0)
            self._message = f"audio streamed {round(100 * self._written)}%"
            self._send()

    def _send(self) -> None:
        fraction = (1 - STREAM_SHARE) * self._diffusion + STREAM_SHARE * self._written
        self._emit(fraction, self._message, self.state.detail())


class StreamWriter:
    """The DiT replica's side of one render's stream. The worker hands each song's audio over as it
    decodes (``piece``, an ``acestep.dit.worker.SongSink``: only a queue put on the worker's thread);
    one thread encodes it, writes each chunk to the audio store, counts it in ``state`` and
    reports the share of the songs written. The stream is advisory, like progress: a failure to
    write it is logged and the render goes on."""

    def __init__(self, audio, task_id: str, state: StreamState, report: Callable[[float], None] = lambda f: None):
        self.audio, self.task_id, self.state, self.report = audio, task_id, state, report
        self._encoders: Dict[int, StreamEncoder] = {}
        self._written = [0.0] * len(state.chunks)
        self._queue: "queue.Queue" = queue.Queue()
        self._stopped = self.failed = False
        self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
        self._thread.start()

    def piece(self, index: int, start: int, audio: torch.Tensor, total: int) -> None:
        self._queue.put((index, start, audio, total))

    def close(self, timeout_s: Optional[float] = None) -> StreamState:
        """After the render: the pieces still queued are written, then the state is final."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        return self.state

    def abort(self) -> None:
        """The render failed or was cancelled: nothing more is written."""
        self._stopped = True
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._stopped or self.failed:
                continue
            try:
                self._write(*job)
            except Exception:  # the stored file does not depend on the stream
                self.failed = True
                log.warning("task %s: writing its audio stream failed", self.task_id, exc_info=True)

    def _write(self, index: int, start: int, audio: torch.Tensor, total: int) -> None:
        encoder = self._encoders.get(index)
        if encoder is None:
            encoder = self._encoders[index] = StreamEncoder(self.state.format)
        end = start + audio.shape[-1]
        data = encoder.encode(audio)
        if end >= total:
            data += encoder.finish()
        if data:
            self.audio.put(part_key(self.task_id, self.state.id, index, self.state.chunks[index]), data)
            self.state.chunks[index] += 1
        self.state.ended[index] = end >= total
        self._written[index] = end / max(total, 1)
        self.report(sum(self._written) / len(self._written))


@dataclass
class SongReader:
    """One song's stream as a client gets it: the bytes from ``offset`` on, as the chunks appear;
    ``b""`` after every ``heartbeat_s`` without any (a tick for heartbeats). It ends when the song's
    stream is complete (``complete``), when the task is finished without it, or when the render
    started again after some of its bytes were read. ``position``: the bytes of the stream up to
    the end of the last chunk yielded."""

    store: Any  # TaskStore
    audio: Any  # AudioStore
    task_id: str
    index: int
    offset: int = 0
    heartbeat_s: float = 15.0
    poll_s: float = 0.25
    complete: bool = False
    position: int = 0
    _state: Optional[StreamState] = field(default=None, repr=False)
    _read: int = 0  # chunks of ``_state``'s stream consumed
    _gone: bool = False  # a chunk was missing from the audio store (expired)

    async def chunks(self) -> AsyncIterator[bytes]:
        cursor, quiet = -1, time.monotonic()
        while True:
            events = await asyncio.to_thread(self.store.events, self.task_id, cursor)
            if events is None:
                return
            final = any(event.phase in FINAL_PHASES for event in events)
            for event in events:
                cursor = event.seq
                if not self._follow(StreamState.of(event.detail)):
                    return
            async for data in self._new_chunks():
                quiet = time.monotonic()
                yield data
            if self._gone:
                return
            if self._ended() or final:
                self.complete = self._ended()
                return
            if time.monotonic() - quiet >= self.heartbeat_s:
                quiet = time.monotonic()
                yield b""
            await asyncio.sleep(self.poll_s)

    def _follow(self, found: Optional[StreamState]) -> bool:
        """Take the newest state; False when it is another render's and bytes were read already."""
        if found is None:
            return True
        if self._state is not None and found.id != self._state.id:
            if self._read:
                return False
            self.position = 0
        self._state = found
        return True

    def _written(self) -> int:
        chunks = self._state.chunks if self._state is not None else []
        return chunks[self.index] if self.index < len(chunks) else 0

    def _ended(self) -> bool:
        state = self._state
        return (state is not None and self.index < len(state.ended) and state.ended[self.index]
                and self._read == self._written())

    async def _new_chunks(self) -> AsyncIterator[bytes]:
        while self._state is not None and self._read < self._written():
            key = part_key(self.task_id, self._state.id, self.index, self._read)
            data = await asyncio.to_thread(self.audio.read, key)
            if data is None:
                self._gone = True
                return
            self._read += 1
            skip = max(0, self.offset - self.position)
            self.position += len(data)
            if skip < len(data):
                yield data[skip:]


def stream_format_of(request: Optional[Dict[str, Any]]) -> Optional[str]:
    """The stream format a stored task request asked for (None: not streamed)."""
    found = ((request or {}).get("extras") or {}).get(STREAM_FIELD)
    return found if found in STREAM_FORMATS else None
