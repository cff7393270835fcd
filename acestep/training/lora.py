"""Trainable adapters on the DiT (peft LoRA or LoKr) and saving them in the official PEFT layout.

The official trainer wraps the decoder (official module names: ``layers.N.self_attn.q_proj``) in
peft and saves ``adapter_config.json`` + ``adapter_model.safetensors`` with tensors named
``base_model.model.layers.N.self_attn.q_proj.lora_A.weight``. We train on diffusers' transformer
(``to_q``, ``to_out.0``...) and write the same files under the official names, so our loader
(``acestep.dit.adapters``), ``dit.adapters.dir`` and upstream's ``load_lora`` (peft's
``PeftModel.from_pretrained`` on its decoder) all read them. LoKr is peft's ``LOKR`` in the same
layout (upstream's own trainer writes LyCORIS's ``lokr_weights.safetensors``, which upstream also loads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors.torch import save_file

from acestep.checkpoints.mapping import unmap_name
from acestep.dit.adapters import PEFT_WEIGHTS

ADAPTER_KINDS = ("lora", "lokr")
ATTENTION_TYPES = ("both", "self", "cross")
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # upstream's default: every attention projection
_TO_DIFFUSERS = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0"}
ADAPTER_NAME = "default"
_ADAPTER_MARKERS = (".lora_", ".lokr_")


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter to train (defaults: upstream's trainer's)."""

    kind: str = "lora"  # "lora" (peft LoRA) or "lokr" (peft LoKr)
    rank: int = 64  # LoRA rank; LoKr's linear dimension
    alpha: float = 128.0  # scaling numerator: the update is scaled by alpha / rank
    dropout: float = 0.1  # LoRA dropout (LoKr: none)
    target_modules: Tuple[str, ...] = OFFICIAL_TARGETS  # official module names
    attention: str = "both"  # which attention the targets sit in: "self", "cross" or "both"
    lokr_factor: int = -1  # LoKr's Kronecker factor (-1: chosen by peft from the shape)
    lokr_decompose_both: bool = False  # LoKr: factor the second Kronecker factor too

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind: {self.kind!r} is not one of {ADAPTER_KINDS}")
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention: {self.attention!r} is not one of {ATTENTION_TYPES}")
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"rank must be >= 1 (got {self.rank}), alpha > 0 (got {self.alpha}), "
                             f"dropout in [0, 1) (got {self.dropout})")

    def official_targets(self) -> List[str]:
        """The targets as the official config names them (upstream's ``resolve_target_modules``)."""
        if self.attention == "both":
            return list(self.target_modules)
        prefix = f"{self.attention}_attn"
        return [t if "." in t else f"{prefix}.{t}" for t in self.target_modules]

    def diffusers_targets(self) -> List[str]:
        return [".".join(_TO_DIFFUSERS.get(part, part) for part in t.split(".")) for t in self.official_targets()]

    def peft_config(self, targets: List[str], **extra):
        if self.kind == "lokr":
            from peft import LoKrConfig

            return LoKrConfig(r=self.rank, alpha=self.alpha, target_modules=targets, decompose_factor=self.lokr_factor,
                              decompose_both=self.lokr_decompose_both, rank_dropout=0.0, module_dropout=0.0, **extra)
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          bias="none", **extra)


def inject(transformer: torch.nn.Module, spec: AdapterSpec) -> List[Tuple[str, torch.nn.Parameter]]:
    """Add the adapter (fresh: LoRA's B and LoKr's second factor start at zero, so the model is
    unchanged until it trains) and freeze everything else. Returns the trainable parameters, in
    module order (the order every worker and every checkpoint uses)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(spec.peft_config(spec.diffusers_targets()), transformer, adapter_name=ADAPTER_NAME)
    trainable = []
    for name, parameter in transformer.named_parameters():
        parameter.requires_grad_(any(marker in name for marker in _ADAPTER_MARKERS))
        if parameter.requires_grad:
            trainable.append((name, parameter))
    if not trainable:
        raise ValueError(f"target_modules {spec.official_targets()} match no module of this DiT")
    return trainable


def _official_key(key: str) -> str:
    """``layers.0.self_attn.to_out.0.lora_A.weight`` →
    ``base_model.model.layers.0.self_attn.o_proj.lora_A.weight``."""
    cut = min(i for i in (key.find(m) for m in _ADAPTER_MARKERS) if i >= 0)
    module, rest = key[:cut], key[cut:]
    official = unmap_name("transformer", f"{module}.weight").removeprefix("decoder.").removesuffix(".weight")
    return f"base_model.model.{official}{rest}"


def adapter_tensors(transformer: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under the official PEFT names (fp32, CPU)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {_official_key(k): v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_official(transformer: torch.nn.Module, spec: AdapterSpec, folder: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``README.md``) as upstream's
    trainer does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config(spec.official_targets(), task_type="FEATURE_EXTRACTION", inference_mode=True)
    config.save_pretrained(str(folder))
    save_file(adapter_tensors(transformer), str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / "README.md").write_text(_model_card(spec))
    return folder


def _model_card(spec: AdapterSpec) -> str:
    """A short card where peft's ``save_pretrained`` writes its own (the same three files)."""
    return (f"# ACE-Step DiT {spec.kind.upper()} adapter\n\nRank {spec.rank}, alpha {spec.alpha:g}, targets "
            f"{', '.join(spec.official_targets())}. Load it with `load_lora(<this folder>)`, or put it in the "
            "server's `dit.adapters.dir`.\n")
