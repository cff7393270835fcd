"""The job's Ray Data stages: callable classes for ``Dataset.map_batches`` (one actor per model copy).

Batches carry one column of JSON text per stage (Arrow-friendly, whatever the rows hold):

- input: ``row`` = {id, index, fields, error}
- ``LMStage`` → ``row`` + {params, config, seeds, plans, lm_time_costs, lm_node}: validates and resolves seeds
  (``prepare_request``), then plans the rows with the 5 Hz LM. The job calls it with one row per
  call and several calls at once per actor (threads), so rows stream through the actor's one engine.
- ``DiTStage`` → ``record`` (a ``ManifestRecord``): renders with DiT + VAE and writes the audio files
  itself (``{output}/audio/{id}_{i}.{format}``), so raw audio never enters the object store. Called
  the same way, one row per call and several at once: the rows join the actor's one DiT worker, whose
  forwards hold as many rows as its device's limits allow (``DiTLimits.for_device``: one on a CPU).
- ``ServeStage`` → ``record``: instead of both, sends each row to a running Serve app's ingress.

A row that fails in any stage carries its error on; the later stages pass it through untouched.
Each record names the Ray node each model stage ran on (``nodes``: lm, dit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional


from acestep.audio import SAMPLE_RATE, decode_audio, save_audio
from acestep.params import GenerationConfig, GenerationParams, GenerationResult, LMPlan, json_safe
from pipelines.manifest import ManifestRecord
from pipelines.rows import to_request

if TYPE_CHECKING:
    from acestep.inference import RenderJob

logger = logging.getLogger(__name__)
AUDIO_DIR = "audio"


class GenerationFailed(RuntimeError):
    """A ``GenerationResult`` with ``success=False`` (the Serve ingress reports errors this way)."""


def describe(error: BaseException) -> str:
    """The manifest's error text: the exception type and message (ValidationError names the field)."""
    return f"{type(error).__name__}: {error}"


def audio_name(row_id: str, item: int, audio_format: str) -> str:
    """An item's file, relative to the output folder."""
    return f"{AUDIO_DIR}/{row_id}_{item}.{audio_format}"


def write_audio(audio: Dict[str, Any], output_dir: Path, name: str, audio_format: str) -> float:
    """Write one item through a temporary name and rename, so a killed job never leaves a torn file:
    its encoded ``bytes`` as they are when the item has them (the Serve app stored them already),
    else its ``tensor`` encoded here. Returns the duration in seconds."""
    target = output_dir / name
    tmp = target.with_name(f".{target.name}.part")
    if audio.get("bytes") is not None:
        tmp.write_bytes(audio["bytes"])
        samples, rate = decode_audio(audio["bytes"], audio_format)
        seconds = samples.shape[0] / rate
    else:
        save_audio(audio["tensor"], tmp, audio_format)
        seconds = audio["tensor"].shape[-1] / float(audio.get("sample_rate") or SAMPLE_RATE)
    os.replace(tmp, target)
    return seconds


def _decode(batch: Dict[str, Any], column: str) -> List[Dict[str, Any]]:
    return [json.loads(text) for text in batch[column]]


def _encode(rows: List[Dict[str, Any]], column: str) -> Dict[str, List[str]]:
    return {column: [json.dumps(row, ensure_ascii=False) for row in rows]}


def new_record(row: Dict[str, Any], **nodes: str) -> ManifestRecord:
    return ManifestRecord(id=row["id"], index=row["index"], params=row.get("fields") or {}, error=row.get("error"),
                          planned_at=row.get("planned_at") or 0.0, nodes={k: v for k, v in nodes.items() if v})


def node_id() -> str:
    """The Ray node this actor runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def finish_record(record: ManifestRecord, result: GenerationResult, output_dir: Path,
                  audio_format: str) -> ManifestRecord:
    """Fill ``record`` from a successful ``GenerationResult``: write each item's file, note seeds,
    codes, LM metadata, duration and time costs."""
    if not result.success:
        raise GenerationFailed(result.error or result.status_message or "generation failed")
    files, durations = [], []
    for index, audio in enumerate(result.audios):
        name = audio_name(record.id, index, audio_format)
        durations.append(write_audio(audio, output_dir, name, audio_format))
        files.append(name)
    record.files = files
    record.seeds = [int(a["params"]["seed"]) for a in result.audios]
    if any("track" in a["params"] for a in result.audios):
        record.tracks = [a["params"].get("track") for a in result.audios]
    record.codes = [str(a["params"].get("audio_codes") or "") for a in result.audios]
    record.duration = durations[0]
    record.lm_metadata = json_safe(result.extra_outputs.get("lm_metadata"))
    record.time_costs = json_safe(result.extra_outputs.get("time_costs") or {})
    record.preset = result.extra_outputs.get("preset") or record.preset
    return record


class LMStage:
    """Validate, resolve seeds and plan a batch of rows. ``lm_model=None``: no LM (rows pass on
    with ``plans=None``, the DiT renders from the caption and the user's metadata)."""

    def __init__(self, checkpoints: str, lm_model: Optional[str] = None, backend: str = "pt",
                 device: str = "auto", audio_format: str = "flac"):
        self.audio_format = audio_format
        self.node = node_id()
        self.handler = None
        if lm_model:
            from acestep.llm_inference import LLMHandler

            self.handler = LLMHandler()
            self.handler.initialize(checkpoints, lm_model_path=lm_model, backend=backend, device=device)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        from acestep.inference import RenderJob, prepare_request

        rows = _decode(batch, "row")
        jobs, live = [], []
        for row in rows:
            row["lm_node"] = self.node
            if row.get("error"):
                continue
            try:
                params, config = to_request(row["fields"], self.audio_format)
                jobs.append(RenderJob(*prepare_request(params, config)))
                live.append(row)
            except Exception as error:  # a bad row fails alone
                row["error"] = describe(error)
        for row, job, outcome in zip(live, jobs, self._plan(jobs), strict=True):
            if isinstance(outcome, BaseException):
                row["error"] = describe(outcome)
                continue
            row.update(params=job.params.to_dict(), config=job.config.to_dict(), seeds=job.seeds,
                       plans=[dataclasses.asdict(p) for p in outcome.plans] if outcome.plans else None,
                       lm_time_costs=outcome.time_costs, planned_at=time.time() if outcome.plans else 0.0)
        return _encode(rows, "row")

    def _plan(self, jobs: List[RenderJob]) -> List[Any]:
        """One outcome (or exception) per job; with an LM, the rows join the engine's running batch."""
        from acestep.inference import plan_music

        if self.handler is not None and jobs:
            from acestep.inference import plan_music_batch

            return plan_music_batch(self.handler, jobs)
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(plan_music(self.handler, job.params, job.config, job.seeds))
            except Exception as error:
                outcomes.append(error)
        return outcomes


class DiTStage:
    """Render planned rows with DiT + VAE and write their audio files; emits manifest records."""

    def __init__(self, checkpoints: str, output_dir: str, dit_config: str = "acestep-v15-turbo",
                 device: str = "auto"):
        from acestep.dit.batch import DiTLimits
        from acestep.handler import AceStepHandler

        self.output_dir = Path(output_dir)
        (self.output_dir / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
        self.node = node_id()
        self.handler = AceStepHandler()
        self.handler.initialize_service(checkpoints, dit_config, device=device, limits=DiTLimits.for_device(device))

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        """All rows of the batch in one ``render_music_batch`` call (concurrent calls' rows share the
        worker's running batch too); a row that fails (validation, unreadable audio) fails alone."""
        from acestep.inference import render_music_batch

        rows = _decode(batch, "row")
        records = [new_record(row, lm=row.get("lm_node"), dit=self.node) for row in rows]
        jobs, owners = [], []
        for row, record in zip(rows, records):
            if record.error is None:
                try:
                    job, record.preset = self._job(row)
                    jobs.append(job)
                    owners.append(record)
                except Exception as error:
                    record.error = describe(error)
        results = render_music_batch(self.handler, jobs) if jobs else []
        for record, job, result in zip(owners, jobs, results):
            try:
                finish_record(record, result, self.output_dir, job.config.audio_format)
            except Exception as error:  # a bad row fails alone
                logger.warning("row %s failed: %s", record.id, error)
                record.error = describe(error)
        for record in records:
            record.finished_at = time.time()
        return _encode([r.to_dict() for r in records], "record")

    def _job(self, row: Dict[str, Any]):
        """The row's RenderJob, with this DiT's preset filling the fields the row left out → (job, the
        preset report)."""
        from acestep.inference import RenderJob, prepare_request
        from acestep.presets import apply_model

        config = GenerationConfig(**{**row["config"], "seeds": row["seeds"], "use_random_seed": False})
        params, report = apply_model(GenerationParams(**row["params"]), self.handler.family,
                                     model=self.handler.model_name, explicit=sorted(row["fields"]))
        params, config, seeds = prepare_request(params, config, is_turbo=self.handler.is_turbo)
        plans = [LMPlan(**plan) for plan in row["plans"]] if row.get("plans") else None
        return RenderJob(params, config, seeds, plans, lm_time_costs=row.get("lm_time_costs")), report.to_dict()


class ServeStage:
    """Send rows to a running Serve app: ``serve.get_app_handle(app).generate.remote(params, config)``
    (the ingress's Python method, same inputs and result as ``generate_music``); writes the files."""

    def __init__(self, app_name: str, output_dir: str, audio_format: str = "flac", method: str = "generate"):
        from ray import serve

        self.output_dir = Path(output_dir)
        (self.output_dir / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
        self.audio_format = audio_format
        self.method = getattr(serve.get_app_handle(app_name), method)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        rows = _decode(batch, "row")
        records = [new_record(row) for row in rows]
        calls = {}
        for row, record in zip(rows, records, strict=True):
            if record.error is None:
                try:
                    params, config = to_request(row["fields"], self.audio_format)
                    # the app's stored files come back as bytes, written as they are: no decode/encode here
                    call = self.method.remote(params, config, include_tensors=False, explicit=sorted(row["fields"]))
                    calls[record.id] = (config.audio_format, call)
                except Exception as error:
                    record.error = describe(error)
        for record in records:  # all calls are in flight; the app batches them
            if record.id in calls:
                audio_format, response = calls[record.id]
                try:
                    finish_record(record, response.result(), self.output_dir, audio_format)
                except Exception as error:
                    record.error = describe(error)
            record.finished_at = time.time()
        return _encode([r.to_dict() for r in records], "record")
