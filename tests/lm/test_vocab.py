"""Token tables: ids looked up by string, forced strings, and value tries that spell exactly the
allowed values (bpm 30–300, duration 10–max, 70 keyscales, 51 languages, time signatures 2/3/4/6)."""

from __future__ import annotations

import pytest

from acestep.lm import constants as C
from acestep.lm.fsm import FsmSpec, compile_program


def _complete_values(trie, newline_id, decode):
    out, stack = set(), [()]
    while stack:
        prefix = stack.pop()
        for nxt in trie[prefix].tolist():
            if nxt == newline_id:
                out.add(decode(list(prefix)).strip())
            else:
                stack.append(prefix + (nxt,))
    return out


def test_ids_come_from_the_tokenizer(tables, tokenizer):
    assert int(tables.code_ids[0]) == tokenizer.convert_tokens_to_ids("<|audio_code_0|>") != 151669
    assert tables.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tables.think_end_id == tokenizer.convert_tokens_to_ids("</think>")
    assert tokenizer.decode([tables.newline_id]) == "\n"


@pytest.mark.parametrize("text", ["<think>", "\n", "bpm:", "caption:", "genres:", "timesignature:", "</think>"])
def test_forced_strings_spell_their_text(tables, tokenizer, text):
    assert tokenizer.decode(list(tables.fixed[text])) == text


def test_tries_spell_exactly_the_valid_values(tables, tokenizer, lm_handler):
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    values = {name: _complete_values(trie, tables.newline_id, decode) for name, trie in tables.tries.items()}
    assert values["bpm"] == {str(v) for v in range(C.BPM_MIN, C.BPM_MAX + 1)}
    assert values["duration"] == {str(v) for v in range(C.DURATION_MIN, lm_handler.max_duration + 1)}
    assert values["keyscale"] == set(C.VALID_KEYSCALES) and len(C.VALID_KEYSCALES) == 70
    assert values["language"] == set(C.VALID_LANGUAGES) and len(C.VALID_LANGUAGES) == 51
    assert values["timesignature"] == {"2", "3", "4", "6"}


def test_program_field_order_and_skips(tables, tokenizer):
    encode = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    names = lambda spec: [tokenizer.decode(list(op.tokens)) for op in compile_program(spec, tables, encode)  # noqa: E731
                          if op.kind == "force"]
    assert names(FsmSpec(phase="cot", stop_at_reasoning=True)) == [
        "<think>", "\n", "bpm:", "caption:", "duration:", "keyscale:", "language:", "timesignature:"]
    understand = names(FsmSpec(phase="understand", skip_genres=False, skip_language=True,
                               user_metadata={"bpm": 95}))
    assert understand == ["<think>", "\n", "bpm:", " 95\n", "caption:", "duration:", "genres:", "keyscale:",
                          "timesignature:", "</think>"]
    codes = compile_program(FsmSpec(phase="codes", target_codes=50), tables, encode)
    assert [(op.kind, op.limit) for op in codes] == [("codes", 50)]
    with pytest.raises(ValueError):
        FsmSpec(phase="lyrics")


def test_unconstrained_decoding_is_plain_sampling_and_fails_loudly(lm_handler, monkeypatch):
    from acestep.params import GenerationConfig, GenerationParams

    monkeypatch.setattr(lm_handler, "max_model_len", 200)
    params = GenerationParams(caption="x", use_constrained_decoding=False, thinking=False)
    with pytest.raises(RuntimeError, match="no metadata"):
        lm_handler.plan(params, GenerationConfig(batch_size=1), [1])
