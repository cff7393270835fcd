"""The six task types as DiT inputs: instruction, source/context latents, chunk mask, cover flag.

Per frame the DiT sees [context latents (64) | chunk mask (64) | x_t (64)]. Table (official):
text2music: silence, mask 1 · cover: tokenized→detokenized source ("hints") · repaint: source
with the window silenced, mask 1 inside / 0 outside · lego: source, mask 1 inside the window ·
extract / complete: source, mask 1. The mask is 0/1 (release behaviour the weights were trained
with), not the later "auto" 2.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

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
TASK_TYPES = ("text2music", "cover", "repaint", "lego", "extract", "complete")
BASE_ONLY_TASKS = ("lego", "extract", "complete")
SOURCE_TASKS = ("cover", "repaint", "lego", "extract", "complete")
TRACK_NAMES = ("woodwinds", "brass", "fx", "synth", "strings", "percussion", "keyboard", "guitar", "bass", "drums",
               "backing_vocals", "vocals")
TRACK_JOIN = " | "  # how the official handler joins complete's track classes
FRAMES_PER_SECOND = 25
MIN_FRAMES = 128  # 5.12 s: the official floor on latent length
TIMBRE_FRAMES = 750  # 30 s of reference latents

# Repaint "balanced" mode (upstream default): re-inject the noised source outside the window for
# the first half of the steps, blend 12 latent frames at the edges, splice 25 ms of waveform.
REPAINT_INJECT_RATIO = 0.5
REPAINT_CROSSFADE_FRAMES = 12
REPAINT_WAV_CROSSFADE_S = 0.025

TRACK_PATTERNS = {
    "extract": re.compile(r"^Extract the (.+) track from the audio:?$"),
    "lego": re.compile(r"^Generate the (.+) track based on the audio context:?$"),
    "complete": re.compile(r"^Complete the input track with (.+?):?$"),
}


def default_instruction(task_type: str) -> str:
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
    tracks = {"extract": "one", "lego": "one", "complete": "many"}
    return [{"task_type": task, "needs_source": task in SOURCE_TASKS and task != "cover",
             "takes_source": task in SOURCE_TASKS, "needs_base": task in BASE_ONLY_TASKS,
             "window": task in ("repaint", "lego"), "tracks": tracks.get(task),
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
                 window: Optional[Window]):
    """(src latents [T, C], chunk mask [T]) for one item, per the task table."""
    mask = torch.ones(frames, device=silence.device, dtype=silence.dtype)
    if task_type == "text2music" or source is None:
        return silence_frames(silence, frames), mask
    src = source[:frames].to(silence.dtype)
    if task_type in ("repaint", "lego") and window is not None:
        mask = torch.zeros_like(mask)
        mask[window.start: window.end] = 1.0
        if task_type == "repaint":
            src = src.clone()
            src[window.start: window.end] = silence_frames(silence, frames)[window.start: window.end]
    return src, mask


def crossfade_mask(window: Window, frames: int, ramp: int, device=None) -> torch.Tensor:
    """1 inside the window, 0 outside, with linear ramps of ``ramp`` frames outside each edge."""
    mask = torch.zeros(frames, device=device)
    mask[window.start: window.end] = 1.0
    if ramp > 0:
        up = torch.linspace(0, 1, ramp + 2, device=device)[1:-1]
        lo = max(window.start - ramp, 0)
        mask[lo: window.start] = up[ramp - (window.start - lo):]
        hi = min(window.end + ramp, frames)
        mask[window.end: hi] = up.flip(0)[: hi - window.end]
    return mask


def splice_waveform(generated: torch.Tensor, original: torch.Tensor, window: Window, crossfade_s: float,
                    hop: int = HOP, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Put the original waveform back outside the window, with linear crossfades at the edges."""
    length = min(generated.shape[-1], original.shape[-1])
    out = generated.clone()
    start, end, fade = window.start * hop, min(window.end * hop, length), int(crossfade_s * sample_rate)
    weight = torch.zeros(length)
    weight[start:end] = 1.0
    if fade > 0:
        ramp = torch.linspace(0, 1, fade + 2)[1:-1]
        weight[max(start - fade, 0): start] = ramp[fade - (start - max(start - fade, 0)):]
        weight[end: min(end + fade, length)] = ramp.flip(0)[: min(end + fade, length) - end]
    weight = weight.to(generated.device)
    out[..., :length] = weight * generated[..., :length] + (1 - weight) * original[..., :length].to(generated.device)
    return out
