"""A tiny random DiT LoRA in the official trainer's PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``, original module names), or in diffusers' single-file layout, for
tests and demos. ``lora_B`` is random, not zero, so the adapter changes the output as a trained one
does."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

from acestep.checkpoints.demo import tiny_dit_config
from acestep.checkpoints.loader import build_dit_modules

# The official trainer's default targets: the decoder attention projections (self and cross).
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_TO_OFFICIAL = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "o_proj"}
_ATTENTION = re.compile(r"^layers\.\d+\.(self_attn|cross_attn)\.(to_q|to_k|to_v|to_out\.0)$")


def _lora_tensors(variant: str, rank: int, seed: int, config: Optional[Dict] = None
                  ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers module path: (lora_A [r, in], lora_B [out, r])} for the DiT's attention (the
    tiny demo DiT of ``variant``, or the DiT of an official ``config``)."""
    transformer = build_dit_modules(config or tiny_dit_config(variant), device="meta")["transformer"]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in transformer.named_modules():
        if _ATTENTION.match(name):
            a = torch.randn(rank, module.in_features, generator=generator) * 0.2
            b = torch.randn(module.out_features, rank, generator=generator) * 0.2
            out[name] = (a, b)
    return out


def _official_name(path: str) -> str:
    """``layers.0.self_attn.to_out.0`` → ``base_model.model.layers.0.self_attn.o_proj`` (as PEFT saves it)."""
    head, _, tail = path.partition("_attn.")
    return f"base_model.model.{head}_attn.{_TO_OFFICIAL[tail]}"


def write_demo_lora(folder: str | Path, variant: str = "turbo", rank: int = 4, alpha: int = 8,
                    seed: int = 0, config: Optional[Dict] = None) -> Path:
    """An official-layout PEFT LoRA for the demo ``variant`` DiT (or the DiT of ``config``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for path, (a, b) in _lora_tensors(variant, rank, seed, config).items():
        name = _official_name(path)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.1, "target_modules": list(OFFICIAL_TARGETS), "bias": "none",
              "base_model_name_or_path": None, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_demo_lora_diffusers(file: str | Path, variant: str = "turbo", rank: int = 4, alpha: int = 8,
                              seed: int = 0) -> Path:
    """The same adapter as ``write_demo_lora`` (same seed) as one diffusers-format file."""
    from diffusers.loaders.lora_pipeline import AceStepLoraLoaderMixin

    file = Path(file)
    layers = {}
    for path, (a, b) in _lora_tensors(variant, rank, seed).items():
        layers[f"{path}.lora_A.weight"], layers[f"{path}.lora_B.weight"] = a.contiguous(), b.contiguous()
    targets = sorted({p.rsplit(".lora_", 1)[0] for p in layers})
    AceStepLoraLoaderMixin.save_lora_weights(
        str(file.parent), transformer_lora_layers=layers, weight_name=file.name,
        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": targets})
    return file
