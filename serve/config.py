"""The Serve app's configuration: one validated pydantic model, built from ``serve_config.yaml``'s ``args``.

Checkpoint paths, model variants, backend, device and per-deployment scaling are all here, so that
``serve run serve_config.yaml``, ``acestep serve`` and the KubeRay ``serveConfigV2`` share one path
(``build_app(args)``). Every field is described; bad values fail at build time with the field named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from acestep.lm.constants import DEFAULT_LM_MODEL, DEFAULT_MAX_MODEL_LEN
from acestep.dit.batch import DiTLimits
from acestep.lm.engine import ENGINE_DEFAULTS, EngineSettings
from acestep.quantize import Quantization

DEMO_BASE_DIT = "acestep-v15-base"  # the demo set's base variant: lego, extract, complete


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AutoscalingSettings(_Strict):
    """Replica bounds and the scale signal (Serve's ``autoscaling_config``, same names).

    ``min_replicas: 0`` lets an LM or DiT deployment scale to zero when idle: Serve stops its last
    replica after ``downscale_to_zero_delay_s`` without requests, and starts one as soon as a call
    arrives (from zero it skips ``upscale_delay_s``); the task waits for that cold start, shown as
    ``queued: cold start`` (README, scale to zero)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running; 0 lets an LM or DiT deployment "
                                                   "scale to zero when idle (never the ingress).")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    initial_replicas: Optional[int] = Field(None, ge=0, description="Replicas started at deploy time (default: min).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Queued + running requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long demand must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long demand must stay low before removing replicas.")
    downscale_to_zero_delay_s: Optional[float] = Field(
        None, ge=0, description="With min_replicas 0: how long a deployment must stay idle before its last "
                                "replica stops (default: downscale_delay_s).")
    look_back_period_s: Optional[float] = Field(None, gt=0, description="Window the demand is averaged over "
                                                                        "(default: Serve's, 30 s).")

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
    max_queued_requests: int = Field(
        256, ge=1, description="Requests a caller's router holds for this deployment beyond the replicas' "
                               "max_ongoing_requests; more are refused (the ingress answers 503 + Retry-After).")
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve calls the replica's check_health.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A check_health slower than this fails the replica.")
    autoscaling_config: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)

    def to_serve(self) -> Dict[str, Any]:
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
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
    model: str = Field(DEFAULT_LM_MODEL, description="LM folder name under the checkpoints root (the default LM).")
    extra_models: List[str] = Field(
        default_factory=list, description="More LM folders (other sizes) served beside `model`, each as its own "
                                          "deployment with these options; requests pick one with `lm_model`.")
    backend: Literal["pt", "vllm"] = Field(
        "pt", description="LM backend: 'pt' (transformers weights on our engine, CPU/GPU) or 'vllm' "
                          "(GPU, lm_cfg_scale = 1 only).")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N, mps.")
    quantization: Optional[Quantization] = Field(
        None, description="Quantize the LM's decoder Linear weights (torchao; pt backend only): int8_weight_only, "
                          "fp8_weight_only (CUDA capability >= 8.9) or w8a8_dynamic; null: full precision.")
    offload_to_cpu: bool = Field(False, description="Keep the LM's weights on the CPU while its engine has no work "
                                                    "(pt backend; CUDA graphs off).")
    engine: LMEngineSettings = Field(default_factory=LMEngineSettings)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


DIT_LIMITS = DiTLimits()


class DiTBatchSettings(_Strict):
    """The DiT replica's one worker (``acestep.dit.batch.DiTLimits``): requests join its running batch
    between sampling steps whatever their lengths; those beyond these bounds wait inside it, in order."""

    max_forward_rows: Optional[int] = Field(
        None, ge=1, le=512, description="Rows in one DiT forward; a guided item (base/sft model, CFG) takes two. "
                                        "null: the device's (DiTLimits.for_device: 1 on a CPU, 32 on a GPU).")
    max_row_frames: int = Field(DIT_LIMITS.max_row_frames, ge=8, le=1 << 24,
                                description="Rows x padded latent frames (25 per second) in the running batch.")
    max_padding: float = Field(DIT_LIMITS.max_padding, ge=0, le=100,
                               description="Padding one forward may carry, as a fraction of its real frames; "
                                           "running songs of very different lengths take separate forwards.")

    def to_library(self, device: str = "auto") -> DiTLimits:
        """The worker's limits on ``device`` (the replica's DiT device; "auto" resolves where it runs)."""
        rows = self.max_forward_rows or DiTLimits.for_device(device).max_forward_rows
        return DiTLimits(max_forward_rows=rows, max_row_frames=self.max_row_frames, max_padding=self.max_padding)


class AdapterSettings(_Strict):
    """LoRA / LoKr adapters the DiT replicas may load: only from this server directory, by name."""

    dir: Optional[str] = Field(None, description="Server directory of adapters (PEFT folders or .safetensors "
                                                 "files); null: no adapters. Requests name an adapter, never a path.")
    max_loaded: int = Field(4, ge=1, le=256, description="Adapters one DiT replica keeps loaded (least recently "
                                                         "used ones are unloaded first).")
    default: Optional[str] = Field(None, description="Adapter applied to requests that name none (null: none).")
    default_scale: float = Field(1.0, ge=0, le=2, description="Scale of the default adapter.")


class UploadURLSettings(_Strict):
    """How a DiT replica PUTs each encoded file to the task's ``upload_url`` (``serve.upload_url``).
    A failed PUT never fails the task: the audio item records the error, and the file stays in the
    audio store. The address rules are the webhooks' (``ingress.webhooks.allow_private``)."""

    timeout_s: float = Field(30.0, gt=0, le=300, description="One PUT attempt's HTTP timeout.")
    attempts: int = Field(3, ge=1, le=5, description="PUT attempts per file; only transient failures (no answer, "
                                                     "408, 429, 5xx) are tried again.")
    backoff_s: float = Field(1.0, ge=0, le=30, description="Delay before the first retry; doubles for each further one.")
    deadline_s: float = Field(120.0, gt=0, description="One task's uploads: no attempt starts after this many seconds "
                                                       "and each attempt's timeout is cut to what is left; below "
                                                       "ingress.timeouts.encode_s, so uploads do not time a task out.")


class DiTSettings(_Strict):
    """The DiT + text encoder + VAE replica."""

    model: str = Field("acestep-v15-turbo", description="DiT folder name under the checkpoints root (the default DiT).")
    extra_models: List[str] = Field(
        default_factory=list, description="More DiT folders (variants: base, sft...) served beside `model`, each as "
                                          "its own deployment with these options; requests pick one with `model`, "
                                          "and lego/extract/complete go to a base variant when they name none.")
    adapters: AdapterSettings = Field(default_factory=lambda: AdapterSettings())
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:N, mps.")
    attention: Literal["auto", "band", "dense"] = Field(
        "auto", description="Sliding layers on FlexAttention ('band') or SDPA with a dense mask; auto: band on CUDA.")
    compile_model: bool = Field(False, description="torch.compile each DiT block (fewer launches per step).")
    quantization: Optional[Quantization] = Field(
        None, description="Quantize the DiT's Linear weights (torchao; about half the bf16 bytes): int8_weight_only, "
                          "fp8_weight_only (CUDA capability >= 8.9) or w8a8_dynamic; null: full precision.")
    offload_to_cpu: bool = Field(False, description="Text encoder, condition encoder, tokenizers and VAE wait on the "
                                                    "CPU and come to the device for their phase.")
    offload_dit_to_cpu: bool = Field(False, description="With offload_to_cpu: the DiT transformer too (the peak is "
                                                        "then the largest phase's weights).")
    batch: DiTBatchSettings = Field(default_factory=DiTBatchSettings)
    upload_url: UploadURLSettings = Field(default_factory=UploadURLSettings)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


class PhaseTimeouts(_Strict):
    """How long a task may stay in one phase before it fails with ``timeout:<phase>``."""

    queue_s: float = Field(3600.0, gt=0, description="Accepted but not yet started (waiting for a free driver).")
    lm_s: float = Field(900.0, gt=0, description="In the LM (a cold start from zero replicas, planning, audio codes).")
    dit_s: float = Field(1800.0, gt=0, description="In the DiT (a cold start from zero replicas, waiting for batch "
                                                   "room, sampling, VAE decode).")
    encode_s: float = Field(300.0, gt=0, description="Encoding and storing the audio files.")


class RequestLimits(_Strict):
    """Largest song and batch one request may ask for on this deployment's GPUs; a request over one
    gets 422 naming the field. ``acestep serve --gpu-memory-gb`` fills them from the memory tier
    (``acestep.tiers``) where the config leaves them out."""

    max_duration_s: Optional[float] = Field(
        None, ge=10, le=600, description="Longest `duration` (seconds) a request may ask for; null: the library's "
                                         "range only.")
    max_batch_size: Optional[int] = Field(
        None, ge=1, le=8, description="Most songs (`batch_size`) one request may ask for; null: the library's "
                                      "range only.")
    origin: Dict[str, str] = Field(
        default_factory=dict, description="Where each limit comes from, by field name, quoted in the refusal "
                                          "(e.g. 'memory tier tier3 (6-8 GB) for 8 GB of GPU memory'); a field "
                                          "not named here: this config.")


class WebhookSettings(_Strict):
    """Task webhooks (``webhook_url`` on a task): signed POSTs of the finished task's public record,
    retried with backoff from an outbox in the task store (``serve.webhooks``)."""

    secret_env: str = Field("ACESTEP_WEBHOOK_SECRET", description="Environment variable holding the server "
                                                                  "secret that signs deliveries of keys without one "
                                                                  "of their own.")
    secrets_file: Optional[str] = Field(None, description="File of 'keyname:secret' lines: each API key's deliveries "
                                                          "are signed with its own secret.")
    allow_private: bool = Field(False, description="Allow webhook URLs that resolve to loopback, private, link-local "
                                                   "or other non-public addresses (trusted networks and tests only).")
    timeout_s: float = Field(10.0, gt=0, le=120, description="One delivery attempt's HTTP timeout.")
    max_attempts: int = Field(8, ge=1, le=50, description="Attempts before a delivery is abandoned.")
    backoff_s: float = Field(5.0, ge=0, description="Delay before the first retry; doubles for each further one.")
    max_backoff_s: float = Field(900.0, ge=0, description="Longest delay between two attempts.")
    lease_s: float = Field(60.0, ge=1, description="A claimed delivery not settled within this is sent again "
                                                   "(its sender died); above timeout_s.")

    @model_validator(mode="after")
    def _lease_outlives_a_call(self) -> "WebhookSettings":
        if self.lease_s <= self.timeout_s:  # else a slow but live call would be sent twice
            raise ValueError(f"lease_s ({self.lease_s:g}) must be above timeout_s ({self.timeout_s:g})")
        return self


class IngressSettings(_Strict):
    """The HTTP ingress: keys, admission, limits on what clients send, and how tasks are driven."""

    api_keys_file: Optional[str] = Field(
        None, description="File of 'name:key' lines; the name identifies a key in limits and logs. "
                          "--api-key / ACESTEP_API_KEY add a key named 'default'. No keys: no auth.")
    key_priorities: Dict[str, Literal["low", "normal", "high"]] = Field(
        default_factory=dict, description="Priority class of each key by name (low, normal, high); a key not "
                                          "named here, or no auth: normal. Queued tasks of a higher class start "
                                          "first; within a class, keys take turns (README, fair share). A request "
                                          "may ask for a lower class (`priority`), never a higher one.")
    public_docs: bool = Field(False, description="Serve /docs and /openapi.json without a key.")
    allowed_audio_dirs: List[str] = Field(
        default_factory=list,
        description="Server directories whose files requests may name in *_audio_path (single-machine setups "
                    "sharing a disk with their clients); empty: no client-named path is ever opened.")
    max_upload_mb: float = Field(50.0, gt=0, le=1024, description="Largest accepted audio upload (multipart or base64).")
    max_unfinished_tasks: int = Field(200, ge=1, description="Unfinished tasks in the store before new ones get 429.")
    max_sync_requests: int = Field(16, ge=1, description="POST /v1/generate calls waiting at once (their own bound).")
    per_key_unfinished: Optional[int] = Field(None, ge=1, description="Unfinished tasks one key may hold; null: no cap.")
    per_key_rpm: Optional[float] = Field(None, gt=0, description="Task submissions per minute per key; null: no cap.")
    request_timeout_s: float = Field(1800.0, gt=0, description="How long POST /v1/generate waits (then 408 + task id).")
    max_drives: int = Field(32, ge=1, description="Tasks one ingress replica drives at once; the rest wait in the store.")
    lease_s: float = Field(30.0, ge=1, description="A driven task's lease; one not renewed in time is re-driven elsewhere.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a task's LM/DiT calls after replica death or overload.")
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry's delay; doubles for each further retry.")
    drain_grace_s: float = Field(30.0, ge=0, description="On shutdown, how long phases in flight may finish.")
    timeouts: PhaseTimeouts = Field(default_factory=PhaseTimeouts)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @field_validator("deployment")
    @classmethod
    def _always_running(cls, deployment: DeploymentOptions) -> DeploymentOptions:
        # the ingress drives queued tasks and answers /ready: with none running, nothing would
        minimum = deployment.autoscaling_config.min_replicas
        if minimum < 1:
            raise ValueError(f"ingress.deployment.autoscaling_config.min_replicas must be at least 1 (got {minimum}); "
                             "only the lm and dit deployments may scale to zero")
        return deployment


class TrainingSettings(_Strict):
    """Adapter training over HTTP (``/v1/dataset/*``, ``/v1/training/*``): songs, prepared datasets and
    runs live in ``dir``; each job runs on the cluster outside the ingress (a detached Ray actor that
    calls the Ray Data and Ray Train jobs)."""

    dir: Optional[str] = Field(None, description="Server directory of uploaded songs, prepared datasets and runs "
                                                 "(shared storage on a cluster); null: {state_dir}/training. "
                                                 "Clients name datasets and runs, never paths.")
    workers: int = Field(1, ge=1, le=64, description="Ray Train workers per run.")
    use_gpu: bool = Field(False, description="One GPU per Ray Train worker (and per dataset actor).")
    cpus_per_worker: Optional[float] = Field(
        None, gt=0, description="CPUs each Ray Train worker and dataset actor claims; null: the CPUs free when the "
                                "job starts, shared by its workers, at most 1 and at least 0.05 each (a claim past "
                                "what the replicas leave free would wait forever).")
    max_steps: int = Field(100000, ge=1, description="Most optimizer steps one run may ask for.")
    max_songs: int = Field(1000, ge=1, description="Most songs one dataset may hold.")
    max_jobs: int = Field(2, ge=1, description="Dataset, label and training jobs one ingress replica runs at once, "
                                               "apart from songs (ingress.max_drives); the rest wait in the store.")
    sync_timeout_s: float = Field(1800.0, gt=0, description="How long the synchronous /v1/dataset/preprocess and "
                                                            "/v1/dataset/auto_label wait for their job; past it they "
                                                            "answer 408 with the job's task id (it goes on).")


class StoreSettings(_Strict):
    """Where task records and audio live: outside every replica, so they survive replica deaths and restarts."""

    redis_url: Optional[str] = Field(
        None, description="redis://host:port/db for clusters; null: SQLite in the state directory (one machine).")
    audio_url: Optional[str] = Field(
        None, description="Audio store: a directory or an fsspec URL (s3://..., gs://...); null: the state directory.")
    audio_options: Dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for audio_url's filesystem, e.g. {endpoint_url: "
                                          "http://minio:9000} for an S3-compatible server; credentials are better "
                                          "left to the environment (AWS_ACCESS_KEY_ID, ...).")
    task_ttl_s: float = Field(86400.0, gt=0, description="How long finished tasks and their audio are kept.")
    max_records: int = Field(10000, ge=10, description="Finished task records kept at most (oldest dropped first).")
    max_audio_mb: float = Field(10240.0, gt=0, description="Audio kept at most in the audio store (oldest dropped first).")


def default_state_dir() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "acestep"


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
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    state_dir: Optional[str] = Field(
        None, description="Task database and audio on this machine (default ~/.local/state/acestep); "
                          "a restart on the same directory resumes queued tasks.")

    @model_validator(mode="after")
    def _checkpoint_source(self) -> "AppConfig":
        if not self.demo and not self.checkpoints:
            raise ValueError("set 'checkpoints' (a checkpoints root) or 'demo: true'")
        if self.demo and "extra_models" not in self.dit.model_fields_set and self.dit.model != DEMO_BASE_DIT:
            # the demo set has a base variant too (a few MB): serving it lets a newcomer try every task
            self.dit.extra_models = [DEMO_BASE_DIT]
        return self

    @model_validator(mode="after")
    def _uploads_within_encode(self) -> "AppConfig":
        if self.dit.upload_url.deadline_s >= self.ingress.timeouts.encode_s:
            raise ValueError(f"dit.upload_url.deadline_s ({self.dit.upload_url.deadline_s:g}) must be below "
                             f"ingress.timeouts.encode_s ({self.ingress.timeouts.encode_s:g}): uploads run in the "
                             "encode phase")
        return self

    def audio_store(self):
        """The audio store this config names (``store.audio_url`` with ``store.audio_options``)."""
        from serve.store.audio import AudioStore

        store = self.store
        return AudioStore(self.audio_store_url(), ttl_s=store.task_ttl_s, max_bytes=int(store.max_audio_mb * 2**20),
                          options=store.audio_options)

    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()

    def task_store_url(self) -> str:
        return self.store.redis_url or f"sqlite:///{self.state_path() / 'tasks.db'}"

    def training_path(self) -> Path:
        return Path(self.training.dir).expanduser() if self.training.dir else self.state_path() / "training"

    def audio_store_url(self) -> str:
        return self.store.audio_url or str(self.state_path() / "audio")

    def check_model_folders(self) -> None:
        """FileNotFoundError naming the missing DiT or LM folder (and the LM folders that exist)."""
        from acestep.checkpoints.layout import resolve_dit_checkpoint, resolve_lm_dir

        root = self.checkpoint_root()
        for name in self.dit_models():
            resolve_dit_checkpoint(root, name)
        if self.lm.enabled:
            for name in self.lm_models():
                resolve_lm_dir(root, name)

    def dit_models(self) -> List[str]:
        """Served DiT folders, the default first."""
        return list(dict.fromkeys([self.dit.model, *self.dit.extra_models]))

    def lm_models(self) -> List[str]:
        """Served LM folders, the default first."""
        return list(dict.fromkeys([self.lm.model, *self.lm.extra_models]))

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
