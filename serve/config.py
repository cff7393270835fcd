"""The Serve app's configuration: one validated pydantic model, built from ``serve_config.yaml``'s ``args``.

Checkpoint paths, model variants, backend, device and per-deployment scaling are all here, so that
``serve run serve_config.yaml``, ``acestep serve`` and the KubeRay ``serveConfigV2`` share one path
(``build_app(args)``). Every field is described; bad values fail at build time with the field named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from acestep.lm.constants import DEFAULT_LM_MODEL, DEFAULT_MAX_MODEL_LEN
from acestep.dit.batch import DiTLimits
from acestep.lm.engine import ENGINE_DEFAULTS, EngineSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AutoscalingSettings(_Strict):
    """Replica bounds and the scale signal (Serve's ``autoscaling_config``, same names)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    initial_replicas: Optional[int] = Field(None, ge=0, description="Replicas started at deploy time (default: min).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Queued + running requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long demand must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long demand must stay low before removing replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie in [min_replicas, max_replicas] "
                f"= [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ActorOptions(_Strict):
    """Resources one replica reserves (Serve's ``ray_actor_options``)."""

    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractional values share a GPU.")
    memory: Optional[int] = Field(None, ge=0, description="Bytes of memory reserved per replica.")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    resources: Dict[str, float] = Field(default_factory=dict, description="Custom Ray resources, e.g. {'lm_gpu': 1}.")

    def to_ray(self) -> Dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=False)


class DeploymentOptions(_Strict):
    """Serve options for one deployment; applied with ``Deployment.options(...)`` in ``build_app``."""

    max_ongoing_requests: int = Field(8, ge=1, description="Requests one replica takes at once (batching needs room).")
    autoscaling_config: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)

    def to_serve(self) -> Dict[str, Any]:
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": self.autoscaling_config.model_dump(exclude_none=True),
            "ray_actor_options": self.ray_actor_options.to_ray(),
        }


class LMEngineSettings(_Strict):
    """The LM replica's one engine (``acestep.lm.engine.EngineSettings``): requests join its running
    batch between decode steps; requests beyond its free rows wait inside it, first come first served."""

    max_rows: int = Field(ENGINE_DEFAULTS.max_rows, ge=2, le=512,
                          description="KV-cache rows; a CFG request (lm_cfg_scale > 1) takes two.")
    max_admit_per_step: int = Field(ENGINE_DEFAULTS.max_admit_per_step, ge=1, le=64,
                                    description="Most requests that join between two decode steps (each costs a prefill).")
    max_model_len: int = Field(DEFAULT_MAX_MODEL_LEN, ge=256, le=32768,
                               description="Positions per row: prompt + completion of one LM request.")
    use_cuda_graphs: Optional[bool] = Field(None, description="Replay decode steps from CUDA graphs; null: on CUDA.")

    def to_library(self) -> EngineSettings:
        return EngineSettings(max_rows=self.max_rows, max_len=self.max_model_len,
                              max_admit_per_step=self.max_admit_per_step, use_cuda_graphs=self.use_cuda_graphs)


class LMSettings(_Strict):
    """The 5 Hz LM replica: which checkpoint, which backend, its engine's limits."""

    enabled: bool = Field(True, description="Load the LM; when false, requests run DiT-only (no thinking).")
    model: str = Field(DEFAULT_LM_MODEL, description="LM folder name under the checkpoints root.")
    backend: Literal["pt", "vllm"] = Field(
        "pt", description="LM backend: 'pt' (transformers weights on our engine, CPU/GPU) or 'vllm' "
                          "(GPU, lm_cfg_scale = 1 only).")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N, mps.")
    engine: LMEngineSettings = Field(default_factory=LMEngineSettings)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


DIT_LIMITS = DiTLimits()


class DiTBatchSettings(_Strict):
    """The DiT replica's one worker (``acestep.dit.batch.DiTLimits``): requests join its running batch
    between sampling steps whatever their lengths; those beyond these bounds wait inside it, in order."""

    max_rows: int = Field(DIT_LIMITS.max_rows, ge=1, le=512,
                          description="Rows in one DiT forward; a guided item (base/sft model, CFG) takes two.")
    max_row_frames: int = Field(DIT_LIMITS.max_row_frames, ge=8, le=1 << 24,
                                description="Rows x padded latent frames (25 per second) in the running batch.")
    max_padding: float = Field(DIT_LIMITS.max_padding, ge=0, le=100,
                               description="Padding one forward may carry, as a fraction of its real frames; "
                                           "running songs of very different lengths take separate forwards.")

    def to_library(self) -> DiTLimits:
        return DiTLimits(max_rows=self.max_rows, max_row_frames=self.max_row_frames, max_padding=self.max_padding)


class DiTSettings(_Strict):
    """The DiT + text encoder + VAE replica."""

    model: str = Field("acestep-v15-turbo", description="DiT folder name under the checkpoints root.")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N, mps.")
    attention: Literal["auto", "band", "dense"] = Field(
        "auto", description="Sliding layers on FlexAttention ('band') or SDPA with a dense mask; auto: band on CUDA.")
    compile_model: bool = Field(False, description="torch.compile each DiT block (fewer launches per step).")
    batch: DiTBatchSettings = Field(default_factory=DiTBatchSettings)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


class IngressSettings(_Strict):
    """The HTTP ingress: limits on what clients may send."""

    max_upload_mb: float = Field(50.0, gt=0, description="Largest accepted audio upload (multipart or base64).")
    request_timeout_s: float = Field(1800.0, gt=0, description="How long POST /v1/generate waits for a result.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


class StoreSettings(_Strict):
    """The task store: task records, progress events and encoded audio, shared by every ingress replica."""

    max_active_tasks: int = Field(200, ge=1, description="Unfinished tasks accepted before new ones get 429.")
    task_ttl_s: float = Field(86400.0, gt=0, description="How long finished tasks and their audio are kept.")
    max_audio_mb: float = Field(2048.0, gt=0, description="Encoded audio kept in memory; oldest dropped first.")
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            max_ongoing_requests=1000, ray_actor_options=ActorOptions(num_cpus=0.1)
        ),
        description="Must stay at one replica (min = max = 1): the store is the single source of task state.",
    )

    @model_validator(mode="after")
    def _single_replica(self) -> "StoreSettings":
        bounds = self.deployment.autoscaling_config
        if bounds.min_replicas != 1 or bounds.max_replicas != 1:
            raise ValueError("store.deployment.autoscaling_config must have min_replicas = max_replicas = 1")
        return self


def default_demo_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "acestep" / "demo_checkpoints"


class AppConfig(_Strict):
    """``build_app`` arguments (``applications[].args`` in serve_config.yaml)."""

    checkpoints: Optional[str] = Field(
        None, description="Checkpoints root holding the DiT, vae/, Qwen3-Embedding-0.6B/ and the LM folders."
    )
    demo: bool = Field(False, description="Use the tiny random demo checkpoints (written on first use).")
    demo_dir: Optional[str] = Field(None, description="Where demo checkpoints are cached (default ~/.cache/acestep).")
    lm: LMSettings = Field(default_factory=LMSettings)
    dit: DiTSettings = Field(default_factory=DiTSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)

    @model_validator(mode="after")
    def _checkpoint_source(self) -> "AppConfig":
        if not self.demo and not self.checkpoints:
            raise ValueError("set 'checkpoints' (a checkpoints root) or 'demo: true'")
        return self

    def check_model_folders(self) -> None:
        """FileNotFoundError naming the missing DiT or LM folder (and the LM folders that exist)."""
        from acestep.checkpoints.layout import resolve_dit_checkpoint, resolve_lm_dir

        root = self.checkpoint_root()
        resolve_dit_checkpoint(root, self.dit.model)
        if self.lm.enabled:
            resolve_lm_dir(root, self.lm.model)

    def checkpoint_root(self) -> Path:
        """The checkpoints root on this node; demo checkpoints are written here on first use."""
        if not self.demo:
            return Path(self.checkpoints).expanduser()
        return ensure_demo_checkpoints(Path(self.demo_dir).expanduser() if self.demo_dir else default_demo_dir())


def ensure_demo_checkpoints(directory: Path) -> Path:
    """Write the demo checkpoints once per node: into a temp folder, then an atomic rename, so replicas
    starting together on one node never see a half-written set."""
    from acestep.checkpoints.demo import write_demo_checkpoints

    done = directory / ".complete"
    if done.exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    write_demo_checkpoints(staging)
    (staging / ".complete").write_text("ok\n")
    try:
        os.rename(staging, directory)
    except OSError:  # another replica won the race (or a stale folder exists)
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        if not done.exists():
            raise
    return directory
