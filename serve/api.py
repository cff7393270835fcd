"""The FastAPI ingress: HTTP routes, the official-compatible routes, and the Python handle API.

One request: the guard (``serve.guard``) checks the key, size and content type before any body is
parsed → the body is validated at the edge (4xx naming the field) → admission (429 + Retry-After)
→ a task record in the durable store, uploads in the audio store → this replica's ``TaskDriver``
runs it: the LM call's object ref, once computed, goes into the DiT call unfetched, so the plan
moves between replicas as a ref, and the DiT replica writes the files to the audio store. Info routes answer from state this replica keeps (``serve.ingress_state``), never behind
generation work.
"""

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from typing import Any, Dict, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.concurrency import run_in_threadpool

from acestep.params import GenerationConfig, GenerationParams, GenerationResult
from serve import chat, client_paths, compat, intake, official
from serve.adapter_api import AdapterRoutes
from serve.audio_store import audio_response
from serve.config import AppConfig
from serve.deployments import LMDisabled, PlanRequest, RenderReply, RenderRequest
from serve.driver import TaskFailure, classify
from serve.errors import APIError, FieldError, error_responses, retry_after
from serve.ingress_state import IngressState, failure_status, guard_settings
from serve.logs import current_request_id, extra, log
from serve.models import ModelSet, adapter_choice
from serve.replica import PlanRef, json_safe, until_ready
from serve.studio import StudioRoutes
from serve.schemas import (
    AudioItem,
    CreateSampleRequest,
    FormatSampleRequest,
    GenerateRequest,
    GenerationOutput,
    TaskAccepted,
    TaskStatus,
    UnderstandRequest,
)
from serve.http_app import api, json_body, not_found
from serve.tasks import FINAL_PHASES, IdempotencyConflict, StoreFull

_MULTIPART = {"type": "object", "properties": {
    "request": {"type": "string", "description": "GenerateRequest as JSON"},
    "src_audio": {"type": "string", "format": "binary"},
    "reference_audio": {"type": "string", "format": "binary"}}}
_GENERATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": _MULTIPART}}}}



async def _events(state: IngressState, task_id: str, after: int, heartbeat_s: float = 15.0):
    """Server-sent events in order, a comment line every ``heartbeat_s`` of quiet; ends at done/failed."""
    quiet_since = time.monotonic()
    while True:
        events = await asyncio.to_thread(state.store.events, task_id, after)
        if events is None:
            return
        for event in events:
            after = event.seq
            yield f"id: {after}\nevent: {event.phase}\ndata: {json.dumps(dataclasses.asdict(event))}\n\n"
            if event.phase in FINAL_PHASES:
                return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= heartbeat_s:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.25)


def _request_digest(body: Dict[str, Any], files: Dict[str, bytes]) -> str:
    """What "the same body" means for Idempotency-Key: the parsed fields and the upload bytes
    (raw multipart bytes differ by their random boundary)."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


# Helpers sit above the ingress class: @serve.ingress serialises the class when it is defined,
# so names defined after it would be missing in the replica.


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(AdapterRoutes, StudioRoutes):
    """HTTP + handle entry point; holds handles to the LM and the DiT, and the ingress state."""

    def __init__(self, config: AppConfig, lms: Dict[str, Any], dits: Dict[str, Any]):
        self.config, self.served = config, ModelSet.of(config)
        self.lms, self.dits = lms, dits
        self.lm, self.dit = lms[self.served.default_lm], dits[self.served.default_dit]
        self.state = IngressState(config, self._pipeline, lms, dits)
        self._started = int(time.time())
        api.user_middleware.clear()
        from serve.guard import Guard

        api.add_middleware(Guard, settings=guard_settings(config), routes=api.routes)

    async def check_health(self) -> None:
        """Serve's health check; also starts the reaper that re-drives lapsed and queued tasks."""
        self.state.start_background()

    # -- Python handle API -------------------------------------------------------------------------

    async def generate(self, params: GenerationParams, config: GenerationConfig,
                       include_tensors: bool = True) -> GenerationResult:
        """Same inputs and result as ``acestep.inference.generate_music``: failures (bad input included)
        come back as ``success=False, error=...``. Tensors are decoded from the stored files;
        ``audios[i]['url']`` names the stored file."""
        try:
            params, config, seeds, route = await self._prepare(params, config, {}, {})
            task_id = await self._submit("handle", params, config, seeds, {}, route, "", sync=True)
            record = await self.state.wait_result(task_id, self.config.ingress.request_timeout_s)
            if record.phase != "done":
                raise TaskFailure(record.error or "internal", record.message)
        except (APIError, TaskFailure) as error:
            message = getattr(error, "message", str(error))
            return GenerationResult(audios=[], status_message=f"Error: {message}", success=False, error=message)
        return await run_in_threadpool(self.state.handle_result, record, include_tensors)

    # -- HTTP: generation --------------------------------------------------------------------------

    @api.post("/v1/generate", response_model=GenerationOutput, openapi_extra=_GENERATE_BODY,
              responses=error_responses(400, 408, 409, 422, 429, 503))
    async def generate_http(self, request: Request):
        """Generate and wait for the result; fetch files from the returned ``audios[i].url``. No result
        within the timeout → 408 with the task id (the task goes on; poll it)."""
        with self.state.admission.sync_slot():
            task_id = await self._submit_http(request, "v1/generate", sync=True)
            record = await self.state.wait_result(task_id, self.config.ingress.request_timeout_s)
        if record.phase == "done":
            return record.result
        if record.phase not in FINAL_PHASES:
            return JSONResponse({"detail": [{"loc": ["task"], "msg": "no result within the sync timeout; poll "
                                             f"/v1/tasks/{task_id}", "type": "timeout"}], "task_id": task_id},
                                status_code=408)
        status, headers = failure_status(record.error)
        return JSONResponse({"detail": [{"loc": ["task"], "msg": record.message, "type": record.error}],
                             "task_id": task_id}, status_code=status, headers=headers)

    @api.post("/v1/tasks", status_code=202, response_model=TaskAccepted, openapi_extra=_GENERATE_BODY,
              responses=error_responses(400, 409, 422, 429, 503))
    async def submit_task(self, request: Request):
        """Start a generation; poll ``GET /v1/tasks/{id}`` or stream ``/v1/tasks/{id}/events``. Send an
        ``Idempotency-Key`` header to make retries safe: the same key and body give the same task."""
        task_id = await self._submit_http(request, "v1/tasks", sync=False)
        return TaskAccepted(task_id=task_id, phase="queued", status_url=f"/v1/tasks/{task_id}",
                            events_url=f"/v1/tasks/{task_id}/events")

    @api.get("/v1/tasks/{task_id}", response_model=TaskStatus, responses=error_responses(404))
    async def task_status(self, task_id: str):
        record = await asyncio.to_thread(self.state.store.get, task_id)
        if record is None:
            raise not_found("task id")
        return record.summary()

    @api.delete("/v1/tasks/{task_id}", response_model=TaskStatus, responses=error_responses(404, 409))
    async def cancel_task(self, task_id: str):
        """Cancel an unfinished task: it ends ``failed`` with error ``cancelled``; its LM rows are
        freed at the engine's next step. 404 for an unknown id, 409 for a task already finished."""
        store = self.state.store
        if not await asyncio.to_thread(store.fail, task_id, "cancelled", "cancelled"):
            if await asyncio.to_thread(store.get, task_id) is None:
                raise not_found("task id")
            raise APIError(409, "task already finished", loc=("path", "task_id"), code="conflict")
        return (await asyncio.to_thread(store.get, task_id)).summary()

    @api.get("/v1/tasks/{task_id}/events", responses=error_responses(404))
    async def task_events(self, task_id: str, request: Request):
        """Server-sent events: one per phase/progress change, in order, ending with done or failed; a
        comment line every 15 s keeps proxies from closing a quiet stream."""
        if await asyncio.to_thread(self.state.store.get, task_id) is None:
            raise not_found("task id")
        last = request.headers.get("last-event-id", "")
        after = int(last) if last.lstrip("-").isdigit() and len(last) < 12 else -1
        return StreamingResponse(_events(self.state, task_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.get("/v1/audio/{key}", responses=error_responses(404))
    async def audio(self, key: str, request: Request):
        """An encoded file; ``Range: bytes=a-b`` gives 206 with that part."""
        return await run_in_threadpool(audio_response, self.state.audio, key, request.headers.get("range"))

    @api.get("/v1/audio", responses=error_responses(404))
    async def audio_by_path(self, path: str, request: Request):
        """Upstream-style ``/v1/audio?path=...``: only the file name is used, as a key into the store."""
        key = path.replace("\\", "/").rsplit("/", 1)[-1]
        return await run_in_threadpool(audio_response, self.state.audio, key, request.headers.get("range"))

    # -- HTTP: LM helpers --------------------------------------------------------------------------

    @api.post("/v1/understand", openapi_extra=json_body(UnderstandRequest), responses=error_responses(400, 422))
    async def understand(self, request: Request):
        fields = (await self._read_model(request, UnderstandRequest)).model_dump()
        return await self._lm_call(self.lm.understand, "audio_codes", fields.pop("audio_codes"), **fields)

    @api.post("/v1/create_sample", openapi_extra=json_body(CreateSampleRequest), responses=error_responses(400, 422))
    async def create_sample(self, request: Request):
        fields = (await self._read_model(request, CreateSampleRequest)).model_dump()
        return await self._lm_call(self.lm.create_sample, "query", fields.pop("query"), **fields)

    @api.post("/v1/format_sample", openapi_extra=json_body(FormatSampleRequest), responses=error_responses(400, 422))
    async def format_sample(self, request: Request):
        fields = (await self._read_model(request, FormatSampleRequest)).model_dump()
        return await self._lm_call(self.lm.format_sample, "caption", fields.pop("caption"), fields.pop("lyrics"),
                                   **fields)

    async def _read_model(self, request: Request, model):
        try:
            return model.model_validate(await intake.read_json_object(request))
        except ValidationError as error:
            raise intake.ValidationFailed(intake.validation_errors(error)) from None

    async def _lm_call(self, method, main_field: str, *args, **kwargs):
        try:
            result = await method.remote(*args, **kwargs)
        except Exception as error:
            cause = getattr(error, "cause", None) or error
            if isinstance(cause, LMDisabled):
                raise APIError(503, str(cause), loc=("lm",), code="lm_disabled") from None
            if isinstance(cause, ValueError):
                raise intake.library_error(cause) from None
            failure = classify(error)
            status, headers = failure_status(getattr(failure, "code", "internal"))
            raise APIError(status, str(failure), loc=("lm",), code=getattr(failure, "code", "internal"),
                           headers=headers) from None
        if not getattr(result, "success", True):
            raise FieldError(main_field, "the LM produced no usable answer for this input", 422, code="lm_failed")
        return dataclasses.asdict(result)

    # -- HTTP: service -----------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        """The process answers (no other check: see /ready); the official envelope, ``status`` also on top."""
        return {**compat.envelope(official.health_data(self.state.model_view())), "status": "ok"}

    @api.get("/ready", responses=error_responses(503))
    async def ready(self):
        """Each deployment has a running replica and the task store answers (from state refreshed in
        the background, so this never waits behind generation work)."""
        self.state.start_background()
        report = self.state.readiness()
        if not report["ready"]:
            return JSONResponse({"detail": [{"loc": ["service"], "msg": "not ready", "type": "not_ready"}],
                                 **report}, status_code=503, headers=retry_after(5))
        return report

    @api.get("/v1/models")
    async def models(self):
        """The served DiT models as the official server lists them (OpenRouter shape: ``data[].id``)."""
        self.state.start_background()
        return official.openrouter_models(self.state.model_view()["dits"], self._started)

    @api.get("/api/v1/models", include_in_schema=False)
    async def models_hosted_prefix(self):
        """The hosted service's spelling of /v1/models (the official chat client test uses it)."""
        return await self.models()

    @api.get("/v1/model_inventory")
    async def model_inventory(self):
        view = self.state.model_view()
        return compat.envelope(official.model_inventory(view["dits"], view["lms"]))

    @api.get("/v1/info")
    async def info(self):
        """This app's own model info: the DiT (and whether it is turbo) and the LM with its backend."""
        self.state.start_background()
        return self.state.models()

    @api.get("/v1/stats")
    async def stats(self):
        """The official job counters in its envelope; this app's per-replica batch sizes, task counts and
        admission under ``data.serve`` (as of the last background refresh)."""
        self.state.start_background()
        native = await asyncio.to_thread(self.state.stats)
        data = official.stats_data(native["store"], self.config.ingress.max_unfinished_tasks,
                                   native["admission"].get("recent_task_s", 0.0))
        return compat.envelope({**data, "serve": native})

    # -- official-compatible routes ----------------------------------------------------------------

    @api.post("/release_task")
    async def release_task(self, request: Request):
        """Upstream ``/release_task``: JSON, multipart (``ref_audio``/``ctx_audio`` files) or form."""
        max_upload = self.state.max_upload
        body, files = await compat.read_body(request, max_upload)
        params, config, extras = compat.to_library(body, self._returned_key)
        for name, (field, ref) in extras.pop("stored_uploads", {}).items():
            files.setdefault(name, await asyncio.to_thread(self._client_file, field, ref))
        files = await intake.check_uploads(self.state.uploads, files, max_upload)
        self._check_analysis(extras.get("analysis"), files)
        params, config, seeds, route = await self._prepare(params, config, files, extras)
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
            sample = await self.lm.format_sample.remote(caption, lyrics, user_metadata=user, temperature=temperature)
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
        ``data:`` URLs; ``stream: true`` → SSE chunks, a heartbeat every 2 s, the audio last."""
        req, model_id, task_start = await self._chat_task(request)
        timeout = self.config.ingress.request_timeout_s
        if req.stream:
            task_id = await task_start()
            return StreamingResponse(chat.stream(model_id, lambda s: self._chat_answer(task_id, s), timeout),
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
        files = await intake.check_uploads(self.state.uploads, files, self.state.max_upload)
        params, config, seeds, route = await self._prepare(params, config, files, {**extras, "model": req.model})
        key_name = getattr(request.state, "key_name", "")
        return req, model_id, lambda: self._submit("chat", params, config, seeds, files, {**extras, **route}, key_name)

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

    # -- submitting ----------------------------------------------------------------------------------

    async def _submit_http(self, request: Request, source: str, *, sync: bool) -> str:
        max_upload = self.state.max_upload
        idempotency = request.headers.get("idempotency-key")
        if idempotency is not None and not 1 <= len(idempotency) <= 200:
            raise APIError(400, "Idempotency-Key must be 1 to 200 characters", loc=("header", "idempotency-key"))
        body, files = await intake.read_generate_body(request, max_upload)
        digest = None if idempotency is None else _request_digest(body, files)
        params, config, files = intake.to_params(body, files, max_upload)
        files = await intake.check_uploads(self.state.uploads, files, max_upload)
        params, config, seeds, route = await self._prepare(params, config, files, intake.routing(body))
        key_name = getattr(request.state, "key_name", "")
        return await self._submit(source, params, config, seeds, files, route, key_name, sync=sync,
                                  idempotency=(idempotency, digest))

    async def _prepare(self, params, config, files, choice: Dict[str, Any]):
        """The DiT and LM for the request (``serve.models``), then the library's checks with that
        DiT's rules → (params, config, seeds, the choice as task extras)."""
        turbo = await self.state.turbo_by_model()
        dit = self.served.pick_dit(choice.get("model"), params.task_type, turbo)
        lm = self.served.lm_name(choice.get("lm_model"))
        params, config, seeds = intake.prepare(params, config, files, is_turbo=turbo[dit])
        adapters = adapter_choice(self.config, choice, await self._defaults() if self.config.dit.adapters.dir else None)
        return params, config, seeds, {"dit_model": dit, "lm_model": lm, **adapters}

    async def _submit(self, source, params, config, seeds, files, extras, key_name, *, sync=False,
                      idempotency=(None, None)) -> str:
        """Admission, then the uploads and the task record; this replica drives it when it has room."""
        state = self.state
        state.start_background()
        await state.admit(key_name)
        task_id = uuid.uuid4().hex
        upload_keys = {}
        for name, data in files.items():
            upload_keys[name] = f"upload-{task_id}-{name}"
            await asyncio.to_thread(state.audio.put, upload_keys[name], data)
        request = intake.task_request(source, params, config, seeds, upload_keys, extras,
                                      request_id=current_request_id())
        claim = state.driver.has_room()
        try:
            task_id, created = await asyncio.to_thread(
                state.store.create, request, key_name=key_name, task_id=task_id, idempotency_key=idempotency[0],
                body_digest=idempotency[1], owner=state.driver.owner if claim else None,
                lease_s=self.config.ingress.lease_s, bounds=state.bounds(key_name))
        except StoreFull as full:
            for key in upload_keys.values():
                await asyncio.to_thread(state.audio.delete, key)
            raise state.refusal(full, key_name) from None
        except IdempotencyConflict:
            raise APIError(409, "Idempotency-Key already used with a different body",
                           loc=("header", "idempotency-key"), code="conflict") from None
        log.info("task %s accepted", task_id, extra=extra(task_id=task_id, source=source, created=created))
        if created and claim:
            state.driver.start(task_id, claimed=True)
        return task_id

    # -- the pipeline ------------------------------------------------------------------------------

    async def _pipeline(self, record) -> Dict[str, Any]:
        """One attempt at a task: (optional upstream sample/format step), LM plan → DiT render."""
        params, config, seeds, upload_keys, extras = intake.from_task_request(record.request)
        task_id = record.task_id
        if extras.get("analysis"):
            return await self._analysis(task_id, extras["analysis"], params, config, seeds, upload_keys)
        if extras.get("sample_mode") or extras.get("sample_query") or extras.get("use_format"):
            params = await self._compat_sample(params, extras)
        calls = []
        lm = self.lms.get(extras.get("lm_model"), self.lm)
        dit = self.dits.get(extras.get("dit_model"), self.dit)
        try:
            plan = lm.plan.remote(PlanRequest(task_id, params, config, seeds))  # not awaited: an object ref
            calls.append(plan)
            plan_ref = await plan._to_object_ref()
            await until_ready(plan_ref)  # the DiT is called with a finished (or failed) plan
            adapters = extras.get("adapters")
            if adapters:  # multiplexing: prefer a replica that holds this adapter set
                dit = dit.options(multiplexed_model_id="+".join(name for name, _ in adapters))
            render = RenderRequest(task_id, params, config, seeds, upload_keys, adapters=adapters)
            calls.append(dit.render.remote(render, PlanRef(plan_ref)))
            reply: RenderReply = await calls[-1]
        except asyncio.CancelledError:
            for call in calls:  # the LM aborts the task's engine rows; the DiT drops its part
                call.cancel()
            raise
        audios = [AudioItem(key=item.file_key, url=f"/v1/audio/{item.file_key}", format=item.format,
                            sample_rate=item.sample_rate, seed=item.seed, params=item.params)
                  for item in reply.items]
        models = {"dit": extras.get("dit_model") or self.served.default_dit,
                  "lm": extras.get("lm_model") or self.served.default_lm, "adapters": adapters or []}
        return GenerationOutput(task_id=task_id, audios=audios, metadata={**reply.metadata, "models": models},
                                time_costs=reply.time_costs, status_message=reply.status_message).model_dump()

    async def _analysis(self, task_id: str, mode: str, params, config, seeds, upload_keys) -> Dict[str, Any]:
        """Upstream's analysis modes: source → codes (DiT replica), codes → metadata (LM, T=0.3), or
        the LM's CoT alone; a record instead of audio."""
        codes, metadata = "", {}
        if "src_audio" in compat.ANALYSIS_NEEDS[mode]:
            codes = await self.dit.audio_codes.remote(task_id, upload_keys["src_audio"])
        if mode == "full_analysis_only":
            metadata = await self.lm.understand_metadata.remote(codes, temperature=0.3)
        elif mode == "analysis_only":
            cot_only = dataclasses.replace(params, thinking=False, use_cot_metas=True)
            outcome = await self.lm.plan.remote(PlanRequest(task_id, cot_only, dataclasses.replace(config, batch_size=1),
                                                            seeds[:1]))
            metadata = json_safe({k: v for k, v in outcome.plans[0].metadata.items() if v is not None})
        raw = compat.analysis_record(mode, metadata, codes, params.caption, params.lyrics, self.config.lm.model)
        return GenerationOutput(task_id=task_id, audios=[], metadata={"analysis": raw},
                                status_message=raw["status_message"]).model_dump()

    async def _compat_sample(self, params: GenerationParams, extras: Dict[str, Any]) -> GenerationParams:
        if extras.get("sample_mode") or extras.get("sample_query"):
            sample = await self.lm.create_sample.remote(
                extras.get("sample_query") or "NO USER INPUT", instrumental=params.instrumental,
                vocal_language=None if params.vocal_language in ("en", "unknown", "") else params.vocal_language)
            return compat.apply_sample(params, sample, from_format=False)
        meta = {"bpm": params.bpm, "duration": params.duration if params.duration > 0 else None,
                "keyscale": params.keyscale, "timesignature": params.timesignature}
        sample = await self.lm.format_sample.remote(
            params.caption, params.lyrics, user_metadata={k: v for k, v in meta.items() if v})
        return compat.apply_sample(params, sample, from_format=True)

    # -- shutdown ----------------------------------------------------------------------------------

    async def drain(self, grace_s: Optional[float] = None) -> Dict[str, int]:
        """Stop admitting (503 + Retry-After), let phases in flight finish within ``grace_s``, leave the
        rest in the store for the next start."""
        return await self.state.drain(self.config.ingress.drain_grace_s if grace_s is None else grace_s)
