"""Full-size (or tiny) models with random weights, built from the real configs shipped in the
package: timings do not depend on weight values, and nothing is downloaded."""

from __future__ import annotations

import torch

from acestep.checkpoints.demo import real_config, tiny_dit_config, TINY_TEXT_ENCODER_OVERRIDES, TINY_VAE_OVERRIDES
from acestep.checkpoints.loader import build_dit_modules
from acestep.dit import vae as vae_ops


def randomize_(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Meta-built module → real storage on ``device`` with small random weights."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)
    return module.to(dtype).eval().requires_grad_(False)


def dit_config(tiny: bool, variant: str = "turbo") -> dict:
    return tiny_dit_config(variant) if tiny else real_config(f"acestep-v15-{variant}")


def build_dit(tiny: bool, device, dtype, variant: str = "turbo"):
    modules = build_dit_modules(dit_config(tiny, variant), device="meta")
    built = {name: randomize_(m, device, dtype) for name, m in modules.items()}
    fsq_twin = build_dit_modules(dit_config(True, variant), device="cpu")["audio_tokenizer"].quantizer
    for name, buffer in fsq_twin.named_buffers(recurse=False):
        built["audio_tokenizer"].quantizer.register_buffer(name, buffer.to(device), persistent=False)
    return built


def build_vae(tiny: bool, device, dtype):
    from diffusers import AutoencoderOobleck

    config = {**real_config("vae"), **(TINY_VAE_OVERRIDES if tiny else {})}
    if tiny:
        config["decoder_input_channels"] = dit_config(True)["audio_acoustic_hidden_dim"]
    with torch.device("meta"):
        vae = AutoencoderOobleck.from_config(config)
    vae = randomize_(vae, device, dtype)
    vae_ops.use_inplace_snakes(vae)  # as the checkpoint loader does
    return vae


def build_text_encoder(tiny: bool, device, dtype):
    from transformers import Qwen3Config, Qwen3Model

    config = real_config("Qwen3-Embedding-0.6B")
    if tiny:
        config = {**config, **TINY_TEXT_ENCODER_OVERRIDES, "vocab_size": 1024}
    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**config))
    return randomize_(model, device, dtype)


def build_lm(name: str, tiny: bool, device, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = real_config(name)
    if tiny:
        config = {**config, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 4096}
    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    model = randomize_(model, device, dtype)
    model.tie_weights()
    return model
