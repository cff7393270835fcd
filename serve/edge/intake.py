"""Reading a generate request at the edge: body → validated library params, checked uploads.

Everything here answers bad input with a ``FieldError`` (4xx naming the field, never the input):
JSON goes through ``serve.edge.safejson`` (UTF-8, nesting and number limits), uploads through
``serve.edge.uploads`` (magic bytes, header sanity, a sandboxed decode), fields through the pydantic
request model and then the library's own ``prepare_request`` (ranges, cross-field rules, the
repaint window and an extension's total length against the source's length). A task's stored
request is plain JSON, so any ingress replica can run it again after a crash: params and config as
dicts, seeds resolved, uploads as audio-store keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from pydantic import ValidationError
from starlette.requests import Request

from acestep.fairness import PRIORITY_CLASSES, priority_rank
from acestep.params import GenerationConfig, GenerationParams
from acestep.presets import apply_model
from serve.edge.errors import APIError, FieldError
from serve.edge.safejson import JSON_LIMIT, check_text, parse_json
from serve.store.records import WEBHOOK_FIELD
from serve.upload_url import UPLOAD_FIELD
from serve.schemas import CONFIG_FIELDS, PARAM_FIELDS, ROUTING_FIELDS, UPLOAD_FIELDS, GenerateRequest, to_library

KNOWN_FIELDS = set(PARAM_FIELDS) | set(CONFIG_FIELDS) | set(UPLOAD_FIELDS)
Uploads = Dict[str, bytes]


def validation_errors(error: ValidationError, prefix=("body",)) -> List[Dict[str, Any]]:
    """Pydantic errors without the echoed input."""
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in error.errors()]


class ValidationFailed(APIError):
    """Several field errors at once (pydantic's list), answered as one 422."""

    def __init__(self, errors: List[Dict[str, Any]]):
        first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
        super().__init__(422, first["msg"], loc=first["loc"])
        self.errors = errors

    def detail(self) -> List[Dict[str, Any]]:
        return self.errors


def library_error(error: BaseException) -> FieldError:
    """A library ValueError (``ValidationError`` carries ``.field``) → 422 naming the field."""
    from serve.schemas import field_from_message

    message = str(error)
    field = getattr(error, "field", None) or field_from_message(message, KNOWN_FIELDS)
    return FieldError(field, message)


async def read_json_object(request: Request) -> Dict[str, Any]:
    body = parse_json(await request.body())
    if not isinstance(body, dict):
        raise FieldError("body", "the JSON body must be an object", 400)
    return body


# An upload's base64 value in a JSON body: base64 has no quotes or escapes, so a scan finds its end.
_BASE64_VALUE = re.compile(rb'"(?:' + b"|".join(n.encode() for n in UPLOAD_FIELDS) + rb')_base64"\s*:\s*"[A-Za-z0-9+/=\s]*"')


def check_json_outside_uploads(raw: bytes) -> None:
    """413 before parsing when the JSON besides the base64 upload values is over ``JSON_LIMIT``: the
    guard lets an upload route's body reach two uploads' size, which is no licence for the rest."""
    if len(raw) <= JSON_LIMIT:
        return
    outside = len(raw) - sum(match.end() - match.start() for match in _BASE64_VALUE.finditer(raw))
    if outside > JSON_LIMIT:
        raise FieldError("body", f"JSON besides the base64 uploads must be at most {JSON_LIMIT} bytes", 413,
                         code="too_large")


async def read_generate_body(request: Request, max_upload: int) -> Tuple[Dict[str, Any], Uploads]:
    """JSON body, or multipart with a ``request`` JSON part plus ``src_audio``/``reference_audio`` files."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type.startswith("multipart/"):
        # read from the stream, not request.body(): that caches the body on the request, which
        # lives as long as a sync route waits for its result
        raw = b"".join([chunk async for chunk in request.stream()])
        check_json_outside_uploads(raw)
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise FieldError("body", "the JSON body must be an object", 400)
        return body, {}
    try:
        form = await request.form(max_part_size=2 * max_upload + JSON_LIMIT)
    except Exception:  # malformed multipart: starlette raises several types
        raise FieldError("body", "malformed multipart body", 400) from None
    files: Uploads = {}
    for name in UPLOAD_FIELDS:
        upload = form.get(name)
        if upload is not None and not isinstance(upload, str):
            files[name] = await upload.read(max_upload + 1)
    raw = form.get("request") or "{}"
    if not isinstance(raw, str):
        raw = (await raw.read(JSON_LIMIT)).decode("utf-8", "surrogateescape")
    check_text("request", raw)
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise FieldError("request", "the request part must be a JSON object", 400)
    return body, files


def routing(body: Dict[str, Any]) -> Dict[str, Any]:
    """The request's model and adapter choice (``ROUTING_FIELDS``; checked by ``to_params``)."""
    return {name: body[name] for name in ROUTING_FIELDS if body.get(name) is not None}


def task_priority(requested: Optional[str], key_class: str) -> int:
    """The task's class rank (``acestep.fairness``): ``requested`` (the body's ``priority``, already
    one of the class names) when it is at most the key's class, else 422 naming ``priority``; none
    requested: the key's class."""
    if requested is None:
        return priority_rank(key_class)
    if priority_rank(requested) > priority_rank(key_class):
        allowed = ", ".join(name for name, rank in PRIORITY_CLASSES.items() if rank <= priority_rank(key_class))
        raise FieldError("priority", f"priority {requested!r} is above this API key's class "
                                     f"({key_class!r}); allowed: {allowed}")
    return priority_rank(requested)


def webhook(body: Dict[str, Any]) -> Dict[str, str]:
    """The task's webhook as its extras keep it ({} without one; ``to_params`` checked its type and
    length, ``serve.webhooks`` checks where it points)."""
    url = body.get(WEBHOOK_FIELD)
    return {WEBHOOK_FIELD: url} if isinstance(url, str) and url else {}


def upload_url(body: Dict[str, Any]) -> Dict[str, Any]:
    """The task's ``upload_url`` as its extras keep it until submission checks it against the task
    ({} without one; ``to_params`` checked its shape, ``serve.upload_url`` the count and addresses)."""
    value = body.get(UPLOAD_FIELD)
    return {UPLOAD_FIELD: value} if value not in (None, "") else {}


def to_params(body: Dict[str, Any], files: Uploads, max_upload: int
              ) -> Tuple[GenerationParams, GenerationConfig, Uploads, Dict[str, str]]:
    """The request model's checks, base64 uploads decoded; uploads not yet inspected. The last item
    names the field each upload was sent as (``src_audio_base64``), for the errors about it."""
    for name in UPLOAD_FIELDS:
        if isinstance(body.get(name), str):
            raise FieldError(name, f"the server never reads a client-named path; upload the file "
                             f"(multipart field {name!r}) or send {name}_base64", 400)
    try:
        model = GenerateRequest.model_validate(body)
    except ValidationError as error:
        raise ValidationFailed(validation_errors(error)) from None
    files, sent_as = dict(files), {}
    for name in UPLOAD_FIELDS:
        text = getattr(model, f"{name}_base64")
        if text:
            files[name] = decode_base64(f"{name}_base64", text, max_upload)
            sent_as[name] = f"{name}_base64"
    try:
        params, config = to_library(model)
    except ValueError as error:
        raise library_error(error) from None
    return params, config, files, sent_as


def decode_base64(field: str, text: str, max_bytes: int) -> bytes:
    if len(text) > max_bytes * 4 // 3 + 8:
        raise FieldError(field, f"upload larger than {max_bytes} bytes", 413, code="too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None


async def check_uploads(checker, files: Uploads, max_upload: int, sent_as: Optional[Dict[str, str]] = None,
                        source_limit: Optional[Tuple[float, str]] = None) -> Uploads:
    """Each upload inspected in the sandboxed checker (422 invalid_audio / 413 too_large), its errors
    naming the field it was sent as. ``source_limit`` = (seconds, where the limit comes from): a
    source audio longer than that is refused (422), since a source task renders the source's length."""
    for name, data in files.items():
        field = (sent_as or {}).get(name, name)
        probe = await asyncio.to_thread(checker.check, field, data, max_upload)
        if name == "src_audio" and source_limit and probe.duration_s > source_limit[0]:
            raise FieldError(field, f"{field} is {probe.duration_s:.1f} seconds long; source audio is at most "
                                    f"{source_limit[0]:g} seconds on this server ({source_limit[1]})")
    return files


def apply_preset(params: GenerationParams, family: Optional[str], model: str, explicit: Optional[List[str]]):
    """``acestep.presets.apply_model``, its refusals as the field's 4xx → (params, PresetReport)."""
    try:
        return apply_model(params, family, model=model, explicit=explicit)
    except ValueError as error:
        raise library_error(error) from None


def prepare(params: GenerationParams, config: GenerationConfig, uploads: Uploads, *, is_turbo: bool):
    """``prepare_request`` on the params with the upload bytes in place → (params without the
    bytes, config, resolved seeds)."""
    from acestep.inference import prepare_request

    try:
        params, config, seeds = prepare_request(dataclasses.replace(params, **uploads), config, is_turbo=is_turbo)
    except ValueError as error:
        raise library_error(error) from None
    return dataclasses.replace(params, **{name: None for name in uploads}), config, seeds


def task_request(source: str, params: GenerationParams, config: GenerationConfig, seeds: List[int],
                 upload_keys: Dict[str, str], extras: Optional[Dict[str, Any]] = None,
                 request_id: str = "") -> Dict[str, Any]:
    """What a task's record keeps to run it again: plain JSON (``request_id``: the Serve request that
    created it, for the logs of whichever replica drives it)."""
    return {"source": source, "params": dataclasses.asdict(params), "config": dataclasses.asdict(config),
            "seeds": list(seeds), "uploads": dict(upload_keys), "extras": dict(extras or {}),
            "request_id": request_id}


def from_task_request(request: Dict[str, Any]):
    """(params, config, seeds, upload_keys, extras) from ``task_request``'s dict."""
    params = GenerationParams(**request["params"])
    config = GenerationConfig(**request["config"])
    return params, config, list(request["seeds"]), dict(request.get("uploads") or {}), dict(request.get("extras") or {})


def request_digest(body: Dict[str, Any], files: Dict[str, bytes]) -> str:
    """What "the same body" means for Idempotency-Key: the parsed fields and the upload bytes
    (raw multipart bytes differ by their random boundary)."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()
