"""How every route submits a generation: the body → library params (``serve.edge.intake``), the DiT
and LM that serve it (``serve.models``) and the library's checks with that DiT's rules, then
admission, the uploads into the audio store and the task record; the replica's driver starts it when
it has room. A route group the ingress inherits; it needs ``config``, ``served`` and ``state``."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any, Dict, List, Optional

from fastapi import Request

from acestep.fairness import DEFAULT_CLASS
from acestep.params import GenerationConfig, GenerationParams
from serve.config import RequestLimits
from serve.edge import intake
from serve.edge.errors import APIError, FieldError
from serve.logs import current_request_id, extra, log
from serve.models import adapter_choice
from serve.store.records import WEBHOOK_FIELD, IdempotencyConflict, StoreFull
from serve import upload_url
from serve.upload_url import UPLOAD_FIELD
from serve.streaming import STREAM_FIELD, stream_extras
from serve.webhooks import WebhookRefused

DEFAULT_BATCH_SIZE = GenerationConfig().batch_size


def within_limits(limits: RequestLimits, params: GenerationParams, config: GenerationConfig,
                  explicit: Optional[List[str]]) -> GenerationConfig:
    """``config``, its batch size lowered to ``limits`` when the request left it at the default (a
    default is never refused); FieldError (422) naming ``duration`` or ``batch_size``, the limit and
    where it comes from when the request asked for more. Values that are not numbers are left to the
    library's checks."""
    duration, batch = params.duration, config.batch_size
    if limits.max_duration_s is not None and _number(duration) and duration > limits.max_duration_s:
        raise FieldError("duration", f"duration is at most {limits.max_duration_s:g} seconds on this server "
                                     f"({_origin(limits, 'max_duration_s')})")
    if limits.max_batch_size is None or not _number(batch) or batch <= limits.max_batch_size:
        return config
    chosen = batch != DEFAULT_BATCH_SIZE if explicit is None else "batch_size" in explicit
    if chosen:
        raise FieldError("batch_size", f"batch_size is at most {limits.max_batch_size} on this server "
                                       f"({_origin(limits, 'max_batch_size')})")
    return dataclasses.replace(config, batch_size=limits.max_batch_size)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _origin(limits: RequestLimits, field: str) -> str:
    return limits.origin.get(field) or f"ingress.limits.{field}"


class Submission:
    async def _submit_http(self, request: Request, source: str, *, sync: bool) -> str:
        max_upload = self.state.max_upload
        idempotency = request.headers.get("idempotency-key")
        if idempotency is not None and not 1 <= len(idempotency) <= 200:
            raise APIError(400, "Idempotency-Key must be 1 to 200 characters", loc=("header", "idempotency-key"))
        body, files = await intake.read_generate_body(request, max_upload)
        digest = None if idempotency is None else intake.request_digest(body, files)
        params, config, files, sent_as = intake.to_params(body, files, max_upload)
        key_name = getattr(request.state, "key_name", "")
        priority = self._priority(key_name, body.get("priority"))
        files = await self._check_uploads(files, max_upload, sent_as)
        params, config, seeds, route = await self._prepare(params, config, files, intake.routing(body), list(body))
        route.update(intake.webhook(body))
        route.update(intake.upload_url(body))
        route.update(stream_extras(body.get(STREAM_FIELD), params))
        return await self._submit(source, params, config, seeds, files, route, key_name, sync=sync,
                                  idempotency=(idempotency, digest), priority=priority)

    async def _upload_targets(self, params, seeds, extras: Dict[str, Any]) -> Dict[str, Any]:
        """``extras`` with its ``upload_url`` as one checked URL per audio (422 naming the field when
        the count or an address is wrong); none (or none needed) dropped."""
        value = extras.get(UPLOAD_FIELD)
        urls = [] if value in (None, "") else upload_url.targets(value, upload_url.audio_count(params, seeds, extras))
        if not urls:
            return {name: item for name, item in extras.items() if name != UPLOAD_FIELD}
        await upload_url.check_targets(urls, self.config.ingress.webhooks.allow_private)
        return {**extras, UPLOAD_FIELD: urls}

    def _priority(self, key_name: str, requested: Optional[str] = None) -> int:
        """The task's class rank: ``requested`` up to the key's class (``ingress.key_priorities``)."""
        return intake.task_priority(requested, self.config.ingress.key_priorities.get(key_name, DEFAULT_CLASS))

    async def _check_uploads(self, files, max_upload: int, sent_as: Optional[Dict[str, str]] = None):
        """``intake.check_uploads`` with this server's longest source (``ingress.limits``)."""
        limits = self.config.ingress.limits
        source_limit = None if limits.max_duration_s is None else (limits.max_duration_s,
                                                                   _origin(limits, "max_duration_s"))
        return await intake.check_uploads(self.state.uploads, files, max_upload, sent_as, source_limit)

    async def _prepare(self, params, config, files, choice: Dict[str, Any], explicit: Optional[List[str]] = None):
        """The DiT and LM for the request (``serve.models``), that DiT's preset for the fields the
        request left out (``explicit``: those it set; None: the Python API's rule, see
        ``acestep.presets``), then the library's checks with its rules → (params, config, seeds, the
        choice and the preset report as task extras)."""
        turbo = await self.state.turbo_by_model()
        dit = self.served.pick_dit(choice.get("model"), params.task_type, turbo)
        lm = self.served.lm_name(choice.get("lm_model"))
        family = (await self.state.family_by_model()).get(dit)
        params, report = intake.apply_preset(params, family, dit, explicit)
        config = within_limits(self.config.ingress.limits, params, config, explicit)
        params, config, seeds = intake.prepare(params, config, files, is_turbo=turbo[dit])
        adapters = adapter_choice(self.config, choice, await self._defaults() if self.config.dit.adapters.dir else None)
        return params, config, seeds, {"dit_model": dit, "lm_model": lm, "preset": report.to_dict(), **adapters}

    async def _submit(self, source, params, config, seeds, files, extras, key_name, *, sync=False,
                      idempotency=(None, None), priority: Optional[int] = None) -> str:
        """Admission, then the uploads and the task record; this replica drives it when it has room.
        ``priority``: the task's class rank; None: the key's class."""
        state = self.state
        state.start_background()
        if extras.get(WEBHOOK_FIELD):
            try:
                await state.webhooks.check_submission(extras[WEBHOOK_FIELD], key_name)
            except WebhookRefused as refused:
                raise FieldError(WEBHOOK_FIELD, str(refused)) from None
        extras = await self._upload_targets(params, seeds, extras)
        await state.admit(key_name)
        task_id = uuid.uuid4().hex
        upload_keys = {}
        for name, data in files.items():
            upload_keys[name] = f"upload-{task_id}-{name}"
            await asyncio.to_thread(state.audio.put, upload_keys[name], data)
        request = intake.task_request(source, params, config, seeds, upload_keys, extras,
                                      request_id=current_request_id())
        claim = state.driver.may_claim_new()
        priority = self._priority(key_name) if priority is None else priority
        try:
            task_id, created = await asyncio.to_thread(
                state.store.create, request, key_name=key_name, task_id=task_id, idempotency_key=idempotency[0],
                body_digest=idempotency[1], owner=state.driver.owner if claim else None,
                lease_s=self.config.ingress.lease_s, bounds=state.bounds(key_name), priority=priority)
        except StoreFull as full:
            for key in upload_keys.values():
                await asyncio.to_thread(state.audio.delete, key)
            raise state.refusal(full, key_name) from None
        except IdempotencyConflict:
            raise APIError(409, "Idempotency-Key already used with a different body",
                           loc=("header", "idempotency-key"), code="conflict") from None
        log.info("task %s accepted", task_id, extra=extra(task_id=task_id, source=source, created=created))
        if created and claim:
            state.driver.start(task_id, claimed=True)
        elif created:
            state.driver.wake()
        return task_id
