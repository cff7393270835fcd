"""The seed API's LM helpers (re-exported by ``acestep.inference``): understand_music,
create_sample, format_sample -- the one layer between the seed API and the engine (they call
``acestep.lm.modes`` with the handler). Signatures are the seed's (defaults from
``acestep.params.LM_HELPER_DEFAULTS``) plus an optional ``seed`` (random when omitted) and
``cancel`` (a ``Cancellation`` that aborts the call's engine request). Like the seed they return a
result object; failures come back as ``success=False`` with the exception text in ``error``."""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Optional

from acestep.lm import modes
from acestep.lm.request import Cancellation, SamplingConfig
from acestep.params import (
    LM_HELPER_DEFAULTS,
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


def _sampling_and_seed(temperature, top_k, top_p, repetition_penalty, seed):
    sampling = SamplingConfig.of(temperature, top_k, top_p, repetition_penalty)
    return sampling, (random.randint(0, 2**32 - 1) if seed is None or seed < 0 else int(seed))


def _ready(llm_handler) -> bool:
    return bool(getattr(llm_handler, "llm_initialized", False))


D = LM_HELPER_DEFAULTS


def understand_music(llm_handler, audio_codes: str, temperature: float = D.temperature, top_k: Optional[int] = D.top_k,
                     top_p: Optional[float] = D.top_p, repetition_penalty: float = D.repetition_penalty,
                     use_constrained_decoding: bool = D.use_constrained_decoding,
                     constrained_decoding_debug: bool = D.constrained_decoding_debug, seed: Optional[int] = None,
                     cancel: Optional[Cancellation] = None) -> UnderstandResult:
    """Audio codes → caption, lyrics and metadata (blank codes: the LM invents a sample)."""
    if not _ready(llm_handler):
        return UnderstandResult(status_message=_NOT_INITIALIZED, success=False, error="LLM not initialized")
    try:
        metadata = understand_metadata(llm_handler, audio_codes, temperature, top_k, top_p, repetition_penalty,
                                       use_constrained_decoding, seed, cancel)
    except Exception as exc:  # the seed API reports failures in the result
        logger.warning("understand_music failed: %s", exc)
        return UnderstandResult(status_message=f"Error: {exc}", success=False, error=str(exc))
    return UnderstandResult(**_common_fields(metadata), status_message="Understanding completed successfully")


def understand_metadata(llm_handler, audio_codes: str, temperature: float = D.temperature,
                        top_k: Optional[int] = D.top_k, top_p: Optional[float] = D.top_p,
                        repetition_penalty: float = D.repetition_penalty,
                        use_constrained_decoding: bool = D.use_constrained_decoding, seed: Optional[int] = None,
                        cancel: Optional[Cancellation] = None) -> Dict[str, Any]:
    """``understand_music``'s metadata as the LM wrote it (genres included, lyrics under ``lyrics``),
    for callers that report the raw fields; raises instead of returning ``success=False``."""
    if not _ready(llm_handler):
        raise RuntimeError(_NOT_INITIALIZED)
    sampling, seed = _sampling_and_seed(temperature, top_k, top_p, repetition_penalty, seed)
    return modes.understand(llm_handler, audio_codes, sampling, seed, use_constrained_decoding, cancel)


def create_sample(llm_handler, query: str, instrumental: bool = False, vocal_language: Optional[str] = None,
                  temperature: float = D.temperature, top_k: Optional[int] = D.top_k, top_p: Optional[float] = D.top_p,
                  repetition_penalty: float = D.repetition_penalty,
                  use_constrained_decoding: bool = D.use_constrained_decoding,
                  constrained_decoding_debug: bool = D.constrained_decoding_debug, seed: Optional[int] = None,
                  cancel: Optional[Cancellation] = None) -> CreateSampleResult:
    """A description → a full sample (caption, lyrics, metadata) — "simple mode"."""
    if not _ready(llm_handler):
        return CreateSampleResult(status_message=_NOT_INITIALIZED, success=False, error="LLM not initialized")
    try:
        sampling, seed = _sampling_and_seed(temperature, top_k, top_p, repetition_penalty, seed)
        metadata = modes.create_sample(llm_handler, query, instrumental, vocal_language, sampling, seed,
                                       use_constrained_decoding, cancel)
    except Exception as exc:
        logger.warning("create_sample failed: %s", exc)
        return CreateSampleResult(status_message=f"Error: {exc}", success=False, error=str(exc))
    return CreateSampleResult(**_common_fields(metadata), instrumental=bool(metadata.get("instrumental", instrumental)),
                              status_message="Sample created successfully")


def format_sample(llm_handler, caption: str, lyrics: str, user_metadata: Optional[Dict[str, Any]] = None,
                  temperature: float = D.temperature, top_k: Optional[int] = D.top_k, top_p: Optional[float] = D.top_p,
                  repetition_penalty: float = D.repetition_penalty,
                  use_constrained_decoding: bool = D.use_constrained_decoding,
                  constrained_decoding_debug: bool = D.constrained_decoding_debug, seed: Optional[int] = None,
                  cancel: Optional[Cancellation] = None) -> FormatSampleResult:
    """Caption + lyrics → enhanced caption, formatted lyrics and metadata (user values kept)."""
    if not _ready(llm_handler):
        return FormatSampleResult(status_message=_NOT_INITIALIZED, success=False, error="LLM not initialized")
    try:
        sampling, seed = _sampling_and_seed(temperature, top_k, top_p, repetition_penalty, seed)
        metadata = modes.format_sample(llm_handler, caption, lyrics, user_metadata, sampling, seed,
                                       use_constrained_decoding, cancel)
    except Exception as exc:
        logger.warning("format_sample failed: %s", exc)
        return FormatSampleResult(status_message=f"Error: {exc}", success=False, error=str(exc))
    return FormatSampleResult(**_common_fields(metadata), status_message="Format completed successfully")
