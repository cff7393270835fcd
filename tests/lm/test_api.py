"""understand_music / create_sample / format_sample return the seed's result classes."""

from __future__ import annotations

from acestep.lm import constants as C
from acestep.lm.api import create_sample, format_sample, understand_music
from acestep.llm_inference import LLMHandler
from acestep.params import CreateSampleResult, FormatSampleResult, UnderstandResult

TS = {"2", "3", "4", "6"}


def _assert_fields(result, max_duration):
    assert result.success and result.error is None
    assert C.BPM_MIN <= result.bpm <= C.BPM_MAX
    assert isinstance(result.duration, float) and C.DURATION_MIN <= result.duration <= max_duration
    assert result.keyscale in C.VALID_KEYSCALES and result.timesignature in TS
    assert result.caption.strip() and isinstance(result.lyrics, str)


def test_understand_music(lm_handler):
    codes = "".join(f"<|audio_code_{i}|>" for i in (5, 63999, 120, 7))
    result = understand_music(lm_handler, codes, temperature=0.85, seed=1)
    assert isinstance(result, UnderstandResult)
    _assert_fields(result, lm_handler.max_duration)
    assert result.language in C.VALID_LANGUAGES
    assert "<|audio_code_" not in result.lyrics and "<|im_end|>" not in result.lyrics
    again = understand_music(lm_handler, codes, temperature=0.85, seed=1)
    assert (again.caption, again.lyrics, again.bpm) == (result.caption, result.lyrics, result.bpm)


def test_create_sample_injects_language(lm_handler):
    result = create_sample(lm_handler, "a soft Bengali love song", vocal_language="bn", seed=2)
    assert isinstance(result, CreateSampleResult)
    _assert_fields(result, lm_handler.max_duration)
    assert result.language == "bn" and result.instrumental is False
    instrumental = create_sample(lm_handler, "", instrumental=True, vocal_language="unknown", seed=3)
    assert instrumental.success and instrumental.instrumental is True
    assert instrumental.language in C.VALID_LANGUAGES and instrumental.lyrics


def test_format_sample_keeps_user_values(lm_handler):
    result = format_sample(lm_handler, "Latin pop", "[Verse 1]\nBailando",
                           user_metadata={"bpm": 95, "duration": 42, "keyscale": "A minor", "language": "es"}, seed=4)
    assert isinstance(result, FormatSampleResult)
    _assert_fields(result, lm_handler.max_duration)
    assert (result.bpm, result.duration, result.keyscale) == (95, 42.0, "A minor")
    assert result.language == ""  # a given language skips the CoT line, as upstream


def test_uninitialized_handler_reports_failure():
    handler = LLMHandler()
    for result in (understand_music(handler, ""), create_sample(handler, "x"), format_sample(handler, "a", "b")):
        assert result.success is False and "not initialized" in result.error


def test_results_fit_generation_params_limits():
    from acestep.lm.api import _common_fields
    from acestep.params import MAX_CAPTION_CHARS, MAX_LYRICS_CHARS

    fields = _common_fields({"caption": "x" * 900, "lyrics": "y" * 5000, "bpm": "N/A"})
    assert len(fields["caption"]) == MAX_CAPTION_CHARS and len(fields["lyrics"]) == MAX_LYRICS_CHARS
    assert fields["bpm"] is None
