"""The task paths an ingress replica's driver runs: one attempt at a stored task, from its request
to its result. Every path (text → music, the official sample/format steps, the analysis modes) asks
``models_for`` which LM and DiT deployments serve the task, so a task that named a model gets it
whatever route it came by.

The LM call's response goes into the DiT call as an object ref, unfetched: the plan moves between
replicas without passing through the ingress.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from acestep.params import GenerationParams, json_safe
from serve.compat import release as compat
from serve.deployments import PlanRequest, RenderReply, RenderRequest
from serve.edge import intake
from serve.gates import Gates
from serve.models import ModelSet, deployment_name
from serve.replica import PlanRef, until_ready
from serve.schemas import AudioItem, GenerationOutput
from serve.upload_url import UPLOAD_FIELD
from serve.streaming import STREAM_FIELD


class Models(NamedTuple):
    """The deployments serving one task, and their names as results report them."""

    lm: Any
    dit: Any
    lm_name: str
    dit_name: str


class TaskPipeline:
    """Runs stored tasks on the LM and DiT deployments (``run`` is the driver's callable)."""

    def __init__(self, config, served: ModelSet, lms: Dict[str, Any], dits: Dict[str, Any],
                 gates: Optional[Gates] = None):
        self.config, self.served, self.lms, self.dits = config, served, lms, dits
        self.gates = gates or Gates.for_config(config)  # plan and render calls wait their turn there

    def models_for(self, extras: Dict[str, Any]) -> Models:
        """The task's chosen LM and DiT (resolved at intake), else the defaults."""
        lm_name = extras.get("lm_model") or self.served.default_lm
        dit_name = extras.get("dit_model") or self.served.default_dit
        return Models(self.lms.get(lm_name, self.lms[self.served.default_lm]),
                      self.dits.get(dit_name, self.dits[self.served.default_dit]), lm_name, dit_name)

    async def run(self, record) -> Dict[str, Any]:
        """One attempt at a task: (optional upstream sample/format step), LM plan → DiT render; a
        dataset or training job runs on its own actor (``serve.training``)."""
        if (record.request or {}).get("kind"):
            from serve.training import run_job

            return await run_job(record)
        params, config, seeds, upload_keys, extras = intake.from_task_request(record.request)
        models = self.models_for(extras)
        if extras.get("analysis"):
            return await self._analysis(record.task_id, extras["analysis"], models, params, config, seeds,
                                        upload_keys)
        if extras.get("sample_mode") or extras.get("sample_query") or extras.get("use_format"):
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
            async with self._gate("lm", models.lm_name).slot(*share):
                plan = models.lm.plan.remote(PlanRequest(task_id, params, config, seeds, *share))  # a ref
                calls.append(plan)
                plan_ref = await plan._to_object_ref()
                await until_ready(plan_ref)  # the DiT is called with a finished (or failed) plan
            dit = models.dit
            if adapters:  # multiplexing: prefer a replica that holds this adapter set
                dit = dit.options(multiplexed_model_id="+".join(name for name, _ in adapters))
            render = RenderRequest(task_id, params, config, seeds, *share, uploads=upload_keys, adapters=adapters,
                                   upload_urls=upload_urls, stream=stream)
            async with self._gate("dit", models.dit_name).slot(*share):
                calls.append(dit.render.remote(render, PlanRef(plan_ref)))
                return await calls[-1]
        except asyncio.CancelledError:
            for call in calls:  # the LM aborts the task's engine rows; the DiT drops its part
                call.cancel()
            raise

    def _gate(self, kind: str, model: str):
        default = self.config.lm.model if kind == "lm" else self.config.dit.model
        return self.gates.gate(deployment_name(kind, model, default))

    async def _analysis(self, task_id: str, mode: str, models: Models, params, config, seeds,
                        upload_keys) -> Dict[str, Any]:
        """Upstream's analysis modes: source → codes (DiT replica), codes → metadata (LM, T=0.3), or
        the LM's CoT alone; a record instead of audio."""
        codes, metadata = "", {}
        if "src_audio" in compat.ANALYSIS_NEEDS[mode]:
            codes = await models.dit.audio_codes.remote(task_id, upload_keys["src_audio"])
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
