"""The seed API's LM helpers (re-exported by ``acestep.inference``): understand_music,
create_sample, format_sample. Signatures are the seed's plus an optional ``seed`` (random when
omitted). Like the seed they return a result object; failures come back as ``success=False``
with the exception text in ``error``."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from acestep.params import (
    MAX_CAPTION_CHARS,
    MAX_LYRICS_CHARS,
    CreateSampleResult,
    FormatSampleResult,
    UnderstandResult,
)

logger = logging.getLogger(__name__)

_NOT_INITIALIZED = "5Hz LM not initialized. Please initialize it first."


def _int_or_none(value: Any) -> Optional[int]:
    if value in (None, "", "N/A"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> Optional[float]:
    if value in (None, "", "N/A"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _common_fields(metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The result fields every mode shares; ``N/A`` blanked as upstream. Caption and lyrics are cut
    to GenerationParams' limits so a result can be passed straight back into generate_music."""
    blank = lambda v: "" if v in (None, "N/A") else str(v)  # noqa: E731
    return {
        "caption": str(metadata.get("caption", ""))[:MAX_CAPTION_CHARS],
        "lyrics": str(metadata.get("lyrics", ""))[:MAX_LYRICS_CHARS],
        "bpm": _int_or_none(metadata.get("bpm")),
        "duration": _float_or_none(metadata.get("duration")),
        "keyscale": blank(metadata.get("keyscale")),
        "language": blank(metadata.get("language", metadata.get("vocal_language"))),
        "timesignature": blank(metadata.get("timesignature")),
    }


def understand_music(llm_handler, audio_codes: str, temperature: float = 0.85, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                     use_constrained_decoding: bool = True, constrained_decoding_debug: bool = False,
                     seed: Optional[int] = None) -> UnderstandResult:
    """Audio codes → caption, lyrics and metadata (blank codes: the LM invents a sample)."""
    if not getattr(llm_handler, "llm_initialized", False):
        return UnderstandResult(status_message=_NOT_INITIALIZED, success=False, error="LLM not initialized")
    try:
        metadata = llm_handler.understand_audio_from_codes(
            audio_codes, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            use_constrained_decoding=use_constrained_decoding, seed=seed)
    except Exception as exc:  # the seed API reports failures in the result
        logger.exception("understand_music failed")
        return UnderstandResult(status_message=f"Error: {exc}", success=False, error=str(exc))
    return UnderstandResult(**_common_fields(metadata), status_message="Understanding completed successfully")


def create_sample(llm_handler, query: str, instrumental: bool = False, vocal_language: Optional[str] = None,
                  temperature: float = 0.85, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  repetition_penalty: float = 1.0, use_constrained_decoding: bool = True,
                  constrained_decoding_debug: bool = False, seed: Optional[int] = None) -> CreateSampleResult:
    """A description → a full sample (caption, lyrics, metadata) — "simple mode"."""
    if not getattr(llm_handler, "llm_initialized", False):
        return CreateSampleResult(status_message=_NOT_INITIALIZED, success=False, error="LLM not initialized")
    try:
        metadata = llm_handler.create_sample_from_query(
            query, instrumental=instrumental, vocal_language=vocal_language, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, use_constrained_decoding=use_constrained_decoding,
            seed=seed)
    except Exception as exc:
        logger.exception("create_sample failed")
        return CreateSampleResult(status_message=f"Error: {exc}", success=False, error=str(exc))
    return CreateSampleResult(**_common_fields(metadata), instrumental=bool(metadata.get("instrumental", instrumental)),
                              status_message="Sample created successfully")


def format_sample(llm_handler, caption: str, lyrics: str, user_metadata: Optional[Dict[str, Any]] = None,
                  temperature: float = 0.85, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  repetition_penalty: float = 1.0, use_constrained_decoding: bool = True,
                  constrained_decoding_debug: bool = False, seed: Optional[int] = None) -> FormatSampleResult:
    """Caption + lyrics → enhanced caption, formatted lyrics and metadata (user values kept)."""
    if not getattr(llm_handler, "llm_initialized", False):
        return FormatSampleResult(status_message=_NOT_INITIALIZED, success=False, error="LLM not initialized")
    try:
        metadata = llm_handler.format_sample_from_input(
            caption, lyrics, user_metadata=user_metadata, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, use_constrained_decoding=use_constrained_decoding, seed=seed)
    except Exception as exc:
        logger.exception("format_sample failed")
        return FormatSampleResult(status_message=f"Error: {exc}", success=False, error=str(exc))
    return FormatSampleResult(**_common_fields(metadata), status_message="Format completed successfully")
