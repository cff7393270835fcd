"""The DiT's text inputs, byte for byte as the official handler writes them."""

from __future__ import annotations

from pathlib import Path

import torch

from acestep.dit.conditioning import TextCondition
from acestep.dit.tasks import TASK_INSTRUCTIONS, instruction_tracks, resolve_instruction
from acestep.params import GenerationParams


def test_caption_prompt_with_all_metas():
    cond = TextCondition(instruction="Fill the audio semantic mask based on the given conditions",
                         caption="calm piano", lyrics="[Verse]\nhello", language="en", bpm=120,
                         timesignature="4", keyscale="C major", duration_s=30.7)
    assert cond.caption_prompt() == (
        "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n"
        "# Caption\ncalm piano\n\n"
        "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n<|endoftext|>\n")
    assert cond.lyric_prompt() == "# Languages\nen\n\n# Lyric\n[Verse]\nhello<|endoftext|>"


def test_caption_prompt_missing_metas_are_na():
    cond = TextCondition(instruction="Repaint the mask area based on the given conditions:", caption="",
                         lyrics="", language="unknown", bpm=None, timesignature="", keyscale="n/a", duration_s=None)
    assert cond.caption_prompt().endswith(
        "# Metas\n- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n<|endoftext|>\n")


def test_task_instructions_are_the_official_ones():
    from diffusers.pipelines.ace_step.pipeline_ace_step import TASK_INSTRUCTIONS as OFFICIAL

    assert TASK_INSTRUCTIONS == OFFICIAL


def test_task_instructions():
    default = "Fill the audio semantic mask based on the given conditions:"
    assert resolve_instruction("text2music", default, has_codes=True) == (
        "Generate audio semantic tokens based on the given conditions:")
    assert resolve_instruction("repaint", default, False) == "Repaint the mask area based on the given conditions:"
    assert resolve_instruction("extract", default, False) == "Extract the track from the audio:"
    assert resolve_instruction("lego", "Generate the DRUMS track based on the audio context:", False).startswith(
        "Generate the DRUMS")
    assert instruction_tracks("complete", "Complete the input track with DRUMS | BASS:") == ["drums", "bass"]
    assert instruction_tracks("extract", "Extract the BACKING_VOCALS track from the audio:") == ["backing_vocals"]


def test_cover_nofsq_takes_covers_instruction():
    assert resolve_instruction("cover-nofsq", TASK_INSTRUCTIONS["text2music"], False) == TASK_INSTRUCTIONS["cover"]


def test_stems_caption_block_is_upstreams_byte_for_byte():
    """The SFT-stems checkpoint's prompt (Global/Local/Mask Control) against the text upstream's own
    _prepare_text_conditioning_inputs wrote (tests/fixtures/upstream/gen_repaint.py)."""
    stems = torch.load(Path(__file__).parents[1] / "fixtures" / "upstream" / "repaint.pt", weights_only=True)["stems"]
    metas = stems["metas"]
    for name in ("full_auto", "full_explicit", "segment"):
        case = stems[name]
        cond = TextCondition(instruction=case["instruction"], caption="clean funk guitar", lyrics="[Verse]\nla la",
                             language="en", global_caption="upbeat funk song, 96 bpm",
                             mask_control=case["mode"] == "explicit", **metas)
        assert cond.caption_prompt() + "\n\n" + cond.lyric_prompt() == case["text"], name


def test_global_caption_reaches_only_the_stems_checkpoints_prompt(turbo_handler):
    params = GenerationParams(caption="clean funk guitar", global_caption="upbeat funk song", duration=10)
    plain = turbo_handler.prepare([params], [1])[0].text
    assert "Global:" not in plain.caption_prompt() and "# Caption\nclean funk guitar\n" in plain.caption_prompt()
    transformer = turbo_handler.bundle.transformer
    original = transformer._internal_dict  # the shared handler's config, put back unchanged below
    transformer.register_to_config(is_lego_sft=True)  # as the SFT-stems checkpoint's config.json says
    try:
        stems = turbo_handler.prepare([params], [1])[0].text
    finally:
        transformer._internal_dict = original
    block = "# Caption\nGlobal: upbeat funk song\nLocal: clean funk guitar\nMask Control: false\n"
    assert block in stems.caption_prompt()
