"""``acestep render`` / ``python -m pipelines.render``: offline batch rendering with Ray Data.

    acestep render --input prompts.jsonl --output out/ --checkpoints ./checkpoints
    acestep render --input prompts.parquet --output out/ --demo --no-lm
    acestep render --input prompts.jsonl --output out/ --via-serve acestep   # a running Serve app

Pipeline: input rows (``pipelines.source``: read tasks read and parse the files, the driver holds
only ids, for resume) → ``LMStage`` (actor pool; each actor keeps
``--lm-rows-in-flight`` rows planning at once in its one LM engine, a stream of rows: a finished row
leaves and the next joins) → ``DiTStage`` (its own actor pool; each actor keeps ``--dit-rows-in-flight``
rows in its one DiT worker, joining its running batch between sampling steps; writes
``audio/{id}_{i}.{format}``; ``--lm-resources`` / ``--dit-resources`` put each pool on its own nodes) →
the driver's writer (journal, then ``manifest.jsonl`` + ``manifest.parquet``). ``--via-serve`` replaces
both model stages with ``ServeStage``. Rerunning the same command resumes: complete rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from pipelines.manifest import Manifest, ManifestRecord
from pipelines.placement import LIGHT_CPUS, Pool, fit_cpus, free_cpus
from pipelines.source import RowKey, input_keys, pending_rows

from acestep.audio import AUDIO_FORMATS
from acestep.lm.constants import DEFAULT_LM_MODEL

logger = logging.getLogger(__name__)


@dataclass
class RenderOptions:
    """Everything the job needs; ``main`` fills it from the command line."""

    input: str  # prompts.jsonl / prompts.parquet / a folder of them, local or a filesystem URI (s3://...)
    output: str  # output folder: audio/, manifest.jsonl, manifest.parquet
    checkpoints: Optional[str] = None  # checkpoints root (DiT folders, vae/, text encoder, LM folders)
    demo: bool = False  # write the tiny demo checkpoints under {output}/.demo-checkpoints and use them
    dit_config: str = "acestep-v15-turbo"  # DiT folder name under the checkpoints root
    lm: str = DEFAULT_LM_MODEL  # LM folder name under the checkpoints root
    no_lm: bool = False  # no LM: render from the rows' captions and metadata only
    lm_backend: str = "pt"
    device: str = "auto"  # device for both models inside their actors
    lm_actors: int = 1  # LM actor pool size
    dit_actors: int = 1  # DiT actor pool size
    lm_gpus: float = 0.0  # GPUs per LM actor
    dit_gpus: float = 0.0  # GPUs per DiT actor
    lm_cpus: Optional[float] = None  # CPUs per LM actor; None: fitted to the free CPUs (pipelines.placement)
    dit_cpus: Optional[float] = None  # CPUs per DiT actor; None: fitted to the free CPUs (pipelines.placement)
    lm_resources: Dict[str, float] = field(default_factory=dict)  # custom resources per LM actor
    dit_resources: Dict[str, float] = field(default_factory=dict)  # custom resources per DiT actor
    lm_rows_in_flight: int = 8  # rows one LM actor plans at once (they share its engine's batch)
    dit_rows_in_flight: int = 8  # rows one DiT actor renders at once (they share its worker's batch)
    via_serve: Optional[str] = None  # Serve app name: send rows to it instead of starting model actors
    serve_actors: int = 1  # actors sending rows to the Serve app (each keeps a batch in flight)
    serve_batch_size: int = 8  # rows in flight per sending actor
    limit: Optional[int] = None  # render at most this many pending rows (then stop, resumable)
    audio_format: str = "flac"  # default for rows without their own audio_format


@dataclass
class RenderSummary:
    """What one run did (``total`` counts all input rows, complete from earlier runs included)."""

    total: int
    skipped: int  # complete from an earlier run
    done: int  # rendered by this run
    failed: int  # failed in this run (error in the manifest)
    songs: int  # audio files this run wrote
    seconds: float
    records: List[ManifestRecord] = field(default_factory=list, repr=False)

    @property
    def songs_per_minute(self) -> float:
        return self.songs / (self.seconds / 60.0) if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"render: {self.done} rows done, {self.failed} failed, {self.skipped} skipped "
                f"(of {self.total}); {self.songs} songs in {self.seconds:.1f}s ({self.songs_per_minute:.1f} songs/min)")


def resources_json(text: str) -> Dict[str, float]:
    """``--lm-resources`` / ``--dit-resources``: a JSON object of resource name → amount."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in value.items()):
        raise argparse.ArgumentTypeError(f"expected an object of resource name → amount >= 0, got {text}")
    return {name: float(amount) for name, amount in value.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="prompts.jsonl / prompts.parquet, a folder of them, or a "
                                                  "filesystem URI such as s3://bucket/prompts/ (GenerationParams "
                                                  "fields, optional id, seed, batch_size, audio_format)")
    p.add_argument("--output", required=True, help="output folder (audio/ + manifest.jsonl + manifest.parquet)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoints", help="checkpoints root")
    group.add_argument("--demo", action="store_true", help="use tiny demo checkpoints (written under --output)")
    p.add_argument("--dit-config", default="acestep-v15-turbo", help="DiT folder under the checkpoints root")
    lm = p.add_mutually_exclusive_group()
    lm.add_argument("--lm", default=DEFAULT_LM_MODEL, help=f"5 Hz LM folder (default {DEFAULT_LM_MODEL})")
    lm.add_argument("--no-lm", action="store_true", help="no LM: DiT only")
    p.add_argument("--lm-backend", default="pt", choices=("pt", "vllm"))
    p.add_argument("--device", default="auto")
    for stage in ("lm", "dit"):
        p.add_argument(f"--{stage}-actors", type=int, default=1, help=f"{stage.upper()} actor pool size")
        p.add_argument(f"--{stage}-gpus", type=float, default=0.0, help=f"GPUs per {stage.upper()} actor")
        p.add_argument(f"--{stage}-cpus", type=float, default=None,
                       help=f"CPUs per {stage.upper()} actor (default: an equal share of the CPUs free at start, "
                            f"less room for the read tasks, at most 1)")
        p.add_argument(f"--{stage}-resources", type=resources_json, default={}, metavar="JSON",
                       help=f"custom resources per {stage.upper()} actor, e.g. '{{\"{stage}_gpu\": 1}}': "
                            f"nodes that advertise them take the {stage.upper()} actors")
    p.add_argument("--lm-rows-in-flight", type=int, default=8,
                   help="rows one LM actor plans at once; a finished row makes room for the next")
    p.add_argument("--dit-rows-in-flight", type=int, default=8,
                   help="rows one DiT actor renders at once; a finished row makes room for the next")
    p.add_argument("--via-serve", metavar="APP", default=None, help="send rows to this running Serve app")
    p.add_argument("--serve-actors", type=int, default=1)
    p.add_argument("--serve-batch-size", type=int, default=8, help="rows in flight per --via-serve actor")
    p.add_argument("--limit", type=int, default=None, help="render at most N pending rows (resume later)")
    p.add_argument("--audio-format", default="flac", choices=AUDIO_FORMATS)
    return p


def parse_options(argv: List[str]) -> RenderOptions:
    # `acestep render --input X --output Y -- --demo ...`: the "--" only shields our options from the
    # acestep parser; drop it here.
    args = build_parser().parse_args([arg for arg in argv if arg != "--"])
    options = RenderOptions(**vars(args))
    if not options.via_serve and not (options.checkpoints or options.demo):
        build_parser().error("one of --checkpoints, --demo or --via-serve is required")
    return options


def _resolve_models(options: RenderOptions) -> None:
    """Demo checkpoints written when asked; the DiT and LM folders checked before Ray starts
    (FileNotFoundError naming the folder and what exists)."""
    from acestep.checkpoints.layout import resolve_dit_checkpoint, resolve_lm_dir

    if options.demo:
        from acestep.checkpoints.demo import write_demo_checkpoints

        root = Path(options.output) / ".demo-checkpoints"
        if not (root / options.dit_config).is_dir():
            write_demo_checkpoints(root)
        options.checkpoints = str(root)
    options.checkpoints = str(Path(options.checkpoints).resolve())
    resolve_dit_checkpoint(options.checkpoints, options.dit_config)
    if options.no_lm:
        options.lm = None
    else:
        resolve_lm_dir(options.checkpoints, options.lm)


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set in a RayJob) or a new local Ray


def _fit_actor_cpus(options: RenderOptions) -> None:
    """Fill in the pools' CPUs per actor the user left unset, from the CPUs free now."""
    if options.lm_cpus is not None and options.dit_cpus is not None:
        return
    free = free_cpus()
    claims = fit_cpus(free, Pool(options.lm_actors, options.lm_cpus, light=not options.lm),
                      Pool(options.dit_actors, options.dit_cpus))
    options.lm_cpus, options.dit_cpus = claims.lm, claims.dit
    logger.info("CPUs per actor: LM %g, DiT %g (%g free)", claims.lm, claims.dit, free)


def build_dataset(options: RenderOptions, pending: List[RowKey], rows: int):
    """The lazy Dataset of manifest records (column ``record``, JSON) for the ``pending`` rows of an
    input of ``rows`` rows."""
    import ray

    ds = pending_rows(options.input, pending, rows)
    output = str(Path(options.output).resolve())
    if options.via_serve:
        from pipelines.stages import ServeStage

        return ds.map_batches(ServeStage, batch_size=options.serve_batch_size,
                              fn_constructor_kwargs={"app_name": options.via_serve, "output_dir": output,
                                                     "audio_format": options.audio_format},
                              compute=ray.data.ActorPoolStrategy(size=options.serve_actors), num_cpus=LIGHT_CPUS)
    from pipelines.stages import DiTStage, LMStage

    # One row per call, many calls running at once per actor (threads): rows stream through the
    # actor's one LM engine / DiT worker, each leaving as soon as it is done, instead of blocks
    # finishing together.
    ds = ds.map_batches(LMStage, batch_size=1,
                        fn_constructor_kwargs={"checkpoints": options.checkpoints, "lm_model": options.lm,
                                               "backend": options.lm_backend, "device": options.device,
                                               "audio_format": options.audio_format},
                        compute=_streaming_pool(options.lm_actors, options.lm_rows_in_flight),
                        num_cpus=options.lm_cpus, num_gpus=options.lm_gpus, resources=options.lm_resources or None)
    return ds.map_batches(DiTStage, batch_size=1,
                          fn_constructor_kwargs={"checkpoints": options.checkpoints, "output_dir": output,
                                                 "dit_config": options.dit_config, "device": options.device},
                          compute=_streaming_pool(options.dit_actors, options.dit_rows_in_flight),
                          num_cpus=options.dit_cpus, num_gpus=options.dit_gpus,
                          resources=options.dit_resources or None)


def _streaming_pool(actors: int, in_flight: int):
    """An actor pool whose actors each run ``in_flight`` one-row calls at once, on threads."""
    import ray

    in_flight = max(1, in_flight)
    return ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True)


def run(options: RenderOptions) -> RenderSummary:
    """Resume from the manifest, render the pending rows, write the manifest; returns the summary."""
    started = time.perf_counter()
    if not options.via_serve:
        _resolve_models(options)
    _ensure_ray()
    if not options.via_serve:
        _fit_actor_cpus(options)
    keys = input_keys(options.input)
    manifest = Manifest(options.output)
    previous = manifest.load()
    pending = [key for key in keys if not manifest.is_complete(previous.get(key.id))]
    skipped = len(keys) - len(pending)
    if options.limit is not None:
        pending = pending[:max(0, options.limit)]
    done = failed = songs = 0
    if pending:
        for item in build_dataset(options, pending, len(keys)).iter_rows():  # the writer: one journal line per row
            record = ManifestRecord.from_dict(json.loads(item["record"]))
            manifest.append(record)
            if record.error:
                logger.warning("row %s failed: %s", record.id, record.error)
            failed += record.error is not None
            done += record.error is None
            songs += len(record.files) if record.error is None else 0
    records = manifest.finalize([key.id for key in keys])
    return RenderSummary(total=len(keys), skipped=skipped, done=done, failed=failed, songs=songs,
                         seconds=time.perf_counter() - started, records=records)


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry: 0 when every row of the input is complete, 1 when some failed or are pending,
    2 when a model folder is missing (said in one line, before Ray starts)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = parse_options(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = run(options)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    print(f"manifest: {Path(options.output) / 'manifest.parquet'} (+ manifest.jsonl)")
    complete = sum(1 for r in summary.records if r.error is None and r.files)
    return 0 if complete == summary.total else 1


if __name__ == "__main__":
    sys.exit(main())
