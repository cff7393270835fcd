"""Per-model presets: the sampling defaults each DiT family is served with, and the rules a model
imposes on a request (turbo is guidance-distilled: its guidance scale is 1.0 whatever was asked).

Which default wins where:
- A request that names a preset (``GenerationParams.preset``: "model" for the serving model's own,
  or a family name) gets the preset's value for every preset field it leaves unset; a field it
  sets keeps its value. Over HTTP and in Ray Data rows "unset" means absent from the body or row
  and the preset defaults to "model"; in the Python API the seed's defaults stand unless a preset
  is named, and then "unset" means "still equal to the seed's default".
- Whatever the preset, the model's rules apply last: on turbo ``guidance_scale`` becomes 1.0 (the
  result says so), and ``dcw_enabled=None`` becomes the family's DCW default.

The values follow upstream's per-model rules: turbo 8 steps, shift 3.0, DCW on; sft 50 steps and
base 32, shift 3.0, CFG 7.0 over the whole schedule, DCW off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Optional, Tuple

from acestep.params import DIT_FAMILIES, PRESET_CHOICES, GenerationParams
from acestep.validation import ValidationError
TURBO_MAX_STEPS = 8  # upstream's service clamps turbo to 8 steps; more is refused here


@dataclass(frozen=True)
class ModelPreset:
    """The defaults a DiT family is served with (the fields of ``GenerationParams`` it sets)."""

    family: str = field(metadata={"description": "turbo, sft or base"})
    inference_steps: int = field(metadata={"description": "diffusion steps"})
    shift: float = field(metadata={"description": "timestep shift"})
    guidance_scale: float = field(metadata={"description": "CFG scale (1.0: no CFG)"})
    cfg_interval_start: float = 0.0
    cfg_interval_end: float = 1.0
    use_adg: bool = False
    dcw_enabled: bool = False
    sampler_mode: str = "euler"

    def values(self) -> Dict[str, Any]:
        """The preset's GenerationParams fields and their values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "family"}


PRESETS: Dict[str, ModelPreset] = {
    "turbo": ModelPreset("turbo", inference_steps=8, shift=3.0, guidance_scale=1.0, dcw_enabled=True),
    "sft": ModelPreset("sft", inference_steps=50, shift=3.0, guidance_scale=7.0),
    "base": ModelPreset("base", inference_steps=32, shift=3.0, guidance_scale=7.0),
}
PRESET_FIELDS = tuple(PRESETS["turbo"].values())
assert tuple(PRESETS) == DIT_FAMILIES


def family_of(model_version: Optional[str], is_turbo: bool) -> str:
    """A DiT's family from its config (``model_version``, ``is_turbo``); unknown versions count as base
    (or turbo when the config says turbo)."""
    if is_turbo:
        return "turbo"
    return model_version if model_version in ("sft", "base") else "base"


@dataclass
class PresetReport:
    """What a model changed in a request: the preset that filled unset fields (and their values),
    and the values the model's rules forced (field → value used)."""

    model: Optional[str] = None
    family: Optional[str] = None
    preset: Optional[str] = None
    filled: Dict[str, Any] = field(default_factory=dict)
    forced: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_SEED_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationParams)}


def _unset(params: GenerationParams, explicit: Optional[Collection[str]]) -> Collection[str]:
    if explicit is not None:
        return [name for name in PRESET_FIELDS if name not in explicit]
    return [name for name in PRESET_FIELDS if getattr(params, name) == _SEED_DEFAULTS[name]]


def apply_model(params: GenerationParams, family: Optional[str], *, model: Optional[str] = None,
                explicit: Optional[Collection[str]] = None) -> Tuple[GenerationParams, PresetReport]:
    """``params`` with the named preset applied to its unset fields and the model's rules applied,
    on a copy; ``explicit``: the fields the caller set (None: those that differ from the seed's
    defaults). ``family`` None (the model is not known yet): only a family-named preset applies.
    The returned params have ``preset`` None (it is spent: applying again changes nothing); the
    report names it."""
    report = PresetReport(model=model, family=family)
    name = params.preset
    if name is not None and name not in PRESET_CHOICES:
        raise ValidationError("preset", name, "one of " + ", ".join(PRESET_CHOICES) + ", or null for none")
    resolved = family if name == "model" else name
    if resolved is not None:
        values = PRESETS[resolved].values()
        report.preset = resolved
        report.filled = {k: values[k] for k in _unset(params, explicit) if getattr(params, k) != values[k]}
    if family is not None and params.dcw_enabled is None and "dcw_enabled" not in report.filled:
        report.filled["dcw_enabled"] = PRESETS[family].dcw_enabled  # the model-aware DCW default
    params = dataclasses.replace(params, **report.filled, preset=None)
    if family is not None:
        report.forced = _model_rules(params, family, model)
        params = dataclasses.replace(params, **report.forced)
    return params, report


def _model_rules(params: GenerationParams, family: str, model: Optional[str]) -> Dict[str, Any]:
    """The model's own rules: a ValidationError naming the field and the model for what it cannot
    do; the values it forces (field → value)."""
    named = f"{model} (a {family} model)" if model else f"a {family} model"
    if params.sampler_mode == "heun" and params.infer_method == "sde":
        raise ValidationError("sampler_mode", params.sampler_mode, "'euler' with infer_method='sde' (heun is an ODE "
                              "sampler)")
    if family != "turbo":
        return {}
    if params.inference_steps > TURBO_MAX_STEPS and not params.timesteps:
        raise ValidationError("inference_steps", params.inference_steps, f"1 to {TURBO_MAX_STEPS} on {named}")
    if params.use_adg:
        raise ValidationError("use_adg", params.use_adg, f"false on {named}: turbo runs without CFG")
    return {"guidance_scale": 1.0} if params.guidance_scale != 1.0 else {}
