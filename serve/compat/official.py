"""Data for the official server's service routes, in its shapes: ``/health`` and ``/v1/stats`` in
its envelope, ``/v1/models`` as its OpenRouter list (what that server actually answers there),
``/v1/model_inventory``, ``/format_input``'s fields and ``/create_random_sample``'s examples.

Pure functions over what the ingress already knows; the routes live in ``serve.compat.routes``. The example
files under ``serve/examples`` are this project's own.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from acestep.dit.tasks import BASE_ONLY_TASKS, TASK_TYPES
from acestep.params import LM_HELPER_DEFAULTS
from serve.edge.errors import FieldError
from serve.edge.intake import ValidationFailed, validation_errors
from serve.schemas import LMTemperature

EXAMPLES = Path(__file__).parents[1] / "examples"
VERSION = importlib.metadata.version("acestep-serve")


def health_data(models: Dict[str, Any]) -> Dict[str, Any]:
    dit, lm = models["dit"], models["lm"]
    return {"status": "ok", "service": "ACE-Step API", "version": VERSION,
            "models_initialized": dit.get("is_turbo") is not None, "llm_initialized": bool(lm.get("enabled")),
            "loaded_model": dit["model"], "loaded_lm_model": lm["model"] if lm.get("enabled") else None}


def stats_data(store_stats: Dict[str, Any], bound: int, recent_task_s: float) -> Dict[str, Any]:
    """Upstream's job counters from the task store's phase counts."""
    tasks = store_stats["tasks"]
    running = sum(tasks.get(phase, 0) for phase in ("lm", "dit", "encode"))
    return {"jobs": {"total": sum(tasks.values()), "queued": tasks.get("queued", 0), "running": running,
                     "succeeded": tasks.get("done", 0), "failed": tasks.get("failed", 0)},
            "queue_size": tasks.get("queued", 0), "queue_maxsize": bound, "avg_job_seconds": round(recent_task_s, 3)}


def supported_tasks(is_turbo: Optional[bool]) -> list:
    return [t for t in TASK_TYPES if t not in BASE_ONLY_TASKS] if is_turbo else list(TASK_TYPES)


def openrouter_models(dits: List[Dict[str, Any]], created: int, max_duration_s: int = 600) -> Dict[str, Any]:
    """``GET /v1/models`` as the official server answers it (clients read ``data[].id``), one
    entry per served DiT, the default first."""
    entries = [{"id": f"acestep/{dit['model']}", "name": f"ACE-Step 1.5 {dit['model']}", "created": created,
                "input_modalities": ["text", "audio"], "output_modalities": ["audio", "text"],
                "context_length": 4096, "max_output_length": max_duration_s,
                "pricing": {"prompt": "0", "completion": "0", "request": "0"},
                "description": "ACE-Step 1.5 music generation: a 5 Hz LM plans, a DiT renders 48 kHz stereo.",
                "family": dit.get("family"), "preset": dit.get("preset")}
               for dit in dits]
    return {"object": "list", "data": entries}


def model_inventory(dits: List[Dict[str, Any]], lms: List[Dict[str, Any]]) -> Dict[str, Any]:
    default, lm = dits[0]["model"], lms[0]
    enabled = bool(lm.get("enabled"))
    return {"models": [{"name": dit["model"], "is_default": dit["model"] == default, "is_loaded": True,
                        "supported_task_types": supported_tasks(dit.get("is_turbo")), "family": dit.get("family"),
                        "preset": dit.get("preset")} for dit in dits],
            "default_model": default, "lm_models": [m["model"] for m in lms] if enabled else [],
            "loaded_lm_model": lm["model"] if enabled else None, "llm_initialized": enabled}


class FormatInput(BaseModel):
    """``/format_input``'s own fields (``param_obj`` is read apart: upstream's key spellings)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    prompt: Optional[str] = None
    lyrics: Optional[str] = None
    temperature: LMTemperature = Field(LM_HELPER_DEFAULTS.temperature, description="0: greedy.")


def format_input_args(body: Dict[str, Any]) -> Tuple[str, str, Dict[str, Any], float]:
    """(caption, lyrics, user_metadata, temperature) from a ``/format_input`` body."""
    meta = body.get("param_obj") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError:
            raise FieldError("param_obj", "param_obj must be a JSON object", 400) from None
    if not isinstance(meta, dict):
        raise FieldError("param_obj", "param_obj must be a JSON object", 400)
    try:
        fields = FormatInput.model_validate(body)
    except ValidationError as error:
        raise ValidationFailed(validation_errors(error)) from None
    user = {"duration": meta.get("duration"), "bpm": meta.get("bpm"),
            "keyscale": meta.get("key") or meta.get("key_scale"),
            "timesignature": meta.get("time_signature") or body.get("time_signature"),
            "language": meta.get("language")}
    return fields.prompt or "", fields.lyrics or "", {k: v for k, v in user.items() if v}, fields.temperature


def format_input_data(sample: Any, caption: str, lyrics: str, user: Dict[str, Any]) -> Dict[str, Any]:
    """The LM's formatted sample in upstream's field names, falling back to the inputs."""
    return {"caption": sample.caption or caption, "lyrics": sample.lyrics or lyrics,
            "bpm": sample.bpm or user.get("bpm"), "key_scale": sample.keyscale or user.get("keyscale", ""),
            "time_signature": sample.timesignature or user.get("timesignature", ""),
            "duration": sample.duration or user.get("duration"),
            "vocal_language": sample.language or user.get("language", "")}


def random_example(sample_type: str, rng: Optional[random.Random] = None) -> Optional[Dict[str, Any]]:
    """One example file's content: ``simple_mode`` descriptions, else full text2music requests."""
    folder = EXAMPLES / ("simple_mode" if sample_type == "simple_mode" else "text2music")
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return None
    return json.loads((rng or random).choice(files).read_text())
