"""The task types as DiT inputs: instruction, source/context latents, chunk mask, cover flag.

Per frame the DiT sees [context latents (64) | chunk mask (64) | x_t (64)]. Table (official):
text2music: silence, mask 1 · cover: tokenized→detokenized source ("hints") · cover-nofsq: the raw
source latents (no FSQ round trip) · repaint: source with the window silenced · lego: source ·
extract / complete: source · extend (ours, ``acestep.dit.extend``): repaint on the source padded
with the new part. The chunk mask is 1 everywhere (chunk_mask_mode "auto", the default)
or, with "explicit", 1 inside the repaint/lego window and 0 outside. Upstream's "auto" means to
write 2.0, but into a bool tensor, so its model sees 1: we send 1, the value the weights know.

Repaint keeps the source outside its window three ways, sized by ``RepaintConfig``: re-injecting
the noised source there during the first steps, blending the final latents at the window's edges,
and splicing the source waveform back after the decode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from acestep.audio import HOP, SAMPLE_RATE

# The official instructions, as in diffusers' pipeline_ace_step (a test checks they agree). Not
# imported from there: that module pulls in transformers and most of diffusers, seconds of import
# in every process that validates a request (the Serve ingress and controller need neither).
TASK_INSTRUCTIONS = {
    "text2music": "Fill the audio semantic mask based on the given conditions:",
    "repaint": "Repaint the mask area based on the given conditions:",
    "cover": "Generate audio semantic tokens based on the given conditions:",
    "extract": "Extract the {TRACK_NAME} track from the audio:",
    "extract_default": "Extract the track from the audio:",
    "lego": "Generate the {TRACK_NAME} track based on the audio context:",
    "lego_default": "Generate the track based on the audio context:",
    "complete": "Complete the input track with {TRACK_CLASSES}:",
    "complete_default": "Complete the input track:",
}
TASK_TYPES = ("text2music", "cover", "cover-nofsq", "repaint", "lego", "extract", "complete", "extend")
BASE_ONLY_TASKS = ("lego", "extract", "complete")
SOURCE_TASKS = ("cover", "cover-nofsq", "repaint", "lego", "extract", "complete", "extend")
STEM_TASKS = ("extract", "lego")  # several tracks in one request (``GenerationParams.tracks``)
COVER_TASKS = ("cover", "cover-nofsq")  # audio codes can stand in for the source audio
CHUNK_MASK_MODES = ("auto", "explicit")
REPAINT_MODES = ("conservative", "balanced", "aggressive")
TRACK_NAMES = ("woodwinds", "brass", "fx", "synth", "strings", "percussion", "keyboard", "guitar", "bass", "drums",
               "backing_vocals", "vocals")
TRACK_JOIN = " | "  # how the official handler joins complete's track classes
FRAMES_PER_SECOND = 25
MIN_FRAMES = 128  # 5.12 s: the official floor on latent length
MAX_DIT_S = 600.0  # the DiT's longest song: one pass renders at most this much
MAX_EXTENDED_S = 1200.0  # the longest song an extension may make (rendered in windows of MAX_DIT_S)
TIMBRE_FRAMES = 750  # 30 s of reference latents

# Repaint sizes at full source preservation (conservative; balanced scales them by 1 - strength)
REPAINT_MAX_CROSSFADE_FRAMES = 25
REPAINT_MAX_WAV_CROSSFADE_S = 0.05

TRACK_PATTERNS = {
    "extract": re.compile(r"^Extract the (.+) track from the audio:?$"),
    "lego": re.compile(r"^Generate the (.+) track based on the audio context:?$"),
    "complete": re.compile(r"^Complete the input track with (.+?):?$"),
}


def default_instruction(task_type: str) -> str:
    if task_type == "cover-nofsq":
        task_type = "cover"  # the same instruction; only the context differs
    return TASK_INSTRUCTIONS.get(f"{task_type}_default", TASK_INSTRUCTIONS.get(task_type, TASK_INSTRUCTIONS["text2music"]))


def resolve_instruction(task_type: str, instruction: str, has_codes: bool) -> str:
    """The instruction the DiT gets: the task's default unless the user wrote one; codes turn
    text2music into cover (as upstream)."""
    if task_type == "text2music" and has_codes:
        return TASK_INSTRUCTIONS["cover"]
    if not instruction or (instruction == TASK_INSTRUCTIONS["text2music"] and task_type != "text2music"):
        return default_instruction(task_type)
    return instruction


def instruction_tracks(task_type: str, instruction: str) -> Optional[List[str]]:
    """Track names an extract/lego/complete instruction names (None if it names none)."""
    pattern = TRACK_PATTERNS.get(task_type)
    match = pattern.match(instruction.strip()) if pattern else None
    if not match:
        return None
    return [name.strip().lower() for name in re.split(r"\s*[|,]\s*|\s+and\s+", match.group(1)) if name.strip()]


def task_instruction(task_type: str, tracks: Sequence[str] = ()) -> str:
    """The official instruction for a task naming ``tracks`` (upper case; complete joins them with
    " | "), or the task's default when it names none."""
    names = [t.strip().upper() for t in tracks if t.strip()]
    if task_type in ("extract", "lego") and names:
        return TASK_INSTRUCTIONS[task_type].format(TRACK_NAME=names[0])
    if task_type == "complete" and names:
        return TASK_INSTRUCTIONS["complete"].format(TRACK_CLASSES=TRACK_JOIN.join(names))
    return default_instruction(task_type)


def task_catalog() -> List[Dict[str, Any]]:
    """What each task needs from a client: a source file, a base model, a window, track names."""
    tracks = {"extract": "many", "lego": "many", "complete": "many"}  # extract/lego: one stem per track
    return [{"task_type": task, "needs_source": task in SOURCE_TASKS and task != "cover",
             "takes_source": task in SOURCE_TASKS, "needs_base": task in BASE_ONLY_TASKS,
             "window": task in ("repaint", "lego"), "tracks": tracks.get(task), "stems": task in STEM_TASKS,
             "instruction": default_instruction(task),
             # {tracks}: the chosen names, upper case, joined by track_join (as task_instruction does)
             "track_instruction": task_instruction(task, ["{tracks}"]).replace("{TRACKS}", "{tracks}")
             if task in tracks else None, "track_join": TRACK_JOIN} for task in TASK_TYPES]


def seconds_to_frames(duration_s: float) -> int:
    """Latent length for a duration: int(round(d, 1)·48000) // 1920, at least 128 frames."""
    return max(MIN_FRAMES, int(round(duration_s, 1) * SAMPLE_RATE) // HOP)


def time_to_frame(seconds: float) -> int:
    return int(seconds * SAMPLE_RATE // HOP)


@dataclass
class Window:
    """Frames [start, end) of a repaint/lego region."""

    start: int
    end: int


@dataclass(frozen=True)
class RepaintConfig:
    """How strongly a repaint item keeps its source outside the window (``repaint_config``)."""

    inject_ratio: float  # share of the steps after which the noised source is re-injected outside
    crossfade_frames: int  # latent blend ramp outside each window edge (0: no latent blend)
    wav_crossfade_s: float  # waveform splice ramp outside each edge (0: hard cut)
    splice: bool  # put the source waveform back outside the window after the decode


@dataclass(frozen=True)
class Repaint:
    """A repaint item's window (latent frames), splice bounds (samples) and config."""

    window: Window
    samples: Tuple[int, int]  # [start, end) of the waveform the model repaints
    config: RepaintConfig


def repaint_config(mode: str, strength: float, crossfade_frames: Optional[int] = None,
                   wav_crossfade_s: Optional[float] = None) -> RepaintConfig:
    """A repaint mode as numbers (upstream's ``_resolve_repaint_config``): conservative re-injects
    the source at every step with the widest blends; aggressive is pure diffusion in the window
    (no injection, blend or splice); balanced scales conservative's numbers by 1 - strength
    (Python's round for the frames, as upstream). Explicit crossfade widths replace the mode's."""
    if mode == "aggressive":
        config = RepaintConfig(0.0, 0, 0.0, splice=False)
    elif mode == "conservative":
        config = RepaintConfig(1.0, REPAINT_MAX_CROSSFADE_FRAMES, REPAINT_MAX_WAV_CROSSFADE_S, splice=True)
    else:
        keep = 1.0 - max(0.0, min(1.0, strength))
        config = RepaintConfig(keep, round(REPAINT_MAX_CROSSFADE_FRAMES * keep), REPAINT_MAX_WAV_CROSSFADE_S * keep,
                               splice=True)
    if crossfade_frames is not None:
        config = replace(config, crossfade_frames=int(crossfade_frames))
    if wav_crossfade_s is not None:
        config = replace(config, wav_crossfade_s=float(wav_crossfade_s))
    return config


def inject_steps(config: RepaintConfig, steps: int, is_turbo: bool) -> int:
    """Steps (from the first) after which the source is re-injected outside the window: round(ratio
    · steps), as upstream. Turbo's last step jumps straight to x0 and never injects; sft/base
    inject after their last step too (at t = 0: the clean source)."""
    count = round(config.inject_ratio * steps)
    return min(count, steps - 1) if is_turbo else count


def resolve_window(start_s: float, end_s: float, frames: int) -> Window:
    start = min(max(time_to_frame(start_s), 0), frames - 1)
    end = frames if end_s is None or end_s < 0 else time_to_frame(end_s)
    return Window(start, min(max(end, start + 1), frames))


def silence_frames(silence: torch.Tensor, frames: int) -> torch.Tensor:
    """First ``frames`` frames of the silence latent [1, N, C] (tiled if longer), → [frames, C]."""
    base = silence[0]
    if frames > base.shape[0]:
        base = base.repeat((frames + base.shape[0] - 1) // base.shape[0], 1)
    return base[:frames]


def task_context(task_type: str, frames: int, silence: torch.Tensor, source: Optional[torch.Tensor],
                 window: Optional[Window], chunk_mask_mode: str = "auto"):
    """(src latents [T, C], chunk mask [T]) for one item, per the task table."""
    mask = torch.ones(frames, device=silence.device, dtype=silence.dtype)
    if task_type == "text2music" or source is None:
        return silence_frames(silence, frames), mask
    src = source[:frames].to(silence.dtype)
    if task_type in ("repaint", "lego") and window is not None:
        if chunk_mask_mode == "explicit":
            mask = torch.zeros_like(mask)
            mask[window.start: window.end] = 1.0
        if task_type == "repaint":
            src = src.clone()
            src[window.start: window.end] = silence_frames(silence, frames)[window.start: window.end]
    return src, mask


def _edge_ramps(weight: torch.Tensor, start: int, end: int, width: int) -> torch.Tensor:
    """Linear ramps of up to ``width`` entries outside [start, end) of a 0/1 ``weight`` (0 → 1 before,
    1 → 0 after), endpoints excluded; a ramp cut by the array's edge is a shorter full ramp."""
    lo, hi = max(start - width, 0), min(end + width, weight.shape[0])
    if start > lo:
        weight[lo:start] = torch.linspace(0.0, 1.0, start - lo + 2, device=weight.device)[1:-1]
    if hi > end:
        weight[end:hi] = torch.linspace(1.0, 0.0, hi - end + 2, device=weight.device)[1:-1]
    return weight


def crossfade_mask(window: Window, frames: int, ramp: int, device=None) -> torch.Tensor:
    """1 inside the window, 0 outside, with linear ramps of ``ramp`` frames outside each edge."""
    mask = torch.zeros(frames, device=device)
    mask[window.start: window.end] = 1.0
    if ramp <= 0 or (window.start == 0 and window.end >= frames):
        return mask
    return _edge_ramps(mask, window.start, window.end, ramp)


def splice_waveform(generated: torch.Tensor, original: torch.Tensor, samples: Tuple[int, int], crossfade_s: float,
                    sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Put the original waveform back outside ``samples`` [start, end), with linear crossfades of
    ``crossfade_s`` outside each edge (rounded to whole samples)."""
    length = min(generated.shape[-1], original.shape[-1])
    start = max(0, min(samples[0], length))
    end = max(start, min(samples[1], length))
    if start == 0 and end >= length:
        return generated
    weight = torch.zeros(length, device=generated.device)
    weight[start:end] = 1.0
    weight = _edge_ramps(weight, start, end, round(crossfade_s * sample_rate))
    original = original[..., :length].to(device=generated.device, dtype=generated.dtype)
    out = generated.clone()
    out[..., :length] = weight * generated[..., :length] + (1 - weight) * original
    return out
