"""Output parsing as upstream (plus the B2 fix) and the demo checkpoint's layout."""

from __future__ import annotations

import json

from acestep.checkpoints.demo_lm import qwen3_chat_template
from acestep.checkpoints.demo_tokenizer import build_qwen_tokenizer
from acestep.lm.parsing import extract_lyrics, parse_lm_output

COT = ("<think>\nbpm: 120\ncaption: A calm piano piece with soft strings that slowly builds into an emotional\n"
       "  climax over a steady pulse.\nduration: 180\ngenres: ambient\nkeyscale: C major\nlanguage: 'no'\n"
       "timesignature: 4\n<|im_end|>")


def test_parse_phase1_output():
    meta, codes = parse_lm_output(COT)
    assert codes == ""
    assert meta == {"bpm": 120, "caption": "A calm piano piece with soft strings that slowly builds into an "
                                          "emotional climax over a steady pulse.", "duration": 180,
                    "genres": "ambient", "keyscale": "C major", "language": "'no'", "vocal_language": "'no'",
                    "timesignature": "4"}


def test_parse_codes_and_lyrics():
    text = "<think>\nbpm: 90\n</think>\n\n<|audio_code_1|><|audio_code_22|>x<|audio_code_3|><|im_end|>"
    meta, codes = parse_lm_output(text)
    assert meta == {"bpm": 90} and codes == "<|audio_code_1|><|audio_code_22|><|audio_code_3|>"
    assert extract_lyrics("<think>\nbpm: 90\n</think>\n# Lyric\n[Verse]\nla la\n<|im_end|>") == "[Verse]\nla la"
    assert extract_lyrics("<think>\n</think>\n# Lyrics\nla") == "# Lyrics\nla"  # upstream regex quirk
    assert extract_lyrics("no think tag") == ""


def test_demo_lm_layout(lm_dir, tokenizer):
    names = {p.name for p in lm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    config = json.loads((lm_dir / "config.json").read_text())
    for key in ("architectures", "head_dim", "max_position_embeddings", "num_key_value_heads", "rope_theta",
                "rms_norm_eps", "tie_word_embeddings", "torch_dtype", "vocab_size"):
        assert key in config
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["num_hidden_layers"] == 2
    assert (lm_dir / "chat_template.jinja").read_text() == qwen3_chat_template()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert config["vocab_size"] == len(tokenizer)
    assert len(tokenizer.encode("<|audio_code_65534|><think></think>", add_special_tokens=False)) == 3


def test_text_encoder_tokenizer_still_appends_eos():
    tok = build_qwen_tokenizer(append_eos=True)
    ids = tok.encode("hello").ids
    assert ids[-1] == tok.token_to_id("<|endoftext|>")
