"""Two-phase text2music planning (upstream ``generate_with_stop_condition`` + the LM part of
``generate_music``), per item.

Phase 1 (CoT metadata) runs iff ``use_cot_metas`` and the user did not give all of bpm, keyscale,
time signature and duration; phase 2 (audio codes) runs iff ``thinking`` and no user codes.
Differences from upstream, on purpose:
- phase 1 runs once per item with that item's seed (upstream: once per chunk, unseeded), so
  every item is independent and reproducible whatever the chunking;
- each phase draws from a generator seeded with the item's seed (phase 2 does not depend on how
  many tokens phase 1 drew);
- phase 2 stops after exactly ``int(duration·5)`` codes for the user's duration or, when the user
  gave none, for the CoT duration (upstream B4: the LM-chosen duration was ignored and the code
  count was whatever the LM emitted);
- the token budget is also capped so prompt + completion fit ``max_model_len``.
The LM is in-process; chunks of ``lm_batch_chunk_size`` items decode as one batch when
``allow_lm_batch`` is set, one item at a time otherwise. ``LMPlan.phase1_time``/``phase2_time`` are
the item's share of its chunk's wall time, so summing over items gives the real time."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Protocol, Sequence

from acestep.lm import constants as C
from acestep.lm import prompts as P
from acestep.lm.engine import LMRequest
from acestep.lm.fsm import FsmSpec
from acestep.lm.parsing import parse_lm_output
from acestep.lm.sampling import SamplingConfig
from acestep.params import GenerationConfig, GenerationParams, LMPlan


class LMContext(Protocol):
    """What the planner needs from the handler."""

    max_model_len: int

    def render(self, messages, add_generation_prompt: bool) -> str: ...
    def tokenize(self, text: str) -> List[int]: ...
    def generate_texts(self, requests: Sequence[LMRequest]) -> List[str]: ...


def user_metadata_from_params(params: GenerationParams) -> Dict[str, Any]:
    """bpm (int, > 0), keyscale / timesignature (stripped, not n/a), duration (int, > 0)."""
    meta: Dict[str, Any] = {}
    try:
        if params.bpm is not None and float(params.bpm) > 0:
            meta["bpm"] = int(float(params.bpm))
    except (TypeError, ValueError):
        pass
    for key in ("keyscale", "timesignature"):
        value = (getattr(params, key) or "").strip()
        if value and value.lower() != "n/a":
            meta[key] = value
    try:
        if params.duration is not None and float(params.duration) > 0:
            meta["duration"] = int(float(params.duration))
    except (TypeError, ValueError):
        pass
    return meta


def has_all_metas(user_metadata: Optional[Dict[str, Any]]) -> bool:
    return bool(user_metadata) and all(k in user_metadata for k in ("bpm", "keyscale", "timesignature", "duration"))


def sampling_from_params(params: GenerationParams) -> SamplingConfig:
    top_k = None if not params.lm_top_k else int(params.lm_top_k)
    top_p = None if not params.lm_top_p or params.lm_top_p >= 1.0 else float(params.lm_top_p)
    return SamplingConfig(temperature=float(params.lm_temperature), cfg_scale=float(params.lm_cfg_scale),
                          top_k=top_k, top_p=top_p)


def token_budget(target_duration: Optional[float], prompt_len: int, max_model_len: int) -> int:
    """Upstream's ``max_new_tokens`` (5·clamp(d, 10, 600) + 500, else the context), capped to fit."""
    if target_duration is not None and target_duration > 0:
        budget = int(max(C.DURATION_MIN, min(C.DURATION_MAX, target_duration)) * C.CODES_PER_SECOND) + 500
    else:
        budget = max_model_len
    budget = min(budget, max_model_len - 64, max_model_len - prompt_len)
    if budget <= 0:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in max_model_len={max_model_len}")
    return budget


def codes_target(user_metadata: Dict[str, Any], metadata: Dict[str, Any]) -> Optional[float]:
    for source in (user_metadata, metadata):
        value = source.get("duration")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def cot_request(lm: LMContext, params: GenerationParams, user_metadata: Dict[str, Any], seed: int) -> LMRequest:
    sampling = sampling_from_params(params)
    prompt = lm.tokenize(P.cot_prompt(lm.render, params.caption, params.lyrics))
    uncond = None
    if sampling.uses_cfg:
        uncond = lm.tokenize(P.cot_uncond_prompt(lm.render, params.lyrics, params.lm_negative_prompt))
    spec = FsmSpec(phase="cot", skip_caption=not params.use_cot_caption, skip_language=not params.use_cot_language,
                   skip_genres=True, stop_at_reasoning=True, user_metadata=user_metadata or None)
    return LMRequest(prompt, sampling, seed, token_budget(None, max(len(prompt), len(uncond or [])), lm.max_model_len),
                     uncond, spec if params.use_constrained_decoding else None)


def codes_request(lm: LMContext, params: GenerationParams, metadata: Dict[str, Any],
                  target: Optional[float], seed: int) -> LMRequest:
    sampling = sampling_from_params(params)
    cot = P.format_metadata_as_cot(metadata)
    prompt = lm.tokenize(P.codes_prompt(lm.render, params.caption, params.lyrics, cot))
    uncond = None
    if sampling.uses_cfg:
        uncond = lm.tokenize(P.codes_uncond_prompt(lm.render, params.caption, params.lyrics, params.lm_negative_prompt))
    target_codes = int(target * C.CODES_PER_SECOND) if target else None
    spec = FsmSpec(phase="codes", target_codes=target_codes)
    budget = token_budget(target, max(len(prompt), len(uncond or [])), lm.max_model_len)
    return LMRequest(prompt, sampling, seed, budget, uncond, spec if params.use_constrained_decoding else None)


def _parse_cot(text: str) -> Dict[str, Any]:
    metadata, _ = parse_lm_output(text)
    if not metadata:
        raise RuntimeError(f"LM phase 1 produced no metadata (output: {text[:200]!r})")
    return metadata


def _plan_chunk(lm: LMContext, params: GenerationParams, user_metadata: Dict[str, Any],
                seeds: Sequence[int], run_phase1: bool, run_phase2: bool) -> List[LMPlan]:
    plans = [LMPlan(metadata=dict(user_metadata), seed=int(s)) for s in seeds]
    if run_phase1:
        start = time.perf_counter()
        texts = lm.generate_texts([cot_request(lm, params, user_metadata, s) for s in seeds])
        share = (time.perf_counter() - start) / len(plans)
        for plan, text in zip(plans, texts):
            plan.metadata, plan.phase1_time = _parse_cot(text), share
    if run_phase2:
        start = time.perf_counter()
        requests = [codes_request(lm, params, p.metadata, codes_target(user_metadata, p.metadata), p.seed)
                    for p in plans]
        texts = lm.generate_texts(requests)
        share = (time.perf_counter() - start) / len(plans)
        for plan, text in zip(plans, texts):
            plan.audio_codes, plan.phase2_time = parse_lm_output(text)[1], share
    return plans


def plan(lm: LMContext, params: GenerationParams, config: GenerationConfig, seeds: Sequence[int]) -> List[LMPlan]:
    """One LMPlan per item (``len(seeds) == config.batch_size``)."""
    if len(seeds) != config.batch_size:
        raise ValueError(f"got {len(seeds)} seeds for batch_size={config.batch_size}")
    user_metadata = user_metadata_from_params(params)
    run_phase1 = params.use_cot_metas and not has_all_metas(user_metadata)
    run_phase2 = params.thinking and not (params.audio_codes or "").strip()
    size = int(config.lm_batch_chunk_size or 0)
    chunk = (size if size > 0 else len(seeds)) if config.allow_lm_batch else 1
    plans: List[LMPlan] = []
    for start in range(0, len(seeds), chunk):
        plans += _plan_chunk(lm, params, user_metadata, seeds[start:start + chunk], run_phase1, run_phase2)
    return plans
