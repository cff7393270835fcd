"""Prompts are byte-identical to the official ones (expected strings written out from the
upstream ACE-Step 1.5 prompt code), rendered through the checkpoint's chat template."""

from __future__ import annotations

import hashlib

import pytest

from acestep.checkpoints.demo_lm import qwen3_chat_template
from acestep.lm import prompts as P

SYS_LM = ("<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
          "<|im_end|>\n")
GEN = "<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["tokenizer", "jinja"])
def render(request, lm_handler):
    """Both renderers: the checkpoint tokenizer's apply_chat_template and the packaged template."""
    if request.param == "tokenizer":
        return lm_handler.render
    return P.template_renderer(qwen3_chat_template())


def test_packaged_template_is_the_stock_qwen3_one():
    data = qwen3_chat_template().encode("utf-8")
    assert len(data) == 4168
    assert hashlib.sha256(data).hexdigest().startswith("a55ee1b1") and hashlib.sha256(data).hexdigest().endswith("74d8")


def test_phase1_conditional(render):
    expected = ("<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:"
                "\n\n<|im_end|>\n<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\n[Verse]\nhello\n<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert P.cot_prompt(render, "calm piano", "[Verse]\nhello") == expected


def test_phase1_unconditional_drops_caption(render):
    expected = SYS_LM + "<|im_start|>user\n# Lyric\n[Verse]\nhello\n<|im_end|>\n" + GEN
    assert P.cot_uncond_prompt(render, "[Verse]\nhello", "NO USER INPUT") == expected
    assert P.cot_uncond_prompt(render, "[Verse]\nhello", "  ") == expected


def test_phase1_unconditional_with_negative_prompt(render):
    expected = SYS_LM + "<|im_start|>user\n# Caption\nharsh noise\n\n# Lyric\n[Verse]\nhello\n<|im_end|>\n" + GEN
    assert P.cot_uncond_prompt(render, "[Verse]\nhello", "harsh noise") == expected


def test_phase1_empty_inputs(render):
    expected = SYS_LM + "<|im_start|>user\n# Caption\n\n\n# Lyric\n\n<|im_end|>\n" + GEN
    assert P.cot_prompt(render, "", "") == expected


METADATA = {
    "bpm": 120,
    "caption": "Intro: soft piano, then a long build into a loud and emotional climax with strings and drums everywhere",
    "duration": 30,
    "genres": "pop",  # dropped from the phase-2 CoT, as upstream
    "keyscale": "F# minor",
    "language": "no",
    "timesignature": "4/4",
}
YAML_COT = ("<think>\nbpm: 120\ncaption: 'Intro: soft piano, then a long build into a loud and emotional climax with\n"
            "  strings and drums everywhere'\nduration: 30\nkeyscale: F# minor\nlanguage: 'no'\ntimesignature: 4\n"
            "</think>")


def test_cot_yaml_reserialisation():
    assert P.format_metadata_as_cot(METADATA) == YAML_COT
    # The reference's own example: plain scalar wrapped at 80 columns, 6/8 kept.
    assert P.format_metadata_as_cot({
        "bpm": 90, "caption": "A calm piano piece with soft strings that slowly builds into an emotional climax "
                              "over a steady pulse.", "duration": "180", "keyscale": "C major", "language": "en",
        "timesignature": "6/8"}) == (
        "<think>\nbpm: 90\ncaption: A calm piano piece with soft strings that slowly builds into an emotional\n"
        "  climax over a steady pulse.\nduration: 180\nkeyscale: C major\nlanguage: en\ntimesignature: 6/8\n</think>")
    assert P.format_metadata_as_cot({}) == "<think>\n\n</think>"


def test_phase2_conditional_closes_the_assistant_turn(render):
    expected = (SYS_LM + "<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\n[Verse]\nhello\n<|im_end|>\n"
                "<|im_start|>assistant\n<think>\nbpm: 120\ncaption: 'Intro: soft piano, then a long build into a loud "
                "and emotional climax with\n  strings and drums everywhere'\nduration: 30\nkeyscale: F# minor\n"
                "language: 'no'\ntimesignature: 4\n</think>\n\n<|im_end|>\n")
    assert P.codes_prompt(render, "calm piano", "[Verse]\nhello", YAML_COT) == expected


def test_phase2_unconditional_keeps_caption_and_empties_cot(render):
    expected = (SYS_LM + "<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\n[Verse]\nhello\n<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n<|im_end|>\n")
    assert P.codes_uncond_prompt(render, "calm piano", "[Verse]\nhello", "NO USER INPUT") == expected
    with_negative = expected.replace("# Caption\ncalm piano", "# Caption\nharsh noise")
    assert P.codes_uncond_prompt(render, "calm piano", "[Verse]\nhello", "harsh noise") == with_negative


def test_create_sample_prompt(render):
    expected = ("<|im_start|>system\n# Instruction\nExpand the user's input into a more detailed and specific musical "
                "description:\n\n<|im_end|>\n<|im_start|>user\na soft Bengali love song for a quiet evening\n\n"
                "instrumental: false<|im_end|>\n<|im_start|>assistant\n")
    assert P.create_sample_prompt(render, "a soft Bengali love song for a quiet evening", False) == expected
    blank = expected.replace("a soft Bengali love song for a quiet evening", "NO USER INPUT").replace("false", "true")
    assert P.create_sample_prompt(render, "   ", True) == blank


def test_format_sample_prompt(render):
    expected = ("<|im_start|>system\n# Instruction\nFormat the user's input into a more detailed and specific musical "
                "description:\n\n<|im_end|>\n<|im_start|>user\n# Caption\nLatin pop, reggaeton\n\n# Lyric\n"
                "[Verse 1]\nBailando<|im_end|>\n<|im_start|>assistant\n")
    assert P.format_sample_prompt(render, "Latin pop, reggaeton", "[Verse 1]\nBailando") == expected
    blanks = expected.replace("Latin pop, reggaeton", "NO USER INPUT").replace("[Verse 1]\nBailando", "[Instrumental]")
    assert P.format_sample_prompt(render, "", " ") == blanks


def test_understand_prompt(render):
    expected = ("<|im_start|>system\n# Instruction\nUnderstand the given musical conditions and describe the audio "
                "semantics accordingly:\n\n<|im_end|>\n<|im_start|>user\n<|audio_code_1|><|audio_code_63999|>"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert P.understand_prompt(render, "<|audio_code_1|><|audio_code_63999|>") == expected
    assert P.understand_prompt(render, "") == expected.replace("<|audio_code_1|><|audio_code_63999|>", "NO USER INPUT")


def test_codes_in_prompts_are_single_tokens(lm_handler, tables):
    ids = lm_handler.tokenize(P.understand_prompt(lm_handler.render, "<|audio_code_1|><|audio_code_63999|>"))
    assert int(tables.code_ids[1]) in ids and int(tables.code_ids[63999]) in ids
