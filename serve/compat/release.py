"""The official ACE-Step API server's ``/release_task`` and ``/query_result`` shapes, so existing
clients work unchanged: same content types, field aliases, lookup order, defaults and response
envelope (see the upstream ``acestep/api_server.py``). The body is read by ``ReleaseRequest``, built
from the library's fields with upstream's spellings and defaults, judged by the library's rules.

Differences on purpose: ``*_path`` fields are refused (the server never reads a path a client names;
upload the file instead), bad values get a 4xx naming the field as sent and what is allowed instead
of a silent default, and an unknown task id is not reported as queued forever.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from starlette.datastructures import UploadFile
from starlette.requests import Request

from acestep.params import GenerationConfig, GenerationParams
from serve import schemas
from serve.edge.errors import FieldError
from serve.edge.intake import ValidationFailed, validation_errors
from serve.edge.safejson import JSON_LIMIT, check_text, parse_json
from serve.webhooks import MAX_URL_LENGTH

# Upstream's spellings of a field (its own name first); every field also takes its library name.
ALIASES: Dict[str, Tuple[str, ...]] = {
    "caption": ("prompt", "caption"),
    "sample_query": ("sample_query", "sampleQuery", "description", "desc"),
    "use_format": ("use_format", "useFormat", "format"),
    "model": ("model", "model_name", "modelName", "dit_model", "ditModel"),
    "lm_model": ("lm_model_path", "lm_model", "lmModelPath", "lmModel"),
    "lora": ("lora", "lora_name", "loraName"),
    "lora_scale": ("lora_scale", "loraScale"),
    "keyscale": ("key_scale", "keyscale", "keyScale", "key"),
    "timesignature": ("time_signature", "timesignature", "timeSignature"),
    "duration": ("audio_duration", "duration", "audioDuration", "target_duration", "targetDuration"),
    "vocal_language": ("vocal_language", "vocalLanguage", "language"),
    "inference_steps": ("inference_steps", "inferenceSteps"),
    "guidance_scale": ("guidance_scale", "guidanceScale"),
    "use_random_seed": ("use_random_seed", "useRandomSeed"),
    "audio_cover_strength": ("audio_cover_strength", "audioCoverStrength"),
    "task_type": ("task_type", "taskType"),
    "infer_method": ("infer_method", "inferMethod"),
    "use_constrained_decoding": ("constrained_decoding", "constrainedDecoding", "constrained"),
    "use_cot_caption": ("use_cot_caption", "cot_caption", "cot-caption"),
    "use_cot_language": ("use_cot_language", "cot_language", "cot-language"),
    "allow_lm_batch": ("allow_lm_batch", "allowLmBatch", "parallel_thinking"),
    "sample_mode": ("sample_mode", "sampleMode"),
    "audio_codes": ("audio_code_string", "audioCodeString", "audio_codes"),
    "analysis_only": ("analysis_only", "analysisOnly"),
    "full_analysis_only": ("full_analysis_only", "fullAnalysisOnly"),
    "extract_codes_only": ("extract_codes_only", "extractCodesOnly"),
}
# The upstream server's defaults where they differ from GenerationParams/GenerationConfig.
UPSTREAM_DEFAULTS = {**schemas.HTTP_DEFAULTS, "thinking": False, "vocal_language": "en", "shift": 3.0, "audio_format": "mp3",
                     "lm_cfg_scale": 2.5}
# The modes that answer with an analysis record instead of audio, and what each needs.
ANALYSIS_MODES = ("extract_codes_only", "full_analysis_only", "analysis_only")
ANALYSIS_NEEDS = {"extract_codes_only": {"src_audio"}, "full_analysis_only": {"src_audio", "lm"},
                  "analysis_only": {"lm"}}
# Request fields that are no library params: they travel as the task's extras when sent.
EXTRA_FIELDS = ("sample_query", "sample_mode", "use_format", "model", "lm_model", "lora", "lora_scale", "webhook_url",
                "upload_url")
PATH_FIELDS = {
    "reference_audio": ("reference_audio_path", "ref_audio_path", "referenceAudioPath", "refAudioPath"),
    "src_audio": ("src_audio_path", "ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"),
}
UPLOAD_NAMES = {"reference_audio": ("ref_audio", "reference_audio"), "src_audio": ("ctx_audio", "src_audio")}
META_KEYS = ("metas", "meta", "metadata", "user_metadata", "userMetadata")


class _Upstream(BaseModel):
    # upstream ignores names it does not know (ai_token, use_tiled_decode, lm_backend...)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("timesteps", "seeds", mode="before", check_fields=False)
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """Form bodies send lists as comma-separated text."""
        if isinstance(value, str):
            return [piece.strip() for piece in value.split(",") if piece.strip()]
        return value


ReleaseRequest = create_model(
    "ReleaseRequest",
    __base__=_Upstream,
    __doc__="The /release_task body: the library's fields under upstream's spellings and defaults.",
    **schemas.library_fields(GenerationParams, schemas.HIDDEN_FIELDS, defaults=UPSTREAM_DEFAULTS, aliases=ALIASES,
                             judged=True),
    **schemas.library_fields(GenerationConfig, defaults=UPSTREAM_DEFAULTS, aliases=ALIASES, judged=True),
    **schemas.routing_fields(("model", "lm_model", "lora", "lora_scale"), ALIASES),
    sample_query=(str, Field("", max_length=4096, validation_alias=schemas.spellings("sample_query", ALIASES),
                             description="A description of the song: the LM writes caption, lyrics and metadata.")),
    sample_mode=(bool, Field(False, validation_alias=schemas.spellings("sample_mode", ALIASES),
                             description="The LM writes the song from sample_query (or from nothing).")),
    webhook_url=(Optional[str], Field(None, max_length=MAX_URL_LENGTH, description=schemas.WEBHOOK_DESCRIPTION)),
    upload_url=schemas.upload_url_field(ALIASES),
    use_format=(bool, Field(False, validation_alias=schemas.spellings("use_format", ALIASES),
                            description="The LM formats caption, lyrics and metadata first.")),
    **{mode: (bool, Field(False, validation_alias=schemas.spellings(mode, ALIASES),
                          description="Answer with an analysis record instead of audio."))
       for mode in ANALYSIS_MODES},
)
# Each field's accepted spellings, in upstream's lookup order.
_SPELLINGS = {name: tuple(field.validation_alias.choices) if field.validation_alias else (name,)
              for name, field in ReleaseRequest.model_fields.items()}


def envelope(data: Any, code: int = 200, error: Optional[str] = None) -> Dict[str, Any]:
    return {"data": data, "code": code, "error": error, "timestamp": int(time.time() * 1000), "extra": None}


async def read_body(request: Request, max_upload_bytes: int) -> Tuple[Dict[str, Any], Dict[str, bytes]]:
    """JSON, multipart or urlencoded body (sniffed when untyped) → (fields, uploaded file bytes)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("multipart/") or content_type == "application/x-www-form-urlencoded":
        try:
            form = await request.form(max_part_size=max_upload_bytes)
        except Exception:  # malformed multipart/urlencoded: starlette raises several types
            raise FieldError("body", "malformed form body", 400) from None
        fields, uploads = {}, {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads[name] = await value.read(max_upload_bytes + 1)
            else:
                fields[name] = check_text(name, value)
        return fields, _named_uploads(uploads)
    raw = await request.body()
    if len(raw) > JSON_LIMIT:  # the official JSON carries no uploads: the route's larger bound is for forms
        raise FieldError("body", f"a JSON or text body must be at most {JSON_LIMIT} bytes", 413, code="too_large")
    if content_type and not (content_type == "application/json" or content_type.endswith("+json")):
        if content_type != "text/plain":
            raise FieldError("content-type", f"unsupported content type {content_type!r}", 415)
    return _parse_untyped(raw), {}


def _parse_untyped(raw: bytes) -> Dict[str, Any]:
    text = raw.decode("utf-8", errors="surrogateescape").strip()
    if not text:
        return {}
    if text.startswith("{") or text.startswith("["):
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise FieldError("body", "JSON body must be an object", 400)
        return data
    from urllib.parse import parse_qsl

    return {name: check_text(name, value) for name, value in parse_qsl(text)}


def _named_uploads(files: Dict[str, bytes]) -> Dict[str, bytes]:
    uploads = {}
    for canonical, names in UPLOAD_NAMES.items():
        for name in names:
            if name in files:
                uploads[canonical] = files[name]
                break
    return uploads


def _sources(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Where upstream looks, in order: the body, ``param_obj`` (object or JSON text), the first
    metas dict (``META_KEYS``; unreadable JSON text there is skipped, as upstream does)."""
    sources = [body]
    param_obj = body.get("param_obj")
    if isinstance(param_obj, str):
        try:
            param_obj = json.loads(param_obj)
        except json.JSONDecodeError:
            raise FieldError("param_obj", "not a JSON object", 400) from None
    if isinstance(param_obj, dict):
        sources.append(param_obj)
    for key in META_KEYS:
        meta = body.get(key)
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                meta = None
        if isinstance(meta, dict):
            sources.append(meta)
            break
    return sources


def gather(body: Dict[str, Any]) -> Dict[str, Any]:
    """Each field's value under the spelling it was found as (so errors name it as sent): the first
    source holding any spelling wins, then upstream's spelling order; empty values count as absent."""
    sources, found = _sources(body), {}
    for spellings in _SPELLINGS.values():
        for source in sources:
            hit = next((s for s in spellings if source.get(s) not in (None, "")), None)
            if hit is not None:
                found[hit] = source[hit]
                break
    return found


def stored_paths(body: Dict[str, Any], stored: Callable[[str], Optional[str]]) -> Dict[str, Tuple[str, Any]]:
    """``*_audio_path`` values → {upload: (the field named, what ``stored`` maps it to)}; a value
    ``stored`` does not know (None) is refused with 400."""
    found = {}
    for canonical, names in PATH_FIELDS.items():
        named = next((s for s in names + (canonical,) if isinstance(body.get(s), str) and body[s]), None)
        if not named:
            continue
        key = stored(body[named])
        if key is None:
            raise FieldError(named, f"the server opens no client-named path outside its allowed audio "
                             f"directories; upload the audio as multipart field {UPLOAD_NAMES[canonical][0]!r} "
                             f"instead (or pass a file URL this server returned)", 400)
        found[canonical] = (named, key)
    return found


def parse(body: Dict[str, Any]) -> BaseModel:
    """An upstream body → ``ReleaseRequest``; bad values → 422 naming each field as sent."""
    try:
        return ReleaseRequest.model_validate(gather(body))
    except ValidationError as error:
        raise ValidationFailed(validation_errors(error)) from None


def returned_file_key(value: str, audio_root: str) -> Optional[str]:
    """The audio-store key when ``value`` is a download URL or stored path this server handed out
    (``/v1/audio?path=...``, ``/v1/audio/<key>``, or a path in the audio store's directory); None
    for anything else. Only the key is used: the value is never opened as a path."""
    from urllib.parse import parse_qs, urlsplit

    text = value.strip()
    if "/v1/audio/" in text and "?" not in text:
        return text.rsplit("/", 1)[-1] or None
    if "/v1/audio?" in text:
        text = parse_qs(urlsplit(text).query).get("path", [""])[0]
    directory, _, name = text.replace("\\", "/").rpartition("/")
    return name if name and directory.rstrip("/") == audio_root.rstrip("/") else None


def to_library(body: Dict[str, Any], stored: Callable[[str], Optional[str]] = lambda value: None
               ) -> Tuple[GenerationParams, GenerationConfig, Dict[str, Any]]:
    """Upstream request fields → (params, config, extras) with the upstream defaults; ``stored`` maps
    a ``*_audio_path`` value to what stands for its bytes (a store key, an allow-listed file) or
    None (→ 400); extras["stored_uploads"] maps the upload to (the field named, that value)."""
    uploads = stored_paths(body, stored)
    request = parse(body)
    params, config = schemas.to_library(request)
    sent = request.model_fields_set
    if not config.use_random_seed and params.seed >= 0 and "seeds" not in sent:
        config = dataclasses.replace(config, seeds=[params.seed])
    extras = {name: getattr(request, name) for name in EXTRA_FIELDS if name in sent}
    modes = [mode for mode in ANALYSIS_MODES if getattr(request, mode)]
    if modes:  # as upstream, codes extraction wins over full analysis, which wins over analysis
        extras["analysis"] = modes[0]
    if uploads:
        extras["stored_uploads"] = uploads
    extras["explicit"] = sorted(sent)  # the fields the body set: the model's preset fills the others
    return params, config, extras


def apply_sample(params: GenerationParams, sample: Any, *, from_format: bool) -> GenerationParams:
    """Fold a create_sample / format_sample result into the params (upstream sample_mode / use_format)."""
    updates = {"caption": sample.caption or params.caption, "lyrics": sample.lyrics or params.lyrics}
    if sample.bpm:
        updates["bpm"] = int(sample.bpm)
    if sample.duration:
        updates["duration"] = float(sample.duration)
    for name in ("keyscale", "timesignature"):
        if getattr(sample, name):
            updates[name] = getattr(sample, name)
    if sample.language:
        updates["vocal_language"] = sample.language
    updates["use_cot_metas"] = from_format and not sample.duration
    return dataclasses.replace(params, **updates)


def file_url(path: str) -> str:
    """Upstream's download link: ``/v1/audio?path=<the stored file's absolute path, url-encoded>``;
    the route only uses the file name in it (a key into the audio store)."""
    from urllib.parse import quote

    return "/v1/audio?path=" + quote(path, safe="")


UNKNOWN_TASK = "unknown task id: never created here, or expired from the task store"


def unknown_item(task_id: str) -> Dict[str, Any]:
    """An id this server does not know: failed (status 2) with the reason, so that a client polling
    until status 1 or 2 stops; upstream answers 0 (queued), which keeps such a client polling."""
    item = {"file": "", "wave": "", "status": 2, "progress": 0.0, "stage": "failed", "error": UNKNOWN_TASK}
    return {"task_id": task_id, "status": 2, "result": json.dumps([item]), "progress_text": UNKNOWN_TASK}


def query_items(record: Optional[Dict[str, Any]], models: Dict[str, str],
                file_path: Callable[[str], str] = lambda key: key) -> Tuple[int, List[Dict[str, Any]]]:
    """A task record → (upstream status 0/1/2, the per-file list upstream JSON-encodes into ``result``);
    ``file_path`` maps an audio key to where the store keeps it."""
    created = int(record["created_at"])
    base = {"file": "", "wave": "", "create_time": created, "env": "ray-serve"}
    if record["phase"] == "failed":
        error = f"{record['error']}: {record['message']}" if record.get("message") else record["error"]
        return 2, [{**base, "status": 2, "progress": record["progress"], "stage": "failed", "error": error}]
    if record["phase"] != "done":
        return 0, [{**base, "status": 0, "progress": record["progress"], "stage": record["phase"]}]
    result = record["result"]
    models = {**models, **{k: v for k, v in (result.get("metadata", {}).get("models") or {}).items()
                           if k in ("lm", "dit")}}  # what served the task, when it says
    analysis = result.get("metadata", {}).get("analysis")
    if analysis is not None:
        return 1, [analysis_item(analysis, base)]
    plans = result.get("metadata", {}).get("plans") or []
    seeds = ",".join(str(a.get("seed")) for a in result["audios"])
    items = []
    for index, audio in enumerate(result["audios"]):
        params = audio.get("params", {})
        lm = plans[index].get("metadata", {}) if index < len(plans) else {}
        metas = {
            "bpm": params.get("bpm") or lm.get("bpm") or "N/A",
            "duration": params.get("duration") if (params.get("duration") or -1) > 0 else lm.get("duration", "N/A"),
            "genres": lm.get("genres", "N/A"),
            "keyscale": params.get("keyscale") or lm.get("keyscale") or "N/A",
            "timesignature": params.get("timesignature") or lm.get("timesignature") or "N/A",
            "prompt": params.get("caption", ""), "lyrics": params.get("lyrics", ""),
        }
        items.append({
            **base, "file": file_url(file_path(audio["key"])), "status": 1, "prompt": lm.get("caption") or params.get("caption", ""),
            "lyrics": params.get("lyrics", ""), "metas": metas, "generation_info": result.get("status_message", ""),
            "seed_value": seeds, "lm_model": models.get("lm", ""), "dit_model": models.get("dit", ""),
            "progress": 1.0, "stage": "succeeded",
        })
    return 1, items


RAW_ANALYSIS = ("Full Hardware Analysis Success", "Audio Codes Extraction Success")


def analysis_item(raw: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    """An analysis task's ``result`` entry: upstream passes the full-analysis and codes records
    through as they are, and lists a metadata-only analysis like a file-less song."""
    if raw.get("status_message") in RAW_ANALYSIS:
        return raw
    metas = raw.get("metas") or {}
    return {**base, "status": 1, "prompt": raw.get("prompt", ""), "lyrics": raw.get("lyrics", ""),
            "metas": {name: metas.get(name) for name in ("bpm", "duration", "genres", "keyscale", "timesignature")},
            "generation_info": raw.get("generation_info", ""), "lm_model": raw.get("lm_model", ""),
            "dit_model": raw.get("dit_model", ""), "progress": 1.0, "stage": "succeeded"}


def analysis_record(mode: str, metadata: Dict[str, Any], codes: str, caption: str, lyrics: str,
                    lm_model: str) -> Dict[str, Any]:
    """The record upstream's analysis modes return (``metadata``: the LM's, ``codes``: the source's)."""
    none = {"audio_paths": [], "raw_audio_paths": [], "first_audio_path": None}
    if mode == "extract_codes_only":
        return {"status_message": "Audio Codes Extraction Success", "audio_codes": codes, **none, "metas": {}}
    if mode == "full_analysis_only":
        return {"status_message": "Full Hardware Analysis Success", "bpm": metadata.get("bpm"),
                "keyscale": metadata.get("keyscale"), "timesignature": metadata.get("timesignature"),
                "duration": metadata.get("duration"), "genre": metadata.get("genres") or metadata.get("genre"),
                "prompt": metadata.get("caption", ""), "lyrics": metadata.get("lyrics", ""),
                "language": metadata.get("language", "unknown"), "metas": metadata, "audio_paths": []}
    return {**none, "generation_info": "Analysis Only Mode Complete", "status_message": "Success",
            "metas": metadata, "bpm": metadata.get("bpm"), "keyscale": metadata.get("keyscale"),
            "duration": metadata.get("duration"), "prompt": metadata.get("caption", caption), "lyrics": lyrics,
            "lm_model": lm_model, "dit_model": "None (Analysis Only)"}


def task_ids_from(body: Dict[str, Any]) -> List[str]:
    ids = body.get("task_id_list", body.get("task_ids"))
    if isinstance(ids, str):
        try:
            ids = json.loads(ids)
        except json.JSONDecodeError:
            ids = [s.strip() for s in ids.split(",") if s.strip()]
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, list) or not all(isinstance(i, str) and len(i) <= 200 for i in ids):
        return []  # upstream answers an empty list for a missing or malformed one
    return ids
