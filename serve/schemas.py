"""HTTP shapes. The generate request is derived from the library's dataclasses (one source of defaults)
and converted back to ``GenerationParams`` / ``GenerationConfig`` once, at the edge."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin
from typing import get_type_hints

import annotated_types
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WrapValidator
from pydantic import create_model, model_validator
from pydantic_core import PydanticCustomError

from acestep.audio import AUDIO_FORMATS, STREAM_FORMATS
from acestep.dit.tasks import TASK_TYPES
from acestep.params import LM_HELPER_DEFAULTS, GenerationConfig, GenerationParams
from acestep.validation import RULES, Rule
from acestep.validation import ValidationError as LibraryValidationError
from serve.upload_url import MAX_URLS, UPLOAD_FIELD
from serve.webhooks import MAX_URL_LENGTH

UPLOAD_FIELDS = ("src_audio", "reference_audio")
# Library fields a client may not set: uploads arrive as bytes, cot_* are LM outputs.
HIDDEN_FIELDS = set(UPLOAD_FIELDS) | {f.name for f in dataclasses.fields(GenerationParams) if f.name.startswith("cot_")}
RULE_OF: Dict[str, Rule] = {rule.field: rule for rule in RULES}
_DESCRIPTIONS = {
    "caption": "Text description of the music (genre, mood, instruments).",
    "lyrics": "Lyrics with structure tags such as [verse]; empty for instrumental.",
    "duration": "Seconds of audio; -1 lets the LM (or a default) decide.",
    "batch_size": "How many songs to render for this request.",
    "audio_format": "Encoded output format: " + ", ".join(AUDIO_FORMATS) + ".",
    "thinking": "Let the 5 Hz LM plan metadata and audio codes before the DiT renders.",
    "seeds": "Seed list (or one seed); -1 or missing entries are random.",
    "task_type": ", ".join(TASK_TYPES) + ".",
    "inference_steps": "DiT sampling steps (turbo: at most 8).",
    "preset": ("Which model preset fills the sampling fields this request leaves out (inference_steps, shift, "
               "guidance_scale, CFG interval, use_adg, dcw_enabled, sampler_mode): 'model' (the serving model's, "
               "GET /v1/models), turbo, sft or base; null for the library defaults."),
    "dcw_enabled": "DCW wavelet correction; null: the model's default (on for turbo, off for sft/base).",
    "tracks": ("extract / lego, several tracks in one call (an extension): track names (a list, or separated by "
               "commas), 'all' or 'vocals+accompaniment'; one audio per track and song (batch_size songs per "
               "track), in this order, each labelled `track`. Null: the one track the instruction names."),
    "extend_left_s": ("task_type=extend: seconds of new audio before the source (caption and lyrics describe the "
                      "new part; source + extension at most 1200 s)."),
    "extend_right_s": "task_type=extend: seconds of new audio after the source.",
}


class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _judge(rule: Rule):
    """A wrap validator answering in the rule's words: a type or range error gets the allowed
    values appended, a value the rule refuses is named as not allowed."""

    def judge(value, handler):
        try:
            value = handler(value)
        except ValidationError as error:
            first = error.errors()[0]
            raise PydanticCustomError(first["type"], "{msg}; allowed: {allowed}",
                                      {"msg": first["msg"], "allowed": rule.allowed}) from None
        if value is not None and not rule.check(value):
            raise PydanticCustomError("value_error", "not allowed: {allowed}", {"allowed": rule.allowed})
        return value

    return WrapValidator(judge)


def checked(annotation, rule_field: str):
    """``annotation`` judged by the library's rule for ``rule_field`` (``acestep.validation.RULES``):
    a range rule's bounds become ge/le (the schema's minimum/maximum), failures name the allowed
    values. ``Optional[...]`` stays optional: None is not judged."""
    rule = RULE_OF[rule_field]
    args = get_args(annotation)
    if get_origin(annotation) is Union and type(None) in args:
        rest = tuple(arg for arg in args if arg is not type(None))
        return Optional[checked(rest[0] if len(rest) == 1 else Union[rest], rule_field)]
    bounds = (annotated_types.Ge(rule.bounds[0]), annotated_types.Le(rule.bounds[1])) if rule.bounds else ()
    return Annotated[(annotation, *bounds, _judge(rule))]


# The LM sampling knobs of every dialect, judged by the one rule each (generation's lm_* fields).
LMTemperature = checked(float, "lm_temperature")
LMTopP = checked(float, "lm_top_p")
LMTopK = checked(int, "lm_top_k")


def _documented_ranges() -> Dict[str, Dict[str, Any]]:
    """minimum/maximum of the library's range rules, shown in the native schema (clients such as the
    studio read them); there the library stays the judge and its messages the answer."""
    shown = {rule.field: {"minimum": rule.bounds[0], "maximum": rule.bounds[1]} for rule in RULES if rule.bounds}
    shown.update({rule.field: {"enum": list(rule.choices)} for rule in RULES if rule.choices})
    return shown


def spellings(name: str, aliases: Optional[Mapping[str, Sequence[str]]]) -> Optional[AliasChoices]:
    """The names a field is read under: a dialect's spellings, then the field's own name."""
    names = tuple((aliases or {}).get(name, ()))
    return AliasChoices(*names, *(() if name in names else (name,))) if names else None


def library_fields(dataclass_type, skip=(), *, defaults: Optional[Mapping[str, Any]] = None,
                   aliases: Optional[Mapping[str, Sequence[str]]] = None, judged: bool = False
                   ) -> Dict[str, Tuple[Any, Any]]:
    """A library dataclass's fields as pydantic field definitions: its types and defaults (a
    dialect's ``defaults`` where they differ), ``aliases`` as other accepted spellings; ``judged``:
    each field with a rule is checked by it (else the library judges later)."""
    hints = get_type_hints(dataclass_type)
    ranges = _documented_ranges()
    fields = {}
    for f in dataclasses.fields(dataclass_type):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        annotation = checked(hints[f.name], f.name) if judged and f.name in RULE_OF else hints[f.name]
        fields[f.name] = (annotation, Field(default, description=_DESCRIPTIONS.get(f.name),
                                            validation_alias=spellings(f.name, aliases),
                                            json_schema_extra=None if judged else ranges.get(f.name)))
    return fields


PARAM_FIELDS = tuple(name for name in library_fields(GenerationParams, HIDDEN_FIELDS))
CONFIG_FIELDS = tuple(name for name in library_fields(GenerationConfig))


def routing_fields(names: Sequence[str], aliases: Optional[Mapping[str, Sequence[str]]] = None
                   ) -> Dict[str, Tuple[Any, Any]]:
    """The model and adapter choice (``ROUTING_FIELDS``) as the native request declares them;
    ``aliases``: a dialect's other spellings."""
    declared = {
        "model": (Optional[str], dict(default=None, max_length=200, description=(
            "Served DiT (GET /v1/models): its name, acestep/<name> or its variant (turbo, sft, base, xl-turbo, xl-sft, "
            "xl-base); default: the app's default, "
            "or a base variant for lego/extract/complete."))),
        "lm_model": (Optional[str], dict(default=None, max_length=200,
                                         description="Served LM name (never a path); default: the app's default.")),
        "lora": (Optional[str], dict(default=None, max_length=64, description=(
            "Adapter name from the server's adapter directory (GET /v1/adapters); default: the app's default "
            "adapter."))),
        "lora_scale": (float, dict(default=1.0, ge=0, le=2, description="Scale of `lora` (0 renders the base model).")),
        "loras": (Optional[Dict[Annotated[str, StringConstraints(max_length=64)], Annotated[float, Field(ge=0, le=2)]]],
                  dict(default=None, max_length=16, description=(
                      "Several adapters at once, {name: weight} (weights 0-2, summed as peft's set_adapters does); "
                      "at most dit.adapters.max_loaded of them; instead of `lora`."))),
    }
    return {name: (declared[name][0], Field(**declared[name][1], validation_alias=spellings(name, aliases)))
            for name in names}


ROUTING_FIELDS = ("model", "lm_model", "lora", "lora_scale", "loras")
WEBHOOK_DESCRIPTION = ("http(s) URL POSTed the task's public record once it is done or failed, signed with "
                       "X-Acestep-Signature (README: Webhooks); it must resolve to public addresses.")
UPLOAD_URL_DESCRIPTION = ("Presigned http(s) PUT URL (S3, GCS, Azure) each encoded file is uploaded to from the DiT "
                          "replica: one URL when the task makes one audio, else a list of one per audio, in order. "
                          "The file stays retrievable here too; audios[i].upload says where it went (the URL without "
                          "its query) or why not. It must resolve to public addresses.")
_URL = Annotated[str, StringConstraints(max_length=MAX_URL_LENGTH)]


def upload_url_field(aliases: Optional[Mapping[str, Sequence[str]]] = None) -> Tuple[Any, Any]:
    """``upload_url`` as a request model declares it (the count per task is checked at submission)."""
    return (Optional[Union[_URL, Annotated[List[_URL], Field(max_length=MAX_URLS)]]],
            Field(None, description=UPLOAD_URL_DESCRIPTION, validation_alias=spellings(UPLOAD_FIELD, aliases)))

# Where HTTP differs from the library's defaults: fields a request leaves out get its model's preset.
HTTP_DEFAULTS = {"preset": "model"}

GenerateRequest = create_model(
    "GenerateRequest",
    __base__=_RequestBase,
    __doc__="GenerationParams + GenerationConfig fields (INFERENCE.md), flat; audio uploads as base64.",
    **library_fields(GenerationParams, HIDDEN_FIELDS, defaults=HTTP_DEFAULTS),
    **library_fields(GenerationConfig),
    src_audio_base64=(Optional[str], Field(None, description="Source audio file (cover/repaint/extend...), base64.")),
    reference_audio_base64=(Optional[str], Field(None, description="Reference (timbre) audio file, base64.")),
    priority=(Optional[Literal["low", "normal", "high"]], Field(None, description=(
        "The task's priority class, at most its API key's (ingress.key_priorities); default: the key's class."))),
    **routing_fields(ROUTING_FIELDS),
    webhook_url=(Optional[str], Field(None, max_length=MAX_URL_LENGTH, description=WEBHOOK_DESCRIPTION)),
    upload_url=upload_url_field(),
    stream_format=(Optional[Literal[tuple(STREAM_FORMATS)]], Field(None, description=(
        "Stream each song while it decodes, in this format (opus: Ogg Opus; mp3), from GET "
        "/v1/tasks/{id}/stream; not with extend or tracks. Default: not streamed."))),
)


def to_library(request: BaseModel) -> Tuple[GenerationParams, GenerationConfig]:
    """Request model → the library's dataclasses (uploads are handled separately). A value the
    Python API would quietly correct (``GenerationParams.__post_init__``: shift <= 0, steps < 1) is a
    ValidationError here: over HTTP bad input is refused, naming the field."""
    data = request.model_dump()
    values = {name: data[name] for name in PARAM_FIELDS if name in data}
    params = GenerationParams(**values)
    for name, value in values.items():
        if getattr(params, name) != value and name in RULE_OF:
            raise LibraryValidationError(name, value, RULE_OF[name].allowed)
    config = GenerationConfig(**{name: data[name] for name in CONFIG_FIELDS if name in data})
    return params, config


def field_from_message(message: str, names) -> str:
    """The first known field name a library ValueError mentions (its messages name the field)."""
    for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message):
        if token in names:
            return token
    return "body"


class UploadOutcome(BaseModel):
    """Where an audio's ``upload_url`` PUT went; a failed one leaves the task done and the file here."""

    url: str = Field(description="The upload URL without its query (a presigned query is a credential).")
    ok: bool = Field(description="Whether the file arrived (a 2xx answer).")
    status: Optional[int] = Field(None, description="The last attempt's HTTP status; null when none answered.")
    error: Optional[str] = Field(None, description="Why the file did not arrive; null when it did.")
    attempts: int = Field(0, description="PUT attempts made (transient failures are tried again).")


class AudioItem(BaseModel):
    key: str = Field(description="Audio key; fetch the file with GET /v1/audio/{key}.")
    url: str
    format: str
    sample_rate: int
    seed: Optional[int] = None
    params: Dict[str, Any] = Field(default_factory=dict, description="The params this item was rendered with.")
    track: Optional[str] = Field(None, description="The track this audio is, when the request named `tracks`.")
    upload: Optional[UploadOutcome] = Field(None, description="The PUT to this audio's `upload_url`, when the "
                                                               "request named one.")

    @model_validator(mode="after")
    def _track_from_params(self) -> "AudioItem":
        # a stem's params carry its track; the item shows it beside them
        if self.track is None and isinstance(self.params.get("track"), str):
            self.track = self.params["track"]
        return self


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
    phase: str = Field(description="queued, lm, dit, encode, done or failed; a dataset or training job: "
                                   "queued, prepare or train, done or failed.")
    progress: float
    message: str
    finished: bool
    created_at: float
    updated_at: float
    result: Optional[Union[GenerationOutput, Dict[str, Any]]] = Field(
        None, description="A generation's output; a dataset or training job's own result object.")
    error: Optional[str] = Field(None, description="Failure code: cancelled, replica_died, overloaded, "
                                                   "invalid_audio, internal or timeout:<phase>.")
    attempts: int = Field(0, description="How many times a driver started this task (re-driven after a crash).")
    detail: Optional[Dict[str, Any]] = Field(
        None, description="Phase detail, e.g. the LM's lm_phase, tokens_done and tokens_expected.")


class _LMSamplingRequest(_RequestBase):
    """Sampling knobs shared by the LM helper endpoints (the seed functions' keyword arguments;
    defaults from ``acestep.params.LM_HELPER_DEFAULTS``, ranges from generation's lm_* rules)."""

    temperature: LMTemperature = Field(LM_HELPER_DEFAULTS.temperature, description="0: greedy.")
    top_k: Optional[LMTopK] = Field(LM_HELPER_DEFAULTS.top_k, description="None or 0: off.")
    top_p: Optional[LMTopP] = Field(LM_HELPER_DEFAULTS.top_p, description="None, 0 or 1: off.")
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
