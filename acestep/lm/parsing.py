"""Parsing LM output text (upstream ``parse_lm_output`` / ``_extract_lyrics_from_output``)."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

_CODE_RE = re.compile(r"<\|audio_code_\d+\|>")
_REASONING_RES = (re.compile(r"<think>(.*?)</think>", re.DOTALL), re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL))
_LYRIC_HEADER_RE = re.compile(r"^#\s*Lyri[c|cs]?\s*\n", re.IGNORECASE)  # upstream's regex, quirk kept
_INT_FIELDS = ("bpm", "duration")
_TEXT_FIELDS = ("genres", "keyscale", "language", "timesignature")


def postprocess_caption(caption: str) -> str:
    """YAML multi-line scalar → one line (lines stripped, blanks dropped, joined by spaces)."""
    return " ".join(line.strip() for line in caption.split("\n") if line.strip())


def _field_value(key: str, lines: List[str]) -> Any:
    value = "\n".join(lines)
    if key in _INT_FIELDS:
        try:
            return int(value.strip())
        except ValueError:
            return value.strip()
    if key == "caption":
        return postprocess_caption(value)
    return value.strip()


def _reasoning_text(text: str) -> str:
    for pattern in _REASONING_RES:
        match = pattern.search(text)
        if match:
            if match.group(1).strip():
                return match.group(1).strip()
            break
    # Phase-1 output has no </think> (EOS is forced there): use the text before any code.
    return text.split("<|audio_code_")[0].strip()


def parse_metadata(reasoning: str) -> Dict[str, Any]:
    """Line scan of ``key: value`` fields with 2-space YAML continuation lines."""
    metadata: Dict[str, Any] = {}
    key: Optional[str] = None
    lines: List[str] = []

    def flush():
        if key in _INT_FIELDS + _TEXT_FIELDS + ("caption",) and lines:
            metadata[key] = _field_value(key, lines)

    for line in reasoning.split("\n"):
        if line.strip().startswith("<"):
            continue
        if line and not line[0].isspace() and ":" in line:
            flush()
            name, first = line.split(":", 1)
            key, lines = name.strip().lower(), ([first] if first.strip() else [])
        elif line[:1] in (" ", "\t") and key:
            lines.append(line)
    flush()
    if "language" in metadata:
        # Upstream drops this: the DiT reads vocal_language, the CoT writes language.
        metadata["vocal_language"] = metadata["language"]
    return metadata


def parse_lm_output(text: str) -> Tuple[Dict[str, Any], str]:
    """(metadata, audio code string) from decoded LM text (decoded with special tokens kept)."""
    codes = "".join(_CODE_RE.findall(text))
    return parse_metadata(_reasoning_text(text)), codes


def extract_lyrics(text: str) -> str:
    """Text after the first ``</think>``, minus a leading ``# Lyric`` header and trailing EOS."""
    match = re.search(r"</think>", text)
    if not match:
        return ""
    after = text[match.end():].strip()
    if not after:
        return ""
    after = _LYRIC_HEADER_RE.sub("", after)
    after = re.sub(r"<\|im_end\|>\s*$", "", after)
    return after.strip()


def count_codes(code_string: str) -> int:
    return len(_CODE_RE.findall(code_string))
