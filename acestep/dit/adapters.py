"""DiT adapters (LoRA, LoKr): reading them in the formats people train them in, and switching
which ones a forward uses.

Formats, told apart by their files (``adapter_format``):
- ``peft``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``, as the official
  trainer saves the decoder's PEFT adapter (original names: ``base_model.model.layers.N.self_attn.q_proj``).
  LoRA and LoKr (``peft_type``) both load.
- ``diffusers``: one ``.safetensors`` file with ``transformer.``-prefixed diffusers names (what
  ``AceStepLoraLoaderMixin.save_lora_weights`` writes), or a folder holding
  ``pytorch_lora_weights.safetensors``.
Key conversion is diffusers' (``AceStepLoraLoaderMixin.lora_state_dict``); injection is peft's,
through the model's ``load_lora_adapter``. The rank and alpha come from the adapter's own config
(diffusers alone would infer alpha = rank from the tensors and so scale an official adapter
wrongly).

``AdapterSlots`` holds the adapters loaded into one transformer and activates an
``AdapterSetting`` (names and weights) before a forward; the DiT worker groups rows by setting,
so rows with different adapters never share a forward."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # peft keeps adapters in ModuleDicts: no dots
MAX_WEIGHT = 2.0

# (name, weight) pairs sorted by name, zero weights dropped: () is "no adapter". Hashable, so it
# keys batching (rows with equal settings may share a forward).
AdapterSetting = Tuple[Tuple[str, float], ...]


class AdapterError(ValueError):
    """An adapter that cannot be read, does not fit the model, or is not loaded."""


@dataclass(frozen=True)
class AdapterInfo:
    """What one adapter is, read from its files."""

    name: str
    path: str
    format: str  # "peft" | "diffusers"
    kind: str  # "lora" | "lokr"
    rank: int
    alpha: float
    target_modules: Tuple[str, ...]  # model module paths it changes (diffusers names)
    tensors: int
    size_bytes: int
    unmapped: Tuple[str, ...] = ()  # module paths the model does not have (filled by ``check_fit``)

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "path": self.path, "format": self.format, "kind": self.kind, "rank": self.rank,
                "alpha": self.alpha, "target_modules": list(self.target_modules), "tensors": self.tensors,
                "size_bytes": self.size_bytes, "unmapped": list(self.unmapped)}


@dataclass
class AdapterFile:
    """An adapter read into memory: converted state dict (diffusers names, no prefix) + peft config."""

    info: AdapterInfo
    state_dict: Dict[str, torch.Tensor]
    config: Dict[str, Any] = field(default_factory=dict)


def check_name(name: str, field_name: str = "lora") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise AdapterError(f"{field_name}: an adapter name is 1-64 letters, digits, '_' or '-' (got {name!r})")
    return name


def adapter_setting(spec: Union[None, str, Mapping[str, float], Iterable[Tuple[str, float]]],
                    scale: float = 1.0) -> AdapterSetting:
    """Normalise a request's adapters: a name (at ``scale``), {name: weight} or (name, weight) pairs."""
    if spec is None or spec == "" or spec == ():
        return ()
    pairs = [(spec, scale)] if isinstance(spec, str) else list(spec.items() if isinstance(spec, Mapping) else spec)
    merged: Dict[str, float] = {}
    for name, weight in pairs:
        weight = float(weight)
        if not 0.0 <= weight <= MAX_WEIGHT:
            raise AdapterError(f"lora_scale: {weight} is outside [0, {MAX_WEIGHT}]")
        merged[check_name(name)] = weight
    return tuple(sorted((n, w) for n, w in merged.items() if w != 0.0))


def setting_label(setting: AdapterSetting) -> str:
    return "+".join(f"{n}@{w:g}" for n, w in setting) or "none"


def adapter_format(path: Path) -> Tuple[str, Path]:
    """("peft" | "diffusers", weights file) of an adapter folder or file; AdapterError otherwise."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file():
            return "peft", path / PEFT_WEIGHTS
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return "diffusers", path / DIFFUSERS_WEIGHTS
        raise AdapterError(f"{path.name}: not an adapter folder (expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
                           f"or {DIFFUSERS_WEIGHTS})")
    if path.is_file() and path.suffix == ".safetensors":
        return "diffusers", path
    if path.is_file() and path.suffix in (".pt", ".bin", ".ckpt"):
        raise AdapterError(f"{path.name}: pickled adapter weights are not loaded; save them as safetensors")
    raise AdapterError(f"{path.name}: no adapter there (a PEFT folder or a .safetensors file)")


def read_adapter(path: Union[str, Path], name: Optional[str] = None) -> AdapterFile:
    """Read and convert an adapter (no model needed; safe off the worker thread)."""
    path = Path(path)
    fmt, weights = adapter_format(path)
    name = check_name(name or path.name.removesuffix(".safetensors"))
    state, metadata = _read_weights(path, weights)
    # diffusers converts the official names (and drops PEFT's prefix) only for LoRA on q/k/v/o_proj
    state = {k.removeprefix("transformer.").removeprefix("base_model.model."): v for k, v in state.items()}
    kind = "lokr" if any(".lokr_" in k for k in state) else "lora"
    if not state or (kind == "lora" and not all(".lora_A." in k or ".lora_B." in k for k in state)):
        raise AdapterError(f"{path.name}: tensors are neither LoRA (lora_A/lora_B) nor LoKr (lokr_*); "
                           "LyCORIS-native and other formats are not loaded")
    if fmt == "peft":
        config = _read_config(path)
    else:
        config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    targets = tuple(sorted({k.split(".lora_")[0].split(".lokr_")[0] for k in state}))
    peft_type = str(config.get("peft_type", kind)).lower()
    if peft_type not in ("lora", "lokr"):
        raise AdapterError(f"{path.name}: peft_type {config.get('peft_type')!r} is not loaded (LORA or LOKR only)")
    rank = int(config.get("r") or _rank_of(state))
    alpha = float(config.get("lora_alpha", config.get("alpha", rank)))
    info = AdapterInfo(name=name, path=str(path), format=fmt, kind=kind, rank=rank, alpha=alpha,
                       target_modules=targets, tensors=len(state),
                       size_bytes=sum(t.numel() * t.element_size() for t in state.values()))
    return AdapterFile(info, state, config)


def _read_weights(path: Path, weights: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    from diffusers.loaders.lora_pipeline import AceStepLoraLoaderMixin

    # a truncated or foreign file is the adapter's fault, not the server's: say which file
    try:
        return AceStepLoraLoaderMixin.lora_state_dict(str(weights), return_lora_metadata=True)
    except AdapterError:
        raise
    except Exception as error:
        raise AdapterError(f"{path.name}: {weights.name} is not readable safetensors "
                           f"({type(error).__name__}: {str(error)[:200]})") from None


def _read_config(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads((path / PEFT_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path.name}: {PEFT_CONFIG} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path.name}: {PEFT_CONFIG} must hold a JSON object")
    return config


def _rank_of(state: Dict[str, torch.Tensor]) -> int:
    for key, tensor in state.items():
        if ".lora_B." in key and tensor.ndim > 1:
            return int(tensor.shape[1])
    return 1


def check_fit(adapter: AdapterFile, transformer: torch.nn.Module) -> AdapterInfo:
    """The adapter's info with ``unmapped``: its target modules the transformer lacks, or whose
    shapes disagree with the LoRA factors (works on a ``meta``-device model too)."""
    modules = dict(transformer.named_modules())
    unmapped = []
    for target in adapter.info.target_modules:
        module = modules.get(target)
        module = getattr(module, "base_layer", module)  # a module that already carries adapters
        if not isinstance(module, torch.nn.Linear):
            unmapped.append(target)
            continue
        a, b = adapter.state_dict.get(f"{target}.lora_A.weight"), adapter.state_dict.get(f"{target}.lora_B.weight")
        if a is not None and b is not None and (a.shape[1] != module.in_features or b.shape[0] != module.out_features):
            unmapped.append(f"{target} (LoRA {b.shape[0]}x{a.shape[1]}, model {module.out_features}x{module.in_features})")
    return AdapterInfo(**{**adapter.info.__dict__, "unmapped": tuple(unmapped)})


def _lora_config(adapter: AdapterFile) -> Dict[str, Any]:
    """peft LoraConfig kwargs with the adapter's own rank and alpha, targeting exactly its modules."""
    config, info = adapter.config, adapter.info
    return {"r": info.rank, "lora_alpha": info.alpha, "target_modules": list(info.target_modules),
            "use_rslora": bool(config.get("use_rslora", False)), "use_dora": bool(config.get("use_dora", False)),
            "lora_dropout": 0.0}


def _lokr_config(adapter: AdapterFile) -> Optional[Dict[str, Any]]:
    """peft LoKrConfig kwargs from the adapter's own config, targeting exactly its modules; None
    (diffusers infers the factorisation from the tensors) for files without a config."""
    import dataclasses

    from peft import LoKrConfig

    if not adapter.config:
        return None
    names = {f.name for f in dataclasses.fields(LoKrConfig) if f.init} - {"peft_type", "task_type", "inference_mode",
                                                                         "base_model_name_or_path", "revision"}
    kwargs = {k: v for k, v in adapter.config.items() if k in names}
    return {**kwargs, "target_modules": list(adapter.info.target_modules), "rank_dropout": 0.0, "module_dropout": 0.0}


class AdapterSlots:
    """The adapters loaded into one transformer and the setting its next forward uses.

    Not thread-safe: the DiT worker thread owns it (loads and switches happen between steps)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.loaded: Dict[str, AdapterInfo] = {}
        self.active: AdapterSetting = ()
        self.fused: Optional[AdapterSetting] = None
        self.loads = 0
        self.switches = 0

    def load(self, adapter: AdapterFile) -> AdapterInfo:
        info = check_fit(adapter, self.transformer)
        if info.unmapped:
            raise AdapterError(f"{info.name}: {len(info.unmapped)} target module(s) are not in this DiT "
                               f"(e.g. {info.unmapped[0]}); trained for another model?")
        if info.name in self.loaded:
            raise AdapterError(f"{info.name}: an adapter of that name is already loaded")
        self._require_unfused()
        kwargs = {"metadata": _lokr_config(adapter) if info.kind == "lokr" else _lora_config(adapter)}
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
                warnings.simplefilter("ignore", UserWarning)
                self.transformer.load_lora_adapter(dict(adapter.state_dict), prefix=None, adapter_name=info.name,
                                                   **kwargs)
        except (ValueError, RuntimeError, TypeError, KeyError) as error:
            self._forget(info.name)
            raise AdapterError(f"{info.name}: does not load into this DiT ({type(error).__name__}: {error})") from None
        self.loaded[info.name] = info
        self.loads += 1
        self._apply(self.active, force=True)  # a new adapter starts active in peft; keep the current setting
        return info

    def unload(self, name: str) -> None:
        if name not in self.loaded:
            raise AdapterError(f"{name}: not loaded")
        self._require_unfused()
        self._forget(name)
        del self.loaded[name]
        self.active = tuple((n, w) for n, w in self.active if n != name)
        self._apply(self.active, force=True)

    def _forget(self, name: str) -> None:
        if name in getattr(self.transformer, "peft_config", {}):
            with warnings.catch_warnings():  # "was active, now deleted": _apply sets the setting next
                warnings.simplefilter("ignore", UserWarning)
                self.transformer.delete_adapters(name)

    def check(self, setting: AdapterSetting) -> None:
        """Raise unless ``setting`` can run now (its adapters loaded; the fused one, when fused)."""
        if self.fused is not None and setting != self.fused:
            raise AdapterError(f"lora: adapters are fused as {setting_label(self.fused)}; "
                               f"{setting_label(setting)} needs unfuse_lora() first")
        missing = [n for n, _ in setting if n not in self.loaded]
        if missing:
            raise AdapterError(f"lora: {missing[0]!r} is not loaded (loaded: {', '.join(sorted(self.loaded)) or 'none'})")

    def activate(self, setting: AdapterSetting) -> None:
        """Make the next forward use ``setting`` (a no-op when it already does)."""
        if setting == self.active and (self.fused is None or setting == self.fused):
            return
        self.check(setting)
        self._apply(setting)

    def _apply(self, setting: AdapterSetting, force: bool = False) -> None:
        if not self.loaded or (setting == self.active and not force):
            self.active = setting
            return
        if setting:
            self.transformer.enable_adapters()
            self.transformer.set_adapters([n for n, _ in setting], weights=[w for _, w in setting])
        else:
            self.transformer.disable_adapters()
        self.active = setting
        self.switches += 1

    def fuse(self, setting: AdapterSetting) -> None:
        """Merge ``setting`` into the base weights (faster forwards; no other setting until unfused)."""
        if not setting:
            raise AdapterError("lora: nothing to fuse")
        self.activate(setting)
        self.transformer.fuse_lora(adapter_names=[n for n, _ in setting])
        self.fused = setting

    def unfuse(self) -> None:
        if self.fused is not None:
            self.transformer.unfuse_lora()
            self.fused = None

    def _require_unfused(self) -> None:
        if self.fused is not None:
            raise AdapterError("adapters are fused; unfuse_lora() before loading or unloading")

    def stats(self) -> Dict[str, Any]:
        return {"loaded": sorted(self.loaded), "active": setting_label(self.active),
                "fused": setting_label(self.fused) if self.fused is not None else None,
                "loads": self.loads, "switches": self.switches}


def resolve_adapter_path(root: Union[str, Path], name: str, field_name: str = "lora_path") -> Path:
    """The adapter ``name`` under the server's adapter directory ``root``: a folder or
    ``<name>.safetensors``. ``name`` is a bare name, never a path."""
    check_name(name, field_name)
    base = Path(root).resolve()
    for candidate in (base / name, base / f"{name}.safetensors"):
        if candidate.exists() and candidate.resolve().parent == base:
            return candidate
    raise AdapterError(f"{field_name}: no adapter named {name!r} in the adapter directory")


def list_adapters(root: Union[str, Path]) -> List[str]:
    """Adapter names found in ``root`` (folders and .safetensors files with valid names)."""
    base = Path(root)
    if not base.is_dir():
        return []
    names = []
    for entry in sorted(base.iterdir()):
        name = entry.name.removesuffix(".safetensors")
        if NAME_PATTERN.match(name) and (entry.is_dir() or entry.suffix == ".safetensors"):
            names.append(name)
    return names
