"""The official ACE-Step server's routes, as a route group the ingress inherits (like
``AdapterRoutes``): ``/release_task``, ``/query_result``, ``/format_input``,
``/create_random_sample``, ``/v1/init`` / ``/v1/reinitialize`` and ``/v1/chat/completions``. They
translate the official bodies (``serve.compat.release``, ``serve.compat.chat``) and submit through the
ingress's own ``_prepare`` / ``_submit``, so every dialect meets the same checks and task path."""

from __future__ import annotations

import asyncio
import json
from typing import Dict, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.compat import chat, official
from serve.compat import release as compat
from serve.driver import TaskFailure, classify
from serve.edge import client_paths, intake
from serve.edge.errors import APIError, FieldError, error_responses
from serve.http_app import api, json_body
from serve.ingress_state import failure_status
from serve.streaming import STREAM_FIELD, SongReader, stream_format_of, why_not_streamed


def _lm_choice(body: Dict) -> Optional[str]:
    """The LM an official body names, in any of the spellings ``/release_task`` accepts."""
    for name in compat.ALIASES["lm_model"]:
        if body.get(name):
            return str(body[name])
    return None


class CompatRoutes:
    """Needs ``config``, ``served``, ``state``, ``pipeline``, ``_prepare`` and ``_submit`` from the ingress."""

    @api.post("/release_task")
    async def release_task(self, request: Request):
        """Upstream ``/release_task``: JSON, multipart (``ref_audio``/``ctx_audio`` files) or form."""
        max_upload = self.state.max_upload
        body, files = await compat.read_body(request, max_upload)
        params, config, extras = compat.to_library(body, self._returned_key)
        for name, (field, ref) in extras.pop("stored_uploads", {}).items():
            files.setdefault(name, await asyncio.to_thread(self._client_file, field, ref))
        files = await self._check_uploads(files, max_upload)
        self._check_analysis(extras.get("analysis"), files)
        params, config, seeds, route = await self._prepare(params, config, files, extras, extras.pop("explicit"))
        task_id = await self._submit("release_task", params, config, seeds, files, {**extras, **route},
                                     request.state.key_name if hasattr(request.state, "key_name") else "")
        queued = (await asyncio.to_thread(self.state.store.stats))["tasks"]["queued"]
        return compat.envelope({"task_id": task_id, "status": "queued", "queue_position": max(queued, 1)})

    def _check_analysis(self, mode: Optional[str], files: Dict[str, bytes]) -> None:
        needs = compat.ANALYSIS_NEEDS.get(mode, set())
        if "lm" in needs and not self.config.lm.enabled:
            raise APIError(503, f"{mode} needs the LM, which is disabled in this deployment", loc=("lm",),
                           code="lm_disabled")
        if "src_audio" in needs and "src_audio" not in files:
            raise FieldError("src_audio", f"{mode} needs the source audio: upload it as multipart ctx_audio "
                             "(or src_audio)", 422)

    def _returned_key(self, value: str):
        """A ``*_audio_path`` value → a store key (a file this server returned), an allow-listed
        ``LocalAudio``, or None (refused)."""
        key = compat.returned_file_key(value, self.state.audio_path("").rstrip("/"))
        if key is not None:
            return key
        path = client_paths.allowed_path(value, self.config.ingress.allowed_audio_dirs)
        return client_paths.LocalAudio(path) if path else None

    def _client_file(self, name: str, ref) -> bytes:
        if isinstance(ref, client_paths.LocalAudio):
            return client_paths.read_allowed(name, ref.path, self.state.max_upload)
        data = self.state.audio.read(ref)
        if data is None:
            raise FieldError(name, "that file is no longer stored; upload it instead", 422, code="not_found")
        return data

    @api.post("/query_result")
    async def query_result(self, request: Request):
        body, _ = await compat.read_body(request, self.state.max_upload)
        task_ids = compat.task_ids_from(body)[:100]
        records = await asyncio.to_thread(self.state.store.get_many, task_ids) if task_ids else {}
        models = {"lm": self.config.lm.model if self.config.lm.enabled else "", "dit": self.config.dit.model}
        data = []
        for task_id in task_ids:  # one item per id, in request order, as upstream
            record = records[task_id]
            if record is None:
                data.append(compat.unknown_item(task_id))
                continue
            status, items = compat.query_items(record.summary(), models, self.state.audio_path)
            data.append({"task_id": task_id, "status": status, "result": json.dumps(items),
                         "progress_text": record.message})
        return compat.envelope(data)

    @api.post("/format_input")
    async def format_input(self, request: Request):
        """Upstream ``/format_input``: the LM formats caption, lyrics and metadata (JSON or form)."""
        body, _ = await compat.read_body(request, self.state.max_upload)
        caption, lyrics, user, temperature = official.format_input_args(body)
        if not self.config.lm.enabled:
            return JSONResponse({"detail": "the LM is disabled in this deployment"}, status_code=503)
        try:
            lm = self.pipeline.models_for({"lm_model": self.served.lm_name(_lm_choice(body))}).lm
            sample = await lm.format_sample.remote(caption, lyrics, user_metadata=user, temperature=temperature)
        except Exception as error:  # upstream reports LM failures inside the envelope
            failure = classify(error)
            return compat.envelope(None, 500, getattr(failure, "code", "internal"))
        if not getattr(sample, "success", True):
            return compat.envelope(None, 500, "the LM produced no usable answer for this input")
        return compat.envelope(official.format_input_data(sample, caption, lyrics, user))

    @api.post("/create_random_sample")
    async def create_random_sample(self, request: Request):
        """Upstream ``/create_random_sample``: an example request (``sample_type`` simple_mode or other)."""
        body, _ = await compat.read_body(request, self.state.max_upload)
        example = official.random_example(str(body.get("sample_type") or "simple_mode"))
        return compat.envelope(example) if example else compat.envelope(None, 500, "No example data available")

    @api.post("/v1/init")
    async def init_model(self, request: Request):
        """Models are chosen by the Serve config, not at run time: this reports what is served, and
        refuses (``code`` 400) a model the app does not serve."""
        body, _ = await compat.read_body(request, self.state.max_upload)
        view = self.state.model_view()
        wanted = body.get("model") or body.get("config_path")
        try:
            loaded = self.served.dit_name(str(wanted).rsplit("/", 1)[-1] if wanted else None)
        except FieldError:
            return compat.envelope(None, 400, f"model not served by this app; it serves {', '.join(self.served.dits)}")
        return compat.envelope({"message": "already initialized", "loaded_model": loaded,
                                "loaded_lm_model": view["lm"]["model"] if view["lm"]["enabled"] else None})

    @api.post("/v1/reinitialize")
    async def reinitialize(self, request: Request):
        return await self.init_model(request)

    @api.post("/v1/chat/completions", openapi_extra=json_body(chat.ChatRequest),
              responses=error_responses(400, 408, 409, 422, 429, 503))
    async def chat_completions(self, request: Request):
        """OpenAI/OpenRouter-style: messages (text with ``<prompt>``/``<lyrics>`` tags or a description,
        ``input_audio`` parts) → ``choices[0].message`` with the metadata as markdown and the audio as
        ``data:`` URLs; ``stream: true`` → SSE chunks: the songs as they decode (``audio_chunk``), a
        heartbeat every 2 s, the audio files last."""
        req, model_id, task_start = await self._chat_task(request)
        timeout = self.config.ingress.request_timeout_s
        if req.stream:
            task_id = await task_start()
            return StreamingResponse(chat.stream(model_id, lambda s: self._chat_answer(task_id, s), timeout,
                                                 audio=await self._chat_audio(task_id)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        with self.state.admission.sync_slot():
            task_id = await task_start()
            try:
                content, audio = await self._chat_answer(task_id, timeout) or (None, None)
            except TaskFailure as failure:
                status, headers = failure_status(failure.code)
                return JSONResponse({"detail": [{"loc": ["task"], "msg": failure.message, "type": failure.code}],
                                     "task_id": task_id}, status_code=status, headers=headers)
        if content is None:
            return JSONResponse({"detail": [{"loc": ["task"], "msg": "no result within the sync timeout; poll "
                                             f"/v1/tasks/{task_id}", "type": "timeout"}], "task_id": task_id},
                                status_code=408)
        return chat.completion(model_id, content, audio)

    async def _chat_task(self, request: Request):
        """(request, model id, a coroutine function submitting the task): everything checked first."""
        req = chat.parse_request(await intake.read_json_object(request))
        model_id = "acestep/" + self.served.dit_name(req.model, status=400)
        found = chat.resolve_input(req, chat.read_messages(req.messages))
        if chat.no_input(req, found):
            raise FieldError("messages", "no prompt, lyrics, description or input audio in the messages", 400)
        files = chat.audio_uploads(req, found, self.state.max_upload)
        params, config, extras = compat.to_library(chat.release_body(req, found))
        files = await self._check_uploads(files, self.state.max_upload)
        explicit = extras.pop("explicit")
        params, config, seeds, route = await self._prepare(params, config, files, {**extras, "model": req.model},
                                                           explicit)
        if req.stream and why_not_streamed(params) is None:  # its songs as they decode, in the chat's SSE
            route[STREAM_FIELD] = "mp3" if config.audio_format == "mp3" else "opus"
        key_name = getattr(request.state, "key_name", "")
        return req, model_id, lambda: self._submit("chat", params, config, seeds, files, {**extras, **route}, key_name)

    async def _chat_audio(self, task_id: str) -> Optional[chat.AudioChunks]:
        """Each song's stream in turn (``serve.streaming``), for a task that streams them."""
        record = await asyncio.to_thread(self.state.store.get, task_id)
        stream_format = stream_format_of(record.request if record is not None else None)
        if stream_format is None:
            return None
        songs = len(record.request.get("seeds") or [])

        async def chunks():
            for index in range(songs):
                reader = SongReader(self.state.store, self.state.audio, task_id, index, heartbeat_s=chat.HEARTBEAT_S)
                async for data in reader.chunks():
                    yield index, stream_format, data

        return chunks()

    async def _chat_answer(self, task_id: str, wait_s: float):
        """(markdown, audio parts) once the task is done, None while it runs; TaskFailure if it failed."""
        record = await self.state.wait_result(task_id, wait_s)
        if record.phase == "failed":
            raise TaskFailure(record.error or "internal", record.message)
        if record.phase != "done":
            return None
        models = {"lm": self.config.lm.model if self.config.lm.enabled else "", "dit": self.config.dit.model}
        _, items = compat.query_items(record.summary(), models)
        audio = []
        for item in record.result["audios"]:
            data = await asyncio.to_thread(self.state.audio.read, item["key"])
            if data is not None:
                audio.append(chat.data_url(data, self.state.audio.media_type(item["key"])))
        return chat.content_markdown(items[0] if items else {}), audio
