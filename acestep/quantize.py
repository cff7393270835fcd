"""Weight-only quantization of a model's Linear layers (torchao), and what the weights then take.

Modes (upstream's names, the ``quantization`` argument of both handlers):
- ``int8_weight_only``: int8 weights with one scale per output row; activations stay in the model's
  dtype. Any device.
- ``fp8_weight_only``: float8 (e4m3) weights, one scale per row; CUDA devices of compute capability
  8.9 or newer only (Ada, Hopper and later have the fp8 type in hardware).
- ``w8a8_dynamic``: int8 weights and int8 activations quantized per token at run time (faster
  matmuls on GPUs with int8 tensor cores, a little less exact). Any device.

Quantization replaces each Linear weight in place by its quantized tensor, so the full-precision
weight is freed once nothing else holds it: apply it right after loading, before anything (an
engine, a worker, a compiled graph) takes references to the weights. torchao is imported only when
a mode is asked for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Literal, Optional, Tuple, Union, get_args

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

Quantization = Literal["int8_weight_only", "fp8_weight_only", "w8a8_dynamic"]
QUANTIZATION_MODES: Tuple[str, ...] = get_args(Quantization)
FP8_MIN_CAPABILITY = (8, 9)


def fp8_supported(device: Union[str, torch.device]) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def check_quantization(mode: Optional[str], device: Union[str, torch.device, None] = None) -> Optional[str]:
    """``mode`` if it is None or a known mode that ``device`` (when given) can run; ValueError naming
    ``quantization``, the allowed values and, for fp8, the device otherwise."""
    if mode is None:
        return None
    if mode not in QUANTIZATION_MODES:
        allowed = ", ".join(repr(m) for m in QUANTIZATION_MODES)
        raise ValueError(f"quantization={mode!r}: expected None or one of {allowed}")
    if mode == "fp8_weight_only" and device is not None and not fp8_supported(device):
        raise ValueError(f"quantization='fp8_weight_only' needs a CUDA device of compute capability >= "
                         f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}; {_describe(device)} has none: "
                         f"use 'int8_weight_only'")
    return mode


def _describe(device: Union[str, torch.device]) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"device {device} ({torch.cuda.get_device_name(device)}, capability {major}.{minor})"


def _config(mode: str):
    from torchao.quantization import (Float8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, MappingType)

    if mode == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if mode == "fp8_weight_only":
        return Float8WeightOnlyConfig()
    # asymmetric activations, as upstream: the DiT's activations are not centred on zero
    return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao tensor (a wrapper subclass holding the quantized data and its scales)."""
    return is_traceable_wrapper_subclass(tensor)


def _quantizable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and weight is not None and weight.is_floating_point()
            and not is_quantized(weight))


def quantize_modules(modules: Union[nn.Module, Iterable[nn.Module]], mode: Optional[str]) -> int:
    """Quantize every Linear layer of ``modules`` in place (their weights must already be on their
    device); returns how many layers were quantized (0 when ``mode`` is None). Raises ValueError as
    ``check_quantization`` does, for the device each module is on."""
    if check_quantization(mode) is None:
        return 0
    from torchao.quantization import quantize_

    modules: List[nn.Module] = [modules] if isinstance(modules, nn.Module) else list(modules)
    count = 0
    for module in modules:
        layers = [sub for sub in module.modules() if _quantizable(sub)]
        if not layers:
            continue
        check_quantization(mode, layers[0].weight.device)
        quantize_(module, _config(mode), filter_fn=lambda sub, fqn: _quantizable(sub))
        count += len(layers)
    return count


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor keeps resident: for a quantized tensor, the sum over its inner tensors
    (data, scales, zero points)."""
    if not is_quantized(tensor):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    inner = (getattr(tensor, name) for name in names)
    return sum(tensor_bytes(t) for t in inner if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class WeightBytes:
    """Resident weight bytes of a module's Linear layers, beside what the same weights take in bf16."""

    linear: int
    linear_bf16: int
    linear_layers: int
    quantized_layers: int

    @property
    def ratio_to_bf16(self) -> float:
        return self.linear / self.linear_bf16 if self.linear_bf16 else 1.0


def weight_bytes(module: nn.Module) -> WeightBytes:
    """Bytes of ``module``'s Linear weights as they are held now (each tensor counted once: tied
    weights are one tensor)."""
    seen, resident, bf16, layers, quantized = set(), 0, 0, 0, 0
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if not isinstance(sub, nn.Linear) or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        layers += 1
        quantized += int(is_quantized(weight))
        resident += tensor_bytes(weight)
        bf16 += weight.numel() * 2
    return WeightBytes(linear=resident, linear_bf16=bf16, linear_layers=layers, quantized_layers=quantized)
