"""What one ingress replica holds: the stores, admission, the upload checker, its task driver, and
a cached view of the model replicas that the info routes answer from.

The view (model info, replica stats, each deployment's running replicas and status) is refreshed
by a background loop, so ``/v1/models``, ``/v1/stats`` and ``/ready`` answer within a second even
when every model replica is busy and their queues are full. The loop calls a model deployment only
while it has a running replica: a call to one scaled to zero would start a replica (Serve scales up
from zero on any call), and the app would never stay idle. The same loop purges expired records and
audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
import uuid
from typing import Any, Dict, Optional, Tuple

from serve import metrics
from serve.edge.admission import Admission, AdmissionLimits
from serve.config import AppConfig
from serve.driver import DriverSettings, TaskDriver
from serve.edge.errors import APIError, retry_after
from serve.logs import log
from serve.models import deployment_name
from serve.replica import plans_unpacked
from serve.store.records import FINAL_PHASES, StoreFull, TaskRecord, wait_final
from serve.store import open_task_store
from serve.webhooks import WebhookSecrets, WebhookSender
from serve.gates import Gates


MAX_UPLOAD_SECONDS = 600.0  # the DiT's longest song; longer sources cannot be covered or repainted
_FAILURE_STATUS = {"overloaded": 503, "replica_died": 503, "invalid_audio": 422, "cancelled": 409}


def failure_status(code: Optional[str]) -> Tuple[int, Optional[Dict[str, str]]]:
    """HTTP status (and headers) for a failed task's code on the sync routes."""
    code = code or "internal"
    if code.startswith("timeout:"):
        return 504, None
    status = _FAILURE_STATUS.get(code, 500)
    return status, retry_after(5) if status == 503 else None


TRAINING_JSON = ("/v1/dataset/scan", "/v1/dataset/load", "/v1/dataset/save", "/v1/dataset/preprocess",
                 "/v1/dataset/preprocess_async", "/v1/dataset/auto_label", "/v1/dataset/auto_label_async",
                 "/v1/training/start", "/v1/training/start_lokr", "/v1/training/export",
                 "/v1/training/load_tensor_info")


def guard_settings(config: AppConfig):
    """The request guard's settings: keys from the environment/--api-key and the keys file."""
    from serve.edge.guard import GuardSettings, KeyRing

    ingress = config.ingress
    lora = {"/v1/lora/load", "/v1/lora/unload", "/v1/lora/toggle", "/v1/lora/scale"}
    official = frozenset({"/release_task", "/query_result", "/format_input", "/create_random_sample",
                          "/v1/init", "/v1/reinitialize", "/v1/lora/status", *lora})
    from serve.studio import PUBLIC_PATHS as STUDIO

    public = {"/health", "/ready", *STUDIO} | (
        {"/docs", "/openapi.json", "/docs/oauth2-redirect"} if ingress.public_docs else set())
    json_only = frozenset({"application/json"})
    json_or_form = frozenset({"application/json", "multipart/form-data"})
    return GuardSettings(
        keys=KeyRing.load(keys_file=ingress.api_keys_file), public_paths=frozenset(public), official_paths=official,
        upload_limit=int(ingress.max_upload_mb * 2**20),
        upload_paths=frozenset({"/v1/generate", "/v1/tasks", "/release_task", "/v1/chat/completions",
                                "/v1/dataset/upload"}),
        content_types={"/v1/understand": json_only, "/v1/create_sample": json_only, "/v1/format_sample": json_only,
                       "/v1/generate": json_or_form, "/v1/tasks": json_or_form,
                       "/v1/chat/completions": json_only, "/v1/dataset/upload": frozenset({"multipart/form-data"}),
                       **{path: json_only for path in TRAINING_JSON},
                       **{path: json_only for path in lora - {"/v1/lora/unload"}}},
    )


class IngressState:
    def __init__(self, config: AppConfig, pipeline, lms: Dict[str, Any], dits: Dict[str, Any],
                 gates: Optional[Gates] = None):
        from serve.edge.uploads import UploadChecker

        ingress, store = config.ingress, config.store
        self.config, self.lms, self.dits = config, lms, dits
        self.lm, self.dit = lms[config.lm.model], dits[config.dit.model]
        self._dit_infos: Dict[str, Dict[str, Any]] = {}
        self.max_upload = int(ingress.max_upload_mb * 2**20)
        self.store = open_task_store(config.task_store_url(), ttl_s=store.task_ttl_s, max_records=store.max_records)
        self.audio = config.audio_store()
        self.admission = Admission(AdmissionLimits(
            max_unfinished=ingress.max_unfinished_tasks, per_key_unfinished=ingress.per_key_unfinished,
            per_key_rpm=ingress.per_key_rpm, sync_max_inflight=ingress.max_sync_requests),
            shared=self.store.take_token)
        self.uploads = UploadChecker(max_duration_s=MAX_UPLOAD_SECONDS)
        timeouts = ingress.timeouts
        settings = DriverSettings(
            max_drives=ingress.max_drives, lease_s=ingress.lease_s, retries=ingress.retries,
            retry_backoff_s=ingress.retry_backoff_s,
            timeouts={"queued": timeouts.queue_s, "lm": timeouts.lm_s, "dit": timeouts.dit_s,
                      "encode": timeouts.encode_s}, max_jobs=config.training.max_jobs)
        owner = f"ingress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.webhooks = WebhookSender(self.store, ingress.webhooks, WebhookSecrets.load(ingress.webhooks), owner)
        self.driver = TaskDriver(self.store, pipeline, settings, owner, on_done=self.admission.record_task_time,
                                 webhooks=self.webhooks)
        self._view: Dict[str, Any] = {"lm_info": None, "dit_info": None, "lm_stats": None, "dit_stats": None,
                                      "replicas": {}, "statuses": {}, "store_ok": False, "as_of": 0.0}
        self._refresher: Optional[asyncio.Task] = None
        self._last_purge = 0.0
        # the pipeline's calls wait their turn here, sized by the replicas this view counts
        self.gates = gates or Gates.for_config(config)
        self.gates.replicas = lambda: self._view["replicas"]

    # -- background ------------------------------------------------------------------------------

    def start_background(self) -> None:
        """Start (or restart after a crash) the reaper and the view refresher; cheap when running."""
        if self.driver.draining:
            return
        self.driver.ensure_reaper()
        if self._refresher is None or self._refresher.done():
            # a context of its own: not the request's that happened to start it (its logs' request id)
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever(),
                                                                    context=contextvars.Context())

    async def _refresh_forever(self, period_s: float = 2.0) -> None:
        while not self.driver.draining:
            try:
                await self._refresh()
            except Exception:
                log.warning("ingress view refresh failed", exc_info=True)
            await asyncio.sleep(period_s)

    async def _refresh(self) -> None:
        view = self._view
        view["store_ok"] = await asyncio.to_thread(self._ping)
        if view["store_ok"]:
            metrics.store_tasks((await asyncio.to_thread(self.store.stats))["tasks"])
        view["replicas"], view["statuses"] = await asyncio.to_thread(_deployment_states)
        self.gates.refresh()  # more replicas: more room
        await self._ask_running_models()
        view["as_of"] = time.time()
        if len(self._dit_infos) < len(self.dits):
            # once per ingress replica, even from zero (requests are routed by each DiT's family); a
            # DiT still starting answers at a later pass
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.turbo_by_model(), 5.0)
        if time.monotonic() - self._last_purge > min(300.0, self.config.store.task_ttl_s / 4):
            self._last_purge = time.monotonic()
            await asyncio.to_thread(self._purge)

    async def _ask_running_models(self) -> None:
        """Stats (and info once) of the default LM and DiT, from those with a running replica only."""
        view, calls = self._view, {}
        for role, handle, model in (("lm", self.lm, self.config.lm.model), ("dit", self.dit, self.config.dit.model)):
            if not view["replicas"].get(deployment_name(role, model, model)):
                view[f"{role}_stats"] = None  # no replica: nothing to report, and a call would start one
                continue
            calls[f"{role}_stats"] = handle.stats
            if view[f"{role}_info"] is None:
                calls[f"{role}_info"] = handle.info
        names = list(calls)
        results = await asyncio.gather(*(asyncio.wait_for(calls[n].remote(), 2.0) for n in names),
                                       return_exceptions=True)
        for name, result in zip(names, results):
            if not isinstance(result, BaseException):
                view[name] = result

    def running(self, deployment: str) -> Optional[int]:
        """Running replicas of ``deployment`` as of the last refresh (None before the first)."""
        return self._view["replicas"].get(deployment) if self._view["as_of"] else None

    def _ping(self) -> bool:
        try:
            return bool(self.store.ping())
        except Exception:
            return False

    def _purge(self) -> None:
        self.store.purge()
        self.audio.purge()

    # -- answers from the view ---------------------------------------------------------------------

    async def dit_info(self) -> Dict[str, Any]:
        if self._view["dit_info"] is None:
            self._view["dit_info"] = await self.dit.info.remote()
        return self._view["dit_info"]

    async def turbo_by_model(self) -> Dict[str, Optional[bool]]:
        """{served DiT: is_turbo}, asked of each DiT deployment once."""
        missing = [name for name in self.dits if name not in self._dit_infos]
        if missing:
            infos = await asyncio.gather(*(self.dits[name].info.remote() for name in missing))
            self._dit_infos.update(zip(missing, infos))
        return {name: info["is_turbo"] for name, info in self._dit_infos.items()}

    async def family_by_model(self) -> Dict[str, Optional[str]]:
        """{served DiT: turbo, sft or base} (``acestep.presets``)."""
        await self.turbo_by_model()
        return {name: info.get("family") for name, info in self._dit_infos.items()}

    def readiness(self) -> Dict[str, Any]:
        """/ready's report (``readiness``) over this app's deployments: the ingress, then each LM and DiT."""
        config, view = self.config, self._view
        minimum = {"Ingress": config.ingress.deployment.autoscaling_config.min_replicas}
        for role, settings, names in (("lm", config.lm, self.lms), ("dit", config.dit, self.dits)):
            least = settings.deployment.autoscaling_config.min_replicas
            minimum.update({deployment_name(role, name, settings.model): least for name in names})
        return readiness(minimum, view["replicas"], view["statuses"], view["store_ok"], view["as_of"])

    def model_view(self) -> Dict[str, Any]:
        """{"dit": {model, is_turbo}, "lm": {enabled, model, backend}} of the defaults, and "dits" /
        "lms": every served one, defaults first; from the config until the replicas have answered
        (``is_turbo`` None then)."""
        unknown = {"is_turbo": None, "family": None, "preset": None}
        dit = self._view["dit_info"] or self._dit_infos.get(self.config.dit.model) or {"model": self.config.dit.model,
                                                                                       **unknown}
        lm = self._view["lm_info"] or {"enabled": self.config.lm.enabled, "model": self.config.lm.model,
                                       "backend": self.config.lm.backend}
        dits = [self._dit_infos.get(name) or {"model": name, **unknown} for name in self.dits]
        lms = [{**lm, "model": name} for name in self.lms]
        return {"dit": dit, "lm": lm, "dits": dits, "lms": lms}

    def models(self) -> Dict[str, Any]:
        view = self.model_view()
        dit = view["dit"]
        return {"models": [{"name": d["model"], "is_default": d["model"] == dit["model"], "is_turbo": d["is_turbo"],
                            "family": d.get("family"), "preset": d.get("preset")} for d in view["dits"]],
                "default_model": dit["model"], "lm": view["lm"], "lm_models": [m["model"] for m in view["lms"]],
                "adapters": {"dir_set": bool(self.config.dit.adapters.dir),
                             "default": self.config.dit.adapters.default}}

    def audio_path(self, key: str) -> str:
        """Where the audio store keeps ``key`` (a path, or the store URL's object name)."""
        return f"{self.audio.root.rstrip('/')}/{key}" if self.audio.is_local else f"{self.audio.url.rstrip('/')}/{key}"

    def stats(self) -> Dict[str, Any]:
        view = self._view
        return {"lm": view["lm_stats"], "dit": view["dit_stats"], "store": self.store.stats(),
                "admission": self.admission.stats(), "driver": self.driver.stats(), "as_of": view["as_of"],
                "webhooks": dict(self.webhooks.counts), "gates": self.gates.stats(), "plans_unpacked": plans_unpacked()}

    # -- tasks -------------------------------------------------------------------------------------

    async def admit(self, key_name: str) -> None:
        if self.driver.draining:
            metrics.rejected("draining")
            raise APIError(503, "the server is shutting down; retry on another replica or after restart",
                           loc=("service",), code="draining", headers=retry_after(self.config.ingress.drain_grace_s))
        unfinished = await asyncio.to_thread(self.store.count_unfinished)
        mine = await asyncio.to_thread(self.store.count_unfinished, key_name) if key_name else 0
        await asyncio.to_thread(self.admission.admit, key_name, unfinished, mine)  # the rate bucket is in the store

    def bounds(self, key_name: str):
        ingress = self.config.ingress
        return ingress.max_unfinished_tasks, ingress.per_key_unfinished if key_name else None

    def refusal(self, full: StoreFull, key_name: str) -> APIError:
        """The 429 (with Retry-After from admission's estimate) for a create the store refused."""
        limit, key_limit = self.bounds(key_name)
        try:
            if full.scope == "global":
                self.admission.admit(key_name, max(full.unfinished, limit), 0)
            else:
                self.admission.admit(key_name, 0, max(full.unfinished, key_limit or 0))
        except APIError as error:
            return error
        return APIError(429, "too many unfinished tasks", code="overloaded", headers=retry_after(1))

    async def wait_result(self, task_id: str, timeout_s: float) -> TaskRecord:
        """The record once final (or as it is at the timeout); awaits the local drive when there is one."""
        deadline = time.monotonic() + timeout_s
        drive = self.driver.local(task_id)
        if drive is not None:
            await asyncio.wait({drive}, timeout=timeout_s)
        left = deadline - time.monotonic()
        record = await asyncio.to_thread(self.store.get, task_id)
        if record is not None and record.phase not in FINAL_PHASES and left > 0:
            await wait_final(self.store, task_id, left)
            record = await asyncio.to_thread(self.store.get, task_id)
        return record

    def handle_result(self, record: TaskRecord, include_tensors: bool):
        """A done task's record → ``GenerationResult`` as ``generate_music`` returns it, plus each
        item's encoded file (``bytes``); ``include_tensors=False`` skips decoding it."""
        import torch

        from acestep.audio import decode_audio

        from acestep.params import GenerationResult

        output = record.result
        audios = []
        for item in output["audios"]:
            data = self.audio.read(item["key"])  # the file as stored: callers keep these bytes as they are
            tensor = None
            if include_tensors:
                samples, _ = decode_audio(data, item["format"])
                tensor = torch.from_numpy(samples.T.copy())
            audios.append({"path": "", "tensor": tensor, "bytes": data, "key": item["key"].rsplit(".", 1)[0],
                           "sample_rate": item["sample_rate"], "params": item["params"], "url": item["url"],
                           "format": item["format"]})
        plans = (output["metadata"] or {}).get("plans") or []
        extra = {"time_costs": output["time_costs"], "task_id": record.task_id,
                 "lm_metadata": (plans[0] or {}).get("metadata") if plans else None,  # as generate_music
                 "lm_plans": plans, "seed_value": ", ".join(str(a["seed"]) for a in output["audios"]),
                 "preset": (output["metadata"] or {}).get("preset")}
        return GenerationResult(audios=audios, status_message=output["status_message"], extra_outputs=extra)

    async def drain(self, grace_s: float) -> Dict[str, int]:
        if self._refresher is not None:
            self._refresher.cancel()
        report = await self.driver.drain(grace_s)
        self.uploads.close()
        return report


FAILED_STATUSES = ("UNHEALTHY", "DEPLOY_FAILED")  # Serve's deployment statuses that no call can fix


def readiness(min_replicas: Dict[str, int], running: Dict[str, int], statuses: Dict[str, str], store_ok: bool,
              as_of: float, now: Optional[float] = None) -> Dict[str, Any]:
    """Ready when the view is fresh (refreshed within 30 s), the task store answers and every
    deployment either has a running replica or may scale from zero (``min_replicas`` 0) and is not
    failed (``FAILED_STATUSES``): a request to a deployment at zero waits for a cold start but is
    served. ``scaled_to_zero`` names the deployments a request would wait for; ``unavailable``
    those with no replica that keep the app not ready (failed, or not allowed to be at zero);
    ``status`` is Serve's per deployment (UPSCALING at zero: a cold start is under way)."""
    now = time.time() if now is None else now
    counts = {name: int(running.get(name, 0)) for name in min_replicas}
    idle = [name for name, count in counts.items() if count == 0]
    unavailable = [name for name in idle if statuses.get(name) in FAILED_STATUSES or min_replicas[name] > 0]
    ready = now - as_of < 30 and store_ok and not unavailable
    return {"ready": bool(ready), "store": store_ok, "running_replicas": counts,
            "scaled_to_zero": [name for name in idle if name not in unavailable], "unavailable": unavailable,
            "status": {name: statuses.get(name) for name in min_replicas}, "as_of": as_of}


def _deployment_states() -> Tuple[Dict[str, int], Dict[str, str]]:
    """Running replicas and Serve's status per deployment of this app, from the Serve controller."""
    from ray import serve

    counts: Dict[str, int] = {}
    statuses: Dict[str, str] = {}
    for app in serve.status().applications.values():
        for name, deployment in app.deployments.items():
            states = deployment.replica_states or {}
            counts[name] = counts.get(name, 0) + int(states.get("RUNNING", 0))
            statuses[name] = str(getattr(deployment.status, "value", deployment.status))
    return counts, statuses
