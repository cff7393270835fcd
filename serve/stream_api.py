"""``GET /v1/tasks/{id}/stream``: a song of a task submitted with ``stream_format``, sent while it
decodes (``serve.streaming``), from any ingress replica. Two forms of the same bytes:

- raw (the default): the Ogg Opus or MP3 stream itself (``audio/ogg`` / ``audio/mpeg``, chunked),
  for an audio element or a player; ``?from=N`` resumes after the first N bytes. The status and
  headers go out at once, the audio from the song's first decoded window on; nothing is sent in
  between (an audio stream has no room for heartbeats).
- ``Accept: text/event-stream``: server-sent events, one ``audio`` event per chunk (base64, with its
  byte offset; its id is the offset after it, so a reconnect with ``Last-Event-ID`` resumes), a
  comment line every 15 s of quiet, then one ``end`` event saying whether the song's stream is
  complete.

A route group the ingress inherits; it needs ``state`` (the task and audio stores).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import AsyncIterator

from fastapi import Query, Request
from fastapi.responses import StreamingResponse

from acestep.audio import STREAM_FORMATS
from serve.edge.errors import APIError, error_responses
from serve.http_app import api, not_found
from serve.streaming import STREAM_FIELD, SongReader, stream_format_of

HEARTBEAT_S = 15.0


class StreamRoutes:
    """Route group inherited by ``serve.api.Ingress``."""

    @api.get("/v1/tasks/{task_id}/stream", responses=error_responses(404, 409, 422))
    async def task_stream(self, task_id: str, request: Request,
                          index: int = Query(0, ge=0, description="Which song of the task (0 to batch_size - 1)."),
                          start: int = Query(0, ge=0, alias="from",
                                             description="Resume after this many bytes of the stream.")):
        """A song of a task submitted with ``stream_format``, while it decodes: the raw Ogg Opus / MP3
        stream, or server-sent events with ``Accept: text/event-stream``. 409 for a task submitted
        without ``stream_format``."""
        record = await asyncio.to_thread(self.state.store.get, task_id)
        if record is None:
            raise not_found("task id")
        stream_format = stream_format_of(record.request)
        if stream_format is None:
            raise APIError(409, f"the task was submitted without {STREAM_FIELD}: it has no stream (its files are "
                                "in the result once it is done)", loc=("path", "task_id"), code="conflict")
        songs = len((record.request or {}).get("seeds") or [])
        if index >= songs:
            raise APIError(422, f"index must be 0 to {songs - 1} (the task's songs)", loc=("query", "index"))
        media_type = STREAM_FORMATS[stream_format].media_type
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if "text/event-stream" in request.headers.get("accept", ""):
            last = request.headers.get("last-event-id", "")
            offset = int(last) if last.isdigit() and len(last) < 16 else start
            reader = SongReader(self.state.store, self.state.audio, task_id, index, offset, heartbeat_s=HEARTBEAT_S)
            return StreamingResponse(_events(reader, stream_format, media_type), media_type="text/event-stream",
                                     headers=headers)
        reader = SongReader(self.state.store, self.state.audio, task_id, index, start, heartbeat_s=HEARTBEAT_S)
        return StreamingResponse(_audio(reader), media_type=media_type, headers=headers)


async def _audio(reader: SongReader) -> AsyncIterator[bytes]:
    async for data in reader.chunks():
        if data:  # a quiet tick: the raw form has nothing to send
            yield data


async def _events(reader: SongReader, stream_format: str, media_type: str) -> AsyncIterator[str]:
    async for data in reader.chunks():
        if not data:
            yield ": keep-alive\n\n"
            continue
        payload = {"index": reader.index, "format": stream_format, "media_type": media_type,
                   "offset": reader.position - len(data), "data": base64.b64encode(data).decode()}
        yield f"id: {reader.position}\nevent: audio\ndata: {json.dumps(payload)}\n\n"
    end = {"index": reader.index, "complete": reader.complete, "bytes": reader.position}
    yield f"event: end\ndata: {json.dumps(end)}\n\n"
