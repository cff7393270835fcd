"""Training section: LoRA training on Ray Train (gloo, CPU) with one worker and with two, on the
same global batch (1 worker × batch B, 2 workers × batch B/2: the same adapter), for a small and a
larger global batch, demo checkpoints and a few synthetic songs prepared in-process. Reported per
run: optimizer steps per second of the workers' training loop (model loading and Ray start-up
excluded), the final loss (equal for both worker counts) and the ratio two over one.

``python -m bench.train [--quick]``: demo models only (a CPU benchmark; ``--quick``: fewer steps,
the small batch only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import numpy as np
import soundfile as sf
import torch

from acestep.training.lora import AdapterSpec
from acestep.training.loop import TrainConfig
from bench import scratch_dir
from bench.common import standalone
from bench.e2e import demo_root

SECTION = "train (LoRA on Ray Train, CPU)"
SONGS = ((220.0, 8.0), (330.0, 10.0), (440.0, 8.0), (550.0, 10.0))
GLOBAL_BATCHES = (2, 8)


def prepare_songs(root: Path, folder: Path) -> Path:
    """Synthetic songs → a prepared folder (the library's path, in this process)."""
    from acestep.checkpoints.bundle import load_dit_bundle
    from acestep.checkpoints.layout import resolve_dit_checkpoint
    from acestep.training.labels import SongText
    from acestep.training.prepare import encode_audio, prepare_sample
    from acestep.training.samples import write_sample

    bundle = load_dit_bundle(resolve_dit_checkpoint(root, "acestep-v15-turbo"))
    folder.mkdir(parents=True, exist_ok=True)
    for i, (freq, seconds) in enumerate(SONGS):
        t = np.arange(int(seconds * 48000)) / 48000
        path = folder / f"song{i}.wav"
        sf.write(str(path), np.stack([0.3 * np.sin(2 * np.pi * freq * t)] * 2, axis=1).astype(np.float32), 48000)
        sample = prepare_sample(bundle, encode_audio(bundle, str(path), i), SongText(caption=f"tone {freq:g}"), {})
        write_sample(sample, folder / f"song{i}.safetensors")
    return folder


def run(bench, dtype: torch.dtype, quick: bool = False) -> None:
    import ray

    from pipelines.train_lora import TrainJob, run as train_run

    steps = 10 if quick else 40
    root, scratch = demo_root(), scratch_dir("acestep-bench-train-")
    data = prepare_songs(root, scratch / "prepared")
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        for batch in GLOBAL_BATCHES[:1] if quick else GLOBAL_BATCHES:
            rates: List[float] = []
            for workers in (1, 2):
                bench.check_time()
                config = TrainConfig(adapter=AdapterSpec(rank=8, alpha=16, dropout=0.0), steps=steps,
                                     batch_size=batch // workers, grad_accumulation=1, checkpoint_every=steps,
                                     warmup_steps=1)
                job = TrainJob(data=str(data), output=str(scratch / f"run{batch}-{workers}"), checkpoints=str(root),
                               workers=workers, cpus_per_worker=1.0)
                result = train_run(job, config)
                rates.append(result.steps_per_s)
                row = {"workers": workers, "global_batch": batch, "steps": steps,
                       "steps_per_s": round(result.steps_per_s, 2), "final_loss": round(result.losses[-1], 4)}
                if workers == 2:
                    row["two_over_one"] = round(rates[1] / rates[0], 2)
                bench.add(SECTION, row)
                bench.save()
    finally:
        ray.shutdown()


def main(argv: List[str] | None = None) -> int:
    return standalone(argv, "python -m bench.train", __doc__.split("\n\n")[0], "bench/results/train-cpu.json", run)


if __name__ == "__main__":
    raise SystemExit(main())
