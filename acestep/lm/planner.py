"""Two-phase text2music planning (upstream ``generate_with_stop_condition`` + the LM part of
``generate_music``), per item.

Phase 1 (CoT metadata) runs iff ``use_cot_metas`` and the user did not give all of bpm, keyscale,
time signature and duration; phase 2 (audio codes) runs iff ``thinking`` and no user codes.
Each item is a chain phase 1 -> phase 2 of engine requests; ``plan`` submits them into the one
engine and waits, keeping at most ``lm_batch_chunk_size`` of its items in the engine at once
(one when ``allow_lm_batch`` is off). Concurrent callers (Serve requests, Ray Data rows) simply call
``plan`` at the same time: their requests meet in the engine's running batch, with no barrier.
Differences from upstream, on purpose:
- phase 1 runs once per item with that item's seed (upstream: once per chunk, unseeded), so
  every item is independent and reproducible whatever the chunking;
- each phase draws from a generator seeded with the item's seed (phase 2 does not depend on how
  many tokens phase 1 drew);
- phase 2 stops after exactly ``int(duration·5)`` codes for the user's duration or, when the user
  gave none, for the CoT duration (upstream: the LM-chosen duration was ignored and the code
  count was whatever the LM emitted);
- the token budget is also capped so prompt + completion fit ``max_model_len``.
``LMPlan.phase1_time``/``phase2_time`` are the item's own wall time in each phase."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
import threading
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

from acestep.fairness import Share
from acestep.lm import constants as C
from acestep.lm import prompts as P
from acestep.lm.fsm import FsmSpec
from acestep.lm.parsing import parse_lm_output
from acestep.lm.request import Cancellation, LMProgress, LMRequest, SamplingConfig
from acestep.params import GenerationConfig, GenerationParams, LMPlan

ProgressCallback = Callable[[LMProgress], None]
PROGRESS_STEP = 0.05  # report codes progress at every 5 % of the expected codes
COT_REPORT_EVERY = 16  # CoT length is the model's choice: report every 16 tokens


class LMContext(Protocol):
    """What the planner and the modes need from the handler."""

    max_model_len: int

    def render(self, messages, add_generation_prompt: bool) -> str: ...
    def tokenize(self, text: str) -> List[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def submit(self, request: LMRequest, on_step: Optional[Callable[[int], None]] = None) -> Future: ...


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
    return SamplingConfig.of(params.lm_temperature, params.lm_top_k, params.lm_top_p, cfg_scale=params.lm_cfg_scale)


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


def cot_request(lm: LMContext, params: GenerationParams, user_metadata: Dict[str, Any], seed: int,
                group: Optional[str] = None, share: Share = Share()) -> LMRequest:
    sampling = sampling_from_params(params)
    prompt = lm.tokenize(P.cot_prompt(lm.render, params.caption, params.lyrics))
    uncond = None
    if sampling.uses_cfg:
        uncond = lm.tokenize(P.cot_uncond_prompt(lm.render, params.lyrics, params.lm_negative_prompt))
    spec = FsmSpec(phase="cot", skip_caption=not params.use_cot_caption, skip_language=not params.use_cot_language,
                   skip_genres=True, stop_at_reasoning=True, user_metadata=user_metadata or None)
    return LMRequest(prompt, sampling, seed, token_budget(None, max(len(prompt), len(uncond or [])), lm.max_model_len),
                     uncond, spec if params.use_constrained_decoding else None, group, share.tenant, share.priority)


def codes_prompts(lm: LMContext, params: GenerationParams, metadata: Dict[str, Any]) -> tuple[str, Optional[str]]:
    """Phase 2's conditional prompt (the CoT re-serialised from ``metadata``) and its unconditional
    prompt (``None`` without CFG)."""
    cot = P.format_metadata_as_cot(metadata)
    prompt = P.codes_prompt(lm.render, params.caption, params.lyrics, cot)
    uncond = None
    if sampling_from_params(params).uses_cfg:
        uncond = P.codes_uncond_prompt(lm.render, params.caption, params.lyrics, params.lm_negative_prompt)
    return prompt, uncond


def codes_request(lm: LMContext, params: GenerationParams, metadata: Dict[str, Any],
                  target: Optional[float], seed: int, group: Optional[str] = None,
                  share: Share = Share()) -> LMRequest:
    prompt_text, uncond_text = codes_prompts(lm, params, metadata)
    prompt = lm.tokenize(prompt_text)
    uncond = lm.tokenize(uncond_text) if uncond_text is not None else None
    target_codes = int(target * C.CODES_PER_SECOND) if target else None
    spec = FsmSpec(phase="codes", target_codes=target_codes)
    budget = token_budget(target, max(len(prompt), len(uncond or [])), lm.max_model_len)
    return LMRequest(prompt, sampling_from_params(params), seed, budget, uncond,
                     spec if params.use_constrained_decoding else None, group, share.tenant, share.priority)


def _parse_cot(text: str) -> Dict[str, Any]:
    metadata, _ = parse_lm_output(text)
    if not metadata:
        raise RuntimeError(f"LM phase 1 produced no metadata (output: {text[:200]!r})")
    return metadata


@dataclass(eq=False)
class _Item:
    """One item's chain of phases (remaining, current first) and its token counts per phase."""

    plan: LMPlan
    phases: List[str]
    started: float = 0.0
    tokens: Dict[str, int] = field(default_factory=dict)
    codes_expected: Optional[int] = None  # codes + the stop token, once the target is known


class _Reporter:
    """Rate-limited, monotone ``LMProgress`` over one call's items (engine and planner threads)."""

    def __init__(self, callback: Optional[ProgressCallback], items: List[_Item]):
        self.callback, self.items = callback, items
        self.last: Optional[LMProgress] = None
        self.lock = threading.Lock()

    def update(self, item: _Item, phase: str, tokens: int) -> None:
        if self.callback is None:
            return
        with self.lock:
            item.tokens[phase] = max(tokens, item.tokens.get(phase, 0))
            event, step = self._snapshot()
            last = self.last
            complete = event.fraction == 1.0 and event != last
            if not complete and last is not None and last.phase == event.phase \
                    and event.tokens_done < last.tokens_done + step:
                return
            self.last = event
        self.callback(event)

    def _snapshot(self) -> tuple[LMProgress, int]:
        if not any("codes" in i.tokens for i in self.items):
            return LMProgress("cot", sum(i.tokens.get("cot", 0) for i in self.items)), COT_REPORT_EVERY
        known = [i.codes_expected for i in self.items if i.codes_expected]
        guess = sum(known) // len(known) if known else 0  # items whose CoT has not chosen a duration yet
        expected = sum(i.codes_expected or guess for i in self.items) or None
        done = sum(i.tokens.get("codes", 0) for i in self.items)
        return LMProgress("codes", done, expected), max(1, int(expected * PROGRESS_STEP)) if expected else COT_REPORT_EVERY


def _window(config: GenerationConfig, items: int) -> int:
    """``lm_batch_chunk_size``: the most items of one request in the engine at once."""
    if not config.allow_lm_batch:
        return 1
    size = int(config.lm_batch_chunk_size or 0)
    return size if size > 0 else items


def plan(lm: LMContext, params: GenerationParams, config: GenerationConfig, seeds: Sequence[int],
         progress: Optional[ProgressCallback] = None, cancel: Optional[Cancellation] = None,
         group: Optional[str] = None, share: Share = Share()) -> List[LMPlan]:
    """One LMPlan per item (``len(seeds) == config.batch_size``). ``progress`` gets rate-limited
    ``LMProgress`` events; ``cancel`` aborts the call's engine requests (raises CancelledError);
    ``group`` labels its requests in the engine's stats; ``share`` places them in its admission
    order (``acestep.fairness``)."""
    if len(seeds) != config.batch_size:
        raise ValueError(f"got {len(seeds)} seeds for batch_size={config.batch_size}")
    user_metadata = user_metadata_from_params(params)
    phases = (["cot"] if params.use_cot_metas and not has_all_metas(user_metadata) else [])
    phases += ["codes"] if params.thinking and not (params.audio_codes or "").strip() else []
    items = [_Item(LMPlan(metadata=dict(user_metadata), seed=int(s)), list(phases)) for s in seeds]
    reporter = _Reporter(progress, items)
    cancel = cancel or Cancellation()

    def submit(item: _Item) -> Future:
        phase = item.phases[0]
        if phase == "cot":
            request = cot_request(lm, params, user_metadata, item.plan.seed, group, share)
        else:
            target = codes_target(user_metadata, item.plan.metadata)
            request = codes_request(lm, params, item.plan.metadata, target, item.plan.seed, group, share)
            item.codes_expected = int(target * C.CODES_PER_SECOND) + 1 if target else None
        item.started = time.perf_counter()
        future = cancel.track(lm.submit(request, lambda tokens: reporter.update(item, phase, tokens)))
        future.add_done_callback(finished.put)  # finished, failed or cancelled: the planner wakes
        return future

    todo, pending, finished = deque(i for i in items if i.phases), {}, SimpleQueue()
    window = _window(config, len(items))
    try:
        while todo or pending:
            while todo and len(pending) < window:
                item = todo.popleft()
                pending[submit(item)] = item
            future = finished.get()
            item = pending.pop(future)
            ids = future.result()
            reporter.update(item, item.phases[0], len(ids))
            _finish_phase(item, lm.decode(ids))
            if item.phases:
                pending[submit(item)] = item
    except BaseException:
        cancel.cancel()
        raise
    return [item.plan for item in items]


def _finish_phase(item: _Item, text: str) -> None:
    elapsed = time.perf_counter() - item.started
    if item.phases.pop(0) == "cot":
        item.plan.metadata, item.plan.phase1_time = _parse_cot(text), elapsed
    else:
        item.plan.audio_codes, item.plan.phase2_time = parse_lm_output(text)[1], elapsed
