"""The task paths an ingress replica's driver runs: one attempt at a stored task, from its request
to its result. Every path (text → music, the official sample/format steps, the analysis modes) asks
``models_for`` which LM and DiT deployments serve the task, so a task that named a model gets it
whatever route it came by.

The LM call's response goes into the DiT call as an object ref, unfetched: the plan moves between
replicas without passing through the ingress.

A deployment may be scaled to zero (``min_replicas: 0``): Serve starts a replica when a call
arrives. ``ColdStart`` shows such a wait in the task's record, and each attempt wakes every cold
deployment of its task at once, so the DiT starts while the LM starts and plans.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from acestep.params import GenerationParams, json_safe
from serve.compat import release as compat
from serve.deployments import LM_DONE, LM_START, PlanRequest, RenderReply, RenderRequest
from serve.edge import intake
from serve.gates import Gates
from serve.models import ModelSet, deployment_name
from serve.replica import PlanRef, until_ready
from serve.schemas import AudioItem, GenerationOutput
from serve.upload_url import UPLOAD_FIELD
from serve.streaming import STREAM_FIELD


COLD_START = "queued: cold start"  # a task's message while a deployment it needs starts a replica
# where a cold-start note sits in a role's phase: below that role's first event, which replaces it
COLD_PROGRESS = {"lm": round(LM_START - 0.01, 3), "dit": LM_DONE}


class Models(NamedTuple):
    """The deployments serving one task, their names as results report them, and their Serve names."""

    lm: Any
    dit: Any
    lm_name: str
    dit_name: str
    lm_deployment: str
    dit_deployment: str

    def deployment(self, role: str) -> str:
        return self.lm_deployment if role == "lm" else self.dit_deployment

    def handle(self, role: str) -> Any:
        return self.lm if role == "lm" else self.dit


class ColdStart:
    """Marks a task waiting for a deployment with no running replica: before the call, the task's
    record gets ``queued: cold start`` in that role's phase (detail ``{"cold_start": deployment}``)
    until the replica's first event replaces it; the phase's timeout bounds the wait. ``running``
    gives a deployment's running replicas as the ingress view last saw them (None: not known yet,
    taken as running)."""

    def __init__(self, store, running: Callable[[str], Optional[int]]):
        self.store, self.running = store, running

    def cold(self, deployment: str) -> bool:
        return self.running(deployment) == 0

    async def note(self, task_id: str, role: str, deployment: str) -> None:
        if self.cold(deployment):
            await asyncio.to_thread(self.store.update, task_id, role, COLD_PROGRESS[role], COLD_START,
                                    {"cold_start": deployment})


class TaskPipeline:
    """Runs stored tasks on the LM and DiT deployments (``run`` is the driver's callable)."""

    def __init__(self, config, served: ModelSet, lms: Dict[str, Any], dits: Dict[str, Any],
                 gates: Optional[Gates] = None):
        self.config, self.served, self.lms, self.dits = config, served, lms, dits
        self.gates = gates or Gates.for_config(config)  # plan and render calls wait their turn there
        self.cold_start: Optional[ColdStart] = None  # set by the ingress once its view of the replicas exists

    def models_for(self, extras: Dict[str, Any]) -> Models:
        """The task's chosen LM and DiT (resolved at intake), else the defaults."""
        served = self.served
        lm_name = extras.get("lm_model") or served.default_lm
        dit_name = extras.get("dit_model") or served.default_dit
        return Models(self.lms.get(lm_name, self.lms[served.default_lm]),
                      self.dits.get(dit_name, self.dits[served.default_dit]), lm_name, dit_name,
                      deployment_name("lm", lm_name, served.default_lm),
                      deployment_name("dit", dit_name, served.default_dit))

    async def run(self, record) -> Dict[str, Any]:
        """One attempt at a task; the deployments it needs that are at zero start at once. A dataset
        or training job runs on its own actor (``serve.training``)."""
        if (record.request or {}).get("kind"):
            from serve.training import run_job

            return await run_job(record)
        params, config, seeds, upload_keys, extras = intake.from_task_request(record.request)
        models = self.models_for(extras)
        wakes = self._wake(models, self._roles(extras))
        try:
            return await self._run(record, models, params, config, seeds, upload_keys, extras)
        finally:
            for call in wakes:  # a replica has started by now, or the task has ended
                call.cancel()

    @staticmethod
    def _roles(extras: Dict[str, Any]) -> Tuple[str, ...]:
        """The deployments a task calls: both, except for the analysis modes that skip one."""
        needs = compat.ANALYSIS_NEEDS.get(extras.get("analysis") or "", {"lm", "src_audio"})
        return tuple(role for role, need in (("lm", "lm"), ("dit", "src_audio")) if need in needs)

    def _wake(self, models: Models, roles: Tuple[str, ...]) -> List[Any]:
        """A cheap call (``info``) to each of the task's deployments at zero: each starts a replica
        now, not when the task reaches it (the DiT is otherwise called only once the plan is done)."""
        if self.cold_start is None:
            return []
        return [models.handle(role).info.remote() for role in roles if self.cold_start.cold(models.deployment(role))]

    async def _before(self, task_id: str, role: str, models: Models) -> None:
        """Before a role's call: the cold-start note when its deployment has no running replica."""
        if self.cold_start is not None:
            await self.cold_start.note(task_id, role, models.deployment(role))

    async def _run(self, record, models: Models, params, config, seeds, upload_keys, extras) -> Dict[str, Any]:
        """(optional upstream sample/format step), LM plan → DiT render; or an analysis mode."""
        if extras.get("analysis"):
            return await self._analysis(record.task_id, extras["analysis"], models, params, config, seeds,
                                        upload_keys)
        if extras.get("sample_mode") or extras.get("sample_query") or extras.get("use_format"):
            await self._before(record.task_id, "lm", models)
            params = await self._compat_sample(models.lm, params, extras)
        adapters = extras.get("adapters")
        reply = await self._render(models, record.task_id, params, config, seeds, upload_keys, adapters,
                                   (record.key_name, record.priority), extras.get(UPLOAD_FIELD),
                                   extras.get(STREAM_FIELD))
        audios = [AudioItem(key=item.file_key, url=f"/v1/audio/{item.file_key}", format=item.format,
                            sample_rate=item.sample_rate, seed=item.seed, params=item.params, upload=item.upload)
                  for item in reply.items]
        names = {"dit": models.dit_name, "lm": models.lm_name, "adapters": adapters or []}
        return GenerationOutput(task_id=record.task_id, audios=audios, metadata={**reply.metadata, "models": names,
                                                                                   "preset": extras.get("preset")},
                                time_costs=reply.time_costs, status_message=reply.status_message).model_dump()

    async def _render(self, models: Models, task_id, params, config, seeds, upload_keys, adapters,
                      share: Tuple[str, int], upload_urls: Optional[List[str]] = None,
                      stream: Optional[str] = None) -> RenderReply:
        """LM plan → DiT render, each call in its deployment's turn (``serve.gates``); ``share`` =
        (key name, class rank): the gates' and the engines' admission order; ``upload_urls``: one per
        audio, PUT by the DiT replica; ``stream``: the format the DiT streams the songs in while they
        decode."""
        calls = []
        try:
            async with self._gate("lm", models).slot(*share):
                await self._before(task_id, "lm", models)
                plan = models.lm.plan.remote(PlanRequest(task_id, params, config, seeds, *share))  # a ref
                calls.append(plan)
                plan_ref = await plan._to_object_ref()
                await until_ready(plan_ref)  # the DiT is called with a finished (or failed) plan
            dit = models.dit
            if adapters:  # multiplexing: prefer a replica that holds this adapter set
                dit = dit.options(multiplexed_model_id="+".join(name for name, _ in adapters))
            render = RenderRequest(task_id, params, config, seeds, *share, uploads=upload_keys, adapters=adapters,
                                   upload_urls=upload_urls, stream=stream)
            async with self._gate("dit", models).slot(*share):
                await self._before(task_id, "dit", models)
                calls.append(dit.render.remote(render, PlanRef(plan_ref)))
                return await calls[-1]
        except asyncio.CancelledError:
            for call in calls:  # the LM aborts the task's engine rows; the DiT drops its part
                call.cancel()
            raise

    def _gate(self, role: str, models: Models):
        return self.gates.gate(models.deployment(role))

    async def _analysis(self, task_id: str, mode: str, models: Models, params, config, seeds,
                        upload_keys) -> Dict[str, Any]:
        """Upstream's analysis modes: source → codes (DiT replica), codes → metadata (LM, T=0.3), or
        the LM's CoT alone; a record instead of audio."""
        codes, metadata = "", {}
        if "src_audio" in compat.ANALYSIS_NEEDS[mode]:
            await self._before(task_id, "dit", models)
            codes = await models.dit.audio_codes.remote(task_id, upload_keys["src_audio"])
        if "lm" in compat.ANALYSIS_NEEDS[mode]:
            await self._before(task_id, "lm", models)  # (after the DiT's, the store drops it: phases only advance)
        if mode == "full_analysis_only":
            metadata = await models.lm.understand_metadata.remote(codes, temperature=0.3)
        elif mode == "analysis_only":
            cot_only = dataclasses.replace(params, thinking=False, use_cot_metas=True)
            one = dataclasses.replace(config, batch_size=1)
            outcome = await models.lm.plan.remote(PlanRequest(task_id, cot_only, one, seeds[:1]))
            metadata = json_safe({k: v for k, v in outcome.plans[0].metadata.items() if v is not None})
        raw = compat.analysis_record(mode, metadata, codes, params.caption, params.lyrics, models.lm_name)
        return GenerationOutput(task_id=task_id, audios=[], metadata={"analysis": raw},
                                status_message=raw["status_message"]).model_dump()

    @staticmethod
    async def _compat_sample(lm, params: GenerationParams, extras: Dict[str, Any]) -> GenerationParams:
        if extras.get("sample_mode") or extras.get("sample_query"):
            sample = await lm.create_sample.remote(
                extras.get("sample_query") or "NO USER INPUT", instrumental=params.instrumental,
                vocal_language=None if params.vocal_language in ("en", "unknown", "") else params.vocal_language)
            return compat.apply_sample(params, sample, from_format=False)
        meta = {"bpm": params.bpm, "duration": params.duration if params.duration > 0 else None,
                "keyscale": params.keyscale, "timesignature": params.timesignature}
        sample = await lm.format_sample.remote(
            params.caption, params.lyrics, user_metadata={k: v for k, v in meta.items() if v})
        return compat.apply_sample(params, sample, from_format=True)
