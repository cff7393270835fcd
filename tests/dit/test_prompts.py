"""The DiT's text inputs, byte for byte as the official handler writes them."""

from __future__ import annotations

from acestep.dit.conditioning import TextCondition
from acestep.dit.tasks import TASK_INSTRUCTIONS, instruction_tracks, resolve_instruction


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
