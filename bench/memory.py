"""Memory profiles (section ``memory`` of bench.gpu): one song with thinking through
``generate_music`` under each card's memory tier (``acestep.tiers``: CPU offload, DiT quantization,
the LM's KV rows) beside the same models fully resident in full precision, measured in the same run.

Per profile: the weight bytes the memory planner puts on the device at once (``acestep.memory``: the
largest phase's, the LM's included), the LM's KV cache, on CUDA ``torch.cuda.max_memory_allocated``
over the song, and seconds per song; each with its ratio to the resident run of the same models.
Full size: the 2B turbo DiT + 0.6B LM for an 8 GB card and the XL turbo DiT + 1.7B LM for a 16 GB
card, 120 s songs, random weights; tiny (the CPU default): the demo checkpoints, 10 s songs.

    python -m bench.memory [--tiny | --full] [--device cuda] [--out FILE.json]"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from acestep.checkpoints.bundle import DiTBundle, load_tokenizer
from acestep.checkpoints.demo_lm import DEMO_LM_DIRNAME
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.dit.attention import use_band_attention
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music
from acestep.lm.engine.llm_engine import EngineSettings
from acestep.llm_inference import LLMHandler
from acestep.memory import module_bytes
from acestep.tiers import tier_for
from bench import models
from bench.common import Bench, standalone
from bench.e2e import demo_root

SECTION = "memory profiles"
MIB = 1 << 20


@dataclass(frozen=True)
class Profile:
    """How the models sit in memory: the settings of ``acestep.tiers.Tier`` that a handler takes."""

    name: str
    offload_to_cpu: bool = False
    offload_dit_to_cpu: bool = False
    quantization: Optional[str] = None

    @classmethod
    def of_card(cls, gpu_memory_gb: float) -> "Profile":
        tier = tier_for(gpu_memory_gb)
        return cls(f"{tier.name} ({gpu_memory_gb:g} GB)", tier.offload_to_cpu, tier.offload_dit_to_cpu,
                   tier.quantization)


RESIDENT = Profile("resident, full precision")


@dataclass(frozen=True)
class Pairing:
    """A DiT and an LM sized for one card, with that card's profile and the KV rows its tier gives."""

    dit_variant: str
    lm_name: str
    card_gb: float

    @property
    def kv_rows(self) -> int:
        return tier_for(self.card_gb).lm_kv_rows or EngineSettings().max_rows


FULL_PAIRINGS = (Pairing("turbo", "acestep-5Hz-lm-0.6B", 8), Pairing("xl-turbo", "acestep-5Hz-lm-1.7B", 16))
TINY_PAIRINGS = (Pairing("turbo", DEMO_LM_DIRNAME, 8),)


def build(pairing: Pairing, profile: Profile, tiny: bool, device: torch.device, dtype: torch.dtype,
          root: Path) -> Tuple[AceStepHandler, LLMHandler]:
    """The pairing's handlers under ``profile``: through the checkpoint loaders (tiny) or from random
    full-size modules. Those are built on the device, where random weights take no time, and the
    handlers move what the profile offloads to the CPU; the peak is measured from after setup."""
    engine = EngineSettings(max_rows=pairing.kv_rows)
    dit, llm = AceStepHandler(), LLMHandler()
    if tiny:
        dit.initialize_service(str(root), f"acestep-v15-{pairing.dit_variant}", device=str(device), dtype=dtype,
                               offload_to_cpu=profile.offload_to_cpu, offload_dit_to_cpu=profile.offload_dit_to_cpu,
                               quantization=profile.quantization)
        llm.initialize(str(root), pairing.lm_name, backend="pt", device=str(device), dtype=dtype, engine=engine,
                       offload_to_cpu=profile.offload_to_cpu)
        return dit, llm
    checkpoint = resolve_dit_checkpoint(root, "acestep-v15-turbo")  # the demo text tokenizer
    bundle = DiTBundle(vae=models.build_vae(False, device, dtype),
                       text_encoder=models.build_text_encoder(False, device, dtype),
                       tokenizer=load_tokenizer(checkpoint.tokenizer_dir), checkpoint=checkpoint,
                       **models.build_dit(False, device, dtype, pairing.dit_variant))
    if device.type == "cuda":
        use_band_attention(bundle.transformer)
    dit = AceStepHandler.from_bundle(bundle, offload_to_cpu=profile.offload_to_cpu,
                                     offload_dit_to_cpu=profile.offload_dit_to_cpu,
                                     quantization=profile.quantization, device=str(device))
    llm.attach_model(models.build_lm(pairing.lm_name, False, device, dtype), load_tokenizer(root / DEMO_LM_DIRNAME),
                     engine=engine, offload_to_cpu=profile.offload_to_cpu)
    return dit, llm


def planned_peak(dit: AceStepHandler, llm: LLMHandler, lm_offloaded: bool) -> Dict[str, int]:
    """Weight bytes on the device at once over a song: the DiT side's largest phase (plus the LM's
    weights when they stay), or the LM's phase (the DiT's resident modules stay beside it); and the
    LM's KV cache, which is allocated whole and never leaves."""
    plan, backend = dit.memory_plan, llm.llm
    lm_bytes = module_bytes(backend.model)
    dit_phase = plan.peak_bytes + (0 if lm_offloaded else lm_bytes)
    lm_phase = plan.resident_bytes + lm_bytes
    net = backend.engine.net
    return {"planned_weights_mib": max(dit_phase, lm_phase),
            "kv_cache_mib": net.k_cache.numel() * net.k_cache.element_size() * 2}


def _song(seconds: int) -> GenerationParams:
    return GenerationParams(caption="warm acoustic ballad with piano", lyrics="[Verse]\nla la la", duration=seconds,
                            thinking=True, lm_cfg_scale=2.0, shift=3.0)


def measure(pairing: Pairing, profile: Profile, tiny: bool, device: torch.device, dtype: torch.dtype,
            root: Path) -> Dict[str, object]:
    """One song under ``profile``: bytes and seconds (setup excluded)."""
    dit, llm = build(pairing, profile, tiny, device, dtype, root)
    try:
        row: Dict[str, object] = {name: round(value / MIB, 1) for name, value in
                                  planned_peak(dit, llm, profile.offload_to_cpu).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["resident_after_setup_mib"] = round(torch.cuda.memory_allocated() / MIB, 1)
        seconds = 10 if tiny else 120
        started = time.perf_counter()
        result = generate_music(dit, llm, _song(seconds), GenerationConfig(batch_size=1, seeds=[5],
                                                                           use_random_seed=False))
        row["s_per_song"] = round(time.perf_counter() - started, 3)
        if not result.success:
            raise RuntimeError(result.error)
        if device.type == "cuda":
            row["max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        return row
    finally:
        dit.loop.close()
        llm.unload()
        del dit, llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profiles_for(pairing: Pairing) -> List[Profile]:
    """The card's own tier, then the resident baseline (what the first run leaves behind can only
    raise the second's peak, so the profile under test runs first)."""
    return [Profile.of_card(pairing.card_gb), RESIDENT]


def bench_memory(bench: Bench, dtype: torch.dtype, iters: int = 1, root: Optional[Path] = None) -> None:
    """``root``: demo checkpoints already written (else written now)."""
    root = root or demo_root()
    for pairing in TINY_PAIRINGS if bench.tiny else FULL_PAIRINGS:
        rows = {}
        for profile in profiles_for(pairing):
            bench.check_time()
            rows[profile] = measure(pairing, profile, bench.tiny, bench.device, dtype, root)
        baseline = rows[RESIDENT]
        for profile, row in rows.items():
            ratios = {f"{key.removesuffix('_mib')}_vs_resident": round(row[key] / baseline[key], 3)
                      for key in ("planned_weights_mib", "max_allocated_mib", "s_per_song") if key in row}
            bench.add(SECTION, {"dit": pairing.dit_variant, "lm": pairing.lm_name, "card_gb": pairing.card_gb,
                                "profile": profile.name, "kv_rows": pairing.kv_rows, **row, **ratios})
        bench.save()


def run(bench: Bench, dtype: torch.dtype, quick: bool = False) -> None:
    bench_memory(bench, dtype)


if __name__ == "__main__":
    sys.exit(standalone(sys.argv[1:], "python -m bench.memory", __doc__.splitlines()[0],
                        "bench/results/memory.json", run))
