"""Which model deployment serves a request.

The app serves a set of DiT variants (turbo, base, sft...) and LM sizes, each its own deployment
with its own replicas and autoscaling (``serve.app.build_app``). A request names a DiT with
``model`` (the folder name, ``acestep/<name>`` as ``/v1/models`` lists it, or its variant: the name
after ``acestep-v15-`` such as ``turbo``, ``sft``, ``xl-turbo`` or ``xl-base``, then the last word
``shift3`` / ``turbo``... when only one served variant ends so) and an LM with ``lm_model`` (a served
name only, never a path). Tasks that need a base DiT (lego, extract, complete) go to a base variant
when the request names none; naming a turbo one for them is a 422 naming ``task_type``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from acestep.dit.tasks import BASE_ONLY_TASKS
from serve.edge.errors import FieldError

DIT_DEPLOYMENT, LM_DEPLOYMENT = "DiTDeployment", "LMDeployment"
DIT_PREFIX = "acestep-v15-"  # official DiT folders: acestep-v15-<variant>


def dit_variant(name: str) -> str:
    """``acestep-v15-xl-turbo`` → ``xl-turbo``; a name without the official prefix is its own variant."""
    return name[len(DIT_PREFIX):] if name.startswith(DIT_PREFIX) else name


def deployment_name(kind: str, model: str, default: str) -> str:
    """The Serve deployment of one served model: the plain name for the default, suffixed otherwise."""
    base = DIT_DEPLOYMENT if kind == "dit" else LM_DEPLOYMENT
    return base if model == default else f"{base}-{model}"


@dataclass(frozen=True)
class ModelSet:
    """The served names, defaults first."""

    dits: tuple
    lms: tuple

    @classmethod
    def of(cls, config) -> "ModelSet":
        return cls(tuple(config.dit_models()), tuple(config.lm_models()))

    @property
    def default_dit(self) -> str:
        return self.dits[0]

    @property
    def default_lm(self) -> str:
        return self.lms[0]

    def dit_name(self, requested: Optional[str], field: str = "model", status: int = 422) -> str:
        """A served DiT name for ``requested`` (aliases as above); a FieldError naming the served ones."""
        if not requested:
            return self.default_dit
        wanted = str(requested).strip()
        wanted = wanted.split("/", 1)[1] if wanted.startswith("acestep/") else wanted
        if wanted in self.dits:
            return wanted
        for matches in ([name for name in self.dits if dit_variant(name) == wanted],
                        [name for name in self.dits if name.rsplit("-", 1)[-1] == wanted]):
            if len(matches) == 1:
                return matches[0]
        raise FieldError(field, f"unknown model; this app serves {', '.join(self.dits)} (GET /v1/models)", status)

    def lm_name(self, requested: Optional[str], field: str = "lm_model") -> str:
        if not requested:
            return self.default_lm
        wanted = str(requested).strip()
        if wanted in self.lms:
            return wanted
        raise FieldError(field, f"not a served LM (a name, never a path); this app serves {', '.join(self.lms)}")

    def pick_dit(self, requested: Optional[str], task_type: str, turbo: Dict[str, Optional[bool]],
                 field: str = "model") -> str:
        """The DiT for a task: the named one (422 when it cannot run the task), else the default,
        else -- for tasks that need a base model -- the first served non-turbo variant."""
        needs_base = task_type in BASE_ONLY_TASKS
        if requested:
            name = self.dit_name(requested, field)
            if needs_base and turbo.get(name):
                raise FieldError("task_type", f"{task_type} needs a base DiT, and {name} is turbo; "
                                              f"served: {self._described(turbo)}")
            return name
        if not needs_base or not turbo.get(self.default_dit):
            return self.default_dit
        for name in self.dits:
            if turbo.get(name) is False:
                return name
        raise FieldError("task_type", f"{task_type} needs a base DiT (lego, extract and complete do); "
                                      f"served: {self._described(turbo)}")

    def _described(self, turbo: Dict[str, Optional[bool]]) -> str:
        return ", ".join(f"{name} ({'turbo' if turbo.get(name) else 'base/sft'})" for name in self.dits)

    def names(self) -> Dict[str, List[str]]:
        return {"dit": list(self.dits), "lm": list(self.lms)}


def adapter_choice(config, choice: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The request's adapters as task extras (``{"adapters": [[name, scale]]}``; {} for none): its
    ``loras`` ({name: weight}) or ``lora`` / ``lora_scale``, else the default set (``defaults``:
    {"adapters": {name: scale}, "use_lora"}, set by /v1/lora/*; else the configured default). 422
    naming the field."""
    from acestep.dit.adapters import AdapterError, adapter_setting, list_adapters

    settings = config.dit.adapters
    field = "loras" if choice.get("loras") else "lora"
    if choice.get("loras"):
        if choice.get("lora"):
            raise FieldError("loras", "name adapters with `lora` (one) or `loras` (several), not both")
        wanted = dict(choice["loras"])
    elif choice.get("lora"):
        wanted = {choice["lora"]: choice.get("lora_scale", 1.0)}
    else:
        if defaults is None:
            defaults = {"adapters": {settings.default: settings.default_scale} if settings.default else {},
                        "use_lora": bool(settings.default)}
        wanted = dict(defaults["adapters"]) if defaults["use_lora"] else {}
        if len(wanted) == 1 and "lora_scale" in choice:
            wanted = {name: choice["lora_scale"] for name in wanted}
    if not wanted:
        return {}
    if not settings.dir:
        raise FieldError(field, "this app serves no adapters (dit.adapters.dir is not set)")
    try:
        setting = adapter_setting({name: float(scale) for name, scale in wanted.items()})
    except AdapterError as error:
        raise FieldError("lora_scale" if field == "lora" and "lora_scale" in str(error) else field, str(error)) from None
    if len(setting) > settings.max_loaded:  # zero weights are dropped above: they count for nothing
        raise FieldError(field, f"at most {settings.max_loaded} adapters per request (dit.adapters.max_loaded)")
    root = Path(settings.dir)
    missing = [name for name in wanted if root.is_dir() and name not in list_adapters(root)]
    if missing:  # (a directory not on this node: the DiT replica checks)
        raise FieldError(field, f"no adapter named {missing[0]!r} in the adapter directory (GET /v1/adapters)")
    return {"adapters": [list(pair) for pair in setting]}
