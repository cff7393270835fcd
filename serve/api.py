"""The FastAPI ingress: HTTP routes, the official-compatible routes, and the Python handle API.

One request: validate at the edge (4xx naming the field) → create a task in the store → call the LM
(``DeploymentResponse`` not awaited) and hand that response straight to the DiT call, so the plan moves
between replicas as an object ref → store the encoded audio → mark the task done.
"""


import asyncio
import dataclasses
import io
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from acestep.params import GenerationConfig, GenerationParams, GenerationResult
from serve import compat
from serve.config import AppConfig
from serve.deployments import LMDisabled, PlanRequest, RenderOutput, RenderRequest
from serve.schemas import (
    CONFIG_FIELDS,
    PARAM_FIELDS,
    UPLOAD_FIELDS,
    AudioItem,
    CreateSampleRequest,
    FieldError,
    FormatSampleRequest,
    GenerateRequest,
    GenerationOutput,
    TaskAccepted,
    TaskStatus,
    UnderstandRequest,
    check_audio_upload,
    decode_base64_upload,
    field_from_message,
    to_library,
)
from serve.tasks import FINAL_PHASES

api = FastAPI(
    title="ACE-Step serve",
    version="1.0",
    description="ACE-Step 1.5 music generation on Ray Serve: a 5 Hz LM plans, a DiT + VAE renders 48 kHz stereo.",
)
_GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "request": {"type": "string", "description": "GenerateRequest as JSON"},
                "src_audio": {"type": "string", "format": "binary"},
                "reference_audio": {"type": "string", "format": "binary"}}}},
        },
    }
}
_KNOWN_FIELDS = set(PARAM_FIELDS) | set(CONFIG_FIELDS)


def _cause(error: BaseException) -> BaseException:
    """The original exception behind a Ray task error (Serve wraps replica exceptions)."""
    return getattr(error, "cause", None) or error


def _message(error: BaseException) -> str:
    cause = _cause(error)
    return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]


def _errors(error: ValidationError, prefix=("body",)) -> List[Dict[str, Any]]:
    """Pydantic errors without the echoed input (a NaN there would make the 422 itself fail)."""
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in error.errors()]


@api.exception_handler(FieldError)
async def _field_error(request: Request, error: FieldError):
    headers = {"Retry-After": "5"} if error.status_code == 429 else None
    return JSONResponse({"detail": error.detail()}, status_code=error.status_code, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def _field_error_from(error: BaseException) -> FieldError:
    """A library ValueError (ValidationError carries ``.field``) → 422 naming the field."""
    message = str(error)
    field = getattr(error, "field", None) or field_from_message(message, _KNOWN_FIELDS | set(UPLOAD_FIELDS))
    return FieldError(field, message)


def _audio_suffix(data: bytes) -> str:
    import soundfile as sf

    return sf.info(io.BytesIO(data)).format.lower()


class _MultiFieldError(FieldError):
    def __init__(self, errors: List[Dict[str, Any]]):
        super().__init__(str(errors[0]["loc"][-1]) if errors else "body", errors[0]["msg"] if errors else "")
        self.errors = errors

    def detail(self) -> List[Dict[str, Any]]:
        return self.errors


async def _swallow(coroutine) -> None:
    """Background tasks record failures in the store; nothing is left to raise to."""
    try:
        await coroutine
    except Exception:
        pass


def _decode(data: bytes):
    import soundfile as sf
    import torch

    samples, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return torch.from_numpy(samples.T.copy())


# Helpers sit above the ingress class: @serve.ingress serialises the class when it is defined,
# so names defined after it would be missing in the replica.


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP + handle entry point; holds handles to the LM, the DiT and the task store."""

    def __init__(self, config: AppConfig, lm, dit, store):
        self.config = config
        self.lm, self.dit, self.store = lm, dit, store
        self.max_upload = int(config.ingress.max_upload_mb * 2**20)
        self._dit_info: Optional[Dict[str, Any]] = None
        self._background: Dict[str, asyncio.Task] = {}

    # -- Python handle API -------------------------------------------------------------------------

    async def generate(self, params: GenerationParams, config: GenerationConfig,
                       include_tensors: bool = True) -> GenerationResult:
        """Same inputs and result as ``acestep.inference.generate_music``: failures (bad input included)
        come back as ``success=False, error=...``. Tensors are decoded from the encoded files;
        ``audios[i]['url']`` names the stored file."""
        try:
            params, config, seeds = await self._prepare(params, config)
            task_id = await self._create_task({"source": "handle"})
            output, rendered = await self._execute(task_id, params, config, seeds, {})
        except Exception as error:
            message = str(_cause(error)) if isinstance(error, FieldError) else _message(error)
            return GenerationResult(audios=[], status_message=f"Error: {message}", success=False, error=message)
        audios = []
        for item, stored in zip(rendered.items, output["audios"]):
            tensor = _decode(item.data) if include_tensors else None
            audios.append({"path": "", "tensor": tensor, "key": item.key, "sample_rate": item.sample_rate,
                           "params": item.params, "url": stored["url"], "format": item.format})
        plans = (output["metadata"] or {}).get("plans") or []
        extra = {"time_costs": output["time_costs"], "task_id": task_id,
                 "lm_metadata": (plans[0] or {}).get("metadata") if plans else None,  # as generate_music
                 "lm_plans": plans,
                 "seed_value": ", ".join(str(a["seed"]) for a in output["audios"])}
        return GenerationResult(audios=audios, status_message=rendered.status_message, extra_outputs=extra)

    # -- HTTP: generation --------------------------------------------------------------------------

    @api.post("/v1/generate", response_model=GenerationOutput, openapi_extra=_GENERATE_BODY)
    async def generate_http(self, request: Request):
        """Generate and wait for the result; fetch files from the returned ``audios[i].url``."""
        params, config, seeds, uploads = await self._read_generate(request)
        task_id = await self._create_task({"source": "v1/generate"})
        timeout = self.config.ingress.request_timeout_s
        try:
            output, _ = await asyncio.wait_for(self._execute(task_id, params, config, seeds, uploads), timeout)
        except asyncio.TimeoutError:
            return JSONResponse({"detail": f"no result within {timeout}s", "task_id": task_id}, status_code=504)
        except FieldError:
            raise
        except Exception as error:  # a server-side failure: say what, without a traceback
            return JSONResponse({"detail": _message(error), "task_id": task_id}, status_code=500)
        return output

    @api.post("/v1/tasks", status_code=202, response_model=TaskAccepted, openapi_extra=_GENERATE_BODY)
    async def submit_task(self, request: Request):
        """Start a generation; poll ``GET /v1/tasks/{id}`` or stream ``/v1/tasks/{id}/events``."""
        params, config, seeds, uploads = await self._read_generate(request)
        task_id = await self._create_task({"source": "v1/tasks"})
        self._start(task_id, self._execute(task_id, params, config, seeds, uploads))
        return TaskAccepted(task_id=task_id, phase="queued", status_url=f"/v1/tasks/{task_id}",
                            events_url=f"/v1/tasks/{task_id}/events")

    @api.get("/v1/tasks/{task_id}", response_model=TaskStatus)
    async def task_status(self, task_id: str):
        record = await self.store.get.remote(task_id)
        if record is None:
            return JSONResponse({"detail": f"unknown task id {task_id!r}"}, status_code=404)
        record.pop("request", None)
        return record

    @api.delete("/v1/tasks/{task_id}", response_model=TaskStatus)
    async def cancel_task(self, task_id: str):
        """Cancel an unfinished task: it ends ``failed`` with error ``cancelled``; its LM rows are
        freed at the engine's next step. 404 for an unknown id, 409 for a task already finished."""
        if not await self.store.fail.remote(task_id, "cancelled"):
            record = await self.store.get.remote(task_id)
            if record is None:
                return JSONResponse({"detail": f"unknown task id {task_id!r}"}, status_code=404)
            return JSONResponse({"detail": f"task {task_id!r} already {record['phase']}"}, status_code=409)
        record = await self.store.get.remote(task_id)
        record.pop("request", None)
        return record

    @api.get("/v1/tasks/{task_id}/events")
    async def task_events(self, task_id: str, request: Request):
        """Server-sent events: one per phase/progress change, in order, ending with done or failed."""
        if await self.store.get.remote(task_id) is None:
            return JSONResponse({"detail": f"unknown task id {task_id!r}"}, status_code=404)
        last = request.headers.get("last-event-id", "")
        after = int(last) if last.lstrip("-").isdigit() else -1
        return StreamingResponse(self._event_stream(task_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _event_stream(self, task_id: str, after: int):
        while True:
            events = await self.store.wait_events.remote(task_id, after, 15.0)
            if events is None:
                return
            if not events:
                yield ": keep-alive\n\n"
                continue
            for event in events:
                after = event["seq"]
                yield f"id: {after}\nevent: {event['phase']}\ndata: {json.dumps(event)}\n\n"
                if event["phase"] in FINAL_PHASES:
                    return

    @api.get("/v1/audio/{key}")
    async def audio(self, key: str):
        return await self._audio_response(key)

    @api.get("/v1/audio")
    async def audio_by_path(self, path: str):
        """Upstream-style ``/v1/audio?path=...``: only the file name is used, as a key into the store."""
        return await self._audio_response(path.replace("\\", "/").rsplit("/", 1)[-1])

    async def _audio_response(self, key: str):
        item = await self.store.get_audio.remote(key)
        if item is None:
            return JSONResponse({"detail": f"unknown audio key {key!r}"}, status_code=404)
        data, media_type = item
        return Response(data, media_type=media_type, headers={"Content-Disposition": f'inline; filename="{key}"'})

    # -- HTTP: LM helpers --------------------------------------------------------------------------

    @api.post("/v1/understand")
    async def understand(self, body: UnderstandRequest):
        fields = body.model_dump()
        return await self._lm_call(self.lm.understand, fields.pop("audio_codes"), **fields)

    @api.post("/v1/create_sample")
    async def create_sample(self, body: CreateSampleRequest):
        fields = body.model_dump()
        return await self._lm_call(self.lm.create_sample, fields.pop("query"), **fields)

    @api.post("/v1/format_sample")
    async def format_sample(self, body: FormatSampleRequest):
        fields = body.model_dump()
        return await self._lm_call(self.lm.format_sample, fields.pop("caption"), fields.pop("lyrics"), **fields)

    async def _lm_call(self, method, *args, **kwargs):
        try:
            result = await method.remote(*args, **kwargs)
        except Exception as error:
            if isinstance(_cause(error), LMDisabled):
                return JSONResponse({"detail": str(_cause(error))}, status_code=503)
            if isinstance(_cause(error), ValueError):
                names = {*kwargs, "audio_codes", "query", "caption", "lyrics"}
                raise FieldError(field_from_message(str(_cause(error)), names), str(_cause(error))) from None
            return JSONResponse({"detail": _message(error)}, status_code=500)
        return dataclasses.asdict(result)

    # -- HTTP: service -----------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        return {"status": "ok", "service": "ACE-Step API", "version": "1.0"}

    @api.get("/v1/models")
    async def models(self):
        lm = await self.lm.info.remote()
        dit = await self._get_dit_info()
        return {"models": [{"name": dit["model"], "is_default": True, "is_turbo": dit["is_turbo"]}],
                "default_model": dit["model"], "lm": lm}

    @api.get("/v1/stats")
    async def stats(self):
        """Per-replica batch sizes the LM and DiT saw, and task counts."""
        lm, dit, store = await asyncio.gather(self.lm.stats.remote(), self.dit.stats.remote(),
                                              self.store.stats.remote())
        return {"lm": lm, "dit": dit, "store": store}

    # -- official-compatible routes ----------------------------------------------------------------

    @api.post("/release_task")
    async def release_task(self, request: Request):
        """Upstream ``/release_task``: JSON, multipart (``ref_audio``/``ctx_audio`` files) or form."""
        body, files = await compat.read_body(request, self.max_upload)
        params, config, extras = compat.to_library(body)
        uploads = {name: check_audio_upload(name, data, self.max_upload) for name, data in files.items()}
        params, config, seeds = await self._prepare(params, config, uploads)
        task_id = await self._create_task({"source": "release_task"})
        self._start(task_id, self._execute_compat(task_id, params, config, seeds, uploads, extras))
        queued = (await self.store.stats.remote())["tasks"]["queued"]
        return compat.envelope({"task_id": task_id, "status": "queued", "queue_position": max(queued, 1)})

    @api.post("/query_result")
    async def query_result(self, request: Request):
        body, _ = await compat.read_body(request, self.max_upload)
        task_ids = compat.task_ids_from(body)
        records = await self.store.get_many.remote(task_ids)
        if all(record is None for record in records.values()):
            return JSONResponse({"detail": f"unknown task ids: {task_ids}"}, status_code=404)
        models = {"lm": self.config.lm.model if self.config.lm.enabled else "", "dit": self.config.dit.model}
        data = []
        for task_id in task_ids:
            record = records[task_id]
            if record is None:
                data.append({"task_id": task_id, "status": 2, "result": "[]", "progress_text": "unknown task id"})
                continue
            status, items = compat.query_items(record, models)
            data.append({"task_id": task_id, "status": status, "result": json.dumps(items),
                         "progress_text": record["message"]})
        return compat.envelope(data)

    async def _execute_compat(self, task_id, params, config, seeds, uploads, extras):
        try:
            if extras.get("sample_mode") or extras.get("sample_query"):
                sample = await self.lm.create_sample.remote(
                    extras.get("sample_query") or "NO USER INPUT", instrumental=params.instrumental,
                    vocal_language=None if params.vocal_language in ("en", "unknown", "") else params.vocal_language)
                params = compat.apply_sample(params, sample, from_format=False)
            elif extras.get("use_format"):
                meta = {"bpm": params.bpm, "duration": params.duration if params.duration > 0 else None,
                        "keyscale": params.keyscale, "timesignature": params.timesignature}
                sample = await self.lm.format_sample.remote(
                    params.caption, params.lyrics, user_metadata={k: v for k, v in meta.items() if v})
                params = compat.apply_sample(params, sample, from_format=True)
        except Exception as error:
            await self.store.fail.remote(task_id, _message(error))
            return
        await self._execute(task_id, params, config, seeds, uploads)

    # -- the pipeline ------------------------------------------------------------------------------

    async def _read_generate(self, request: Request) -> Tuple[GenerationParams, GenerationConfig, List[int], Dict]:
        """JSON body, or multipart with a ``request`` JSON part plus ``src_audio``/``reference_audio`` files."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        files: Dict[str, bytes] = {}
        if content_type.startswith("multipart/"):
            form = await request.form(max_part_size=2 * self.max_upload)
            raw = form.get("request") or "{}"
            for name in UPLOAD_FIELDS:
                upload = form.get(name)
                if upload is not None and not isinstance(upload, str):
                    files[name] = await upload.read(self.max_upload + 1)
        else:
            raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as error:
            raise FieldError("body", f"invalid JSON: {error.msg}", 400) from None
        if not isinstance(body, dict):
            raise FieldError("body", "JSON body must be an object", 400)
        for name in UPLOAD_FIELDS:
            if isinstance(body.get(name), str):
                raise FieldError(name, f"the server never reads a client-named path; upload the file "
                                 f"(multipart field {name!r}) or send {name}_base64", 400)
        try:
            model = GenerateRequest.model_validate(body)
        except ValidationError as error:
            return_errors = _errors(error)
            raise _MultiFieldError(return_errors) from None
        for name in UPLOAD_FIELDS:
            text = getattr(model, f"{name}_base64")
            if text:
                files[name] = decode_base64_upload(f"{name}_base64", text, self.max_upload)
        uploads = {name: check_audio_upload(name, data, self.max_upload) for name, data in files.items()}
        params, config = to_library(model)
        params, config, seeds = await self._prepare(params, config, uploads)
        return params, config, seeds, uploads

    async def _prepare(self, params, config, uploads: Optional[Dict[str, bytes]] = None):
        """``prepare_request`` at the edge; uploads go to a scratch file only for the check (e.g. the
        repaint window against the source length), and the paths are dropped again."""
        from acestep.inference import prepare_request

        info = await self._get_dit_info()
        with tempfile.TemporaryDirectory(prefix="acestep-check-") as scratch:
            paths = {}
            for name, data in (uploads or {}).items():
                paths[name] = os.path.join(scratch, f"{name}.{_audio_suffix(data)}")
                with open(paths[name], "wb") as handle:
                    handle.write(data)
            try:
                params, config, seeds = prepare_request(dataclasses.replace(params, **paths), config,
                                                        is_turbo=info["is_turbo"])
            except ValueError as error:
                raise _field_error_from(error) from None
        return dataclasses.replace(params, **{name: None for name in paths}), config, seeds

    async def _get_dit_info(self) -> Dict[str, Any]:
        if self._dit_info is None:
            self._dit_info = await self.dit.info.remote()
        return self._dit_info

    async def _create_task(self, request: Dict[str, Any]) -> str:
        task_id = await self.store.create.remote(request)
        if task_id is None:
            raise FieldError("task", "server busy: too many unfinished tasks, retry later", 429)
        return task_id

    def _start(self, task_id: str, coroutine) -> None:
        task = asyncio.create_task(_swallow(self._drive(task_id, coroutine)))
        self._background[task_id] = task
        task.add_done_callback(lambda _: self._background.pop(task_id, None))

    async def _drive(self, task_id: str, coroutine) -> None:
        """Run a task's pipeline until it ends or the task turns final elsewhere (DELETE on any
        ingress replica marks it failed in the store), which cancels the pipeline."""
        work = asyncio.ensure_future(coroutine)
        watch = asyncio.ensure_future(self._until_final(task_id))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (work, watch):
                if not pending.done():
                    pending.cancel()
        await asyncio.gather(work, return_exceptions=True)

    async def _until_final(self, task_id: str) -> None:
        while await self.store.wait_final.remote(task_id, 60.0) not in (None, *FINAL_PHASES):
            pass

    async def _execute(self, task_id, params, config, seeds, uploads) -> Tuple[Dict[str, Any], RenderOutput]:
        calls = []
        try:
            plan = self.lm.plan.remote(PlanRequest(task_id, params, config, seeds))  # not awaited: an object ref
            calls.append(plan)
            calls.append(self.dit.render.remote(RenderRequest(task_id, params, config, seeds, uploads), plan))
            rendered: RenderOutput = await calls[-1]
            audios = []
            for item in rendered.items:
                file_key = f"{item.key}.{item.format}"
                await self.store.put_audio.remote(file_key, item.data, item.media_type)
                audios.append(AudioItem(key=file_key, url=f"/v1/audio/{file_key}", format=item.format,
                                        sample_rate=item.sample_rate, seed=item.seed, params=item.params))
            output = GenerationOutput(task_id=task_id, audios=audios, metadata=rendered.metadata,
                                      time_costs=rendered.time_costs, status_message=rendered.status_message)
            output = output.model_dump()
            await self.store.finish.remote(task_id, output)
            return output, rendered
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError):
                for call in calls:  # the LM aborts the task's engine rows; the DiT drops its part
                    call.cancel()
            await asyncio.shield(self.store.fail.remote(task_id, _message(error)))
            if isinstance(_cause(error), ValueError):
                raise _field_error_from(_cause(error)) from None
            raise
