"""A tiny random 5 Hz LM laid out like ``acestep-5Hz-lm-0.6B`` (no hub, a few seconds to write).

Folder: config.json (a Qwen3ForCausalLM config with the real checkpoint's keys), model.safetensors,
tokenizer.json + tokenizer_config.json (Qwen3 special tokens + 65,535 ``<|audio_code_N|>`` tokens,
eos ``<|im_end|>``, pad ``<|endoftext|>``) and chat_template.jinja (the stock Qwen3 template, the
one the official LM ships). Its outputs are random: constrained decoding is what makes them valid."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from acestep.checkpoints.demo_tokenizer import build_qwen_tokenizer, save_pretrained_tokenizer
from acestep.lm.constants import DEFAULT_LM_MODEL

DEMO_LM_DIRNAME = DEFAULT_LM_MODEL


def qwen3_chat_template() -> str:
    """The stock Qwen3 chat_template.jinja (4,168 bytes, sha256 a55ee1b1…74d8)."""
    return Path(__file__).with_name("qwen3_chat_template.jinja").read_text(encoding="utf-8")


def demo_lm_config(vocab_size: int, eos_id: int, pad_id: int) -> dict:
    """Real checkpoint keys (transformers 4.5x Qwen3 config.json), tiny dimensions."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 40960,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def _random_weights(config: dict, seed: int) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied, as in the real checkpoint
    return {k: v.contiguous().to(torch.bfloat16) for k, v in state.items()}


def write_demo_lm(directory: Path, seed: int = 0) -> Path:
    """Write the tiny LM into ``directory`` (created) and return it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(audio_codes=True)
    save_pretrained_tokenizer(tokenizer, directory, eos_token="<|im_end|>", chat_template=qwen3_chat_template())
    (directory / "chat_template.jinja").write_text(qwen3_chat_template(), encoding="utf-8")
    config = demo_lm_config(tokenizer.get_vocab_size(), tokenizer.token_to_id("<|im_end|>"),
                            tokenizer.token_to_id("<|endoftext|>"))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(_random_weights(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
