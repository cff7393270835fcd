"""understand / create_sample / format_sample generations (upstream ``understand_audio_from_codes``,
``create_sample_from_query``, ``format_sample_from_input``): one request each, constrained in the
``understand`` phase (CoT with genres, then free-text lyrics), no CFG, no duration target."""

from __future__ import annotations

from typing import Any, Dict, Optional

from acestep.lm import prompts as P
from acestep.lm.fsm import FsmSpec
from acestep.lm.parsing import extract_lyrics, parse_lm_output
from acestep.lm.planner import LMContext, token_budget
from acestep.lm.request import Cancellation, LMRequest, SamplingConfig


def _run(lm: LMContext, prompt: str, sampling: SamplingConfig, seed: int, constrained: bool,
         user_metadata: Optional[Dict[str, Any]] = None, skip_language: bool = False,
         cancel: Optional[Cancellation] = None) -> str:
    ids = lm.tokenize(prompt)
    spec = FsmSpec(phase="understand", skip_genres=False, skip_language=skip_language,
                   user_metadata=user_metadata or None)
    request = LMRequest(ids, sampling, seed, token_budget(None, len(ids), lm.max_model_len),
                        fsm=spec if constrained else None)
    future = lm.submit(request)
    text = lm.decode((cancel.track(future) if cancel is not None else future).result())
    if not text:
        raise RuntimeError("the LM produced no output")
    return text


def _metadata_and_lyrics(text: str) -> tuple[Dict[str, Any], str]:
    metadata, _ = parse_lm_output(text)
    if not metadata:
        raise RuntimeError(f"the LM output holds no metadata (output: {text[:200]!r})")
    return metadata, extract_lyrics(text)


def understand(lm: LMContext, audio_codes: str, sampling: SamplingConfig, seed: int, constrained: bool = True,
               cancel: Optional[Cancellation] = None) -> Dict[str, Any]:
    """Codes → metadata + lyrics (blank codes → ``NO USER INPUT``: the LM invents a sample)."""
    text = _run(lm, P.understand_prompt(lm.render, audio_codes), sampling, seed, constrained, cancel=cancel)
    metadata, lyrics = _metadata_and_lyrics(text)
    if lyrics:
        metadata["lyrics"] = lyrics
    return metadata


def create_sample(lm: LMContext, query: str, instrumental: bool, vocal_language: Optional[str],
                  sampling: SamplingConfig, seed: int, constrained: bool = True,
                  cancel: Optional[Cancellation] = None) -> Dict[str, Any]:
    """Query → caption, metadata, lyrics; a given language (not ``unknown``) is injected."""
    language = (vocal_language or "").strip()
    user = {"language": language} if language and language.lower() != "unknown" else None
    text = _run(lm, P.create_sample_prompt(lm.render, query, instrumental), sampling, seed, constrained, user,
                cancel=cancel)
    metadata, lyrics = _metadata_and_lyrics(text)
    if lyrics:
        metadata["lyrics"] = lyrics
    elif instrumental:
        metadata["lyrics"] = "[Instrumental]"
    metadata["instrumental"] = instrumental
    return metadata


def _format_constraints(user_metadata: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """bpm / duration (int > 0), keyscale, timesignature, language (truthy), as upstream."""
    out: Dict[str, Any] = {}
    for key in ("bpm", "duration"):
        try:
            value = int((user_metadata or {}).get(key))
            if value > 0:
                out[key] = value
        except (TypeError, ValueError):
            pass
    for key in ("keyscale", "timesignature", "language"):
        if (user_metadata or {}).get(key):
            out[key] = user_metadata[key]
    return out or None


def format_sample(lm: LMContext, caption: str, lyrics: str, user_metadata: Optional[Dict[str, Any]],
                  sampling: SamplingConfig, seed: int, constrained: bool = True,
                  cancel: Optional[Cancellation] = None) -> Dict[str, Any]:
    """Caption + lyrics → enhanced caption, metadata, formatted lyrics (input lyrics if none).

    A given language is not injected: its line is skipped (upstream sets ``skip_language``)."""
    constraints = _format_constraints(user_metadata)
    skip_language = bool(constraints and constraints.get("language") is not None)
    text = _run(lm, P.format_sample_prompt(lm.render, caption, lyrics), sampling, seed, constrained,
                constraints, skip_language, cancel)
    metadata, formatted = _metadata_and_lyrics(text)
    metadata["lyrics"] = formatted or (lyrics if lyrics and lyrics.strip() else "[Instrumental]")
    return metadata
