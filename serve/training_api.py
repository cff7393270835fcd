"""The official server's training routes (``/v1/training/*``) in its ``{"data", "code", "error"}``
envelope, on jobs that run outside the ingress (``serve.training``); ``JobRoutes`` is what they share
with the dataset routes (``serve.dataset_api``).

Where upstream reads and writes server paths, clients here name things: ``tensor_dir`` is a dataset's
name, ``lora_output_dir`` / ``output_dir`` a run's name and ``export_path`` an adapter's name in
``dit.adapters.dir``. A key's latest dataset and training run are kept in the task store's settings, so
every ingress replica answers the status routes alike. Upstream fields that would change a run in a
way this trainer cannot are refused (422 naming them) unless they hold upstream's default."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.compat import release as compat
from serve.edge import intake
from serve.edge.errors import APIError, FieldError, error_responses
from serve.http_app import api, json_body
from serve.logs import current_request_id
from serve.store.records import FINAL_PHASES
from serve.training import JobSpec, dataset_dirs, job_request, read_meta, valid_name


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StartBody(_Body):
    tensor_dir: str = Field(min_length=1, description="The prepared dataset's name.")
    lora_rank: int = Field(64, ge=1, le=256)
    lora_alpha: int = Field(128, ge=1, le=512)
    lora_dropout: float = Field(0.1, ge=0.0, le=1.0)
    learning_rate: float = Field(1e-4, gt=0.0)
    train_epochs: int = Field(10, ge=1, description="Passes over the dataset (steps = epochs x batches per epoch).")
    train_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; set, it wins over train_epochs.")
    train_batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation: int = Field(4, ge=1, le=64)
    save_every_n_epochs: int = Field(5, ge=1)
    training_seed: int = Field(42, ge=0)
    lora_output_dir: str = Field("lora_output", description="The run's name (letters, digits, _ . -).")
    gradient_checkpointing: bool = False
    training_shift: float = Field(3.0, ge=0.0, description="Accepted and ignored, as upstream's trainer ignores it "
                                                           "(its schedule is fixed); timesteps here follow the "
                                                           "checkpoint's own config.")
    use_fp8: bool = Field(False, description="FP8 training: not available here; true is refused.")


class StartLoKrBody(StartBody):
    lokr_linear_dim: int = Field(64, ge=1, le=256)
    lokr_linear_alpha: int = Field(128, ge=1, le=512)
    lokr_factor: int = Field(-1, ge=-1)
    lokr_decompose_both: bool = False
    lokr_use_tucker: bool = Field(False, description="Tucker decomposition: not available on peft's LoKr; true is "
                                                     "refused.")
    lokr_use_scalar: bool = Field(False, description="Scalar calibration: not available on peft's LoKr; true is "
                                                     "refused.")
    lokr_weight_decompose: bool = Field(False, description="DoRA-style weight decomposition (upstream's default "
                                                           "is true): not available on peft's LoKr; true is refused.")
    learning_rate: float = Field(0.03, gt=0.0)
    train_epochs: int = Field(500, ge=1, description="Passes over the dataset (steps = epochs x batches per epoch).")
    lora_output_dir: str = Field("lokr_output", alias="output_dir", description="The run's name.")


UNSUPPORTED = {"use_fp8": "FP8 training is not available here", "lokr_use_tucker": "peft's LoKr has no Tucker "
               "decomposition", "lokr_use_scalar": "peft's LoKr has no scalar calibration",
               "lokr_weight_decompose": "peft's LoKr has no weight decomposition (DoRA)"}


class ExportBody(_Body):
    export_path: str = Field(min_length=1, description="The adapter's name in the server's adapter directory.")
    lora_output_dir: str = Field(min_length=1, description="The run's name.")


class TensorInfoBody(_Body):
    tensor_dir: str = Field("", description="The prepared dataset's name.")


async def parse(request: Request, model):
    try:
        return model.model_validate(await intake.read_json_object(request))
    except ValidationError as error:
        raise intake.ValidationFailed(intake.validation_errors(error)) from None


def name_of(field: str, value: Optional[str], suffix: str = "") -> str:
    """A client's name for a dataset, run or adapter; upstream's defaults spell names as relative
    files (``./name``; ``suffix``, e.g. ``.json``, is taken off too)."""
    value = (value or "").strip()
    if value.startswith("./"):
        value = value[2:]
    if suffix and value.endswith(suffix):
        value = value[: -len(suffix)]
    if not valid_name(value):
        raise FieldError(field, "a name of 1 to 64 letters, digits, '_', '.' or '-' (never a path)", 422)
    return value


class JobRoutes:
    """What the dataset and training route groups share (uses the ingress's ``config``, ``state``)."""

    def _root(self) -> Path:
        return self.config.training_path()

    def _key(self, request: Request) -> str:
        return getattr(request.state, "key_name", "") or ""

    async def _setting(self, name: str) -> Optional[Any]:
        return await asyncio.to_thread(self.state.store.get_setting, name)

    async def _put(self, name: str, value: Any) -> None:
        await asyncio.to_thread(self.state.store.put_setting, name, value)

    def _spec(self, kind: str, dataset: str, **job: Any) -> JobSpec:
        settings = self.config.training
        return JobSpec(kind=kind, dataset=dataset, root=str(self._root()),
                       checkpoints=str(self.config.checkpoint_root()), dit_config=self.config.dit.model,
                       store_url=self.config.task_store_url(), workers=settings.workers, use_gpu=settings.use_gpu,
                       cpus_per_worker=settings.cpus_per_worker, **job)

    async def _submit_job(self, spec: JobSpec, key_name: str) -> str:
        """Admission, then the job's task record; this replica's driver starts its actor."""
        state = self.state
        state.start_background()
        await state.admit(key_name)
        from serve.store.records import StoreFull

        try:
            task_id, _ = await asyncio.to_thread(
                state.store.create, job_request(spec, current_request_id()), key_name=key_name,
                bounds=state.bounds(key_name), priority=self._priority(key_name))
        except StoreFull as full:
            raise state.refusal(full, key_name) from None
        state.driver.wake()
        return task_id

    async def _await_job(self, task_id: str, status_route: str):
        """The job's done record (a synchronous route), bounded by ``training.sync_timeout_s``; 408 naming
        the job's status route when it runs past it, the failure's status when it failed."""
        from serve.ingress_state import failure_status

        timeout = self.config.training.sync_timeout_s
        record = await self.state.wait_result(task_id, timeout)
        if record.phase == "done":
            return record
        if record.phase not in FINAL_PHASES:
            raise APIError(408, f"no result within {timeout:g}s (training.sync_timeout_s); the job goes on: poll "
                                f"{status_route}/{task_id}", loc=("task",), code="timeout")
        if record.error == "invalid_dataset":
            raise FieldError("dataset_name", record.message, 400)
        status, headers = failure_status(record.error)
        raise APIError(status, record.message, loc=("task",), code=record.error or "internal", headers=headers)


def _steps(body: StartBody, samples: int) -> int:
    if body.train_steps is not None:
        return body.train_steps
    per_epoch = math.ceil(max(1, samples) / (body.train_batch_size * body.gradient_accumulation))
    return body.train_epochs * per_epoch


def _adapter(body: StartBody) -> Dict[str, Any]:
    if isinstance(body, StartLoKrBody):
        return {"kind": "lokr", "rank": body.lokr_linear_dim, "alpha": float(body.lokr_linear_alpha),
                "lokr_factor": body.lokr_factor, "lokr_decompose_both": body.lokr_decompose_both}
    return {"kind": "lora", "rank": body.lora_rank, "alpha": float(body.lora_alpha), "dropout": body.lora_dropout}


def _refuse_unsupported(body: StartBody) -> None:
    for field, reason in UNSUPPORTED.items():
        if getattr(body, field, False):
            raise FieldError(field, f"{reason}; leave it false (or unset)", 422)


def _status_payload(record, events) -> Dict[str, Any]:
    """Upstream's training status from the task record and its events."""
    request = record.request or {}
    job = request.get("job", {})
    history = [{"step": step, "loss": loss} for event in events or []
               for step, loss in ((event.detail or {}).get("training") or {}).get("losses", [])]
    detail = (record.detail or {}).get("training") or {}
    result = record.result or {}
    rate = result.get("steps_per_second", 0.0)
    return {"task_id": record.task_id, "is_training": record.phase not in FINAL_PHASES, "should_stop": False,
            "current_step": result.get("steps", detail.get("step", 0)),
            "current_loss": result.get("final_loss", detail.get("loss")), "status": record.message,
            "phase": record.phase, "config": job.get("train", {}), "tensor_dir": job.get("dataset", ""),
            "output_dir": job.get("run", ""), "loss_history": history, "tensorboard_url": None,
            "tensorboard_logdir": None, "training_log": record.message, "start_time": record.created_at,
            "current_epoch": 0, "steps_per_second": rate, "estimated_time_remaining": 0.0, "error": record.error}


def _prepared_count(root: Path, dataset: str) -> int:
    """The dataset's prepared samples; 0 when it has none."""
    from acestep.training.samples import sample_files

    try:
        return len(sample_files(str(dataset_dirs(root, dataset)["prepared"])))
    except (ValueError, OSError):
        return 0


class TrainingRoutes(JobRoutes):
    """Route group inherited by ``serve.api.Ingress``."""

    async def _start(self, request: Request, model) -> Dict[str, Any]:
        body = await parse(request, model)
        _refuse_unsupported(body)
        dataset, run = name_of("tensor_dir", body.tensor_dir), name_of("lora_output_dir", body.lora_output_dir)
        samples = await asyncio.to_thread(_prepared_count, self._root(), dataset)
        if not samples:
            raise FieldError("tensor_dir", f"dataset {dataset} has no prepared samples: run "
                                           "/v1/dataset/preprocess_async first", 400)
        steps = _steps(body, samples)
        if steps > self.config.training.max_steps:
            raise FieldError("train_steps", f"{steps} steps; at most {self.config.training.max_steps} on this server "
                                            "(training.max_steps)", 422)
        every = min(steps, body.save_every_n_epochs * max(1, steps // body.train_epochs))
        train = {"adapter": _adapter(body), "steps": steps, "batch_size": body.train_batch_size,
                 "grad_accumulation": body.gradient_accumulation, "learning_rate": body.learning_rate,
                 "seed": body.training_seed, "gradient_checkpointing": body.gradient_checkpointing,
                 "checkpoint_every": max(1, every)}
        from acestep.training.loop import TrainConfig

        try:
            train = TrainConfig(**train).to_dict()
        except ValueError as error:
            raise FieldError("body", str(error), 422) from None
        key = self._key(request)
        latest = await self._setting(f"training-latest:{key}")
        running = await asyncio.to_thread(self.state.store.get, latest) if latest else None
        if running is not None and not running.finished:
            raise APIError(409, "Training already in progress", loc=("body",), code="conflict")
        task_id = await self._submit_job(self._spec("training", dataset, run=run, train=train), key)
        await self._put(f"training-latest:{key}", task_id)
        return compat.envelope({"message": "Training started", "task_id": task_id, "tensor_dir": dataset,
                                "output_dir": run, "config": train, "fp8_enabled": False})

    @api.post("/v1/training/start", openapi_extra=json_body(StartBody), responses=error_responses(400, 409, 422, 429))
    async def training_start(self, request: Request):
        """LoRA training on a prepared dataset (Ray Train); watch /v1/training/status or the task's events."""
        return await self._start(request, StartBody)

    @api.post("/v1/training/start_lokr", openapi_extra=json_body(StartLoKrBody),
              responses=error_responses(400, 409, 422, 429))
    async def training_start_lokr(self, request: Request):
        return await self._start(request, StartLoKrBody)

    async def _latest_training(self, request: Request):
        task_id = await self._setting(f"training-latest:{self._key(request)}")
        return await asyncio.to_thread(self.state.store.get, task_id) if task_id else None

    @api.get("/v1/training/status")
    async def training_status(self, request: Request):
        """The key's latest run: step, loss, the loss history, the outcome."""
        record = await self._latest_training(request)
        if record is None:
            return compat.envelope({"is_training": False, "should_stop": False, "current_step": 0,
                                    "current_loss": None, "status": "Idle", "config": {}, "loss_history": [],
                                    "error": None, "task_id": None})
        events = await asyncio.to_thread(self.state.store.events, record.task_id)
        return compat.envelope(_status_payload(record, events))

    @api.post("/v1/training/stop")
    async def training_stop(self, request: Request):
        """Cancel the key's running run (its task ends ``cancelled``; its Ray Train workers stop)."""
        record = await self._latest_training(request)
        if record is not None and await asyncio.to_thread(self.state.store.fail, record.task_id, "cancelled",
                                                          "cancelled"):
            return compat.envelope({"message": "Stopping training...", "task_id": record.task_id})
        return compat.envelope({"message": "No training in progress"})

    @api.post("/v1/training/load_tensor_info", openapi_extra=json_body(TensorInfoBody),
              responses=error_responses(400, 422))
    async def training_tensor_info(self, request: Request):
        """A prepared dataset's name → its prepared sample count and activation tag (upstream's shape)."""
        body = await parse(request, TensorInfoBody)
        if not body.tensor_dir.strip():
            raise FieldError("tensor_dir", "name a prepared dataset", 400)
        dataset = name_of("tensor_dir", body.tensor_dir)
        count = await asyncio.to_thread(_prepared_count, self._root(), dataset)
        if not count:
            raise FieldError("tensor_dir", f"dataset {dataset} has no prepared samples: run "
                                           "/v1/dataset/preprocess first", 400)
        tag = (await asyncio.to_thread(read_meta, self._root(), dataset)).custom_tag
        message = f"Loaded preprocessed dataset: {dataset}\nSamples: {count} preprocessed tensors"
        return compat.envelope({"dataset_name": dataset, "num_samples": count, "custom_tag": tag,
                                "tensor_dir": dataset, "message": message + (f"\nCustom Tag: {tag}" if tag else "")})

    @api.post("/v1/training/export", openapi_extra=json_body(ExportBody), responses=error_responses(400, 404, 409, 422))
    async def training_export(self, request: Request):
        """A finished run's adapter into the adapter directory, under ``export_path``: /v1/adapters lists it
        and requests use it by that name (``lora``)."""
        body = await parse(request, ExportBody)
        run, name = name_of("lora_output_dir", body.lora_output_dir), name_of("export_path", body.export_path)
        if not self.config.dit.adapters.dir:
            raise FieldError("export_path", "this app serves no adapters (dit.adapters.dir is not set)", 400)
        source = self._root() / "runs" / run / "adapter"
        target = Path(self.config.dit.adapters.dir) / name
        if not (source / "adapter_config.json").is_file():
            raise FieldError("lora_output_dir", f"run {run} has no finished adapter", 404, code="not_found")
        if target.exists():
            raise FieldError("export_path", f"an adapter named {name} exists already", 409, code="conflict")
        await asyncio.to_thread(_export, source, target)
        return compat.envelope({"message": "LoRA exported successfully", "export_path": name, "source": run})


def _export(source: Path, target: Path) -> None:
    """Copied beside the target, then renamed: a replica never reads a half-written adapter."""
    staging = target.with_name(f".{target.name}.part-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    staging.rename(target)
