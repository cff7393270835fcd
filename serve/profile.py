"""The memory profile ``acestep serve --gpu-memory-gb N|auto`` writes into the app args before they
are validated: the memory tier's settings (``acestep.tiers``) field by field, and on a machine whose
local Ray has one GPU the one-box placement, where the LM and DiT deployments share that GPU.

Every function returns the lines the command prints at start, each setting with where it came from:
``(tier)`` / ``(one-box)`` when the profile set it, ``(config)`` when the config file's own value won.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

REPO_ROOT = Path(__file__).resolve().parents[1]

# The app config fields a memory tier sets, by path; each one's value is read off the tier.
TIER_FIELDS = (("dit", "offload_to_cpu"), ("dit", "offload_dit_to_cpu"), ("lm", "offload_to_cpu"),
               ("dit", "quantization"), ("ingress", "limits", "max_duration_s"),
               ("ingress", "limits", "max_batch_size"), ("lm", "engine", "max_rows"))

# One-box placement: the share of the GPU (Ray's fractional ``num_gpus``) the LM deployments and the
# DiT deployments reserve between them. Ray only counts these; what keeps the two inside the card's
# memory is the tier's offload and quantization. The LM's share is the smaller: its weights are a
# third of the DiT side's at every tier's LM size.
LM_GPU_SHARE = 0.25
DIT_GPU_SHARE = 1.0 - LM_GPU_SHARE


def memory_profile(values: Dict[str, Any], requested: Union[str, float], num_gpus: Optional[int]) -> List[str]:
    """Apply the profile for ``requested`` ('auto' or GB) to ``values`` (``applications[].args``);
    ``num_gpus``: the local Ray's GPUs as given on the command line (None: detected as Ray does)."""
    if num_gpus is None:
        num_gpus = ray_gpu_count()
    if requested == "auto":
        detected = detected_gpu_memory_gb() if num_gpus else None
        if not detected:
            return ["memory profile: none (no CUDA device found; --gpu-memory-gb N picks a tier)"]
        lines = apply_memory_tier(values, detected, "detected")
    else:
        lines = apply_memory_tier(values, float(requested), "--gpu-memory-gb")
    return lines + place_on_one_gpu(values, num_gpus)


def ray_gpu_count() -> int:
    """The GPUs a local Ray started now would see (Ray's own count: CUDA_VISIBLE_DEVICES, else NVML;
    no CUDA context is created)."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    return int(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators() or 0)


def detected_gpu_memory_gb() -> Optional[float]:
    """The first CUDA device's memory, asked in a child process: CUDA initialised here would hold a
    context on the GPU for as long as the server runs."""
    code = "from acestep.tiers import detect_gpu_memory_gb as d; print(d() or '')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})
    answer = result.stdout.strip().splitlines()[-1:] or [""]
    return float(answer[0]) if answer[0] else None


def tier_values(tier, lm_enabled: bool) -> Dict[Tuple[str, ...], Any]:
    """{config path: value} of ``tier`` (``acestep.tiers.Tier``); the limits are those with the LM
    loaded when ``lm_enabled``; a tier without a KV-row count leaves the config's."""
    duration, batch = tier.limits(lm_enabled)
    values = (tier.offload_to_cpu, tier.offload_dit_to_cpu, tier.offload_to_cpu, tier.quantization, duration, batch,
              tier.lm_kv_rows)
    return {path: value for path, value in zip(TIER_FIELDS, values)
            if value is not None or path != ("lm", "engine", "max_rows")}


def apply_memory_tier(values: Dict[str, Any], gpu_memory_gb: float, how: str) -> List[str]:
    """Set the memory tier's settings in the app ``values`` field by field, leaving those the config
    sets; → the profile's lines."""
    from acestep.tiers import tier_for, tier_range

    tier = tier_for(gpu_memory_gb)
    described = f"memory tier {tier.name} ({tier_range(tier)}) for {gpu_memory_gb:g} GB of GPU memory"
    lm = values.get("lm") or {}
    lm_enabled = lm.get("enabled", _lm_default("enabled"))
    lines = [f"memory profile: {tier.name} ({tier_range(tier)}) for {gpu_memory_gb:g} GB of GPU memory ({how})"]
    for path, value in tier_values(tier, lm_enabled).items():
        section, name = _section(values, path)
        source = "config" if name in section else "tier"
        if source == "tier":
            section[name] = value
            if path[-2] == "limits":
                section.setdefault("origin", {})[name] = described
        lines.append(f"  {'.'.join(path)}: {json.dumps(section[name])} ({source})")
    lines.append(_lm_advice(tier, lm, lm_enabled))
    return lines


def place_on_one_gpu(values: Dict[str, Any], num_gpus: int) -> List[str]:
    """On a one-GPU machine, every LM and DiT deployment the config keeps off the GPU (no
    ``num_gpus``, or 0) moves onto it: ``device: cuda``, a fraction of the GPU each (the LM
    deployments share ``LM_GPU_SHARE``, the DiT deployments the rest) and one replica each (a second
    replica on the same card would hold a second copy of the weights; a ``min_replicas: 0`` of the
    config stays). Without a GPU, or with several (a cluster layout: cluster/gpu-profile.yaml),
    nothing moves."""
    if num_gpus != 1:
        reason = "no GPU for the local Ray" if not num_gpus else f"{num_gpus} GPUs: one deployment per GPU is yours to set"
        return [f"  placement: unchanged ({reason})"]
    from serve.config import AppConfig

    config = AppConfig.model_validate(values)  # the served models, the demo's extra base DiT included
    roles = {"dit": (DIT_GPU_SHARE, len(config.dit_models()))}
    if config.lm.enabled:
        roles["lm"] = (LM_GPU_SHARE, len(config.lm_models()))
    lines = ["  placement: one GPU shared by the LM and DiT deployments (one-box)"]
    for role, (share, count) in roles.items():
        section = values.setdefault(role, {})
        deployment = section.setdefault("deployment", {})
        actor = deployment.setdefault("ray_actor_options", {})
        if actor.get("num_gpus"):
            lines.append(f"  {role}.deployment.ray_actor_options.num_gpus: {json.dumps(actor['num_gpus'])} (config)")
            continue
        actor["num_gpus"] = round(share / count, 4)
        section["device"] = "cuda"
        scaling = deployment.setdefault("autoscaling_config", {})
        # at most one replica; a config's scale to zero stays (an idle model then frees the card)
        scaling.update(min_replicas=min(1, scaling.get("min_replicas", 1)), max_replicas=1)
        scaling.pop("initial_replicas", None)
        replicas = "one replica" if scaling["min_replicas"] else "at most one replica, zero when idle"
        lines.append(f"  {role}: device cuda, num_gpus {actor['num_gpus']:g} per deployment x {count}, "
                     f"{replicas} (one-box)")
    return lines


def _section(values: Dict[str, Any], path: Tuple[str, ...]) -> Tuple[Dict[str, Any], str]:
    *parents, name = path
    section = values
    for key in parents:
        section = section.setdefault(key, {})
    return section, name


def _lm_default(field: str) -> Any:
    from serve.config import LMSettings

    return LMSettings.model_fields[field].default


def _lm_advice(tier, lm: Dict[str, Any], lm_enabled: bool) -> str:
    """The tier's LM advice (not applied) beside what the config serves."""
    if not tier.lm_models:
        return (f"  lm (advice): none fits beside the DiT on {tier.name}: lm.enabled false "
                f"(now {json.dumps(lm_enabled)})")
    model, backend = lm.get("model", _lm_default("model")), lm.get("backend", _lm_default("backend"))
    return (f"  lm (advice): {tier.lm_model} on {tier.lm_backend} (fits: {', '.join(tier.lm_models)}); "
            f"configured: {model} on {backend}")
