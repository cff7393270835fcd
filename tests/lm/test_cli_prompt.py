"""``acestep prompt MODE --input FILE.json [--checkpoint LM_DIR]`` (called through run_prompt)."""

from __future__ import annotations

import argparse
import json

import pytest

from acestep.lm.cli_prompt import MODES, add_prompt_parser, run_prompt

SYS = "<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n<|im_end|>\n"


def _run(tmp_path, capsys, mode, data, checkpoint=None):
    path = tmp_path / f"{mode}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert run_prompt(argparse.Namespace(mode=mode, input=str(path), checkpoint=checkpoint)) == 0
    return json.loads(capsys.readouterr().out)


def test_cot_prompts(tmp_path, capsys):
    out = _run(tmp_path, capsys, "cot", {"caption": "calm piano", "lyrics": "[Verse]\nhello"})
    assert out == {
        "prompt": SYS + "<|im_start|>user\n# Caption\ncalm piano\n\n# Lyric\n[Verse]\nhello\n<|im_end|>\n"
                        "<|im_start|>assistant\n",
        "uncond_prompt": SYS + "<|im_start|>user\n# Lyric\n[Verse]\nhello\n<|im_end|>\n<|im_start|>assistant\n",
    }


def test_codes_prompts_with_checkpoint_template(tmp_path, capsys, lm_dir):
    data = {"caption": "calm piano", "lyrics": "la", "lm_negative_prompt": "noise",
            "metadata": {"bpm": 120, "caption": "Soft: piano", "duration": 30, "keyscale": "C major",
                         "language": "en", "timesignature": "4/4"}}
    out = _run(tmp_path, capsys, "codes", data, checkpoint=str(lm_dir))
    user = "<|im_start|>user\n# Caption\n{}\n\n# Lyric\nla\n<|im_end|>\n"
    assert out["prompt"] == (SYS + user.format("calm piano") + "<|im_start|>assistant\n<think>\nbpm: 120\n"
                             "caption: 'Soft: piano'\nduration: 30\nkeyscale: C major\nlanguage: en\n"
                             "timesignature: 4\n</think>\n\n<|im_end|>\n")
    assert out["uncond_prompt"] == (SYS + user.format("noise") + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
                                    "<|im_end|>\n")


def test_codes_prompt_from_the_users_metas_is_the_one_the_pipeline_sends(tmp_path, capsys, lm_handler):
    from acestep.lm import planner
    from acestep.params import GenerationParams

    data = {"caption": "calm piano", "lyrics": "la", "bpm": 90, "keyscale": "D minor", "timesignature": "3",
            "duration": 20}
    out = _run(tmp_path, capsys, "codes", data, checkpoint=str(lm_handler.model_path))
    assert "<think>\nbpm: 90\nduration: 20\nkeyscale: D minor\ntimesignature: 3\n</think>" in out["prompt"]
    params = GenerationParams(**data)  # the pipeline skips phase 1 and re-serialises the user's values
    request = planner.codes_request(lm_handler, params, planner.user_metadata_from_params(params), 20.0, 1)
    assert lm_handler.tokenize(out["prompt"]) == request.prompt_ids
    assert lm_handler.tokenize(out["uncond_prompt"]) == request.uncond_ids
    with pytest.raises(ValueError, match="metadata"):
        _run(tmp_path, capsys, "codes", {"caption": "x", "bpm": 90})  # phase 1 would run: no CoT to show


@pytest.mark.parametrize("mode,data,needle", [
    ("create_sample", {"query": "sad song", "instrumental": True}, "<|im_start|>user\nsad song\n\ninstrumental: true"),
    ("format_sample", {"caption": "pop", "lyrics": ""}, "# Caption\npop\n\n# Lyric\n[Instrumental]<|im_end|>"),
    ("understand", {"audio_codes": "<|audio_code_3|>"}, "<|im_start|>user\n<|audio_code_3|><|im_end|>"),
])
def test_no_cfg_modes(tmp_path, capsys, mode, data, needle):
    out = _run(tmp_path, capsys, mode, data)
    assert needle in out["prompt"] and out["prompt"].endswith("<|im_start|>assistant\n")
    assert out["uncond_prompt"] is None


def test_parser_wiring(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="acestep")
    add_prompt_parser(parser.add_subparsers(dest="command"))
    path = tmp_path / "in.json"
    path.write_text("{}", encoding="utf-8")
    args = parser.parse_args(["prompt", "understand", "--input", str(path)])
    assert args.func is run_prompt and args.checkpoint is None and set(MODES) >= {args.mode}
    assert args.func(args) == 0
    assert "NO USER INPUT" in json.loads(capsys.readouterr().out)["prompt"]
    with pytest.raises(SystemExit):
        parser.parse_args(["prompt", "bogus", "--input", str(path)])
