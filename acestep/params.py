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
INSTRUMENTAL_LYRICS = "[Instrumental]"  # the lyrics of a song without vocals (upstream's marker)
DEFAULT_LM_TEMPERATURE = 0.85  # generation and the LM helpers alike (INFERENCE.md)
DIT_FAMILIES = ("turbo", "sft", "base")  # the DiT variants' families (acestep.presets)
PRESET_CHOICES = ("model",) + DIT_FAMILIES

# An audio input: a path, the file's bytes, or a seekable binary file object (see acestep.audio)
AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


@dataclass
class GenerationParams:
    """What to generate: task, text, metadata, DiT and LM sampling knobs (INFERENCE.md)."""

    # The preset that fills the sampling fields left unset (acestep.presets): "model" (the serving
    # model's own), a family name, or None (the defaults below). HTTP and Ray Data default to "model".
    preset: Optional[str] = None
    # Task & instruction
    task_type: str = "text2music"
    instruction: str = DEFAULT_DIT_INSTRUCTION
    # Extension: several tracks of extract / lego in one call (acestep.stems): names, "all" or
    # "vocals+accompaniment"; one audio per track and song, each labelled "track". None: one track,
    # named by the instruction (the official way).
    tracks: Optional[Union[str, List[str]]] = None
    # Audio inputs: path, bytes or binary file object (an upload needs no temporary file).
    # prepare_request reads file objects into bytes, so its copies of the params deep-copy cheaply.
    reference_audio: Optional[AudioSource] = None
    src_audio: Optional[AudioSource] = None
    # LM code hints: "<|audio_code_N|>..." (5 codes per second)
    audio_codes: str = ""
    # Text inputs
    caption: str = ""
    global_caption: str = ""  # song-level caption of the stems lego task (the caption describes the track)
    lyrics: str = ""
    instrumental: bool = False
    # Metadata
    vocal_language: str = "unknown"
    bpm: Optional[int] = None
    keyscale: str = ""
    timesignature: str = ""
    duration: float = -1.0
    # Audio post-processing: peak normalisation first, then fades (seconds, 0 = none)
    enable_normalization: bool = True
    normalization_db: float = -1.0
    fade_in_duration: float = 0.0
    fade_out_duration: float = 0.0
    # Latent post-processing before the VAE decode: x * latent_rescale + latent_shift
    latent_shift: float = 0.0
    latent_rescale: float = 1.0
    # Advanced DiT settings
    inference_steps: int = 8
    seed: int = -1
    guidance_scale: float = 7.0
    use_adg: bool = False
    cfg_interval_start: float = 0.0
    cfg_interval_end: float = 1.0
    shift: float = 1.0
    infer_method: str = "ode"
    sampler_mode: str = "euler"  # "euler" or "heun" (second order: two DiT forwards per step)
    velocity_norm_threshold: float = 0.0  # clamp |v| to threshold·|x| per item (0 = off)
    velocity_ema_factor: float = 0.0  # v ← (1 − f)·v + f·v_previous (0 = off)
    # DCW, the wavelet-domain correction after each sampler step. None = the model's own default:
    # on for turbo, off for sft/base (their output degrades with it).
    dcw_enabled: Optional[bool] = None
    dcw_mode: str = "double"  # "low" | "high" | "double" | "pix"
    dcw_scaler: float = 0.05  # low-band scaler ("low", "double"), the only one for "high" / "pix"
    dcw_high_scaler: float = 0.02  # high-band scaler ("double" only)
    dcw_wavelet: str = "haar"
    timesteps: Optional[List[float]] = None
    repainting_start: float = 0.0
    repainting_end: float = -1
    chunk_mask_mode: str = "auto"  # "explicit": 0/1 mask from the repaint/lego window; "auto": 1 everywhere
    # Repaint crossfades; None = the repaint mode's (balanced 0.5: 12 frames, 0.025 s)
    repaint_latent_crossfade_frames: Optional[int] = None  # latent blend width at the window's edges (25 Hz frames)
    repaint_wav_crossfade_sec: Optional[float] = None  # waveform splice crossfade (0 = hard cut)
    repaint_mode: str = "balanced"  # "conservative" | "balanced" | "aggressive"
    repaint_strength: float = 0.5  # balanced mode only: 0 keeps the source most, 1 is pure diffusion
    # Extend (task_type="extend"): seconds of new audio before / after src_audio; the caption and
    # lyrics describe the new part, which the repaint fields join to the source
    extend_left_s: float = 0.0
    extend_right_s: float = 0.0
    # Retake: cos/sin mix of the seed's noise with retake_seed's (variance 0 = no-op)
    retake_seed: Optional[Union[str, int]] = None
    retake_variance: float = 0.0
    # Flow-edit morph (cover / cover-nofsq / text2music): move the source, described by the
    # flow_edit_source_* texts, toward caption/lyrics over flow time [n_min, n_max]
    flow_edit_morph: bool = False
    flow_edit_source_caption: str = ""
    flow_edit_source_lyrics: str = ""
    flow_edit_n_min: float = 0.0
    flow_edit_n_max: float = 1.0
    flow_edit_n_avg: int = 1
    audio_cover_strength: float = 1.0
    cover_noise_strength: float = 0.0  # cover: start from the source re-noised (0 = pure noise, 1 = closest)
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

    def __post_init__(self):
        # as upstream: shift <= 0 would divide by zero in the shift formula, 0 steps render silence
        if isinstance(self.shift, (int, float)) and not isinstance(self.shift, bool) and self.shift <= 0:
            self.shift = 1.0
        if (isinstance(self.inference_steps, int) and not isinstance(self.inference_steps, bool)
                and self.inference_steps < 1):
            self.inference_steps = 1

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
