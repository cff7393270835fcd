"""``POST /v1/chat/completions`` for music, in the OpenAI/OpenRouter shape the official server's
adapter answers: a chat request becomes an upstream ``/release_task`` body holding only what the
adapter sets (so it gets the same fields, defaults and checks), its result becomes a chat completion
whose message carries the metadata as markdown and the audio as ``data:`` URLs.

Message text may use ``<prompt>…</prompt>`` / ``<lyrics>…</lyrics>`` tags; untagged text that looks
like lyrics (structure tags, or four or more short lines) is the lyrics, any other untagged text is
a description for sample mode. ``input_audio`` parts are the source audio (tasks that edit a
source: first part source, second reference) or the reference (text2music).

Pure functions over the request and the finished task; the route lives in ``serve.compat.routes``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.compat.release import ReleaseRequest
from serve.edge.errors import FieldError
from serve.schemas import LMTemperature, LMTopK, LMTopP, checked

SOURCE_TASKS = {"cover", "cover-nofsq", "repaint", "lego", "extract", "complete"}
LYRICS_MARKERS = ("[verse", "[chorus", "[bridge", "[intro", "[outro", "[hook", "[pre-chorus", "[refrain", "[inst")
INSTRUMENTAL_LYRICS = ("[inst]", "[instrumental]")
MAX_MESSAGES = 64
HEARTBEAT_S = 2.0
CHAT_BATCH_SIZE = 1  # the official adapter renders one song unless asked (/release_task: 2)


def _official(name: str) -> str:
    """``/release_task``'s default for ``name``, for the descriptions (chat leaves it to that model)."""
    return f"default {ReleaseRequest.model_fields[name].default!r}"


class _Loose(BaseModel):
    # OpenAI clients send fields this server has no use for (n, user, tools...): ignored, not refused
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class AudioConfig(_Loose):
    duration: Optional[checked(float, "duration")] = Field(
        None, description="Seconds of audio; none: the LM or a default decides.")
    format: Optional[checked(str, "audio_format")] = Field(
        None, description=f"Output format ({_official('audio_format')}).")
    bpm: Optional[checked(int, "bpm")] = Field(None, description="Beats per minute.")
    key_scale: Optional[checked(str, "keyscale")] = Field(None, description="Key and scale, e.g. 'C major'.")
    time_signature: Optional[checked(str, "timesignature")] = Field(None, description="Beats per bar: 2, 3, 4 or 6.")
    vocal_language: Optional[checked(str, "vocal_language")] = Field(
        None, description=f"Language code of the vocals ({_official('vocal_language')}).")
    instrumental: Optional[bool] = Field(None, description="No vocals (lyrics become [inst]).")


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[Dict[str, Any]], None] = Field(
        None, description="Text, or parts: {type: text, text} and {type: input_audio, input_audio: {data, format}}.")


class ChatRequest(_Loose):
    """The chat request; besides the OpenAI fields, the ACE-Step fields the official adapter reads.
    An ACE-Step field left out (None) takes ``/release_task``'s default."""

    model: Optional[str] = Field(None, description="acestep/<dit model> (see GET /v1/models); none: the default.")
    messages: List[ChatMessage] = Field(..., max_length=MAX_MESSAGES)
    stream: bool = Field(False, description=(
        "Server-sent chunks: each song's audio as it decodes (`delta.audio_chunk`: index, format opus or mp3, "
        "base64), a heartbeat every 2 s, the audio files in the last chunk."))
    audio_config: Optional[AudioConfig] = None
    temperature: Optional[LMTemperature] = Field(None, description=f"LM temperature ({_official('lm_temperature')}).")
    top_p: Optional[LMTopP] = Field(None, description=f"LM top-p ({_official('lm_top_p')}).")
    top_k: Optional[LMTopK] = Field(None, description=f"LM top-k, 0: off ({_official('lm_top_k')}).")
    seed: Union[int, str, None] = Field(None, description="A seed, or comma-separated seeds for a batch; none: random.")
    thinking: Optional[bool] = Field(None, description=f"Let the LM write audio codes first ({_official('thinking')}).")
    guidance_scale: Optional[checked(float, "guidance_scale")] = None
    batch_size: Optional[checked(int, "batch_size")] = Field(
        None, description=f"Songs to render (default {CHAT_BATCH_SIZE}).")
    inference_steps: Optional[checked(int, "inference_steps")] = Field(
        None, description=f"DiT steps ({_official('inference_steps')}).")
    lyrics: str = Field("", description="Lyrics; the message text is then the caption.")
    sample_mode: bool = Field(False, description="The message text is a description; the LM writes the song.")
    use_format: bool = Field(False, description="Let the LM format caption, lyrics and metadata first.")
    use_cot_caption: Optional[bool] = None
    use_cot_language: Optional[bool] = None
    task_type: Optional[checked(str, "task_type")] = Field(None, description=f"{_official('task_type')}.")
    repainting_start: Optional[checked(float, "repainting_start")] = None
    repainting_end: Optional[checked(float, "repainting_end")] = None
    audio_cover_strength: Optional[checked(float, "audio_cover_strength")] = None
    cover_noise_strength: Optional[checked(float, "cover_noise_strength")] = Field(
        None, description="Cover: start from the source re-noised (0: pure noise, 1: closest to the source).")
    audio_codes: Optional[str] = Field(None, description="5 Hz audio codes to render instead of LM-written ones.")


# Chat fields that pass to /release_task as they are when set, by the name they take there.
PASSED_ON = {"temperature": "lm_temperature", "top_p": "lm_top_p", "top_k": "lm_top_k", "thinking": "thinking",
             "guidance_scale": "guidance_scale", "inference_steps": "inference_steps", "task_type": "task_type",
             "repainting_start": "repainting_start", "repainting_end": "repainting_end",
             "audio_cover_strength": "audio_cover_strength", "cover_noise_strength": "cover_noise_strength",
             "use_cot_caption": "use_cot_caption",
             "use_cot_language": "use_cot_language", "audio_codes": "audio_code_string"}
AUDIO_PASSED_ON = {"bpm": "bpm", "key_scale": "key_scale", "time_signature": "time_signature",
                   "duration": "audio_duration", "vocal_language": "vocal_language", "format": "audio_format",
                   "instrumental": "instrumental"}


@dataclass
class ChatInput:
    """What the messages say: caption text, lyrics, a sample-mode description, audio parts (base64)."""

    prompt: str = ""
    lyrics: str = ""
    sample_query: str = ""
    audios: List[str] = field(default_factory=list)
    tagged: bool = False


def parse_request(body: Dict[str, Any]) -> ChatRequest:
    from serve.edge.intake import ValidationFailed, validation_errors

    try:
        return ChatRequest.model_validate(body)
    except ValidationError as error:
        raise ValidationFailed(validation_errors(error)) from None


def _tagged(text: str) -> Tuple[Optional[str], Optional[str], str]:
    """(``<prompt>`` content, ``<lyrics>`` content, the text outside both)."""
    found = {}
    for tag in ("prompt", "lyrics"):
        match = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL | re.IGNORECASE)
        if match:
            found[tag] = match.group(1).strip()
            text = text.replace(match.group(0), "")
    return found.get("prompt"), found.get("lyrics"), text.strip()


def looks_like_lyrics(text: str) -> bool:
    lowered = text.lower()
    if any(marker in lowered for marker in LYRICS_MARKERS):
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 4 and sum(map(len, lines)) / len(lines) < 60


def _add_text(found: ChatInput, parts: List[str], text: str) -> None:
    prompt, lyrics, rest = _tagged(text.strip())
    if prompt is not None or lyrics is not None:
        found.tagged = True
        parts.extend(t for t in (prompt, rest) if t)
        found.lyrics = lyrics or found.lyrics
    elif looks_like_lyrics(text):
        found.lyrics = text.strip()
    elif text.strip():
        parts.append(text.strip())


def read_messages(messages: List[ChatMessage]) -> ChatInput:
    """The user messages' text and audio parts (system and assistant turns carry no song)."""
    found, parts = ChatInput(), []
    for index, message in enumerate(messages):
        if message.role != "user" or message.content is None:
            continue
        if isinstance(message.content, str):
            _add_text(found, parts, message.content)
            continue
        for part_index, part in enumerate(message.content):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                _add_text(found, parts, part["text"])
            elif kind == "input_audio":
                audio = part.get("input_audio")
                data = audio.get("data") if isinstance(audio, dict) else None
                if not isinstance(data, str) or not data:
                    raise FieldError(f"messages.{index}.content.{part_index}.input_audio.data",
                                     "input_audio needs base64 data", 422)
                found.audios.append(data)
    found.prompt = " ".join(parts).strip()
    if not found.tagged and not found.lyrics and found.prompt:
        found.sample_query, found.prompt = found.prompt, ""  # a free description: sample mode
    return found


def resolve_input(request: ChatRequest, found: ChatInput) -> ChatInput:
    """Explicit ``lyrics`` / ``sample_mode`` say what the message text is, overriding the guess."""
    text = found.prompt or found.sample_query
    if request.lyrics:
        return ChatInput(prompt=text, lyrics=request.lyrics, audios=found.audios, tagged=True)
    if request.sample_mode:
        return ChatInput(sample_query=text, audios=found.audios)
    return found


def audio_uploads(request: ChatRequest, found: ChatInput, max_bytes: int) -> Dict[str, bytes]:
    """``input_audio`` parts → upload bytes by field, routed by the task type."""
    from serve.edge.intake import decode_base64

    names = ["src_audio", "reference_audio"] if request.task_type in SOURCE_TASKS else ["reference_audio"]
    if len(found.audios) > len(names):
        raise FieldError("messages", f"at most {len(names)} input_audio part(s) for this task_type (cover, "
                         "cover-nofsq, repaint, lego, extract, complete: source then reference; text2music: "
                         "a reference)", 422)
    files = {}
    for name, data in zip(names, found.audios):
        payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        files[name] = decode_base64("input_audio", payload, max_bytes)
    return files


def release_body(request: ChatRequest, found: ChatInput) -> Dict[str, Any]:
    """The chat request as an upstream ``/release_task`` body: what the messages say, the fields
    the client set, and the adapter's own choices (one song; ``[inst]`` lyrics for instrumental;
    sample mode for a free description); everything else is left to ``/release_task``'s defaults."""
    audio = request.audio_config or AudioConfig()
    body: Dict[str, Any] = {
        "prompt": found.prompt, "lyrics": found.lyrics or ("[inst]" if audio.instrumental else ""),
        "sample_query": found.sample_query, "sample_mode": request.sample_mode or bool(found.sample_query) or None,
        "use_format": request.use_format or None,
        "batch_size": CHAT_BATCH_SIZE if request.batch_size is None else request.batch_size,
        **{sent: getattr(request, name) for name, sent in PASSED_ON.items()},
        **{sent: getattr(audio, name) for name, sent in AUDIO_PASSED_ON.items()},
    }
    if isinstance(request.seed, str) and "," in request.seed:
        body["seeds"] = request.seed
    elif request.seed is not None:
        body.update(seed=request.seed, use_random_seed=False)
    return {name: value for name, value in body.items() if value is not None and value != ""}


def no_input(request: ChatRequest, found: ChatInput) -> bool:
    return not (found.prompt or found.lyrics or found.sample_query or request.sample_mode or found.audios)


# -- the answer ------------------------------------------------------------------------------------


def content_markdown(item: Dict[str, Any]) -> str:
    """The metadata and lyrics of one result item (``compat.query_items`` shape) as markdown."""
    metas = item.get("metas") or {}
    lines = []
    caption = metas.get("prompt") or item.get("prompt")  # the caption asked for, as upstream shows it
    if caption:
        lines.append(f"**Caption:** {caption}")
    for name, label, unit in (("bpm", "BPM", ""), ("duration", "Duration", "s"), ("keyscale", "Key", ""),
                              ("timesignature", "Time Signature", "")):
        if metas.get(name) not in (None, "", "N/A"):
            lines.append(f"**{label}:** {metas[name]}{unit}")
    sections = ["## Metadata\n" + "\n".join(lines)] if lines else []
    lyrics = (item.get("lyrics") or "").strip()
    if lyrics and lyrics.lower() not in INSTRUMENTAL_LYRICS:
        sections.append(f"## Lyrics\n{lyrics}")
    return "\n\n".join(sections) or "Music generated successfully."


def data_url(data: bytes, media_type: str) -> Dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": f"data:{media_type};base64,{base64.b64encode(data).decode()}"}}


def completion(model_id: str, content: str, audio: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "audio": audio or None},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


class _Chunks:
    def __init__(self, model_id: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model_id

    def __call__(self, finish_reason: Optional[str] = None, **delta) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk)}\n\n"


# A song's stream while it decodes: (song index, stream format, bytes; b"" after a quiet spell)
AudioChunks = AsyncIterator[Tuple[int, str, bytes]]


def audio_chunk(index: int, stream_format: str, data: bytes) -> Dict[str, Any]:
    """An ``audio_chunk`` delta: the next bytes of song ``index``'s Ogg Opus / MP3 stream."""
    return {"index": index, "format": stream_format, "data": base64.b64encode(data).decode()}


async def stream(model_id: str, wait: Callable[[float], Awaitable[Optional[Tuple[str, List[Dict[str, Any]]]]]],
                 deadline_s: float, heartbeat_s: float = HEARTBEAT_S,
                 audio: Optional[AudioChunks] = None) -> AsyncIterator[str]:
    """SSE chunks: the role, then, given ``audio``, each song's stream as ``audio_chunk`` deltas while it
    decodes, a ``.`` every ``heartbeat_s`` until ``wait`` returns (content, audio) (None: not yet; an
    exception: the task failed), then the content, the audio files, ``[DONE]``."""
    chunk = _Chunks(model_id)
    yield chunk(role="assistant", content="Generating music")
    started = time.monotonic()
    try:
        async for index, stream_format, data in audio if audio is not None else _nothing():
            if time.monotonic() - started > deadline_s:
                raise TimeoutError("timeout: no result in time; the task goes on")
            yield chunk(audio_chunk=audio_chunk(index, stream_format, data)) if data else chunk(content=".")
        while True:
            answer = await wait(heartbeat_s)
            if answer is not None:
                break
            if time.monotonic() - started > deadline_s:
                raise TimeoutError("timeout: no result in time; the task goes on")
            yield chunk(content=".")
    except (Exception, asyncio.TimeoutError) as error:
        reason = f"{error.code}: {error}" if getattr(error, "code", None) else str(error)
        yield chunk(content=f"\n\nError: {reason}")
        yield chunk(finish_reason="error")
        yield "data: [DONE]\n\n"
        return
    content, audio = answer
    yield chunk(content=f"\n\n{content}")
    if audio:
        yield chunk(audio=audio)
    yield chunk(finish_reason="stop")
    yield "data: [DONE]\n\n"


async def _nothing() -> AudioChunks:
    return
    yield  # an async generator that yields nothing
