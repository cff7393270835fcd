"""The FastAPI ingress: the native routes and the Python handle API. The official server's routes
are a route group it inherits (``serve.compat.routes``), as are the adapter routes
(``serve.adapter_api``), the dataset and training routes (``serve.dataset_api``, ``serve.training_api``),
the song streams (``serve.stream_api``) and the studio page (``serve.studio``).

One request: the guard (``serve.edge.guard``) checks the key, size and content type before any body
is parsed → the body is validated at the edge (4xx naming the field) → admission (429 +
Retry-After) → a task record in the durable store, uploads in the audio store → this replica's
``TaskDriver`` runs it through the ``TaskPipeline``. Info routes answer from state this replica keeps
(``serve.ingress_state``), never behind generation work.
"""

import asyncio
import dataclasses
import importlib
import time
from typing import Any, Dict, List, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.concurrency import run_in_threadpool

from acestep.params import GenerationConfig, GenerationParams, GenerationResult
from serve.adapter_api import AdapterRoutes
from serve.compat import official
from serve.compat import release as compat
from serve.compat.routes import CompatRoutes
from serve.config import AppConfig
from serve.dataset_api import DatasetRoutes
from serve.deployments import LMDisabled
from serve.driver import TaskFailure, classify
from serve.edge import intake
from serve.edge.errors import APIError, FieldError, error_responses, retry_after
from serve.gates import Gates
from serve.http_app import api, json_body, not_found
from serve.ingress_state import IngressState, failure_status, guard_settings
from serve.models import ModelSet
from serve.pipeline import ColdStart, TaskPipeline
from serve.schemas import (
    GENERATE_BODY,
    CreateSampleRequest,
    FormatSampleRequest,
    GenerationOutput,
    TaskAccepted,
    TaskStatus,
    UnderstandRequest,
)
from serve.store.audio import archive, audio_response
from serve.store.records import FINAL_PHASES, sse_events
from serve.stream_api import StreamRoutes
from serve.studio import StudioRoutes
from serve.submission import Submission
from serve.training_api import TrainingRoutes

# Helpers sit above the ingress class: @serve.ingress serialises the class when it is defined,
# so names defined after it would be missing in the replica.


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(Submission, CompatRoutes, AdapterRoutes, StreamRoutes, StudioRoutes, TrainingRoutes, DatasetRoutes):
    """HTTP + handle entry point; holds handles to the LM and the DiT, and the ingress state."""

    def __init__(self, config: AppConfig, lms: Dict[str, Any], dits: Dict[str, Any]):
        # This class reaches the replica by value, the route groups' methods by reference: importing
        # this module there runs @serve.ingress once more, which gives those methods their injected
        # ``self`` (without it their routes ask the client for a "self" query parameter).
        importlib.import_module(__name__)
        self.config, self.served = config, ModelSet.of(config)
        self.lms, self.dits = lms, dits
        gates = Gates.for_config(config)
        self.pipeline = TaskPipeline(config, self.served, lms, dits, gates)
        self.state = IngressState(config, self.pipeline.run, lms, dits, gates)
        self.pipeline.cold_start = ColdStart(self.state.store, self.state.running)
        self._started = int(time.time())
        api.user_middleware.clear()
        from serve.edge.guard import Guard

        api.add_middleware(Guard, settings=guard_settings(config), routes=api.routes)

    async def check_health(self) -> None:
        """Serve's health check; also starts the reaper that re-drives lapsed and queued tasks."""
        self.state.start_background()

    # -- Python handle API -------------------------------------------------------------------------

    async def generate(self, params: GenerationParams, config: GenerationConfig,
                       include_tensors: bool = True, explicit: Optional[List[str]] = None) -> GenerationResult:
        """Same inputs and result as ``acestep.inference.generate_music``: failures (bad input included)
        come back as ``success=False, error=...``. ``audios[i]['bytes']`` is the stored file as it is
        (``url`` names it); tensors are decoded from it unless ``include_tensors=False``. ``explicit``:
        the fields the caller set, for ``params.preset`` (None: those that differ from the defaults)."""
        try:
            params, config, seeds, route = await self._prepare(params, config, {}, {}, explicit)
            task_id = await self._submit("handle", params, config, seeds, {}, route, "", sync=True)
            record = await self.state.wait_result(task_id, self.config.ingress.request_timeout_s)
            if record.phase != "done":
                raise TaskFailure(record.error or "internal", record.message)
        except (APIError, TaskFailure) as error:
            message = getattr(error, "message", str(error))
            return GenerationResult(audios=[], status_message=f"Error: {message}", success=False, error=message)
        return await run_in_threadpool(self.state.handle_result, record, include_tensors)

    # -- HTTP: generation --------------------------------------------------------------------------

    @api.post("/v1/generate", response_model=GenerationOutput, openapi_extra=GENERATE_BODY,
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

    @api.post("/v1/tasks", status_code=202, response_model=TaskAccepted, openapi_extra=GENERATE_BODY,
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
        return StreamingResponse(sse_events(self.state.store, task_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @api.get("/v1/tasks/{task_id}/audios.zip", responses=error_responses(404, 409))
    async def task_archive(self, task_id: str):
        """Every audio of a finished task in one zip, in result order; stems are named
        '<NN>-<track>.<format>'. 409 while the task is unfinished or when it failed."""
        record = await asyncio.to_thread(self.state.store.get, task_id)
        if record is None:
            raise not_found("task id")
        summary = record.summary()
        if summary.get("phase") != "done" or not summary.get("result"):
            raise APIError(409, "the task has no audio (yet)", loc=("path", "task_id"), code="conflict")
        data = await asyncio.to_thread(archive, self.state.audio, summary["result"]["audios"])
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{task_id}.zip"'})

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
        lm = self._helper_lm(fields)
        return await self._lm_call(lm.understand, "audio_codes", fields.pop("audio_codes"), **fields)

    @api.post("/v1/create_sample", openapi_extra=json_body(CreateSampleRequest), responses=error_responses(400, 422))
    async def create_sample(self, request: Request):
        fields = (await self._read_model(request, CreateSampleRequest)).model_dump()
        lm = self._helper_lm(fields)
        return await self._lm_call(lm.create_sample, "query", fields.pop("query"), **fields)

    @api.post("/v1/format_sample", openapi_extra=json_body(FormatSampleRequest), responses=error_responses(400, 422))
    async def format_sample(self, request: Request):
        fields = (await self._read_model(request, FormatSampleRequest)).model_dump()
        lm = self._helper_lm(fields)
        return await self._lm_call(lm.format_sample, "caption", fields.pop("caption"), fields.pop("lyrics"),
                                   **fields)

    def _helper_lm(self, fields: Dict[str, Any]):
        """The LM deployment a helper request names (``lm_model``, popped), else the default."""
        name = self.served.lm_name(fields.pop("lm_model", None))
        return self.pipeline.models_for({"lm_model": name}).lm

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
        """The task store answers and each deployment has a running replica or may scale from zero
        (``min_replicas: 0``, not failed): see ``serve.ingress_state.readiness``. From state refreshed
        in the background, so this never waits behind generation work."""
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

    # -- shutdown ----------------------------------------------------------------------------------

    async def drain(self, grace_s: Optional[float] = None) -> Dict[str, int]:
        """Stop admitting (503 + Retry-After), let phases in flight finish within ``grace_s``, leave the
        rest in the store for the next start."""
        return await self.state.drain(self.config.ingress.drain_grace_s if grace_s is None else grace_s)
