"""Strict loading of DiT-side checkpoints into diffusers modules, without trust_remote_code.

Modules are built on the ``meta`` device from the checkpoint's config, every tensor is mapped by
the rules in ``mapping.py`` and checked (each checkpoint tensor used, each module tensor filled,
shapes equal), then weights are read from safetensors (memory-mapped) straight into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn

from acestep.checkpoints.mapping import (EXTERNAL_TENSORS, KNOWN_CLASSES, component_classes, component_kwargs,
                                         map_official_name)

MAX_LISTED_MISMATCHES = 10


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the modules built from its config."""


@dataclass
class MappingReport:
    """Result of matching checkpoint tensors (name → shape) against module tensors."""

    mapped: Dict[Tuple[str, str], str] = field(default_factory=dict)  # (component, inner) → checkpoint name
    unused: List[str] = field(default_factory=list)  # checkpoint tensors no module takes
    missing: List[str] = field(default_factory=list)  # module tensors nothing fills
    shape_mismatches: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unused or self.missing or self.shape_mismatches)

    def describe(self) -> str:
        lines = []
        for title, items in (("unused checkpoint tensors", self.unused), ("module tensors not filled", self.missing),
                             ("shape mismatches", self.shape_mismatches)):
            if items:
                shown = ", ".join(items[:MAX_LISTED_MISMATCHES])
                more = f" (+{len(items) - MAX_LISTED_MISMATCHES} more)" if len(items) > MAX_LISTED_MISMATCHES else ""
                lines.append(f"{len(items)} {title}: {shown}{more}")
        return "; ".join(lines)


def module_tensor_shapes(modules: Dict[str, nn.Module]) -> Dict[Tuple[str, str], Tuple[int, ...]]:
    return {(comp, name): tuple(t.shape) for comp, mod in modules.items() for name, t in mod.state_dict().items()}


def match_tensors(
    checkpoint_shapes: Dict[str, Tuple[int, ...]],
    module_shapes: Dict[Tuple[str, str], Tuple[int, ...]],
    name_map: Callable[[str], Optional[Tuple[str, str]]],
    external: Dict[Tuple[str, str], str],
) -> MappingReport:
    report = MappingReport()
    for name, shape in checkpoint_shapes.items():
        target = name_map(name)
        if target is None or target not in module_shapes:
            report.unused.append(name)
            continue
        if tuple(shape) != module_shapes[target]:
            report.shape_mismatches.append(f"{name} {list(shape)} vs {'.'.join(target)} {list(module_shapes[target])}")
        report.mapped[target] = name
    report.missing = [".".join(t) for t in module_shapes if t not in report.mapped and t not in external]
    return report


def build_dit_modules(config: dict, device: str | torch.device = "meta") -> Dict[str, nn.Module]:
    """The four DiT-side modules from an official DiT config.json, on ``device``."""
    with torch.device(device):
        modules = {name: cls(**component_kwargs(config, name)) for name, cls in component_classes(config).items()}
    # the SFT-stems checkpoint's flag: its lego prompt carries the song-level caption (global_caption)
    modules["transformer"].register_to_config(is_lego_sft=bool(config.get("is_lego_sft", False)))
    return modules


def _materialize_fsq_buffers(module: nn.Module, device: torch.device) -> None:
    """FSQ constants are non-persistent buffers: rebuild them from a dim-1 twin of the quantizer."""
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            if not hasattr(sub, "levels") or not hasattr(sub, "num_quantizers"):
                raise RuntimeError(f"cannot rebuild meta buffers of {type(sub).__name__}")
            twin = type(sub)(dim=1, levels=list(sub.levels), num_quantizers=sub.num_quantizers)
            for name, buffer in twin.named_buffers(recurse=False):
                sub.register_buffer(name, buffer.to(device), persistent=False)


def _assign(module: nn.Module, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    module.load_state_dict(state, strict=True, assign=True)
    _materialize_fsq_buffers(module, device)
    return module.eval().requires_grad_(False)


def _read(handle, name: str, dtype: Optional[torch.dtype], device: torch.device) -> torch.Tensor:
    tensor = handle.get_tensor(name)
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    # copy=True: fresh, aligned storage instead of views into the mmap, so CPU kernels (whose
    # choice can depend on alignment) give the same bits whichever file the weights came from.
    return tensor.to(device=device, dtype=target, copy=True)


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def load_silence_latent(path: Path) -> torch.Tensor:
    """silence_latent.pt holds [1, 64, T] (channel-first); modules want [1, T, 64]."""
    latent = torch.load(str(path), map_location="cpu", weights_only=True)
    return latent.transpose(1, 2).contiguous()


def load_official_dit(folder: Path, dtype: Optional[torch.dtype] = None,
                      device: str | torch.device = "cpu") -> Dict[str, nn.Module]:
    """Load an official ``acestep-v15-*`` folder into the four diffusers modules, strictly."""
    folder = Path(folder)
    device = torch.device(device)
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    modules = build_dit_modules(config)
    report = match_tensors(safetensors_shapes(weights), module_tensor_shapes(modules), map_official_name,
                           EXTERNAL_TENSORS)
    if not report.ok:
        raise CheckpointMismatchError(f"{weights}: {report.describe()}")
    states: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in modules}
    with safe_open(str(weights), framework="pt") as handle:
        for (component, inner), name in report.mapped.items():
            states[component][inner] = _read(handle, name, dtype, device)
    load_dtype = dtype or next(iter(states["transformer"].values())).dtype
    silence = load_silence_latent(folder / EXTERNAL_TENSORS[("condition_encoder", "silence_latent")])
    states["condition_encoder"]["silence_latent"] = silence.to(device=device, dtype=load_dtype)
    return {name: _assign(module, states[name], device) for name, module in modules.items()}


def load_diffusers_module(folder: Path, cls, dtype: Optional[torch.dtype] = None,
                          device: str | torch.device = "cpu") -> nn.Module:
    """Load one diffusers-format component folder (config.json + diffusion_pytorch_model.safetensors).
    A folder whose ``_class_name`` names a known subclass of ``cls`` (the XL condition encoder) gets it."""
    folder = Path(folder)
    device = torch.device(device)
    config = json.loads((folder / "config.json").read_text())
    named = KNOWN_CLASSES.get(config.get("_class_name"))
    cls = named if named is not None and issubclass(named, cls) else cls
    with torch.device("meta"):
        module = cls.from_config(config)
    weights = folder / "diffusion_pytorch_model.safetensors"
    expected = {("m", name): tuple(t.shape) for name, t in module.state_dict().items()}
    report = match_tensors(safetensors_shapes(weights), expected, lambda n: ("m", n), {})
    if not report.ok:
        raise CheckpointMismatchError(f"{weights}: {report.describe()}")
    with safe_open(str(weights), framework="pt") as handle:
        state = {inner: _read(handle, name, dtype, device) for (_, inner), name in report.mapped.items()}
    return _assign(module, state, device)
