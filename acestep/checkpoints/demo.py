"""``acestep demo-checkpoints DIR``: a complete tiny checkpoint set in the official layout.

Same files and config keys as the real checkpoints, tiny sizes and random weights, so every code
path (loading, name mapping, tokenizers, sampling, VAE) runs in seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import torch
from safetensors.torch import save_file

from acestep.checkpoints.demo_tokenizer import build_qwen_tokenizer, save_pretrained_tokenizer
from acestep.checkpoints.layout import TEXT_ENCODER_DIR, VAE_DIR
from acestep.checkpoints.loader import build_dit_modules
from acestep.checkpoints.mapping import unmap_name

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_TEXT_HIDDEN = 32

# Overrides of the real 2B config: same keys, tiny sizes. FSQ levels (64,000 codes), the 5-frame
# pooling and the 1920-sample hop stay real so codes, latents and audio lengths behave as in
# production; the latent width shrinks to 8 because the VAE encoder's width is twice it.
TINY_LATENT_CHANNELS = 8
TINY_DIT_OVERRIDES = {
    "audio_acoustic_hidden_dim": TINY_LATENT_CHANNELS, "timbre_hidden_dim": TINY_LATENT_CHANNELS,
    "in_channels": 3 * TINY_LATENT_CHANNELS,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "fsq_dim": 32, "text_hidden_dim": TINY_TEXT_HIDDEN,
    "num_lyric_encoder_hidden_layers": 2, "num_timbre_encoder_hidden_layers": 2,
    "num_attention_pooler_hidden_layers": 1, "num_audio_decoder_hidden_layers": 2, "sliding_window": 16,
    "layer_types": ["sliding_attention", "full_attention"], "dtype": "float32",
}
# XL on top of that: a DiT wider than its condition encoder (which keeps the 2B tiny widths, as
# the real XL keeps 2048), with a head count whose width differs from the hidden size, as in 4B.
TINY_XL_OVERRIDES = {
    "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 1,
    "encoder_hidden_size": TINY_DIT_OVERRIDES["hidden_size"],
    "encoder_intermediate_size": TINY_DIT_OVERRIDES["intermediate_size"],
    "encoder_num_attention_heads": TINY_DIT_OVERRIDES["num_attention_heads"],
    "encoder_num_key_value_heads": TINY_DIT_OVERRIDES["num_key_value_heads"],
}
DEMO_VARIANTS = ("turbo", "base")  # what write_demo_checkpoints writes unless told
TINY_VAE_OVERRIDES = {"encoder_hidden_size": 2 * TINY_LATENT_CHANNELS, "decoder_input_channels": TINY_LATENT_CHANNELS,
                      "channel_multiples": [1, 2, 2, 2, 2], "decoder_channels": 8}
TINY_TEXT_ENCODER_OVERRIDES = {
    "hidden_size": TINY_TEXT_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2, "max_window_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "torch_dtype": "float32",
}


# Seed offsets per DiT variant (turbo and base keep the ones they always had).
_VARIANT_SEEDS = {"turbo": 0, "base": 1, "sft": 5, "xl-turbo": 6, "xl-sft": 7, "xl-base": 8}


def real_config(name: str) -> Dict:
    """A real checkpoint config shipped with the package (``configs/<name>.json``)."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def tiny_dit_config(variant: str) -> Dict:
    """The real ``acestep-v15-<variant>`` config at tiny sizes (``xl-*`` variants keep the XL shape)."""
    xl = TINY_XL_OVERRIDES if variant.startswith("xl-") else {}
    return {**real_config(f"acestep-v15-{variant}"), **TINY_DIT_OVERRIDES, **xl}


def _silence_latent(channels: int, frames: int = 15000, seed: int = 0) -> torch.Tensor:
    """Like the real file: [1, C, 15000] fp32, 4 distinct head frames, then one constant frame."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(1, channels, 4, generator=generator) * 0.5
    body = (torch.randn(1, channels, 1, generator=generator) * 0.5).expand(1, channels, frames - 4)
    return torch.cat([head, body], dim=2).contiguous()


def write_dit_folder(folder: Path, variant: str, seed: int) -> Path:
    """acestep-v15-<variant>/: config.json, model.safetensors (official names), silence_latent.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_dit_config(variant)
    torch.manual_seed(seed)
    modules = build_dit_modules(config, device="cpu")
    state = {}
    for component, module in modules.items():
        for inner, tensor in module.state_dict().items():
            if (component, inner) == ("condition_encoder", "silence_latent"):
                continue
            state[unmap_name(component, inner)] = tensor.detach().clone().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(_silence_latent(config["audio_acoustic_hidden_dim"], seed=seed), folder / "silence_latent.pt")
    return folder


def write_vae_folder(folder: Path, seed: int) -> Path:
    from diffusers import AutoencoderOobleck

    torch.manual_seed(seed)
    config = {**real_config("vae"), **TINY_VAE_OVERRIDES}
    vae = AutoencoderOobleck.from_config(config)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_text_encoder_folder(folder: Path, seed: int) -> Path:
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen_tokenizer(append_eos=True)
    save_pretrained_tokenizer(tokenizer, folder, eos_token="<|im_end|>", chat_template=None, model_max_length=32768)
    config = {**real_config("Qwen3-Embedding-0.6B"), **TINY_TEXT_ENCODER_OVERRIDES,
              "vocab_size": tokenizer.get_vocab_size(), "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
              "eos_token_id": tokenizer.token_to_id("<|endoftext|>")}
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures",)}))
    model.config.architectures = ["Qwen3Model"]
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_demo_checkpoints(directory: str | Path, seed: int = 0, with_lm: bool = True,
                           variants: Sequence[str] = DEMO_VARIANTS) -> Path:
    """Write the whole tiny set under ``directory`` (the checkpoints root) and return it: one DiT
    folder per variant (turbo, base, sft, xl-turbo, xl-sft, xl-base), VAE, text encoder, 5 Hz LM."""
    unknown = [v for v in variants if v not in _VARIANT_SEEDS]
    if unknown:
        raise ValueError(f"variants={unknown}: expected some of {', '.join(_VARIANT_SEEDS)}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        write_dit_folder(root / f"acestep-v15-{variant}", variant, seed + _VARIANT_SEEDS[variant])
    write_vae_folder(root / VAE_DIR, seed + 2)
    write_text_encoder_folder(root / TEXT_ENCODER_DIR, seed + 3)
    if with_lm:
        from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME, write_demo_lm

        write_demo_lm(root / DEMO_LM_DIRNAME, seed=seed + 4)
    return root
