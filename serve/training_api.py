"""The official server's dataset and training routes (``/v1/dataset/*``, ``/v1/training/*``) in its
``{"data", "code", "error"}`` envelope, on jobs that run outside the ingress (``serve.training``).

Where upstream reads and writes server paths, clients here name things: ``audio_dir`` (scan) must lie
inside ``ingress.allowed_audio_dirs``, songs otherwise arrive by upload (``/v1/dataset/upload``);
``tensor_dir`` is a dataset's name, ``lora_output_dir`` / ``output_dir`` a run's name and
``export_path`` an adapter's name in ``dit.adapters.dir``. A key's latest dataset and training run
are kept in the task store's settings, so every ingress replica answers the status routes alike."""

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
from serve.http_app import api, json_body, not_found
from serve.logs import current_request_id
from serve.store.records import FINAL_PHASES
from serve.training import JobSpec, dataset_dirs, job_request, valid_name

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
SNIFFED_SUFFIX = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg": ".ogg"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ScanBody(_Body):
    audio_dir: str = Field(min_length=1, max_length=4096, description="A directory inside ingress.allowed_audio_dirs.")
    dataset_name: str = Field("my_lora_dataset", description="The dataset's name (letters, digits, _ . -).")


class PreprocessBody(_Body):
    output_dir: Optional[str] = Field(None, description="Ignored: a dataset is prepared into its own folder.")
    dataset_name: Optional[str] = Field(None, description="Which dataset; unset: the key's latest one.")


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


class StartLoKrBody(StartBody):
    lokr_linear_dim: int = Field(64, ge=1, le=256)
    lokr_linear_alpha: int = Field(128, ge=1, le=512)
    lokr_factor: int = Field(-1, ge=-1)
    lokr_decompose_both: bool = False
    learning_rate: float = Field(0.03, gt=0.0)
    lora_output_dir: str = Field("lokr_output", alias="output_dir", description="The run's name.")


class ExportBody(_Body):
    export_path: str = Field(min_length=1, description="The adapter's name in the server's adapter directory.")
    lora_output_dir: str = Field(min_length=1, description="The run's name.")


async def _parse(request: Request, model):
    try:
        return model.model_validate(await intake.read_json_object(request))
    except ValidationError as error:
        raise intake.ValidationFailed(intake.validation_errors(error)) from None


def _name(field: str, value: str) -> str:
    value = (value or "").strip()
    if value.startswith("./"):  # upstream's defaults spell names as relative folders
        value = value[2:]
    if not valid_name(value):
        raise FieldError(field, "a name of 1 to 64 letters, digits, '_', '.' or '-' (never a path)", 422)
    return value


def _samples(songs: Path):
    from pipelines.prepare_dataset import list_songs, sidecar_text

    samples = []
    for index, song in enumerate(list_songs(str(songs)) if songs.is_dir() else []):
        text = sidecar_text(song)
        samples.append({"index": index, "filename": Path(song.source).name, "caption": text.caption,
                        "lyrics": text.lyrics or "[Instrumental]", "bpm": text.bpm, "keyscale": text.keyscale,
                        "timesignature": text.timesignature, "language": text.language or "unknown",
                        "is_instrumental": not text.lyrics, "labeled": bool(text.caption)})
    return samples


def _copy_songs(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.is_symlink():
            shutil.copyfile(path, target / path.name)


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


def _preprocess_payload(record) -> Dict[str, Any]:
    detail = (record.detail or {}).get("training") or {}
    status = {"done": "completed", "failed": "failed"}.get(record.phase, "running")
    payload = {"task_id": record.task_id, "status": status, "progress": record.message,
               "current": detail.get("current", 0), "total": detail.get("total", 0)}
    if status == "completed":
        payload.update(current=record.result.get("num_tensors", 0), result=record.result)
    elif status == "failed":
        payload["error"] = record.error
    return payload


class TrainingRoutes:
    """Route group inherited by ``serve.api.Ingress`` (uses its ``config``, ``state``, ``_submit_job``)."""

    def _root(self) -> Path:
        return self.config.training_path()

    def _key(self, request: Request) -> str:
        return getattr(request.state, "key_name", "") or ""

    async def _setting(self, name: str) -> Optional[Any]:
        return await asyncio.to_thread(self.state.store.get_setting, name)

    async def _put(self, name: str, value: Any) -> None:
        await asyncio.to_thread(self.state.store.put_setting, name, value)

    async def _dataset_reply(self, name: str, message: str) -> Dict[str, Any]:
        samples = await asyncio.to_thread(_samples, dataset_dirs(self._root(), name)["songs"])
        return compat.envelope({"message": message, "dataset_name": name, "num_samples": len(samples),
                                "labeled_count": sum(s["labeled"] for s in samples), "samples": samples})

    @api.post("/v1/dataset/scan", openapi_extra=json_body(ScanBody), responses=error_responses(400, 422))
    async def dataset_scan(self, request: Request):
        """A dataset from a server directory's audio files and sidecars (inside ingress.allowed_audio_dirs)."""
        body = await _parse(request, ScanBody)
        name = _name("dataset_name", body.dataset_name)
        directory = _allowed_dir(body.audio_dir, self.config.ingress.allowed_audio_dirs)
        songs = dataset_dirs(self._root(), name)["songs"]
        await asyncio.to_thread(_copy_songs, directory, songs)
        await self._put(f"dataset-latest:{self._key(request)}", name)
        reply = await self._dataset_reply(name, f"scanned {body.audio_dir}")
        if not reply["data"]["num_samples"]:
            raise FieldError("audio_dir", f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in that directory", 400)
        return reply

    @api.post("/v1/dataset/upload", responses=error_responses(400, 413, 415, 422))
    async def dataset_upload(self, request: Request):
        """One song into a dataset: multipart ``file`` (audio, checked like every upload), ``dataset_name``,
        optional ``caption`` / ``lyrics`` (kept as the song's sidecar)."""
        form, data = await _read_song_form(request, self.state.max_upload)
        name = _name("dataset_name", str(form.get("dataset_name") or "my_lora_dataset"))
        probe = await asyncio.to_thread(self.state.uploads.check, "file", data, self.state.max_upload)
        songs = dataset_dirs(self._root(), name)["songs"]
        count = len(await asyncio.to_thread(_samples, songs))
        if count >= self.config.training.max_songs:
            raise FieldError("file", f"a dataset holds at most {self.config.training.max_songs} songs "
                                     "(training.max_songs)", 422)
        stem = _song_stem(form.get("file"), count)
        await asyncio.to_thread(_write_song, songs, stem, data, probe.format, form)
        await self._put(f"dataset-latest:{self._key(request)}", name)
        return await self._dataset_reply(name, f"uploaded {stem}")

    @api.get("/v1/dataset/samples")
    async def dataset_samples(self, request: Request):
        """The key's latest dataset: its songs and their text."""
        name = await self._setting(f"dataset-latest:{self._key(request)}")
        if not name:
            return compat.envelope(None, 400, "No dataset loaded. Scan a directory or upload songs first.")
        return await self._dataset_reply(name, "ok")

    @api.post("/v1/dataset/preprocess_async", openapi_extra=json_body(PreprocessBody),
              responses=error_responses(400, 422, 429))
    async def dataset_preprocess(self, request: Request):
        """Prepare the dataset's songs into training samples (a Ray Data job); poll preprocess_status."""
        body = await _parse(request, PreprocessBody)
        key = self._key(request)
        name = _name("dataset_name", body.dataset_name) if body.dataset_name else await self._setting(
            f"dataset-latest:{key}")
        if not name:
            raise FieldError("dataset_name", "no dataset yet: scan a directory or upload songs first", 400)
        total = len(await asyncio.to_thread(_samples, dataset_dirs(self._root(), name)["songs"]))
        if not total:
            raise FieldError("dataset_name", f"dataset {name} has no songs", 400)
        task_id = await self._submit_job(self._spec("dataset", name), key)
        await self._put(f"preprocess-latest:{key}", task_id)
        return compat.envelope({"task_id": task_id, "message": "Preprocessing task started", "total": total,
                                "output_dir": name})

    @api.get("/v1/dataset/preprocess_status/{task_id}", responses=error_responses(404))
    async def preprocess_status(self, task_id: str):
        record = await asyncio.to_thread(self.state.store.get, task_id)
        if record is None or (record.request or {}).get("kind") != "dataset":
            raise not_found("task id")
        return compat.envelope(_preprocess_payload(record))

    @api.get("/v1/dataset/preprocess_status")
    async def preprocess_status_latest(self, request: Request):
        task_id = await self._setting(f"preprocess-latest:{self._key(request)}")
        record = await asyncio.to_thread(self.state.store.get, task_id) if task_id else None
        if record is None:
            return compat.envelope({"task_id": None, "status": "idle", "progress": "", "current": 0, "total": 0})
        return compat.envelope(_preprocess_payload(record))

    def _spec(self, kind: str, dataset: str, run: str = "", train: Optional[Dict[str, Any]] = None) -> JobSpec:
        settings = self.config.training
        return JobSpec(kind=kind, dataset=dataset, root=str(self._root()), checkpoints=str(self.config.checkpoint_root()),
                       dit_config=self.config.dit.model, store_url=self.config.task_store_url(),
                       workers=settings.workers, use_gpu=settings.use_gpu, cpus_per_worker=settings.cpus_per_worker,
                       run=run, train=train or {})

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

    async def _start(self, request: Request, model) -> Dict[str, Any]:
        body = await _parse(request, model)
        dataset, run = _name("tensor_dir", body.tensor_dir), _name("lora_output_dir", body.lora_output_dir)
        from acestep.training.samples import sample_files

        try:
            samples = len(await asyncio.to_thread(sample_files, str(dataset_dirs(self._root(), dataset)["prepared"])))
        except (ValueError, OSError):
            raise FieldError("tensor_dir", f"dataset {dataset} has no prepared samples: run "
                                           "/v1/dataset/preprocess_async first", 400) from None
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
        task_id = await self._submit_job(self._spec("training", dataset, run, train), key)
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

    @api.post("/v1/training/export", openapi_extra=json_body(ExportBody), responses=error_responses(400, 404, 409, 422))
    async def training_export(self, request: Request):
        """A finished run's adapter into the adapter directory, under ``export_path``: /v1/adapters lists it
        and requests use it by that name (``lora``)."""
        body = await _parse(request, ExportBody)
        run, name = _name("lora_output_dir", body.lora_output_dir), _name("export_path", body.export_path)
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


def _allowed_dir(value: str, allowed) -> Path:
    """The real path of an allow-listed directory (itself or inside one), else 400 naming ``audio_dir``."""
    real = os.path.realpath(value) if os.path.isabs(value) and "\x00" not in value else ""
    for directory in allowed or []:
        root = os.path.realpath(directory)
        if real and os.path.commonpath([root, real]) == root and os.path.isdir(real):
            return Path(real)
    raise FieldError("audio_dir", "not a directory inside the server's allowed audio directories "
                                  "(ingress.allowed_audio_dirs); upload songs with /v1/dataset/upload instead", 400)


async def _read_song_form(request: Request, max_upload: int):
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(415, "content type must be multipart/form-data", loc=("header", "content-type"),
                       code="unsupported_media_type")
    try:
        form = await request.form(max_part_size=max_upload + 1)
    except Exception:  # malformed multipart: starlette raises several types
        raise FieldError("body", "malformed multipart body", 400) from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise FieldError("file", "a song file is required (multipart field 'file')", 422)
    for text in ("caption", "lyrics", "dataset_name"):
        if len(str(form.get(text) or "")) > 20000:
            raise FieldError(text, "at most 20000 characters", 422)
    return form, await upload.read(max_upload + 1)


def _song_stem(upload, index: int) -> str:
    stem = Path(getattr(upload, "filename", "") or "").stem
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem)[:60].strip("_")
    return f"{index:04d}-{stem or 'song'}"


def _write_song(songs: Path, stem: str, data: bytes, kind: str, form) -> None:
    import json

    songs.mkdir(parents=True, exist_ok=True)
    (songs / f"{stem}{SNIFFED_SUFFIX.get(kind, '.' + kind)}").write_bytes(data)
    text = {name: str(form.get(name)) for name in ("caption", "lyrics") if form.get(name)}
    if text:
        (songs / f"{stem}.json").write_text(json.dumps(text, ensure_ascii=False))
