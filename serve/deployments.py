"""Serve deployments: thin shells over the library's handlers (which also work without Ray).

- ``LMDeployment``: ``LLMHandler`` + ``acestep.inference.plan_music``; every request goes straight
  into the replica's one LM engine (continuous batching; ``stats()`` shows the engine's counters).
- ``DiTDeployment``: ``AceStepHandler`` + ``acestep.inference.submit_render``; every request goes
  straight into the replica's one DiT worker (step-level batching; ``stats()`` shows forward sizes);
  reads uploads from the audio store and writes the encoded files there (and PUTs them to a task's
  ``upload_url``, ``serve.upload_url``), so no audio bytes travel through other actors.

Task records and audio live outside every replica (``serve.store.records``, ``serve.store.audio``); the
replicas write progress there themselves (``serve.replica.ProgressSink``). ``check_health`` fails a
replica that holds requests without progress, so Serve replaces it and the ingress re-drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from ray import serve

from acestep.audio import SAMPLE_RATE
from acestep.devices import device_memory
from acestep.dit.adapters import AdapterError
from acestep.fairness import DEFAULT_PRIORITY, Share
from acestep.params import json_safe
from serve import metrics
from serve.adapter_pool import AdapterPool
from serve.config import AppConfig
from serve.replica import PlanRef, ProgressSink, ShippedPlan, StallWatch, plans_unpacked
from serve.store import open_task_store
from serve.upload_url import Uploader


@dataclass
class PlanRequest:
    """One request for the LM: validated params/config and resolved seeds; ``tenant`` (the task's
    key name) and ``priority`` (its class rank) place it in the engines' admission order."""

    task_id: str
    params: Any  # GenerationParams
    config: Any  # GenerationConfig
    seeds: List[int]
    tenant: str = ""
    priority: int = DEFAULT_PRIORITY

    @property
    def share(self) -> Share:
        return Share(self.tenant, self.priority)


@dataclass
class RenderRequest(PlanRequest):
    """One request for the DiT; ``uploads`` maps 'src_audio' / 'reference_audio' to audio-store keys;
    ``upload_urls``: one URL per audio the files are PUT to (``serve.upload_url``)."""

    uploads: Dict[str, str] = field(default_factory=dict)
    adapters: Optional[List[List[Any]]] = None  # [[name, scale]]: the DiT adapters this request uses
    upload_urls: Optional[List[str]] = None
    stream: Optional[str] = None  # the format its songs are streamed in while they decode (serve.streaming)


@dataclass
class RenderedItem:
    """One encoded file, already in the audio store under ``file_key``; ``upload``: the outcome of its
    PUT to the task's upload URL (``serve.upload_url.Uploader.send``), when it had one."""

    key: str
    file_key: str
    size: int
    format: str
    media_type: str
    sample_rate: int
    seed: Optional[int]
    params: Dict[str, Any]
    upload: Optional[Dict[str, Any]] = None


@dataclass
class RenderReply:
    """What a DiT render call answers: the stored files and the request's metadata."""

    items: List[RenderedItem]
    status_message: str
    time_costs: Dict[str, Any]
    metadata: Dict[str, Any]


class _ModelReplica:
    """Shared plumbing: a helper thread, progress reports to the task store, health, replica stats."""

    def _setup(self, config: AppConfig, options) -> None:
        # as many torch threads as CPUs the replica reserved: no oversubscription of a shared node,
        # and the LM engine's CPU rows stay batch-invariant (see acestep/lm/engine/graphs.py)
        torch.set_num_threads(max(1, int(options.ray_actor_options.num_cpus)))
        url, ttl = config.task_store_url(), config.store.task_ttl_s
        self._open_store = lambda: open_task_store(url, ttl_s=ttl, max_records=config.store.max_records)
        self._progress = ProgressSink(self._open_store)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        self._replica = _replica_name(type(self).__name__)
        self._health = StallWatch()
        self._inflight = 0

    async def _run(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _report(self, task_ids: List[str], phase: str, progress: float, message: str = "",
                detail: Optional[Dict[str, Any]] = None) -> None:
        for task_id in task_ids:
            self._progress.report(task_id, phase, progress, message, detail)

    async def _report_now(self, task_id: str, phase: str, progress: float, message: str = "",
                          detail: Optional[Dict[str, Any]] = None) -> None:
        """A phase change, written before the work goes on (coalescing must not drop it: the task
        may finish before the sink's next flush)."""
        self._progress.report(task_id, phase, progress, message, detail)
        await asyncio.to_thread(self._progress.flush)

    async def _tracked(self, work):
        """Await ``work`` counted as in flight; a CUDA error marks the replica unhealthy."""
        self._inflight += 1
        try:
            return await work
        except Exception as error:
            self._health.note_error(error)
            raise
        finally:
            self._inflight -= 1

    def check_health(self) -> None:
        """Serve's health check: raises when busy without progress for 60 s or after a CUDA error."""
        counters = self._counters()
        self._health.check(self._inflight > 0, (counters.get("steps"), counters.get("requests")))

    def _counters(self) -> Dict[str, Any]:
        return {}

    def _device(self) -> Optional[str]:
        return None

    def stats(self) -> Dict[str, Any]:
        """Common to both kinds: ``device_memory`` is ``acestep.devices.device_memory`` of the model's
        device (allocator counts on CUDA, None elsewhere; the process's RSS always)."""
        return {"replica": self._replica, "pid": os.getpid(), "inflight": self._inflight,
                "plans_unpacked": plans_unpacked(), "device_memory": device_memory(self._device())}


def _replica_name(fallback: str) -> str:
    """``<deployment>#<replica id>`` as Serve names this replica (``fallback-pid<pid>`` outside Serve)."""
    from ray.serve.exceptions import RayServeException

    try:
        replica_id = serve.get_replica_context().replica_id
    except RayServeException:  # not inside a Serve replica (a plain instance in a test)
        return f"{fallback}-pid{os.getpid()}"
    return f"{replica_id.deployment_id.name}#{replica_id.unique_id}"


LM_START, LM_DONE = 0.05, 0.3  # the LM's share of a task's progress
# the DiT's first event: above LM_DONE, where a cold-start note (serve.pipeline) waits, so it replaces it
DIT_START = LM_DONE + 0.01
PLAN_FIELDS = ("bpm", "keyscale", "timesignature", "duration", "language", "caption", "lyrics")


def plan_summary(plans) -> Dict[str, Any]:
    """The first item's plan as the LM-done event shows it (metadata only, never the codes)."""
    metadata = (plans[0].metadata if plans else None) or {}
    return json_safe({name: metadata[name] for name in PLAN_FIELDS if metadata.get(name) not in (None, "")})


def lm_fraction(event) -> float:
    """A task's progress for an ``LMProgress``: the CoT fills 0.05-0.10 (its length is the model's
    choice, so it approaches 0.10), the codes 0.10-0.29 in proportion (0.30: LM done)."""
    if event.phase == "cot":
        return LM_START + 0.05 * event.tokens_done / (event.tokens_done + 100)
    return 0.10 + (LM_DONE - 0.11) * (event.fraction or 0.0)


@serve.deployment(name="LMDeployment")
class LMDeployment(_ModelReplica):
    """The 5 Hz LM: one engine per replica (inside the ``LLMHandler``). Each request's items go
    straight into it and join its running batch between decode steps -- no Serve batching, no waves.
    Concurrency is bounded by ``max_ongoing_requests`` and by the engine's KV rows."""

    def __init__(self, config: AppConfig, model: Optional[str] = None):
        self._setup(config, config.lm.deployment)
        self.settings, self.model = config.lm, model or config.lm.model
        self.handler = load_lm(config, self.model) if config.lm.enabled else None
        # planners mostly wait on engine futures: one thread per request the replica may hold
        self._planners = ThreadPoolExecutor(max_workers=config.lm.deployment.max_ongoing_requests,
                                            thread_name_prefix="lm-planner")
        self._requests = 0
        if self.handler is not None:
            metrics.watch(self.handler.stats, metrics.LMMeter(self.model))

    async def plan(self, job: PlanRequest):
        """PlanOutcome for one request (plans, merged params, time_costs, status). A cancelled call
        (client gone, task deleted, timeout) aborts the request's engine rows at the next step."""
        from acestep.inference import plan_music
        from acestep.lm.request import Cancellation

        self._requests += 1
        cancel = Cancellation()
        progress = self._progress_reporter(job.task_id) if self.handler is not None else None
        work = asyncio.get_running_loop().run_in_executor(self._planners, lambda: plan_music(
            self.handler, job.params, job.config, job.seeds, progress=progress, cancel=cancel, group=job.task_id,
            share=job.share))
        try:
            outcome = await self._tracked(work)
        except asyncio.CancelledError:
            cancel.cancel()
            raise
        if outcome.plans is not None:
            await self._report_now(job.task_id, "lm", LM_DONE, "LM done", {"plan": plan_summary(outcome.plans)})
        return ShippedPlan(outcome)

    def _progress_reporter(self, task_id: str):
        seen: Set[str] = set()

        def report(event) -> None:  # on the engine thread
            detail = {"lm_phase": event.phase, "tokens_done": event.tokens_done,
                      "tokens_expected": event.tokens_expected}
            expected = event.tokens_expected or "?"
            # the first event of the CoT and of the codes survives coalescing: a short phase may
            # otherwise end, and be overwritten by "LM done", before the sink's next write
            milestone = event.phase not in seen
            seen.add(event.phase)
            self._progress.report(task_id, "lm", lm_fraction(event), f"LM {event.phase} {event.tokens_done}/{expected}",
                                  detail, milestone=milestone)

        return report

    def _device(self) -> Optional[str]:
        return self.handler.device if self.handler is not None else None

    def stats(self) -> Dict[str, Any]:
        """Plan requests taken, and the engine's rows, queue, steps and per-task peaks (``engine``)."""
        engine = self.handler.stats() if self.handler is not None else {}
        return {**super().stats(), "requests": self._requests, "engine": engine}

    def _counters(self) -> Dict[str, Any]:
        engine = self.handler.stats() if self.handler is not None else {}
        return {"steps": engine.get("steps"), "requests": engine.get("requests_finished")}

    async def understand(self, audio_codes: str, **kwargs):
        from acestep.inference import understand_music

        return await self._helper(understand_music, audio_codes, **kwargs)

    async def understand_metadata(self, audio_codes: str, **kwargs) -> Dict[str, Any]:
        """Codes → the LM's raw metadata (the official full analysis reports it as written)."""
        from acestep.lm.api import understand_metadata

        return json_safe(await self._helper(understand_metadata, audio_codes, **kwargs))

    async def create_sample(self, query: str, **kwargs):
        from acestep.inference import create_sample

        return await self._helper(create_sample, query, **kwargs)

    async def format_sample(self, caption: str, lyrics: str, **kwargs):
        from acestep.inference import format_sample

        return await self._helper(format_sample, caption, lyrics, **kwargs)

    async def _helper(self, fn, *args, **kwargs):
        from acestep.lm.request import Cancellation

        handler, cancel = self._require_lm(), Cancellation()
        work = asyncio.get_running_loop().run_in_executor(
            self._planners, lambda: fn(handler, *args, cancel=cancel, **kwargs))
        try:
            return await self._tracked(work)
        except asyncio.CancelledError:
            cancel.cancel()
            raise

    def info(self) -> Dict[str, Any]:
        return {"enabled": self.handler is not None, "model": self.model, "backend": self.settings.backend}

    def _require_lm(self):
        if self.handler is None:
            raise LMDisabled("the LM is disabled in this deployment's config (lm.enabled: false)")
        return self.handler


class LMDisabled(RuntimeError):
    """Raised by LM-only calls when the app runs without an LM (answered with 503)."""


@serve.deployment(name="DiTDeployment")
class DiTDeployment(_ModelReplica):
    """DiT + text encoder + VAE: one worker per replica (inside the ``AceStepHandler``). Each
    request's items go straight into it and join its running batch between sampling steps, whatever
    their lengths and settings -- no Serve batching, no waves. Items finishing together are decoded
    together; audio is encoded here, so only encoded bytes leave the replica."""

    def __init__(self, config: AppConfig, model: Optional[str] = None):
        self._setup(config, config.dit.deployment)
        self.settings, self.model = config.dit, model or config.dit.model
        self.audio = config.audio_store()
        self.uploader = Uploader(config.dit.upload_url, allow_private=config.ingress.webhooks.allow_private)
        self.handler = load_dit(config, self.model)
        metrics.watch(self.handler.stats, metrics.DiTMeter(self.model))
        adapters = config.dit.adapters
        self.adapters = AdapterPool(self.handler, adapters.dir, adapters.max_loaded, replica=self._replica,
                                    open_store=self._open_store) if adapters.dir else None

    @serve.multiplexed(max_num_models_per_replica=256)
    async def adapter_set(self, model_id: str) -> str:
        """Serve's multiplexing: marks this replica as holding the adapter set ``model_id`` (names
        joined by '+'), so the router prefers it for requests naming that set. The pool
        (``serve.adapter_pool``) does the loading and the bounded unloading."""
        return model_id

    def info(self) -> Dict[str, Any]:
        from acestep.presets import PRESETS

        family = self.handler.family
        return {"model": self.model, "is_turbo": family == "turbo", "family": family,
                "preset": PRESETS[family].values()}

    def check_health(self) -> None:
        super().check_health()
        if self.adapters is not None:
            self.adapters.refresh()  # the record saying which adapters this replica holds stays fresh

    def __del__(self):
        # Serve calls this on a graceful shutdown; a crashed replica's record goes stale instead
        if getattr(self, "adapters", None) is not None:
            self.adapters.withdraw()

    def _device(self) -> Optional[str]:
        return str(self.handler.bundle.device)

    def stats(self) -> Dict[str, Any]:
        """The worker's requests, queue and forward sizes (``worker.items_per_forward``, ``rows_per_forward``,
        ``forwards_by_adapters``) and the adapter pool (loads, evictions)."""
        adapters = self.adapters.stats() if self.adapters is not None else None
        return {**super().stats(), "model": self.model, "worker": self.handler.stats(), "adapters": adapters}

    def _counters(self) -> Dict[str, Any]:
        worker = self.handler.stats()
        return {"steps": worker.get("steps"), "requests": worker.get("requests")}

    async def render(self, job: RenderRequest, outcome) -> RenderReply:
        """``outcome`` is the LM's PlanOutcome, or a ``PlanRef`` to the LM call (awaited here, so the
        plan goes LM → DiT). A cancelled call (client gone, task deleted) drops the request's items at
        the next step."""
        if isinstance(outcome, PlanRef):
            outcome = await outcome.outcome()
        return await self._tracked(self._render(job, outcome))

    async def _render(self, job: RenderRequest, outcome) -> RenderReply:
        from acestep.inference import RenderJob, submit_render

        params = await self._run(self._with_uploads, job.params, job.uploads)
        render_job = RenderJob(params=params, config=job.config, seeds=job.seeds, plans=outcome.plans,
                               lm_time_costs=outcome.time_costs)
        await self._report_now(job.task_id, "dit", DIT_START, "DiT queued")
        setting = tuple((str(name), float(scale)) for name, scale in job.adapters or ())
        names = [name for name, _ in setting]
        if names and self.adapters is None:
            raise AdapterError("lora: this deployment serves no adapters")
        if names:
            await self.adapter_set(serve.get_multiplexed_model_id() or "+".join(names))
        writer, progress = self._stream_of(job)
        async with self.adapters.using(names) if names else contextlib.nullcontext():
            try:
                output = await asyncio.wrap_future(submit_render(
                    self.handler, render_job, progress, adapters=setting, share=job.share,
                    stream=writer.piece if writer is not None else None))
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        # the stream's last chunks are in the store before the task says so (and before it is done)
        detail = (await asyncio.to_thread(writer.close)).detail() if writer is not None else None
        await self._report_now(job.task_id, "encode", 0.92, "encoding audio", detail)
        return await self._run(self._output, render_job, outcome, output, setting, job)

    def _stream_of(self, job: RenderRequest):
        """(the stream writer or None, the worker's progress callback): a streamed render's progress
        events carry its stream's state (``serve.streaming``)."""
        if not job.stream:
            return None, self._progress_of(job.task_id)
        from serve.streaming import StreamProgress, StreamState, StreamWriter

        state = StreamState.new(job.stream, len(job.seeds))
        progress = StreamProgress(lambda fraction, desc, detail: self._report(
            [job.task_id], "dit", 0.3 + 0.6 * fraction, desc, detail), state)
        return StreamWriter(self.audio, job.task_id, state, progress.written), progress.diffusion

    async def audio_codes(self, task_id: str, upload_key: str) -> str:
        """An uploaded source from the audio store → its 5 Hz code string (VAE encode + tokenizer)."""
        data = await self._run(self.audio.read, upload_key)
        if data is None:
            raise FileNotFoundError("the uploaded source audio has expired from the audio store")
        await self._report_now(task_id, "dit", DIT_START, "encoding the source audio to codes")
        return await self._tracked(self._run(self.handler.convert_src_audio_to_codes, data))

    def _with_uploads(self, params, uploads: Dict[str, str]):
        """Upload bytes from the audio store into the params (the library takes bytes; no temp files)."""
        values = {}
        for name, key in uploads.items():
            data = self.audio.read(key)
            if data is None:
                raise FileNotFoundError(f"uploaded {name} has expired from the audio store")
            values[name] = data
        return dataclasses.replace(params, **values) if values else params

    def _progress_of(self, task_id: str):
        def report(fraction: float, desc: str = "") -> None:  # on the worker thread
            self._report([task_id], "dit", 0.3 + 0.6 * min(max(float(fraction), 0.0), 1.0), str(desc))

        return report

    def _output(self, render_job, outcome, output, setting=(), job: Optional[RenderRequest] = None) -> RenderReply:
        from acestep.inference import render_result

        result = render_result(render_job, output)
        stored = [self._store_file(audio, render_job.config.audio_format, setting) for audio in result.audios]
        items = [item for item, _ in stored]
        if job is not None and job.upload_urls:  # PUT from here: the bytes pass through no other actor
            files = [(url, data, item.media_type) for url, (item, data) in zip(job.upload_urls, stored)]
            self._report([job.task_id], "encode", 0.95, f"uploading {len(files)} file(s) to upload_url")
            for item, upload in zip(items, self.uploader.send_all(files, job.task_id)):
                item.upload = upload
        # each item's codes travel once, in its params (``audio_codes``); the plan keeps the rest
        plans = [{k: v for k, v in json_safe(p).items() if k != "audio_codes"} for p in (outcome.plans or [])]
        metadata = {"plans": plans, "lm_status": outcome.status}
        time_costs = json_safe(result.extra_outputs.get("time_costs", {}))
        return RenderReply(items, result.status_message, time_costs, metadata)

    def _store_file(self, audio: Dict[str, Any], audio_format: str, setting=()) -> Tuple[RenderedItem, bytes]:
        """Encode one song and put it in the audio store → (its item, the encoded bytes); its key is a
        hash of the params (and of the DiT and adapters when they are not the defaults: the same
        params render differently there), so a re-driven task writes the same file again (idempotent)."""
        from acestep.audio import encode_audio, params_key

        params = audio.get("params") or {}
        params = json_safe(params if isinstance(params, dict) else dataclasses.asdict(params))
        data = encode_audio(audio["tensor"], audio_format)
        key = audio["key"]
        if setting or self.model != self.settings.model:
            key = params_key({"params": key, "dit_model": self.model, "adapters": [list(p) for p in setting]})
        file_key = f"{key}.{audio_format}"
        self.audio.put(file_key, data)
        return RenderedItem(
            key=key, file_key=file_key, size=len(data), format=audio_format,
            media_type=self.audio.media_type(file_key),
            sample_rate=int(audio.get("sample_rate", SAMPLE_RATE)), seed=params.get("seed"), params=params,
        ), data


def load_lm(config: AppConfig, model: str):
    from acestep.llm_inference import LLMHandler

    engine, longest = config.lm.engine, config.ingress.limits.max_duration_s
    handler = LLMHandler()
    # the longest song the server takes also bounds the durations the LM itself decides
    handler.initialize(str(config.checkpoint_root()), lm_model_path=model, backend=config.lm.backend,
                       device=config.lm.device, max_model_len=engine.max_model_len, engine=engine.to_library(),
                       max_duration=None if longest is None else int(longest),
                       quantization=config.lm.quantization, offload_to_cpu=config.lm.offload_to_cpu)
    return handler


def load_dit(config: AppConfig, model: str):
    from acestep.handler import AceStepHandler

    handler = AceStepHandler()
    handler.initialize_service(str(config.checkpoint_root()), model, device=config.dit.device,
                               attention=config.dit.attention, compile_model=config.dit.compile_model,
                               limits=config.dit.batch.to_library(config.dit.device),
                               quantization=config.dit.quantization, offload_to_cpu=config.dit.offload_to_cpu,
                               offload_dit_to_cpu=config.dit.offload_dit_to_cpu)
    longest = config.ingress.limits.max_duration_s
    if longest is not None:  # an extension's DiT passes stay within the longest song the card takes
        from acestep.dit.extend import ExtendConfig

        window = min(handler.extend.window_s, longest)
        handler.extend = ExtendConfig(window_s=window, context_s=min(handler.extend.context_s, window / 2))
    return handler
