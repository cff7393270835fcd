"""AceStepHandler: owns the DiT side's loaded modules (DiT, condition encoder, audio tokenizer /
detokenizer, VAE, text encoder), the ``DiTWorker`` sampling with them and the one ``StepLoop``
thread that drives it (the only thread using the modules). Thin: loading is in
``acestep.checkpoints``, sampling in ``acestep.dit``. Every call is safe from any thread: calls
made at the same time share the worker's running batch (``acestep.dit.batch`` says what may)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from functools import partial
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from acestep.audio import NOT_STREAMED
from acestep.checkpoints.bundle import DiTBundle, load_dit_bundle
from acestep.dit.adapters import (MAX_WEIGHT, AdapterError, AdapterInfo, AdapterSetting, AdapterSlots, adapter_setting,
                                  read_adapter)
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.dit.attention import use_band_attention
from acestep.dit.batch import DiTLimits
from acestep.dit.codes import format_audio_codes, latents_to_codes
from acestep.dit.extend import ExtendConfig, ExtendRender
from acestep.dit.items import DiTItem, Progress, RenderOutput, SamplingSettings
from acestep.dit.prepare import build_items, encode_source, sampling_settings
from acestep.devices import default_dtype, resolve_device
from acestep.dit.worker import DiTWorker, SongSink
from acestep.fairness import Share
from acestep.memory import DIT_PHASES, MemoryPlan, dit_modules, dit_offloaded, plan_memory
from acestep.offload import RESIDENT, Offloader
from acestep.presets import family_of
from acestep.params import AudioSource, GenerationParams
from acestep.quantize import check_quantization, quantize_modules
from acestep.steploop import StepLoop

logger = logging.getLogger(__name__)


@dataclass
class OffloadedBundle(DiTBundle):
    """A ``DiTBundle`` whose work runs on ``execution_device`` wherever its modules are now."""

    execution_device: torch.device = torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self.execution_device


def on_execution_device(bundle: DiTBundle, device: torch.device) -> OffloadedBundle:
    """The same modules, their work pinned to ``device``."""
    values = {f.name: getattr(bundle, f.name) for f in fields(DiTBundle)}
    return OffloadedBundle(**values, execution_device=torch.device(device))


def quantize_dit(bundle: DiTBundle, quantization: Optional[str]) -> DiTBundle:
    """The DiT transformer's Linear layers quantized in place (the encoders, tokenizer and VAE run
    once per request and stay in full precision, as upstream keeps them)."""
    count = quantize_modules(bundle.transformer, quantization)
    if count:
        logger.info("DiT: %d Linear layers quantized (%s)", count, quantization)
    return bundle


class AceStepHandler:
    """The DiT side of the seed API (``dit_handler``)."""

    def __init__(self):
        self.bundle: Optional[DiTBundle] = None
        self.config_path: Optional[str] = None
        self.worker: Optional[DiTWorker] = None
        self.loop: Optional[StepLoop] = None
        self.adapters: Optional[AdapterSlots] = None
        self._lora_scales: Dict[str, float] = {}  # adapters of the default setting -> scale
        self.use_lora = False
        self.memory_plan: Optional[MemoryPlan] = None  # weight bytes on the device per phase (acestep.memory)
        self.quantization: Optional[str] = None
        self.extend = ExtendConfig()  # how extensions are cut into DiT passes (acestep.dit.extend)

    def initialize_service(self, project_root: str, config_path: str = "acestep-v15-turbo", device: str = "auto",
                           use_flash_attention: bool = False, compile_model: bool = False,
                           offload_to_cpu: bool = False, offload_dit_to_cpu: bool = False,
                           dtype: Optional[torch.dtype] = None, attention: str = "auto",
                           limits: Optional[DiTLimits] = None, quantization: Optional[str] = None) -> Tuple[str, bool]:
        """Load ``config_path`` (a DiT folder under ``project_root``/checkpoints, under
        ``project_root``, an absolute path, or a diffusers repo folder). Returns (status, True);
        raises FileNotFoundError / CheckpointMismatchError when it cannot load.

        ``attention``: "band" runs sliding layers on FlexAttention, "dense" on SDPA with the dense
        mask, "auto" picks band on CUDA (``use_flash_attention=True`` forces band).
        ``compile_model`` compiles each DiT block with torch.compile (fewer launches per step).
        ``limits`` bounds the worker's running batch (``DiTLimits``).
        ``offload_to_cpu`` keeps the text encoder, condition encoder, audio tokenizers and VAE on the
        CPU, each brought to the device for its phase (``acestep.offload``); with it,
        ``offload_dit_to_cpu`` offloads the DiT transformer too. ``memory_plan`` has the weight bytes
        on the device. ``quantization`` quantizes the DiT's Linear weights
        after loading (``acestep.quantize``: int8_weight_only, fp8_weight_only, w8a8_dynamic)."""
        if attention not in ("auto", "band", "dense"):
            raise ValueError(f"attention={attention!r}: expected 'auto', 'band' or 'dense'")
        resolved = resolve_device(device)
        check_quantization(quantization, resolved)
        checkpoint = resolve_dit_checkpoint(project_root, config_path)
        offloaded = dit_offloaded(offload_to_cpu, offload_dit_to_cpu)
        # offloaded modules never touch the device at load: a card that holds only the largest phase suffices
        bundle = load_dit_bundle(checkpoint, dtype=dtype or default_dtype(resolved),
                                 device="cpu" if offloaded else resolved)
        self._start(quantize_dit(bundle, quantization), limits, offloaded, resolved)
        self.quantization = quantization
        self.config_path = str(config_path)
        if use_flash_attention or attention == "band" or (attention == "auto" and resolved.type == "cuda"):
            use_band_attention(self.bundle.transformer)
        if compile_model:
            for block in self.bundle.transformer.layers:
                block.compile()
        if offload_dit_to_cpu and not offload_to_cpu:
            logger.info("offload_dit_to_cpu applies with offload_to_cpu only: every DiT-side module stays resident")
        status = f"DiT {checkpoint.name} ({checkpoint.layout} layout) loaded on {resolved} as {self.bundle.dtype}"
        logger.info("%s; %s", status, self.memory_plan.describe())
        return status, True

    @classmethod
    def from_bundle(cls, bundle: DiTBundle, limits: Optional[DiTLimits] = None, *, offload_to_cpu: bool = False,
                    offload_dit_to_cpu: bool = False, quantization: Optional[str] = None,
                    device: Optional[str] = None) -> "AceStepHandler":
        """A handler around already-loaded modules (benchmarks build random full-size ones), with
        ``initialize_service``'s offload and quantization; ``device``: where the work runs (default:
        where the transformer is). Build an offloaded bundle on the CPU: only its resident modules
        then ever take device memory."""
        resolved = resolve_device(device) if device else next(bundle.transformer.parameters()).device
        check_quantization(quantization, resolved)
        handler = cls()
        handler._start(quantize_dit(bundle, quantization), limits, dit_offloaded(offload_to_cpu, offload_dit_to_cpu),
                       resolved)
        handler.quantization = quantization
        return handler

    def _start(self, bundle: DiTBundle, limits: Optional[DiTLimits], offloaded: Tuple[str, ...] = (),
               device: Optional[torch.device] = None) -> None:
        if self.loop is not None:
            self.loop.close()
        offload = RESIDENT
        if offloaded:
            bundle = on_execution_device(bundle, device)
            for name, module in dit_modules(bundle).items():
                if name not in offloaded:
                    module.to(device)
            offload = Offloader(dit_modules(bundle), DIT_PHASES, offloaded, device)
        self.bundle = bundle
        self.memory_plan = plan_memory(dit_modules(bundle), DIT_PHASES, offloaded)
        self.adapters = AdapterSlots(bundle.transformer)
        self._lora_scales, self.use_lora = {}, False
        self.worker = DiTWorker(bundle, limits or DiTLimits(), adapters=self.adapters, offload=offload)
        self.loop = StepLoop(self.worker, "acestep-dit-worker")

    @property
    def is_initialized(self) -> bool:
        return self.bundle is not None

    @property
    def is_turbo(self) -> bool:
        return self._require().is_turbo

    @property
    def family(self) -> str:
        """turbo, sft or base (``acestep.presets``), from the DiT's config."""
        bundle = self._require()
        return family_of(getattr(bundle.transformer.config, "model_version", None), bundle.is_turbo)

    @property
    def model_name(self) -> str:
        return self._require().checkpoint.name

    def _require(self) -> DiTBundle:
        if self.bundle is None:
            raise RuntimeError("AceStepHandler is not initialized: call initialize_service(...) first")
        return self.bundle

    def render(self, item_params: List[GenerationParams], seeds: List[int],
               progress: Optional[Progress] = None) -> RenderOutput:
        """Render one audio per (params, seed); all items share the first params' sampling settings."""
        return self.submit(item_params, seeds, progress=progress).result()

    def submit(self, item_params: List[GenerationParams], seeds: List[int],
               settings: Optional[SamplingSettings] = None, progress: Optional[Progress] = None,
               share: Share = Share(), stream: Optional[SongSink] = None) -> Future:
        """``render`` without waiting: a Future of the ``RenderOutput``. Its items are prepared
        (audio read and encoded) on the worker thread and join the running batch; what preparing
        raises (unreadable audio, bad codes) fails this future only. ``future.cancel()`` drops them.
        An extension renders window after window, each a request of its own (``acestep.dit.extend``).
        ``share`` (tenant, priority class): the items' place in the running batch's admission order.
        ``stream`` gets each item's audio as the VAE decodes it (``acestep.dit.worker.SongSink``)."""
        bundle = self._require()
        settings = settings or sampling_settings(item_params[0])
        if settings.adapters is None:
            settings = replace(settings, adapters=self.lora_setting)
        if item_params[0].task_type == "extend":
            if stream is not None:
                raise ValueError(f"stream: {NOT_STREAMED['extend']}")
            submit = partial(_submit_shared, self._loop().submit, share)
            return ExtendRender(submit, bundle, item_params, seeds, settings, progress, self.extend).start()
        counts = self.worker.encodes
        return self._loop().submit(lambda: build_items(bundle, item_params, seeds, counts), settings, progress,
                                   share.tenant, share.priority, stream)

    def prepare(self, item_params: List[GenerationParams], seeds: List[int]) -> List[DiTItem]:
        """Read and encode audio inputs, decode codes, build task contexts: one DiTItem per seed."""
        bundle = self._require()
        if item_params[0].task_type == "extend":
            raise ValueError("task_type='extend' renders in windows, each built from the one before: use submit")
        counts = self.worker.encodes
        return self._loop().call(lambda: self.worker.in_phase("encode", lambda: build_items(
            bundle, item_params, seeds, counts))).result()

    def render_items(self, items: List[DiTItem], settings: SamplingSettings,
                     progress: Optional[Progress] = None) -> RenderOutput:
        """Sample and decode prepared items (sharing the running batch with concurrent calls)."""
        return self._loop().submit(items, settings, progress).result()

    def stats(self) -> Dict[str, Any]:
        """The worker's requests, queue and batch sizes (``items_per_forward``, ``rows_per_forward``)."""
        return self._loop().stats()

    def _loop(self) -> StepLoop:
        self._require()
        return self.loop

    def convert_src_audio_to_codes(self, audio_path: AudioSource, seed: int = 0) -> str:
        """Source audio (a path, bytes or binary file object) → 5 Hz code string (VAE encode, then
        the FSQ tokenizer)."""
        bundle, counts = self._require(), self.worker.encodes

        def codes() -> str:
            counts.source += 1
            return format_audio_codes(latents_to_codes(bundle, encode_source(bundle, audio_path, seed).latents))

        return self._loop().call(lambda: self.worker.in_phase("encode", codes)).result()

    # -- adapters (LoRA / LoKr; ``acestep.dit.adapters``) ------------------------------------------
    def load_lora(self, name_or_dir: str, adapter_name: Optional[str] = None, activate: bool = True) -> AdapterInfo:
        """Load an adapter (a PEFT folder or a diffusers .safetensors file). Reading happens on the
        caller's thread; only the injection waits for the worker's step boundary. ``activate``: join
        the default setting at scale 1 (as the official handler does); False only makes it
        available to requests that name it (``SamplingSettings.adapters``)."""
        self._require()
        adapter = read_adapter(name_or_dir, adapter_name)
        info = self._loop().call(lambda: self.adapters.load(adapter)).result()
        if activate:
            self._lora_scales[info.name] = 1.0
            self.use_lora = True
        return info

    def unload_lora(self, adapter_name: Optional[str] = None) -> List[str]:
        """Unload one adapter (every adapter when None); refused while a running item uses it."""
        names = [adapter_name] if adapter_name else sorted(self._require_adapters().loaded)

        def unload() -> None:
            for name in names:
                if self.worker.in_use(name):
                    raise AdapterError(f"lora: {name!r} is in use by running items; unload it when they finish")
                self.adapters.unload(name)
        self._loop().call(unload).result()
        for name in names:
            self._lora_scales.pop(name, None)
        self.use_lora = self.use_lora and bool(self._lora_scales)
        return names

    def set_lora_scale(self, scale: float, adapter_name: Optional[str] = None) -> AdapterSetting:
        """Scale (0-2) of one default adapter (every default adapter when None); the new default."""
        if not 0.0 <= float(scale) <= MAX_WEIGHT:
            raise AdapterError(f"scale: {scale} is outside [0, {MAX_WEIGHT}]")
        names = [adapter_name] if adapter_name else list(self._lora_scales)
        for name in names:
            if name not in self._require_adapters().loaded:
                raise AdapterError(f"lora: {name!r} is not loaded")
            self._lora_scales[name] = float(scale)
        if not names:
            raise AdapterError("lora: no adapter is loaded")
        return self.lora_setting

    def set_use_lora(self, use_lora: bool) -> AdapterSetting:
        if use_lora and not self._lora_scales:
            raise AdapterError("lora: no adapter is loaded")
        self.use_lora = bool(use_lora)
        return self.lora_setting

    @property
    def lora_setting(self) -> AdapterSetting:
        """What requests that name no adapter use."""
        return adapter_setting(self._lora_scales) if self.use_lora else ()

    def get_lora_status(self) -> Dict[str, Any]:
        loaded = sorted(self.adapters.loaded) if self.adapters is not None else []
        scales = [self._lora_scales[n] for n in loaded if n in self._lora_scales]
        return {"loaded": bool(loaded), "active": self.use_lora, "scale": scales[0] if len(scales) == 1 else 1.0,
                "adapters": {n: {"scale": self._lora_scales.get(n), "default": n in self._lora_scales}
                             for n in loaded}}

    def fuse_lora(self) -> AdapterSetting:
        """Merge the default setting into the DiT weights: faster, and no other setting runs until
        ``unfuse_lora`` (base weights come back to float rounding)."""
        if self.quantization is not None:  # peft cannot merge into quantized weights
            raise AdapterError(f"lora: fusing needs an unquantized DiT (quantization={self.quantization!r})")
        setting = self.lora_setting
        self._loop().call(lambda: self.adapters.fuse(setting)).result()
        return setting

    def unfuse_lora(self) -> None:
        self._loop().call(self.adapters.unfuse).result()

    def _require_adapters(self) -> AdapterSlots:
        self._require()
        return self.adapters


def _submit_shared(submit, share: Share, items, settings, progress) -> Future:
    """A StepLoop's submit for one extension window, with the request's tenant and class."""
    return submit(items, settings, progress, share.tenant, share.priority)
