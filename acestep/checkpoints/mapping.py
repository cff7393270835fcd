"""Official ACE-Step 1.5 DiT checkpoint names → diffusers' AceStep modules, as data.

The official ``model.safetensors`` holds one state dict for the whole
``AceStepConditionGenerationModel``. diffusers splits it into four modules; the names differ only
by a prefix per module and a few renames, so the mapping is a table of rules, applied in order.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Dict, List, Optional, Tuple

from diffusers import AceStepTransformer1DModel
from diffusers.pipelines.ace_step import (
    AceStepAudioTokenDetokenizer,
    AceStepAudioTokenizer,
    AceStepConditionEncoder,
)

from acestep.dit.xl import AceStepXLConditionEncoder

DIT_COMPONENTS = {
    "transformer": AceStepTransformer1DModel,
    "condition_encoder": AceStepConditionEncoder,
    "audio_tokenizer": AceStepAudioTokenizer,
    "audio_token_detokenizer": AceStepAudioTokenDetokenizer,
}

# XL configs give the condition encoder, tokenizer and detokenizer their own widths (the DiT is
# wider); these config keys replace the plain ones for every component but the transformer.
ENCODER_WIDTH_KEYS = {
    "hidden_size": "encoder_hidden_size",
    "intermediate_size": "encoder_intermediate_size",
    "num_attention_heads": "encoder_num_attention_heads",
    "num_key_value_heads": "encoder_num_key_value_heads",
}
# Classes a diffusers-layout component folder may name in its config.json's ``_class_name``.
KNOWN_CLASSES = {cls.__name__: cls for cls in (*DIT_COMPONENTS.values(), AceStepXLConditionEncoder)}


def is_xl(config: Dict[str, Any]) -> bool:
    """An XL (4B) DiT config: its condition encoder is narrower than the DiT."""
    return config.get("encoder_hidden_size", config["hidden_size"]) != config["hidden_size"]


def component_classes(config: Dict[str, Any]) -> Dict[str, type]:
    """The module class of each DiT component for an official config.json."""
    if not is_xl(config):
        return dict(DIT_COMPONENTS)
    return {**DIT_COMPONENTS, "condition_encoder": AceStepXLConditionEncoder}


# (official prefix, component, prefix inside the component). First match wins.
PREFIX_RULES: List[Tuple[str, str, str]] = [
    ("decoder.", "transformer", ""),
    ("encoder.", "condition_encoder", ""),
    ("null_condition_emb", "condition_encoder", "null_condition_emb"),
    ("tokenizer.", "audio_tokenizer", ""),
    ("detokenizer.", "audio_token_detokenizer", ""),
]

# Renames applied to the name inside the component (regex, replacement).
RENAME_RULES: List[Tuple[str, str]] = [
    (r"^proj_in\.1\.", "proj_in_conv."),  # official nn.Sequential(Lambda, Conv1d, Lambda)
    (r"^proj_out\.1\.", "proj_out_conv."),
    (r"(attn)\.q_proj\.", r"\1.to_q."),
    (r"(attn)\.k_proj\.", r"\1.to_k."),
    (r"(attn)\.v_proj\.", r"\1.to_v."),
    (r"(attn)\.o_proj\.", r"\1.to_out.0."),
    (r"(attn)\.q_norm\.", r"\1.norm_q."),
    (r"(attn)\.k_norm\.", r"\1.norm_k."),
]

# Module tensors that are not in model.safetensors, and where they come from instead.
EXTERNAL_TENSORS = {("condition_encoder", "silence_latent"): "silence_latent.pt"}


def map_official_name(name: str) -> Optional[Tuple[str, str]]:
    """Official tensor name → (component, name inside the component), or None if no rule applies."""
    for prefix, component, target_prefix in PREFIX_RULES:
        if name.startswith(prefix):
            inner = target_prefix + name[len(prefix):]
            for pattern, replacement in RENAME_RULES:
                inner = re.sub(pattern, replacement, inner)
            return component, inner
    return None


COMPONENT_PREFIX = {component: prefix for prefix, component, inner in PREFIX_RULES if not inner}
INVERSE_RENAME_RULES: List[Tuple[str, str]] = [
    (r"^proj_in_conv\.", "proj_in.1."),
    (r"^proj_out_conv\.", "proj_out.1."),
    (r"(attn)\.to_q\.", r"\1.q_proj."),
    (r"(attn)\.to_k\.", r"\1.k_proj."),
    (r"(attn)\.to_v\.", r"\1.v_proj."),
    (r"(attn)\.to_out\.0\.", r"\1.o_proj."),
    (r"(attn)\.norm_q\.", r"\1.q_norm."),
    (r"(attn)\.norm_k\.", r"\1.k_norm."),
]


def unmap_name(component: str, inner: str) -> str:
    """Inverse of ``map_official_name`` (used to write official-layout demo checkpoints)."""
    if component == "condition_encoder" and inner == "null_condition_emb":
        return inner
    for pattern, replacement in INVERSE_RENAME_RULES:
        inner = re.sub(pattern, replacement, inner)
    return COMPONENT_PREFIX[component] + inner


def component_kwargs(config: Dict[str, Any], component: str) -> Dict[str, Any]:
    """Constructor kwargs of one diffusers component from an official DiT config.json."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.hidden_act={config['hidden_act']!r}: only 'silu' is supported")
    if config.get("rope_scaling") is not None:
        raise ValueError(f"config.rope_scaling={config['rope_scaling']!r}: only null (default RoPE) is supported")
    if component != "transformer":
        config = {**config, **{key: config[wide] for key, wide in ENCODER_WIDTH_KEYS.items() if wide in config}}
    cls = DIT_COMPONENTS[component]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {key: value for key, value in config.items() if key in accepted}
    if "sliding_window" in accepted and not config.get("use_sliding_window", True):
        kwargs["sliding_window"] = None
    if component == "transformer":
        kwargs["is_turbo"] = bool(config.get("is_turbo", False))
        kwargs["model_version"] = config.get("model_version", "turbo" if kwargs["is_turbo"] else "base")
    return kwargs
