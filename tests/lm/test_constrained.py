"""Constrained decoding makes the random demo LM emit valid CoT and codes."""

from __future__ import annotations

import re

import pytest

from acestep.lm import constants as C
from acestep.lm import planner
from acestep.lm.request import LMRequest, SamplingConfig
from acestep.lm.fsm import FsmSpec
from acestep.lm.parsing import count_codes, parse_lm_output
from acestep.params import GenerationConfig, GenerationParams

TS = {"2", "3", "4", "6"}


def assert_valid_cot(meta, max_duration):
    assert isinstance(meta["bpm"], int) and C.BPM_MIN <= meta["bpm"] <= C.BPM_MAX
    assert isinstance(meta["caption"], str) and meta["caption"].strip()
    assert isinstance(meta["duration"], int) and C.DURATION_MIN <= meta["duration"] <= max_duration
    assert meta["keyscale"] in C.VALID_KEYSCALES
    assert meta["language"] in C.VALID_LANGUAGES and meta["vocal_language"] == meta["language"]
    assert meta["timesignature"] in TS


@pytest.fixture(scope="module")
def fifty_cots(lm_handler):
    params = GenerationParams(caption="upbeat electronic dance music", lyrics="[Verse]\nWalking down the street")
    requests = [planner.cot_request(lm_handler, params, {}, seed) for seed in range(50)]
    assert all(r.sampling.cfg_scale == 2.0 and r.uncond_ids for r in requests)  # defaults: CFG on
    futures = [lm_handler.submit(r) for r in requests]  # 50 CoTs decode together in the engine
    return [lm_handler.decode(f.result()) for f in futures]


def test_fifty_seeds_phase1_parses_in_range(fifty_cots, lm_handler):
    assert lm_handler.max_duration == 180  # CPU tier, as upstream's gpu_config
    for text in fifty_cots:
        meta, codes = parse_lm_output(text)
        assert codes == ""
        assert_valid_cot(meta, lm_handler.max_duration)
    assert len({parse_lm_output(t)[0]["bpm"] for t in fifty_cots}) > 5  # seeds matter


def test_phase1_format_and_forced_stop(fifty_cots):
    pattern = re.compile(
        r"<think>\nbpm: \d+\ncaption: \S.*\nduration: \d+\nkeyscale: [^\n]+\nlanguage: [a-z]+\n"
        r"timesignature: [2346]\n<\|im_end\|>", re.DOTALL)
    for text in fifty_cots:
        assert pattern.fullmatch(text), text[:200]
        assert "</think>" not in text  # EOS is forced where </think> would start


def test_phase1_caption_lines_are_yaml_continuations(fifty_cots):
    for text in fifty_cots:
        caption_block = text.split("\ncaption:", 1)[1].split("\nduration:", 1)[0]
        for line in caption_block.split("\n")[1:]:
            assert line[:1] in (" ", "\t"), repr(line)


def _codes_request(lm_handler, seed, duration, cfg_scale=2.0):
    params = GenerationParams(caption="calm piano", lyrics="[Verse]\nhello", lm_cfg_scale=cfg_scale)
    meta = {"bpm": 90, "caption": "calm piano", "duration": duration, "keyscale": "C major",
            "language": "en", "timesignature": "4"}
    return planner.codes_request(lm_handler, params, meta, float(duration), seed)


@pytest.mark.parametrize("duration", [10, 13])
def test_phase2_only_codes_and_exact_count(lm_handler, runner, tables, duration):
    requests = [_codes_request(lm_handler, seed, duration) for seed in range(3)]
    assert requests[0].fsm.target_codes == duration * 5
    valid = set(tables.code_ids.tolist())
    for ids in runner.generate(requests):
        assert len(ids) == duration * 5 + 1 and ids[-1] == tables.eos_id
        assert set(ids[:-1]) <= valid
        text = lm_handler.decode(ids)
        assert count_codes(parse_lm_output(text)[1]) == duration * 5
        assert re.fullmatch(r"(<\|audio_code_\d+\|>)+<\|im_end\|>", text)


def test_codes_never_use_invalid_code_tokens(tables):
    ids = tables.sets["codes_only"].tolist()
    assert len(ids) == 64000 and ids == sorted(tables.code_ids.tolist())
    invalid = set(tables.sets["any_code"].tolist()) - set(ids)
    assert len(invalid) == 65535 - 64000


def test_user_metadata_is_injected_verbatim(lm_handler):
    params = GenerationParams(caption="jazz", bpm=128, keyscale=" C Major ", timesignature="4/4", thinking=False)
    plans = lm_handler.plan(params, GenerationConfig(batch_size=2, allow_lm_batch=True), [3, 4])
    for plan in plans:
        assert plan.metadata["bpm"] == 128
        assert plan.metadata["keyscale"] == "C Major"  # not validated, as upstream
        assert plan.metadata["timesignature"] == "4/4"
        assert C.DURATION_MIN <= plan.metadata["duration"] <= lm_handler.max_duration
        assert plan.phase1_time > 0 and plan.audio_codes == ""


def test_use_cot_caption_and_language_skip_fields(lm_handler):
    params = GenerationParams(caption="jazz", use_cot_caption=False, use_cot_language=False, thinking=False)
    (plan,) = lm_handler.plan(params, GenerationConfig(batch_size=1), [11])
    assert set(plan.metadata) == {"bpm", "duration", "keyscale", "timesignature"}


def test_understand_phase_emits_genres_then_lyrics(lm_handler, runner):
    ids = lm_handler.tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    spec = FsmSpec(phase="understand", skip_genres=False, user_metadata={"language": "bn"})
    request = LMRequest(ids, SamplingConfig(), seed=5, max_new_tokens=1500, fsm=spec)
    text = lm_handler.decode(runner.generate([request])[0])
    head = text.split("</think>")[0]
    assert re.fullmatch(r"<think>\nbpm: \d+\ncaption: .*\nduration: \d+\ngenres: [^\n]+\nkeyscale: [^\n]+\n"
                        r"language: bn\ntimesignature: [2346]\n", head, re.DOTALL), head
    assert "<|audio_code_" not in text
