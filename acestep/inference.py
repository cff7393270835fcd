"""The seed's API: data classes and generate_music / understand_music / create_sample / format_sample.

generate_music = prepare_request (validate, seeds) → plan_music (the 5 Hz LM, when asked for)
→ render_music (DiT + VAE + files). Serve and Ray Data run the same three steps on their own
replicas. This module is where the LM half and the DiT half meet, through plain LMPlan data.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


from acestep.audio import (
    SAMPLE_RATE,
    AudioLoadError,
    audio_duration,
    is_audio_bytes,
    is_audio_file,
    is_audio_path,
    is_silent,
    params_key,
    read_source_bytes,
    save_audio,
)
from acestep.dit.tasks import SOURCE_TASKS, TASK_INSTRUCTIONS
from acestep.fairness import Share
from acestep.lm.constants import DURATION_MAX
from acestep.params import (  # noqa: F401  (re-exported: the seed's import path)
    CreateSampleResult,
    FormatSampleResult,
    GenerationConfig,
    GenerationParams,
    GenerationResult,
    LMPlan,
    UnderstandResult,
)
from acestep.presets import apply_model
from acestep.stems import Stem, StemPlan, plan_stems
from acestep.validation import ValidationError, validate

logger = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
# The LM plans new songs; source tasks take their structure from the source, but an extension's
# new part is new music, which the LM plans (``lm_params``)
NO_LM_TASKS = tuple(task for task in SOURCE_TASKS if task != "extend")


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


def resolve_retake_seeds(params: GenerationParams, count: int):
    """One retake seed per item as "a,b,..." when retake is on (variance > 0), else the value as
    given. Like the seeds: one seed s gives s + item index; a list gives one per item; -1 or a
    missing entry draws a random one, so the recorded value reproduces the noise."""
    value = params.retake_seed
    if params.retake_variance <= 0:
        return value
    explicit = [int(p) for p in value.split(",") if p.strip()] if isinstance(value, str) else [value]
    explicit = [s for s in explicit if s is not None]
    if len(explicit) == 1 and explicit[0] >= 0:
        explicit = [explicit[0] + i for i in range(count)]
    seeds = [explicit[i] if i < len(explicit) and explicit[i] >= 0 else secrets.randbelow(2**32) for i in range(count)]
    return ",".join(str(s) for s in seeds)


def item_retake_seed(params: GenerationParams, index: int) -> Optional[int]:
    """Item ``index``'s resolved retake seed (None while retake is off)."""
    if params.retake_variance <= 0 or params.retake_seed is None:
        return None
    seeds = [int(p) for p in str(params.retake_seed).split(",") if p.strip()]
    return seeds[index] if index < len(seeds) else seeds[0]


AUDIO_FIELDS = ("src_audio", "reference_audio")


def _check_file(field_name: str, source: Any) -> None:
    """A path must name an existing file, bytes must be non-empty; file objects were read already."""
    if source is None or (is_audio_path(source) and not os.fspath(source)):
        return
    if is_audio_path(source):
        if not os.path.isfile(source):
            raise ValidationError(field_name, os.fspath(source), "an existing audio file")
    elif not is_audio_bytes(source):
        raise ValidationError(field_name, type(source).__name__, "a path, bytes or a binary file object")
    elif not memoryview(source).nbytes:
        raise ValidationError(field_name, "uploaded audio", "non-empty audio data")


def _read_audio_objects(params: GenerationParams) -> GenerationParams:
    """File objects (which cannot be deep-copied, and which several steps read) and mutable
    buffers become bytes, read once; paths and bytes are kept as they are."""
    changes = {}
    for name in AUDIO_FIELDS:
        source = getattr(params, name)
        if is_audio_file(source) or isinstance(source, (bytearray, memoryview)):
            try:
                changes[name] = read_source_bytes(source)
            except AudioLoadError as error:
                raise ValidationError(name, "uploaded audio", f"a readable binary file object ({error})") from None
    return dataclasses.replace(params, **changes) if changes else params


def prepare_request(params: GenerationParams, config: GenerationConfig, *,
                    is_turbo: Optional[bool] = None) -> Tuple[GenerationParams, GenerationConfig, List[int]]:
    """Validate (ValidationError naming the field) and resolve seeds (and retake seeds, written
    back into ``params.retake_seed``), on copies of the inputs.
    Audio inputs may be paths, bytes or binary file objects; the copies hold paths or bytes."""
    params, config = copy.deepcopy(_read_audio_objects(params)), copy.deepcopy(config)
    for name in AUDIO_FIELDS:
        _check_file(name, getattr(params, name))
    if params.task_type == "cover" and not params.src_audio and not params.audio_codes.strip():
        params.task_type = "text2music"  # as upstream: nothing to cover
        if params.instruction == TASK_INSTRUCTIONS["cover"]:
            params.instruction = TASK_INSTRUCTIONS["text2music"]
    src_duration = None
    if params.src_audio and (params.task_type in SOURCE_TASKS or params.flow_edit_morph):
        try:
            src_duration = audio_duration(params.src_audio)
        except AudioLoadError as error:
            shown = os.fspath(params.src_audio) if is_audio_path(params.src_audio) else "uploaded audio"
            raise ValidationError("src_audio", shown, f"a readable audio file ({error})") from error
    validate(params, config, is_turbo=is_turbo, src_duration=src_duration)
    params.retake_seed = resolve_retake_seeds(params, config.batch_size)
    return params, config, resolve_seeds(params, config)


def _llm_ready(llm_handler) -> bool:
    return llm_handler is not None and bool(getattr(llm_handler, "is_initialized", llm_handler is not None))


def uses_lm(llm_handler, params: GenerationParams) -> bool:
    wants = params.thinking or params.use_cot_metas or params.use_cot_caption or params.use_cot_language
    # a morph takes its structure from the source, as the source tasks do (upstream skips the LM too)
    return wants and params.task_type not in NO_LM_TASKS and not params.flow_edit_morph and _llm_ready(llm_handler)


def lm_params(params: GenerationParams) -> GenerationParams:
    """What the LM plans from. An extension's LM plans its new part alone: the request's caption,
    lyrics and metadata (bpm, keyscale, timesignature, vocal_language: the source's, as the request
    states them; those left out are the CoT's choice), for the new part's seconds (both sides
    together, rounded up, at most the LM's longest song: frames past its codes get none)."""
    if params.task_type != "extend":
        return params
    seconds = min(math.ceil(params.extend_left_s + params.extend_right_s), DURATION_MAX)
    return dataclasses.replace(params, duration=float(seconds))


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
    if (merged.duration is None or merged.duration <= 0) and isinstance(meta.get("duration"), (int, float)) \
            and merged.task_type != "extend":  # an extension's length is the source's plus the new part
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


def plan_music(llm_handler, params: GenerationParams, config: GenerationConfig, seeds: List[int],
               progress: Optional[Callable[[Any], None]] = None, cancel: Optional[Any] = None,
               group: Optional[str] = None, share: Share = Share()) -> PlanOutcome:
    """Run the LM when the params ask for it and one is loaded; otherwise pass through.
    ``progress`` receives ``acestep.lm.request.LMProgress`` events, ``cancel`` is an
    ``acestep.lm.request.Cancellation``, ``group`` labels the engine requests (see the planner),
    ``share`` (tenant, priority class) places them in the engine's admission order."""
    if not uses_lm(llm_handler, params):
        return PlanOutcome(plans=None, params=params)
    started = time.perf_counter()
    plans = llm_handler.plan(lm_params(params), config, seeds, progress=progress, cancel=cancel, group=group,
                             share=share)
    # items decode concurrently: a phase's time is its longest item's
    phase1 = max(p.phase1_time for p in plans)
    phase2 = max(p.phase2_time for p in plans)
    costs = {"lm_phase1_time": phase1, "lm_phase2_time": phase2, "lm_total_time": time.perf_counter() - started}
    status = f"LM planned {len(plans)} item(s): phase1 {phase1:.2f}s, phase2 {phase2:.2f}s"
    return PlanOutcome(plans=plans, params=merge_plan(params, plans[0]), time_costs=costs, status=status)


def plan_music_batch(llm_handler, jobs: List[Any]) -> List[Any]:
    """``plan_music`` for many requests at once (``.params``, ``.config``, ``.seeds`` each), one
    thread per request: their engine requests meet in the LM engine's running batch. A failed
    request gets its exception in place of a PlanOutcome."""
    from concurrent.futures import ThreadPoolExecutor

    def run(job):
        try:
            return plan_music(llm_handler, job.params, job.config, job.seeds)
        except Exception as error:  # reported per request
            return error

    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="lm-planner") as pool:
        return list(pool.map(run, jobs))


def _save_items(audios, item_params, seeds, plans, audio_format: str, save_dir: Optional[str],
                stems: Optional[List[Stem]] = None):
    """One result dict per audio; ``stems`` labels each with its track (and its song's retake seed)."""
    results, warnings = [], []
    for i, audio in enumerate(audios):
        audio_params = item_params[i].to_dict()
        audio_params["seed"] = seeds[i]
        if item_params[i].retake_variance > 0:
            audio_params["retake_seed"] = item_retake_seed(item_params[i], stems[i].song if stems else i)
        audio_params["audio_codes"] = plans[i].audio_codes if plans else item_params[i].audio_codes
        if stems:
            audio_params["track"] = stems[i].track
        key = params_key(audio_params)
        silent = is_silent(audio)
        path = ""
        if save_dir and not silent:
            path = str(save_audio(audio, Path(save_dir) / f"{key}.{audio_format}", audio_format))
        if silent:
            warnings.append(f"item {i} is silent and was not saved")
        results.append({"path": path, "tensor": audio, "key": key, "sample_rate": SAMPLE_RATE, "params": audio_params,
                        "silent": silent, **({"track": stems[i].track} if stems else {})})
    return results, warnings


@dataclass
class RenderJob:
    """One request's DiT step (what render_music takes), for rendering many requests together."""

    params: GenerationParams
    config: GenerationConfig
    seeds: List[int]
    plans: Optional[List[LMPlan]] = None
    save_dir: Optional[str] = None
    lm_time_costs: Optional[Dict[str, float]] = None

    def item_params(self) -> List[GenerationParams]:
        """One GenerationParams per item: the request's, with each item's LM plan merged in."""
        return [merge_plan(self.params, p) for p in self.plans] if self.plans else [self.params] * len(self.seeds)

    def stem_plan(self) -> Optional[StemPlan]:
        """With ``tracks``: the items of every track of every song (``acestep.stems``); else None."""
        return plan_stems(self.item_params(), self.seeds) if self.params.tracks is not None else None


def _failure(error: Exception) -> GenerationResult:
    return GenerationResult(audios=[], status_message=f"Error: {error}", extra_outputs={}, success=False,
                            error=str(error))


def submit_render(dit_handler, job: RenderJob, progress: Optional[Progress] = None, adapters=None,
                  share: Share = Share(), stream=None):
    """Start ``job`` on the DiT worker without waiting: a ``concurrent.futures.Future`` of its
    ``RenderOutput`` (``render_result`` turns it into the seed's result). Concurrent jobs share
    the worker's running batch whatever their lengths and settings, each getting the audio it
    would get alone; ``future.cancel()`` drops the job's items. ``adapters``: an
    ``AdapterSetting`` (loaded adapters and scales); None uses the handler's default. ``share``
    (tenant, priority class) places its items in the running batch's admission order. ``stream``
    (``acestep.dit.worker.SongSink``) gets each song's audio while the VAE decodes it (not with
    ``tracks`` or ``extend``: ValueError naming ``stream``)."""
    import dataclasses

    from acestep.dit.prepare import sampling_settings

    settings = sampling_settings(job.params)
    if adapters is not None:
        settings = dataclasses.replace(settings, adapters=tuple(adapters))
    items, seeds, stems = job.item_params(), job.seeds, job.stem_plan()
    if stems is not None:  # every track one item of this request: one source encode, shared forwards
        if stream is not None:
            from acestep.audio import NOT_STREAMED

            raise ValueError(f"stream: {NOT_STREAMED['tracks']}")
        items, seeds = stems.items, stems.seeds
        settings = dataclasses.replace(settings, retake_seeds=stems.retake_seeds(settings.retake_seeds))
    return dit_handler.submit(items, seeds, settings, progress, share=share, stream=stream)


def render_result(job: RenderJob, output) -> GenerationResult:
    """The seed's ``GenerationResult`` for a rendered job (writes its files when ``save_dir`` is set)."""
    item_params, seeds, plans, audios = job.item_params(), job.seeds, job.plans, output.audios
    plan = job.stem_plan()
    if plan is not None:  # the plans are already merged into the item params
        item_params, plans, audios = plan.outputs, None, plan.combine(output.audios)
        seeds = [job.seeds[stem.song] for stem in plan.stems]
    audios, warnings = _save_items(audios, item_params, seeds, plans, job.config.audio_format, job.save_dir,
                                   plan.stems if plan is not None else None)
    lm_costs = dict(job.lm_time_costs or {})
    dit_costs = {f"dit_{k}": v for k, v in output.time_costs.items()}
    time_costs = {**lm_costs, **dit_costs}
    time_costs["pipeline_total_time"] = lm_costs.get("lm_total_time", 0.0) + dit_costs["dit_total_time_cost"]
    latents = output.latents
    extra: Dict[str, Any] = {
        "lm_metadata": job.plans[0].metadata if job.plans else None, "time_costs": time_costs,
        "latents": latents, "masks": output.extras.get("chunk_masks"), "pred_latents": latents,
        "seed_value": ", ".join(str(s) for s in job.seeds), **output.extras,
    }
    if plan is not None:  # the latents and masks above are the rendered items' (a mix's parts each)
        extra["tracks"] = [stem.track for stem in plan.stems]
    status = "; ".join([f"Generated {len(audios)} audio(s) in {time_costs['dit_total_time_cost']:.2f}s"] + warnings)
    return GenerationResult(audios=audios, status_message=status, extra_outputs=extra, success=True, error=None)


def render_music_batch(dit_handler, jobs: List[RenderJob], progress: Optional[Progress] = None
                       ) -> List[GenerationResult]:
    """Render many requests at once: all are submitted to the DiT worker, whose running batch they
    share (``submit_render``). A job that fails (unreadable audio, say) fails alone."""
    futures = [submit_render(dit_handler, job, progress) for job in jobs]
    results = []
    for job, future in zip(jobs, futures):
        try:
            results.append(render_result(job, future.result()))
        except Exception as error:  # this job only
            results.append(_failure(error))
    return results


def render_music(dit_handler, params: GenerationParams, config: GenerationConfig, seeds: List[int],
                 plans: Optional[List[LMPlan]] = None, save_dir: Optional[str] = None,
                 progress: Optional[Progress] = None,
                 lm_time_costs: Optional[Dict[str, float]] = None) -> GenerationResult:
    """DiT + VAE for every item (one per seed); writes ``{save_dir}/{key}.{format}`` files.
    Failures raise (generate_music turns them into results)."""
    job = RenderJob(params, config, seeds, plans, save_dir, lm_time_costs)
    return render_result(job, submit_render(dit_handler, job, progress).result())


def _lm_progress(progress: Optional[Progress]):
    """LM progress into the seed's ``progress(fraction, desc)`` callback, desc starting with "LM"."""
    if progress is None:
        return None

    def report(event) -> None:
        expected = event.tokens_expected or "?"
        progress(event.fraction or 0.0, f"LM {event.phase} {event.tokens_done}/{expected} tokens")

    return report


def generate_music(dit_handler, llm_handler, params: GenerationParams, config: GenerationConfig,
                   save_dir: Optional[str] = None, progress: Optional[Progress] = None) -> GenerationResult:
    """The seed's entry point. Errors come back as ``success=False, error=...``, never raised."""
    try:
        ready = getattr(dit_handler, "is_initialized", False)
        params, report = apply_model(params, dit_handler.family if ready else None,
                                     model=dit_handler.model_name if ready else None)
        params, config, seeds = prepare_request(params, config, is_turbo=report.family == "turbo" if ready else None)
        outcome = plan_music(llm_handler, params, config, seeds, progress=_lm_progress(progress))
        result = render_music(dit_handler, params, config, seeds, outcome.plans, save_dir, progress,
                              outcome.time_costs)
        if outcome.status:
            result.status_message = outcome.status + "; " + result.status_message
        result.extra_outputs["preset"] = report.to_dict()
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
