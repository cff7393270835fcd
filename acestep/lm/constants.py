"""Constants of the official 5 Hz LM (ace-step/ACE-Step-1.5:acestep/constants.py)."""

from __future__ import annotations

DEFAULT_LM_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
DEFAULT_LM_UNDERSTAND_INSTRUCTION = "Understand the given musical conditions and describe the audio semantics accordingly:"
DEFAULT_LM_INSPIRED_INSTRUCTION = "Expand the user's input into a more detailed and specific musical description:"
DEFAULT_LM_REWRITE_INSTRUCTION = "Format the user's input into a more detailed and specific musical description:"

NO_USER_INPUT = "NO USER INPUT"

VALID_LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en",
    "es", "fa", "fi", "fr", "he", "hi", "hr", "ht", "hu", "id",
    "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no",
    "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr", "sv", "sw",
    "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh",
    "unknown",
)
KEYSCALE_NOTES = ("A", "B", "C", "D", "E", "F", "G")
KEYSCALE_ACCIDENTALS = ("", "#", "b", "♯", "♭")
KEYSCALE_MODES = ("major", "minor")
VALID_KEYSCALES = tuple(f"{n}{a} {m}" for n in KEYSCALE_NOTES for a in KEYSCALE_ACCIDENTALS for m in KEYSCALE_MODES)

BPM_MIN, BPM_MAX = 30, 300
DURATION_MIN, DURATION_MAX = 10, 600
VALID_TIME_SIGNATURES = (2, 3, 4, 6)

MAX_AUDIO_CODE = 63999  # FSQ codebook [8,8,8,5,5,5] = 64,000 entries; the vocab has 65,535 code tokens
CODES_PER_SECOND = 5
CAPTION_MAX_TOKENS = 512
GENRES_MAX_TOKENS = 64  # ours: upstream's genres field is unbounded when its vocab file is absent

# CoT fields in the FSM's (alphabetical) order; genres only in understand/create/format.
COT_FIELD_ORDER = ("bpm", "caption", "duration", "genres", "keyscale", "language", "timesignature")
# Keys re-serialised into the phase-2 CoT (genres dropped, as upstream).
COT_YAML_KEYS = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_LM_MODEL = "acestep-5Hz-lm-0.6B"  # the seed's example LM; the demo checkpoints write this folder
LM_DIR_PREFIX = "acestep-5Hz-lm-"


def max_duration_for_vram(total_gb: float | None) -> int:
    """GPU-tier ``max_duration_with_lm`` (acestep/gpu_config.py); ``None`` = CPU (tier 1)."""
    if total_gb is None or total_gb <= 4:
        return 180
    if total_gb <= 6:
        return 360
    if total_gb <= 15.5:
        return 240
    if total_gb <= 24:
        return 480
    return 600
