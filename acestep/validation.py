"""One table of field rules for GenerationParams / GenerationConfig. Each violation raises a
ValidationError (a ValueError) naming the field, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from acestep.audio import AUDIO_FORMATS
from acestep.lm.constants import VALID_KEYSCALES, VALID_LANGUAGES, VALID_TIME_SIGNATURES
from acestep.dit.tasks import (BASE_ONLY_TASKS, CHUNK_MASK_MODES, COVER_TASKS, MAX_EXTENDED_S, REPAINT_MODES,
                               SOURCE_TASKS, STEM_TASKS, TASK_TYPES, TRACK_NAMES, instruction_tracks)
from acestep.params import MAX_CAPTION_CHARS, MAX_LYRICS_CHARS, PRESET_CHOICES, GenerationConfig, GenerationParams
from acestep.stems import MIX_TASKS, MIXES, TRACKS_ALLOWED, default_instructions, track_names

MAX_SEED = 2**32 - 1
DCW_MODES = ("low", "high", "double", "pix")
DCW_WAVELETS = ("haar", "db2", "db4", "sym4", "sym8", "coif2")  # the bases upstream's UI offers


FLOW_EDIT_TASKS = ("text2music", "cover", "cover-nofsq")  # the tasks flow-edit morph applies to


class ValidationError(ValueError):
    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}{_shown(value)} is not allowed: {allowed}")


def _shown(value: Any) -> str:
    """The value in a message only when short and not free text: a server must not echo client
    text (a 10 MB caption would come back in the error)."""
    if value is None or isinstance(value, (bool, int, float)):
        return f"={value!r}"
    return ""


_KEYSCALES = {k.lower() for k in VALID_KEYSCALES}
_UNSET = ("", "n/a")


def _keyscale(value) -> bool:
    if not isinstance(value, str) or len(value) > 16:
        return False
    text = " ".join(value.split()).lower()
    return text in _UNSET or text in _KEYSCALES


def _timesignature(value) -> bool:
    if not isinstance(value, str) or len(value) > 8:
        return False
    text = value.strip().lower()
    beats, _, unit = text.partition("/")
    if text in _UNSET:
        return True
    return beats.isdigit() and int(beats) in VALID_TIME_SIGNATURES and unit in ("", "2", "4", "8", "16")


def _language(value) -> bool:
    return isinstance(value, str) and len(value) <= 16 and value.strip().lower() in ("",) + VALID_LANGUAGES


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Between:
    """A range check that also states its range (the HTTP schema shows it as minimum/maximum)."""

    def __init__(self, lo, hi, integer: bool = False):
        self.lo, self.hi, self.integer = lo, hi, integer

    def __call__(self, v) -> bool:
        kind_ok = isinstance(v, int) and not isinstance(v, bool) if self.integer else _number(v)
        return kind_ok and self.lo <= v <= self.hi


def _between(lo, hi) -> Callable[[Any], bool]:
    return _Between(lo, hi)


def _int_between(lo, hi) -> Callable[[Any], bool]:
    return _Between(lo, hi, integer=True)


def _schedule(values) -> bool:
    """Strictly decreasing in [0, 1] with a first value above 0: a trailing 0 only ends the
    schedule (turbo snapping drops it), so a list of zeros would leave no step to run."""
    if not isinstance(values, (list, tuple)) or not values or not all(_number(v) and 0 <= v <= 1 for v in values):
        return False
    return values[0] > 0 and all(a > b for a, b in zip(values, values[1:]))


def _retake_seed(value) -> bool:
    """An integer seed, or a string of them separated by commas (one per item, as ``seeds``)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")] if len(value) <= 256 else [""]
        return all(p.lstrip("-").isdigit() and -1 <= int(p) <= MAX_SEED for p in parts)
    return _seeds(value)


class _OneOf:
    """A choice among strings that also states them (the HTTP schema shows them as an enum)."""

    def __init__(self, *choices: str):
        self.choices = choices

    def __call__(self, v) -> bool:
        return isinstance(v, str) and v in self.choices


def _one_of(*choices) -> Callable[[Any], bool]:
    return _OneOf(*choices)


def _flag(value) -> bool:
    return isinstance(value, bool)


def _seeds(value) -> bool:
    items = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(s, int) and not isinstance(s, bool) and -1 <= s <= MAX_SEED for s in items)


@dataclass(frozen=True)
class Rule:
    """``source`` is "params" or "config"; ``check`` gets the value; None values skip if optional."""

    source: str
    field: str
    check: Callable[[Any], bool]
    allowed: str
    optional: bool = False

    @property
    def bounds(self) -> Optional[tuple]:
        """(minimum, maximum) when the rule is a plain range."""
        return (self.check.lo, self.check.hi) if isinstance(self.check, _Between) else None

    @property
    def choices(self) -> Optional[tuple]:
        """The allowed strings when the rule is a plain choice."""
        return self.check.choices if isinstance(self.check, _OneOf) else None


RULES: List[Rule] = [
    Rule("params", "preset", _one_of(*PRESET_CHOICES), "one of " + ", ".join(PRESET_CHOICES) + ", or null for none",
         optional=True),
    Rule("params", "task_type", lambda v: v in TASK_TYPES, "one of " + ", ".join(TASK_TYPES)),
    Rule("params", "bpm", _int_between(30, 300), "an integer from 30 to 300, or null for auto", optional=True),
    Rule("params", "duration", lambda v: _number(v) and (v <= 0 or 10 <= v <= 600),
         "10 to 600 seconds, or <= 0 for auto"),
    Rule("params", "inference_steps", _int_between(1, 200), "an integer from 1 to 200"),
    Rule("params", "guidance_scale", _between(1.0, 15.0), "1.0 to 15.0"),
    Rule("params", "shift", _between(1.0, 5.0), "1.0 to 5.0"),
    Rule("params", "cfg_interval_start", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "cfg_interval_end", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "infer_method", lambda v: v in ("ode", "sde"), "'ode' or 'sde'"),
    Rule("params", "timesteps", _schedule, "a strictly decreasing list of floats in [0, 1] with at least one "
         "value above 0 (a trailing 0 ends the schedule)", optional=True),
    Rule("params", "audio_cover_strength", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "seed", _int_between(-1, MAX_SEED), f"-1 (random) or 0 to {MAX_SEED}"),
    Rule("params", "caption", lambda v: isinstance(v, str) and len(v) <= MAX_CAPTION_CHARS,
         f"a string of at most {MAX_CAPTION_CHARS} characters"),
    Rule("params", "lyrics", lambda v: isinstance(v, str) and len(v) <= MAX_LYRICS_CHARS,
         f"a string of at most {MAX_LYRICS_CHARS} characters"),
    Rule("params", "keyscale", _keyscale, "a key such as 'C major' or 'F# minor' (notes A-G, #/b, major/minor), "
         "or empty for auto"),
    Rule("params", "timesignature", _timesignature, "beats per bar 2, 3, 4 or 6 (e.g. '4' or '6/8'), or empty for auto"),
    Rule("params", "vocal_language", _language, "an ISO 639-1 code the LM knows (en, zh, ja, ...), or 'unknown'"),
    Rule("params", "lm_temperature", _between(0.0, 2.0), "0.0 to 2.0"),
    Rule("params", "lm_cfg_scale", _between(1.0, 10.0), "1.0 to 10.0"),
    Rule("params", "lm_top_k", _int_between(0, 1000), "an integer from 0 (off) to 1000"),
    Rule("params", "lm_top_p", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "sampler_mode", _one_of("euler", "heun"), "'euler' or 'heun'"),
    Rule("params", "velocity_norm_threshold", _between(0.0, 5.0), "0.0 (off) to 5.0"),
    Rule("params", "velocity_ema_factor", _between(0.0, 0.5), "0.0 (off) to 0.5"),
    Rule("params", "dcw_enabled", _flag, "true, false, or null for the model's default", optional=True),
    Rule("params", "dcw_mode", _one_of(*DCW_MODES), "one of " + ", ".join(DCW_MODES)),
    Rule("params", "dcw_scaler", _between(0.0, 0.1), "0.0 to 0.1"),
    Rule("params", "dcw_high_scaler", _between(0.0, 0.1), "0.0 to 0.1"),
    Rule("params", "dcw_wavelet", _one_of(*DCW_WAVELETS), "one of " + ", ".join(DCW_WAVELETS)),
    Rule("params", "chunk_mask_mode", _one_of(*CHUNK_MASK_MODES), "'auto' or 'explicit'"),
    Rule("params", "repaint_latent_crossfade_frames", _int_between(0, 250),
         "an integer from 0 to 250 (10 s), or null for the repaint mode's", optional=True),
    Rule("params", "repaint_wav_crossfade_sec", _between(0.0, 10.0),
         "0.0 to 10.0 seconds, or null for the repaint mode's", optional=True),
    Rule("params", "repaint_mode", _one_of(*REPAINT_MODES), "one of " + ", ".join(REPAINT_MODES)),
    Rule("params", "repaint_strength", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "retake_seed", _retake_seed, f"an integer from -1 to {MAX_SEED}, or such integers separated "
         "by commas (one per item)", optional=True),
    Rule("params", "retake_variance", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "flow_edit_morph", _flag, "true or false"),
    Rule("params", "flow_edit_source_caption", lambda v: isinstance(v, str) and len(v) <= MAX_CAPTION_CHARS,
         f"a string of at most {MAX_CAPTION_CHARS} characters"),
    Rule("params", "flow_edit_source_lyrics", lambda v: isinstance(v, str) and len(v) <= MAX_LYRICS_CHARS,
         f"a string of at most {MAX_LYRICS_CHARS} characters"),
    Rule("params", "flow_edit_n_min", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "flow_edit_n_max", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "flow_edit_n_avg", _int_between(1, 8), "an integer from 1 to 8"),
    Rule("params", "cover_noise_strength", _between(0.0, 1.0), "0.0 to 1.0"),
    Rule("params", "global_caption", lambda v: isinstance(v, str) and len(v) <= MAX_CAPTION_CHARS,
         f"a string of at most {MAX_CAPTION_CHARS} characters"),
    Rule("params", "enable_normalization", _flag, "true or false"),
    Rule("params", "normalization_db", _between(-10.0, 0.0), "-10.0 to 0.0 dBFS"),
    Rule("params", "fade_in_duration", _between(0.0, 10.0), "0.0 to 10.0 seconds"),
    Rule("params", "fade_out_duration", _between(0.0, 10.0), "0.0 to 10.0 seconds"),
    Rule("params", "latent_shift", _between(-0.2, 0.2), "-0.2 to 0.2"),
    Rule("params", "latent_rescale", _between(0.5, 1.5), "0.5 to 1.5"),
    Rule("params", "extend_left_s", _between(0.0, MAX_EXTENDED_S), f"0 to {MAX_EXTENDED_S:g} seconds"),
    Rule("params", "extend_right_s", _between(0.0, MAX_EXTENDED_S), f"0 to {MAX_EXTENDED_S:g} seconds"),
    Rule("params", "repainting_start", lambda v: _number(v) and v >= 0, ">= 0 seconds"),
    Rule("params", "repainting_end", lambda v: _number(v) and (v == -1 or v > 0), "-1 (end of source) or > 0 seconds"),
    Rule("config", "batch_size", _int_between(1, 8), "an integer from 1 to 8"),
    Rule("config", "audio_format", lambda v: v in AUDIO_FORMATS, "one of " + ", ".join(AUDIO_FORMATS)),
    Rule("config", "lm_batch_chunk_size", _int_between(1, 64), "an integer from 1 to 64"),
    Rule("config", "seeds", _seeds, f"an integer or list of integers from -1 to {MAX_SEED}", optional=True),
]


def check_fields(params: GenerationParams, config: GenerationConfig) -> None:
    for rule in RULES:
        value = getattr(params if rule.source == "params" else config, rule.field)
        if value is None and rule.optional:
            continue
        if not rule.check(value):
            raise ValidationError(rule.field, value, rule.allowed)


def check_cross_fields(params: GenerationParams, is_turbo: Optional[bool] = None,
                       src_duration: Optional[float] = None) -> None:
    """Rules that need several fields or the loaded model / source audio."""
    if params.flow_edit_n_min > params.flow_edit_n_max:
        raise ValidationError("flow_edit_n_min", params.flow_edit_n_min,
                              f"<= flow_edit_n_max ({params.flow_edit_n_max})")
    if params.cfg_interval_start > params.cfg_interval_end:
        raise ValidationError("cfg_interval_start", params.cfg_interval_start,
                              f"<= cfg_interval_end ({params.cfg_interval_end})")
    task = params.task_type
    if task in BASE_ONLY_TASKS and is_turbo:
        raise ValidationError("task_type", task, "lego, extract and complete need a base model (not turbo)")
    if task == "cover-nofsq" and not params.src_audio and not params.audio_codes.strip():
        raise ValidationError("src_audio", params.src_audio, "an audio file (or audio_codes) is required for "
                              "task_type='cover-nofsq'")
    if task in SOURCE_TASKS and task not in COVER_TASKS and not params.src_audio:
        raise ValidationError("src_audio", params.src_audio, f"an audio file is required for task_type={task!r}")
    tracks = instruction_tracks(task, params.instruction)
    if tracks is not None:
        unknown = [t for t in tracks if t not in TRACK_NAMES]
        if unknown:
            raise ValidationError("instruction", params.instruction,
                                  "track names from: " + ", ".join(TRACK_NAMES) + f" (got {', '.join(unknown)})")
    if params.tracks is not None:
        _check_tracks(params)
    if task in ("repaint", "lego"):
        _check_window(params, src_duration)
    _check_extend(params, src_duration)
    if params.flow_edit_morph:
        _check_flow_edit(params)


def _check_flow_edit(params: GenerationParams) -> None:
    """Flow-edit morph edits a source clip on the tasks upstream runs it for, with the sampler its
    loop has (Euler ODE, APG guidance); it neither switches condition nor starts from noise."""
    if params.task_type not in FLOW_EDIT_TASKS:
        raise ValidationError("flow_edit_morph", params.flow_edit_morph,
                              "false unless task_type is " + ", ".join(FLOW_EDIT_TASKS))
    if not params.src_audio:
        raise ValidationError("src_audio", params.src_audio, "an audio file (the clip to edit) is required "
                                                             "with flow_edit_morph")
    for name, fixed in (("sampler_mode", "euler"), ("infer_method", "ode"), ("use_adg", False),
                        ("audio_cover_strength", 1.0), ("cover_noise_strength", 0.0)):
        if getattr(params, name) != fixed:
            raise ValidationError(name, getattr(params, name), f"{fixed!r} with flow_edit_morph")


def _check_tracks(params: GenerationParams) -> None:
    """Several tracks in one call: known names, on extract / lego, the instruction left to them."""
    try:
        names = track_names(params.tracks)
    except ValueError as error:
        raise ValidationError("tracks", params.tracks, f"{TRACKS_ALLOWED} ({error})") from None
    task = params.task_type
    if task not in STEM_TASKS:
        raise ValidationError("tracks", params.tracks, "null unless task_type is " + " or ".join(STEM_TASKS))
    if task not in MIX_TASKS and any(name in MIXES for name in names):
        raise ValidationError("tracks", params.tracks, ", ".join(MIXES) + " only with task_type "
                              + " or ".join(MIX_TASKS))
    if params.instruction not in default_instructions(task):
        raise ValidationError("instruction", params.instruction, "the default when tracks is set (each track "
                              "gets its official instruction)")


def _check_extend(params: GenerationParams, src_duration: Optional[float]) -> None:
    """An extension adds something, and the song it makes stays within MAX_EXTENDED_S; other tasks
    leave the extension fields at 0 (a value there would be silently ignored)."""
    left, right = params.extend_left_s, params.extend_right_s
    if params.task_type != "extend":
        for name, value in (("extend_left_s", left), ("extend_right_s", right)):
            if value:
                raise ValidationError(name, value, "0 unless task_type is 'extend'")
        return
    if left <= 0 and right <= 0:
        raise ValidationError("extend_right_s", right, "> 0 seconds (or extend_left_s > 0) for task_type='extend'")
    if src_duration is not None and src_duration + left + right > MAX_EXTENDED_S:
        name, value = ("extend_right_s", right) if right > 0 else ("extend_left_s", left)
        room = max(MAX_EXTENDED_S - src_duration, 0.0)
        raise ValidationError(name, value, f"source ({src_duration:.2f} s) + extend_left_s + extend_right_s at most "
                                           f"{MAX_EXTENDED_S:g} seconds: at most {room:.2f} s of extension")


def _check_window(params: GenerationParams, src_duration: Optional[float]) -> None:
    start, end = params.repainting_start, params.repainting_end
    if end != -1 and end <= start:
        raise ValidationError("repainting_end", end, f"-1 or greater than repainting_start ({start})")
    if src_duration is None:
        return
    if start >= src_duration:
        raise ValidationError("repainting_start", start, f"inside the source audio: 0 to {src_duration:.2f} seconds")
    if end != -1 and end > src_duration:
        raise ValidationError("repainting_end", end, f"inside the source audio: at most {src_duration:.2f} seconds")


def validate(params: GenerationParams, config: GenerationConfig, is_turbo: Optional[bool] = None,
             src_duration: Optional[float] = None) -> None:
    """Raise ValidationError for the first rule that fails."""
    check_fields(params, config)
    check_cross_fields(params, is_turbo=is_turbo, src_duration=src_duration)
