"""Stems section: the twelve tracks of one source through ``extract``, two ways on one base-DiT
handler, same seed, the model's preset (base: 32 steps, CFG):

- "1 call": ``tracks="all"``: one request, the source VAE-encoded once, the twelve tracks as items
  of one running batch (shared forwards as the limits allow);
- "12 calls": the official single-track request for each track, one after another (each encodes
  the source and runs alone).

Reported: seconds each way, the ratio, source encodes and items per forward, for the device's serving
limits (``DiTLimits.for_device``: one row per forward on a CPU) and, on a CPU, for 24-row forwards
(every track in one forward).

``python -m bench.stems [--quick] [--tiny | --full]``: tiny (the CPU default) runs the demo base
checkpoints on a 30 s source (``--quick``: 10 s); full (the CUDA default) a random full-size base DiT,
VAE and text encoder from the real configs on a 120 s source."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import soundfile as sf
import torch

from acestep.checkpoints.bundle import DiTBundle, load_tokenizer
from acestep.checkpoints.layout import resolve_dit_checkpoint
from acestep.dit.attention import use_band_attention
from acestep.dit.batch import DiTLimits
from acestep.dit.tasks import task_instruction
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music
from acestep.stems import ALL_TRACKS
from bench import models, scratch_dir
from bench.common import standalone
from bench.e2e import demo_root

SECTION = "stems (12 tracks of one source)"
BASE = "acestep-v15-base"


def build_base_handler(root: Path, tiny: bool, device: torch.device, dtype: torch.dtype,
                       limits: DiTLimits) -> AceStepHandler:
    """The demo base checkpoints under ``root`` (tiny) or a random full-size base DiT with the real
    VAE and text encoder shapes (the demo tokenizer), behind a worker with ``limits``."""
    if tiny:
        handler = AceStepHandler()
        handler.initialize_service(str(root), BASE, device=str(device), dtype=dtype, limits=limits)
        return handler
    checkpoint = resolve_dit_checkpoint(root, BASE)
    bundle = DiTBundle(vae=models.build_vae(False, device, dtype),
                       text_encoder=models.build_text_encoder(False, device, dtype),
                       tokenizer=load_tokenizer(checkpoint.tokenizer_dir), checkpoint=checkpoint,
                       **models.build_dit(False, device, dtype, variant="base"))
    if device.type == "cuda":
        use_band_attention(bundle.transformer)
    return AceStepHandler.from_bundle(bundle, limits)


def write_source(seconds: int) -> str:
    """A stereo 48 kHz test song: a chord with a beat, so every band has content."""
    rate = 48000
    t = np.arange(seconds * rate) / rate
    chord = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (110.0, 220.0, 277.2, 329.6))
    beat = 0.3 * np.sin(2 * np.pi * 60 * t) * (np.mod(t, 0.5) < 0.08)
    mono = (chord + beat).astype(np.float32)
    path = scratch_dir("acestep-stems-") / "song.wav"
    sf.write(str(path), np.stack([mono, mono], axis=1), rate)
    return str(path)


def _extract(handler, source: str, **fields):
    params = GenerationParams(task_type="extract", src_audio=source, preset="model", seed=1, thinking=False, **fields)
    result = generate_music(handler, None, params, GenerationConfig(batch_size=1, use_random_seed=False))
    if not result.success:
        raise RuntimeError(result.error)
    return result


def _one_call(handler, source: str) -> int:
    return len(_extract(handler, source, tracks="all").audios)


def _twelve_calls(handler, source: str) -> int:
    return sum(len(_extract(handler, source, instruction=task_instruction("extract", [t])).audios)
               for t in ALL_TRACKS)


def _measure(bench, handler, way, source: str) -> Dict:
    before = handler.stats()
    started = time.perf_counter()
    audios = way(handler, source)
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)
    wall = time.perf_counter() - started
    after = handler.stats()
    forwards = {k: v - before["items_per_forward"].get(k, 0) for k, v in after["items_per_forward"].items()
                if v > before["items_per_forward"].get(k, 0)}
    items = sum(int(k) * v for k, v in forwards.items())
    return {"audios": audios, "wall_s": round(wall, 3),
            "source_encodes": after["vae_encodes"]["source"] - before["vae_encodes"]["source"],
            "mean_items_per_forward": round(items / max(sum(forwards.values()), 1), 2),
            "max_items_per_forward": max((int(k) for k in forwards), default=0)}


def bench_stems(bench, root: Path, dtype: torch.dtype, limits: DiTLimits, source: str, seconds: int) -> None:
    bench.check_time()
    handler = build_base_handler(root, bench.tiny, bench.device, dtype, limits)
    _extract(handler, source, instruction=task_instruction("extract", ["vocals"]))  # warm-up, not measured
    one = _measure(bench, handler, _one_call, source)
    bench.check_time()
    twelve = _measure(bench, handler, _twelve_calls, source)
    handler.loop.close()
    common = {"source_s": seconds, "forward_rows": limits.max_forward_rows}
    bench.add(SECTION, {"way": "1 call (tracks='all')", **common, **one,
                        "speedup_vs_12_calls": round(twelve["wall_s"] / one["wall_s"], 2)})
    bench.add(SECTION, {"way": "12 calls", **common, **twelve})


def run(bench, dtype: torch.dtype, quick: bool = False) -> None:
    seconds = (10 if quick else 30) if bench.tiny else 120
    limits: List[DiTLimits] = [DiTLimits.for_device(bench.device)]
    if limits[0].max_forward_rows < 24:
        limits.append(DiTLimits(max_forward_rows=24))  # every guided track in one forward
    root, source = demo_root(), write_source(seconds)
    for each in limits:
        bench_stems(bench, root, dtype, each, source, seconds)
        bench.save()


def main(argv: List[str] | None = None) -> int:
    return standalone(argv, "python -m bench.stems", __doc__.split("\n\n")[0], "bench/results/stems.json", run)


if __name__ == "__main__":
    raise SystemExit(main())
