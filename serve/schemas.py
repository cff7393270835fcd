"""HTTP shapes. The generate request is derived from the library's dataclasses (one source of defaults)
and converted back to ``GenerationParams`` / ``GenerationConfig`` once, at the edge."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Dict, List, Optional, Tuple, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from acestep.params import LM_HELPER_DEFAULTS, GenerationConfig, GenerationParams

UPLOAD_FIELDS = ("src_audio", "reference_audio")
# Library fields a client may not set: uploads arrive as bytes, cot_* are LM outputs.
_HIDDEN = set(UPLOAD_FIELDS) | {f.name for f in dataclasses.fields(GenerationParams) if f.name.startswith("cot_")}
_DESCRIPTIONS = {
    "caption": "Text description of the music (genre, mood, instruments).",
    "lyrics": "Lyrics with structure tags such as [verse]; empty for instrumental.",
    "duration": "Seconds of audio; -1 lets the LM (or a default) decide.",
    "batch_size": "How many songs to render for this request.",
    "audio_format": "Encoded output format: flac, wav or mp3.",
    "thinking": "Let the 5 Hz LM plan metadata and audio codes before the DiT renders.",
    "seeds": "Seed list (or one seed); -1 or missing entries are random.",
    "task_type": "text2music, cover, repaint, lego, extract or complete.",
    "inference_steps": "DiT sampling steps (turbo: at most 8).",
}


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _documented_ranges() -> Dict[str, Dict[str, Any]]:
    """minimum/maximum of the library's range rules, shown in the schema (clients such as the
    studio read them); the library stays the judge and its messages the answer."""
    from acestep.validation import RULES

    return {rule.field: {"minimum": rule.bounds[0], "maximum": rule.bounds[1]} for rule in RULES if rule.bounds}


def _fields_of(dataclass_type, skip=()) -> Dict[str, Tuple[Any, Any]]:
    hints = get_type_hints(dataclass_type)
    ranges = _documented_ranges()
    fields = {}
    for f in dataclasses.fields(dataclass_type):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = (hints[f.name], Field(default, description=_DESCRIPTIONS.get(f.name),
                                               json_schema_extra=ranges.get(f.name)))
    return fields


PARAM_FIELDS = tuple(name for name in _fields_of(GenerationParams, _HIDDEN))
CONFIG_FIELDS = tuple(name for name in _fields_of(GenerationConfig))

GenerateRequest = create_model(
    "GenerateRequest",
    __base__=_RequestBase,
    __doc__="GenerationParams + GenerationConfig fields (INFERENCE.md), flat; audio uploads as base64.",
    **_fields_of(GenerationParams, _HIDDEN),
    **_fields_of(GenerationConfig),
    src_audio_base64=(Optional[str], Field(None, description="Source audio file (cover/repaint), base64.")),
    reference_audio_base64=(Optional[str], Field(None, description="Reference (timbre) audio file, base64.")),
    model=(Optional[str], Field(None, max_length=200, description=(
        "Served DiT (GET /v1/models): its name, acestep/<name> or turbo/base/sft; default: the app's default, "
        "or a base variant for lego/extract/complete."))),
    lm_model=(Optional[str], Field(None, max_length=200, description="Served LM name (never a path); default: the app's default.")),
    lora=(Optional[str], Field(None, max_length=64, description="Adapter name from the server's adapter directory "
                                                                "(GET /v1/adapters); default: the app's default adapter.")),
    lora_scale=(float, Field(1.0, ge=0, le=2, description="Scale of `lora` (0 renders the base model).")),
    loras=(Optional[Dict[Annotated[str, StringConstraints(max_length=64)], Annotated[float, Field(ge=0, le=2)]]],
           Field(None, max_length=16, description=(
               "Several adapters at once, {name: weight} (weights 0-2, summed as peft's set_adapters does); "
               "at most dit.adapters.max_loaded of them; instead of `lora`."))),
)
ROUTING_FIELDS = ("model", "lm_model", "lora", "lora_scale", "loras")


def to_library(request: BaseModel) -> Tuple[GenerationParams, GenerationConfig]:
    """Request model → the library's dataclasses (uploads are handled separately)."""
    data = request.model_dump()
    params = GenerationParams(**{name: data[name] for name in PARAM_FIELDS if name in data})
    config = GenerationConfig(**{name: data[name] for name in CONFIG_FIELDS if name in data})
    return params, config


def field_from_message(message: str, names) -> str:
    """The first known field name a library ValueError mentions (its messages name the field)."""
    for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message):
        if token in names:
            return token
    return "body"


class AudioItem(BaseModel):
    key: str = Field(description="Audio key; fetch the file with GET /v1/audio/{key}.")
    url: str
    format: str
    sample_rate: int
    seed: Optional[int] = None
    params: Dict[str, Any] = Field(default_factory=dict, description="The params this item was rendered with.")


class GenerationOutput(BaseModel):
    task_id: str
    audios: List[AudioItem]
    metadata: Dict[str, Any] = Field(default_factory=dict, description="LM metadata (bpm, keyscale, ...) and codes.")
    time_costs: Dict[str, Any] = Field(default_factory=dict)
    status_message: str = ""


class TaskAccepted(BaseModel):
    task_id: str
    phase: str
    status_url: str
    events_url: str


class TaskStatus(BaseModel):
    task_id: str
    phase: str = Field(description="queued, lm, dit, encode, done or failed.")
    progress: float
    message: str
    finished: bool
    created_at: float
    updated_at: float
    result: Optional[GenerationOutput] = None
    error: Optional[str] = Field(None, description="Failure code: cancelled, replica_died, overloaded, "
                                                   "invalid_audio, internal or timeout:<phase>.")
    attempts: int = Field(0, description="How many times a driver started this task (re-driven after a crash).")
    detail: Optional[Dict[str, Any]] = Field(
        None, description="Phase detail, e.g. the LM's lm_phase, tokens_done and tokens_expected.")


class _LMSamplingRequest(_RequestBase):
    """Sampling knobs shared by the LM helper endpoints (the seed functions' keyword arguments;
    defaults from ``acestep.params.LM_HELPER_DEFAULTS``)."""

    temperature: float = Field(LM_HELPER_DEFAULTS.temperature, gt=0, le=2)
    top_k: Optional[int] = Field(LM_HELPER_DEFAULTS.top_k, ge=0)
    top_p: Optional[float] = Field(LM_HELPER_DEFAULTS.top_p, gt=0, le=1)
    repetition_penalty: float = Field(LM_HELPER_DEFAULTS.repetition_penalty, gt=0)
    use_constrained_decoding: bool = LM_HELPER_DEFAULTS.use_constrained_decoding
    lm_model: Optional[str] = Field(None, max_length=200,
                                    description="A served LM's name (GET /v1/models); unset: the default LM.")


class UnderstandRequest(_LMSamplingRequest):
    audio_codes: str = Field(min_length=1, description="'<|audio_code_N|>...' string (5 codes per second).")


class CreateSampleRequest(_LMSamplingRequest):
    query: str = Field(min_length=1, max_length=4096, description="Natural-language description of the song.")
    instrumental: bool = False
    vocal_language: Optional[str] = None


class FormatSampleRequest(_LMSamplingRequest):
    caption: str = Field(max_length=4096)
    lyrics: str = Field("", max_length=16384)
    user_metadata: Optional[Dict[str, Any]] = Field(
        None, description="bpm, duration, keyscale, timesignature, language.")


# /v1/generate and /v1/tasks take JSON or multipart; FastAPI cannot infer that from a Request parameter.
_MULTIPART = {"type": "object", "properties": {
    "request": {"type": "string", "description": "GenerateRequest as JSON"},
    "src_audio": {"type": "string", "format": "binary"},
    "reference_audio": {"type": "string", "format": "binary"}}}
GENERATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": _MULTIPART}}}}
