"""The seed API's data classes (re-exported by ``acestep.inference``).

Every field and default follows ACE-Step's INFERENCE.md. They live in their own module so the LM
half, the DiT half and ``acestep.inference`` can all import them without import cycles.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, List, Optional, Union

DEFAULT_DIT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
MAX_CAPTION_CHARS = 512  # INFERENCE.md limits on user text
MAX_LYRICS_CHARS = 4096
DEFAULT_LM_TEMPERATURE = 0.85  # generation and the LM helpers alike (INFERENCE.md)

# An audio input: a path, the file's bytes, or a seekable binary file object (see acestep.audio)
AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


@dataclass
class GenerationParams:
    """What to generate: task, text, metadata, DiT and LM sampling knobs (INFERENCE.md)."""

    # Task & instruction
    task_type: str = "text2music"
    instruction: str = DEFAULT_DIT_INSTRUCTION
    # Audio inputs: path, bytes or binary file object (an upload needs no temporary file).
    # prepare_request reads file objects into bytes, so its copies of the params deep-copy cheaply.
    reference_audio: Optional[AudioSource] = None
    src_audio: Optional[AudioSource] = None
    # LM code hints: "<|audio_code_N|>..." (5 codes per second)
    audio_codes: str = ""
    # Text inputs
    caption: str = ""
    lyrics: str = ""
    instrumental: bool = False
    # Metadata
    vocal_language: str = "unknown"
    bpm: Optional[int] = None
    keyscale: str = ""
    timesignature: str = ""
    duration: float = -1.0
    # Advanced DiT settings
    inference_steps: int = 8
    seed: int = -1
    guidance_scale: float = 7.0
    use_adg: bool = False
    cfg_interval_start: float = 0.0
    cfg_interval_end: float = 1.0
    shift: float = 1.0
    infer_method: str = "ode"
    timesteps: Optional[List[float]] = None
    repainting_start: float = 0.0
    repainting_end: float = -1
    audio_cover_strength: float = 1.0
    # 5 Hz LM parameters
    thinking: bool = True
    lm_temperature: float = DEFAULT_LM_TEMPERATURE
    lm_cfg_scale: float = 2.0
    lm_top_k: int = 0
    lm_top_p: float = 0.9
    lm_negative_prompt: str = "NO USER INPUT"
    use_cot_metas: bool = True
    use_cot_caption: bool = True
    use_cot_lyrics: bool = False
    use_cot_language: bool = True
    use_constrained_decoding: bool = True
    # CoT generated values (filled by the LM)
    cot_bpm: Optional[int] = None
    cot_keyscale: str = ""
    cot_timesignature: str = ""
    cot_duration: Optional[float] = None
    cot_vocal_language: str = "unknown"
    cot_caption: str = ""
    cot_lyrics: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GenerationConfig:
    """How many, which seeds, how the LM batches, and the output format (INFERENCE.md)."""

    batch_size: int = 2
    allow_lm_batch: bool = False
    use_random_seed: bool = True
    seeds: Optional[Union[List[int], int]] = None
    lm_batch_chunk_size: int = 8
    constrained_decoding_debug: bool = False
    audio_format: str = "flac"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GenerationResult:
    """Audio items (path, tensor, key, sample_rate, params) plus status and extra outputs."""

    audios: List[Dict[str, Any]] = field(default_factory=list)
    status_message: str = ""
    extra_outputs: Dict[str, Any] = field(default_factory=dict)
    success: bool = True
    error: Optional[str] = None


@dataclass
class UnderstandResult:
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    duration: Optional[float] = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    status_message: str = ""
    success: bool = True
    error: Optional[str] = None


@dataclass
class CreateSampleResult:
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    duration: Optional[float] = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    instrumental: bool = False
    status_message: str = ""
    success: bool = True
    error: Optional[str] = None


@dataclass
class FormatSampleResult:
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    duration: Optional[float] = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    status_message: str = ""
    success: bool = True
    error: Optional[str] = None


@dataclass(frozen=True)
class LMHelperOptions:
    """Sampling knobs of the LM helpers (understand_music / create_sample / format_sample) with the
    seed's defaults; the helper signatures and the HTTP schemas take their defaults from here."""

    temperature: float = DEFAULT_LM_TEMPERATURE
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    use_constrained_decoding: bool = True
    constrained_decoding_debug: bool = False


LM_HELPER_DEFAULTS = LMHelperOptions()


@dataclass
class LMPlan:
    """What the LM hands the DiT for one item: metadata (bpm, caption, duration, keyscale,
    language, timesignature as parsed from the CoT), the code string, the seed it sampled with
    and its timings. Plain data: the only thing the LM half and the DiT half share."""

    metadata: Dict[str, Any] = field(default_factory=dict)
    audio_codes: str = ""
    seed: Optional[int] = None
    phase1_time: float = 0.0
    phase2_time: float = 0.0


def json_safe(value: Any) -> Any:
    """Drop what JSON cannot carry (tensors, arrays, bytes); keep plain data."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items() if _is_plain(v)}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value if _is_plain(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool, type(None), dict, list, tuple)):
        return True
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
