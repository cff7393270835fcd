"""The seed's API: data classes and generate_music / understand_music / create_sample / format_sample.

generate_music = prepare_request (validate, seeds) → plan_music (the 5 Hz LM, when asked for)
→ render_music (DiT + VAE + files). Serve and Ray Data run the same three steps on their own
replicas. This module is where the LM half and the DiT half meet, through plain LMPlan data.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from acestep.audio import AudioLoadError, audio_duration, is_silent, params_key, save_audio
from acestep.dit.tasks import SOURCE_TASKS, TASK_INSTRUCTIONS
from acestep.params import (  # noqa: F401  (re-exported: the seed's import path)
    CreateSampleResult,
    FormatSampleResult,
    GenerationConfig,
    GenerationParams,
    GenerationResult,
    LMPlan,
    UnderstandResult,
)
from acestep.validation import ValidationError, validate

logger = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
NO_LM_TASKS = SOURCE_TASKS  # the LM plans new songs; source tasks take their structure from the source


@dataclass
class PlanOutcome:
    """What the LM step hands the DiT step."""

    plans: Optional[List[LMPlan]]
    params: GenerationParams  # item 0's params with the LM metadata merged (for display)
    time_costs: Dict[str, float] = field(default_factory=dict)
    status: str = ""


def resolve_seeds(params: GenerationParams, config: GenerationConfig) -> List[int]:
    """One seed per item. ``use_random_seed`` draws all; otherwise ``config.seeds`` (an int or a
    list, padded with random seeds, -1 entries random), else ``params.seed`` + item index."""
    count = config.batch_size
    if config.use_random_seed:
        return [secrets.randbelow(2**32) for _ in range(count)]
    if config.seeds is not None:
        explicit = list(config.seeds) if isinstance(config.seeds, (list, tuple)) else [config.seeds]
    elif params.seed >= 0:
        explicit = [params.seed + i for i in range(count)]
    else:
        explicit = []
    return [explicit[i] if i < len(explicit) and explicit[i] >= 0 else secrets.randbelow(2**32) for i in range(count)]


def _check_file(field_name: str, path: Optional[str]) -> None:
    if path and not os.path.isfile(path):
        raise ValidationError(field_name, path, "an existing audio file")


def prepare_request(params: GenerationParams, config: GenerationConfig, *,
                    is_turbo: Optional[bool] = None) -> Tuple[GenerationParams, GenerationConfig, List[int]]:
    """Validate (ValidationError naming the field) and resolve seeds, on copies of the inputs."""
    params, config = copy.deepcopy(params), copy.deepcopy(config)
    if params.task_type == "cover" and not params.src_audio and not params.audio_codes.strip():
        params.task_type = "text2music"  # as upstream: nothing to cover
        if params.instruction == TASK_INSTRUCTIONS["cover"]:
            params.instruction = TASK_INSTRUCTIONS["text2music"]
    _check_file("src_audio", params.src_audio)
    _check_file("reference_audio", params.reference_audio)
    src_duration = None
    if params.src_audio and params.task_type in SOURCE_TASKS:
        try:
            src_duration = audio_duration(params.src_audio)
        except AudioLoadError as error:
            raise ValidationError("src_audio", params.src_audio, f"a readable audio file ({error})") from error
    validate(params, config, is_turbo=is_turbo, src_duration=src_duration)
    return params, config, resolve_seeds(params, config)


def _llm_ready(llm_handler) -> bool:
    return llm_handler is not None and bool(getattr(llm_handler, "is_initialized", llm_handler is not None))


def uses_lm(llm_handler, params: GenerationParams) -> bool:
    wants = params.thinking or params.use_cot_metas or params.use_cot_caption or params.use_cot_language
    return wants and params.task_type not in NO_LM_TASKS and _llm_ready(llm_handler)


def merge_plan(params: GenerationParams, plan: Optional[LMPlan]) -> GenerationParams:
    """Item params after the LM: user values win; empty fields take the CoT's; cot_* filled;
    the LM caption and language replace the user's when use_cot_caption / use_cot_language."""
    if plan is None:
        return params
    meta = plan.metadata or {}
    merged = dataclasses.replace(params)
    if not merged.bpm and isinstance(meta.get("bpm"), int):
        merged.bpm = meta["bpm"]
    for name in ("keyscale", "timesignature"):
        if not str(getattr(merged, name) or "").strip() and meta.get(name):
            setattr(merged, name, str(meta[name]))
    if (merged.duration is None or merged.duration <= 0) and isinstance(meta.get("duration"), (int, float)):
        merged.duration = float(meta["duration"])
    language = meta.get("vocal_language") or meta.get("language")
    merged.cot_bpm = meta.get("bpm") if isinstance(meta.get("bpm"), int) else None
    merged.cot_keyscale = str(meta.get("keyscale") or "")
    merged.cot_timesignature = str(meta.get("timesignature") or "")
    merged.cot_duration = float(meta["duration"]) if isinstance(meta.get("duration"), (int, float)) else None
    merged.cot_vocal_language = str(language or "unknown")
    merged.cot_caption = str(meta.get("caption") or "")
    if params.use_cot_caption and merged.cot_caption:
        merged.caption = merged.cot_caption
    if params.use_cot_language and language and merged.vocal_language in ("", "unknown"):
        merged.vocal_language = str(language)
    if plan.audio_codes:
        merged.audio_codes = plan.audio_codes
    return merged


def plan_music(llm_handler, params: GenerationParams, config: GenerationConfig, seeds: List[int]) -> PlanOutcome:
    """Run the LM when the params ask for it and one is loaded; otherwise pass through."""
    if not uses_lm(llm_handler, params):
        return PlanOutcome(plans=None, params=params)
    started = time.perf_counter()
    plans = llm_handler.plan(params, config, seeds)
    phase1 = sum(p.phase1_time for p in plans)
    phase2 = sum(p.phase2_time for p in plans)
    costs = {"lm_phase1_time": phase1, "lm_phase2_time": phase2, "lm_total_time": time.perf_counter() - started}
    status = f"LM planned {len(plans)} item(s): phase1 {phase1:.2f}s, phase2 {phase2:.2f}s"
    return PlanOutcome(plans=plans, params=merge_plan(params, plans[0]), time_costs=costs, status=status)


def _save_items(audios, item_params, seeds, plans, audio_format: str, save_dir: Optional[str]):
    results, warnings = [], []
    for i, audio in enumerate(audios):
        audio_params = item_params[i].to_dict()
        audio_params["seed"] = seeds[i]
        audio_params["audio_codes"] = plans[i].audio_codes if plans else item_params[i].audio_codes
        key = params_key(audio_params)
        silent = is_silent(audio)
        path = ""
        if save_dir and not silent:
            path = str(save_audio(audio, Path(save_dir) / f"{key}.{audio_format}", audio_format))
        if silent:
            warnings.append(f"item {i} is silent and was not saved")
        results.append({"path": path, "tensor": audio, "key": key, "sample_rate": 48000, "params": audio_params,
                        "silent": silent})
    return results, warnings


def render_music(dit_handler, params: GenerationParams, config: GenerationConfig, seeds: List[int],
                 plans: Optional[List[LMPlan]] = None, save_dir: Optional[str] = None,
                 progress: Optional[Progress] = None,
                 lm_time_costs: Optional[Dict[str, float]] = None) -> GenerationResult:
    """DiT + VAE for every item (one per seed); writes ``{save_dir}/{key}.{format}`` files."""
    item_params = [merge_plan(params, p) for p in plans] if plans else [params] * len(seeds)
    output = dit_handler.render(item_params, seeds, progress)
    audios, warnings = _save_items(output.audios, item_params, seeds, plans, config.audio_format, save_dir)
    lm_costs = dict(lm_time_costs or {})
    time_costs = {**lm_costs, **{f"dit_{k}": v for k, v in output.time_costs.items()}}
    time_costs["pipeline_total_time"] = lm_costs.get("lm_total_time", 0.0) + time_costs["dit_total_time_cost"]
    extra: Dict[str, Any] = {
        "lm_metadata": plans[0].metadata if plans else None, "time_costs": time_costs,
        "latents": output.latents, "masks": output.extras["chunk_masks"], "pred_latents": output.latents,
        "seed_value": ", ".join(str(s) for s in seeds), **output.extras,
    }
    status = "; ".join([f"Generated {len(audios)} audio(s) in {time_costs['dit_total_time_cost']:.2f}s"] + warnings)
    return GenerationResult(audios=audios, status_message=status, extra_outputs=extra, success=True, error=None)


def generate_music(dit_handler, llm_handler, params: GenerationParams, config: GenerationConfig,
                   save_dir: Optional[str] = None, progress: Optional[Progress] = None) -> GenerationResult:
    """The seed's entry point. Errors come back as ``success=False, error=...``, never raised."""
    try:
        is_turbo = dit_handler.is_turbo if getattr(dit_handler, "is_initialized", False) else None
        params, config, seeds = prepare_request(params, config, is_turbo=is_turbo)
        outcome = plan_music(llm_handler, params, config, seeds)
        result = render_music(dit_handler, params, config, seeds, outcome.plans, save_dir, progress,
                              outcome.time_costs)
        if outcome.status:
            result.status_message = outcome.status + "; " + result.status_message
        return result
    except Exception as error:  # the seed API reports every failure in the result
        logger.warning("generate_music failed: %s", error, exc_info=not isinstance(error, ValueError))
        return GenerationResult(audios=[], status_message=f"Error: {error}", extra_outputs={}, success=False,
                                error=str(error))


def understand_music(llm_handler, audio_codes: str, **kwargs) -> UnderstandResult:
    from acestep.lm.api import understand_music as run

    return run(llm_handler, audio_codes, **kwargs)


def create_sample(llm_handler, query: str, **kwargs) -> CreateSampleResult:
    from acestep.lm.api import create_sample as run

    return run(llm_handler, query, **kwargs)


def format_sample(llm_handler, caption: str, lyrics: str, **kwargs) -> FormatSampleResult:
    from acestep.lm.api import format_sample as run

    return run(llm_handler, caption, lyrics, **kwargs)
