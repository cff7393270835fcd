"""The adapter routes: the official server's ``/v1/lora/load|unload|toggle|scale|status`` in its
shapes, and the native ``GET /v1/adapters``.

Here the official routes set the service-wide default adapters -- what requests that name no
``lora`` use -- kept in the task store, so every ingress replica applies the same default. They
never load anything into a replica: DiT replicas load adapters when a request needs one
(``serve.adapter_pool``). ``lora_path`` is an adapter name in the server's adapter directory,
never a path."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from acestep.dit.adapters import MAX_WEIGHT, AdapterError, list_adapters, read_adapter, resolve_adapter_path
from serve.compat import release as compat
from serve.edge import intake
from serve.adapter_pool import holders
from serve.edge.errors import FieldError, error_responses
from serve.http_app import api, json_body

LORA_DEFAULT = "lora_default"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LoraLoadBody(_Body):
    lora_path: str = Field(min_length=1, max_length=200, description="Adapter name in the server's adapter directory.")
    adapter_name: Optional[str] = Field(None, description="Set: add it to the default set; unset: it replaces the set.")


class LoraScaleBody(_Body):
    scale: float = Field(ge=0, le=MAX_WEIGHT, description="Scale of the default adapter(s); 0 renders the base model.")
    adapter_name: Optional[str] = Field(None, description="Which default adapter; unset: every one.")


class LoraToggleBody(_Body):
    use_lora: bool


def default_adapters(stored: Optional[Dict[str, Any]], settings) -> Dict[str, Any]:
    """{"adapters": {name: scale}, "use_lora": bool}: the stored default, else the configured one."""
    if stored is not None:
        return stored
    configured = {settings.default: settings.default_scale} if settings.default else {}
    return {"adapters": configured, "use_lora": bool(configured)}


async def _parse(request: Request, model):
    try:
        return model.model_validate(await intake.read_json_object(request))
    except ValidationError as error:
        raise intake.ValidationFailed(intake.validation_errors(error)) from None


class AdapterRoutes:
    """Route group inherited by ``serve.api.Ingress`` (uses its ``config`` and ``state``)."""

    async def _defaults(self) -> Dict[str, Any]:
        stored = await asyncio.to_thread(self.state.store.get_setting, LORA_DEFAULT)
        return default_adapters(stored, self.config.dit.adapters)

    async def _save_defaults(self, value: Dict[str, Any]) -> None:
        await asyncio.to_thread(self.state.store.put_setting, LORA_DEFAULT, value)

    def _adapter_root(self) -> Path:
        if not self.config.dit.adapters.dir:
            raise FieldError("lora_path", "this app serves no adapters (dit.adapters.dir is not set)", 400)
        return Path(self.config.dit.adapters.dir)

    @api.post("/v1/lora/load", openapi_extra=json_body(LoraLoadBody), responses=error_responses(400, 422))
    async def lora_load(self, request: Request):
        """Make an adapter of the adapter directory the default (official shape)."""
        body = await _parse(request, LoraLoadBody)
        name = body.lora_path.strip()
        root = self._adapter_root()
        try:
            path = resolve_adapter_path(root, name)
            await asyncio.to_thread(read_adapter, path, name)  # its format must load
        except AdapterError as error:
            raise FieldError("lora_path", str(error), 400) from None
        defaults = await self._defaults()
        adapters = dict(defaults["adapters"]) if body.adapter_name else {}
        adapters[name] = 1.0
        await self._save_defaults({"adapters": adapters, "use_lora": True})
        data = {"message": f"LoRA {name} is the default adapter", "lora_path": name}
        return compat.envelope({**data, **({"adapter_name": body.adapter_name} if body.adapter_name else {})})

    @api.post("/v1/lora/unload")
    async def lora_unload(self):
        """No default adapter any more (replicas unload unused adapters as their pools need room)."""
        await self._save_defaults({"adapters": {}, "use_lora": False})
        return compat.envelope({"message": "LoRA unloaded, using the base model"})

    @api.post("/v1/lora/toggle", openapi_extra=json_body(LoraToggleBody), responses=error_responses(400, 422))
    async def lora_toggle(self, request: Request):
        body = await _parse(request, LoraToggleBody)
        defaults = await self._defaults()
        if body.use_lora and not defaults["adapters"]:
            return compat.envelope(None, 400, "No LoRA adapter loaded. Load one with /v1/lora/load first.")
        await self._save_defaults({**defaults, "use_lora": body.use_lora})
        return compat.envelope({"message": f"LoRA {'enabled' if body.use_lora else 'disabled'}",
                                "use_lora": body.use_lora})

    @api.post("/v1/lora/scale", openapi_extra=json_body(LoraScaleBody), responses=error_responses(400, 422))
    async def lora_scale(self, request: Request):
        body = await _parse(request, LoraScaleBody)
        defaults = await self._defaults()
        adapters = dict(defaults["adapters"])
        names = [body.adapter_name] if body.adapter_name else list(adapters)
        if not adapters or any(name not in adapters for name in names):
            return compat.envelope(None, 400, f"No such default LoRA adapter: {body.adapter_name or 'none loaded'}")
        adapters.update({name: body.scale for name in names})
        await self._save_defaults({**defaults, "adapters": adapters})
        data = {"message": f"LoRA scale: {body.scale:.2f}", "scale": body.scale}
        return compat.envelope({**data, **({"adapter_name": body.adapter_name} if body.adapter_name else {})})

    @api.get("/v1/lora/status")
    async def lora_status(self):
        defaults = await self._defaults()
        adapters = defaults["adapters"]
        scales = list(adapters.values())
        return compat.envelope({
            "lora_loaded": bool(adapters), "use_lora": bool(defaults["use_lora"] and adapters),
            "lora_scale": scales[0] if len(scales) == 1 else 1.0, "adapter_type": "lora" if adapters else None,
            "scales": adapters, "active_adapter": next(iter(adapters), None), "adapters": list(adapters),
            "synthetic_default_mode": False})

    @api.get("/v1/adapters")
    async def adapters(self):
        """The adapter directory's adapters (format, kind, rank, alpha, target modules, size, the
        replicas of every DiT deployment that hold it) and the default set."""
        settings = self.config.dit.adapters
        root = Path(settings.dir) if settings.dir else None
        found = await asyncio.to_thread(_describe_all, root) if root is not None else []
        # a live replica republishes on every health check: three missed checks mean it is gone
        fresh_s = 3 * self.config.dit.deployment.health_check_period_s + 10
        held = await asyncio.to_thread(holders, self.state.store, fresh_s) if found else {}
        for entry in found:
            entry["replicas"] = held.get(entry["name"], [])
        return {"adapters": found, "default": await self._defaults(), "max_loaded_per_replica": settings.max_loaded}


def _describe_all(root: Path) -> List[Dict[str, Any]]:
    described = []
    for name in list_adapters(root):
        try:
            info = read_adapter(resolve_adapter_path(root, name), name).info.as_dict()
            info.pop("path", None)  # a server path: not the client's business
            info.pop("unmapped", None)
        except AdapterError as error:
            info = {"name": name, "error": str(error)}
        described.append(info)
    return described
