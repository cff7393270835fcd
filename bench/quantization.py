"""Quantized DiT and LM vs full precision (section ``quantization`` of bench.gpu): per mode of
``acestep.quantize``, the resident Linear weight bytes, their ratio to bf16, the time beside the
unquantized model's measured in the same run (DiT: a forward; LM: an engine decode step), and the
output's SNR against it (DiT output; LM: prompt logits), with the same random weights in each mode.

    python -m bench.quantization [--tiny | --full] [--device cuda] [--out FILE.json]"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch

from acestep.checkpoints.loader import build_dit_modules
from acestep.dit.attention import use_band_attention
from acestep.quantize import fp8_supported, quantize_modules, weight_bytes
from bench import models
from bench.common import Bench, median_ms, standalone


def modes(device: torch.device) -> List[Optional[str]]:
    return [None, "int8_weight_only", "w8a8_dynamic"] + (["fp8_weight_only"] if fp8_supported(device) else [])


def grid(tiny: bool):
    return [(10, 1), (20, 2)] if tiny else [(30, 1), (120, 4)]


def _transformer(bench: Bench, dtype: torch.dtype):
    torch.manual_seed(0)  # one set of random weights for every mode
    meta = build_dit_modules(models.dit_config(bench.tiny), device="meta")["transformer"]
    transformer = models.randomize_(meta, bench.device, dtype)
    if bench.device.type == "cuda":
        use_band_attention(transformer)  # what the handler picks on CUDA
    return transformer


def _inputs(transformer, seconds: int, batch: int, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(seconds * 100 + batch)
    channels, width = transformer.config.audio_acoustic_hidden_dim, transformer.config.hidden_size
    frames, time = seconds * 25, torch.full((batch,), 0.5, device=device, dtype=dtype)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    return dict(hidden_states=make(batch, frames, channels), timestep=time, timestep_r=time,
                encoder_hidden_states=make(batch, 200, width), context_latents=make(batch, frames, 2 * channels),
                return_dict=False)


def _snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = (other - reference).float().norm()
    return float("inf") if error == 0 else round(float(20 * torch.log10(reference.float().norm() / error)), 1)


@torch.no_grad()
def bench_quantized_dit(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    full_ms, full_out = {}, {}
    for mode in modes(bench.device):
        bench.check_time()
        transformer = _transformer(bench, dtype)
        quantize_modules(transformer, mode)
        report = weight_bytes(transformer)
        for seconds, batch in grid(bench.tiny):
            bench.check_time()
            inputs = _inputs(transformer, seconds, batch, bench.device, dtype)
            ms = median_ms(lambda model=transformer, kwargs=inputs: model(**kwargs), bench.device, iters, warmup=2)
            out = transformer(**inputs)[0]
            key = (seconds, batch)
            if mode is None:
                full_ms[key], full_out[key] = ms, out
            bench.add("quantized dit", {
                "mode": mode or "none", "song_s": seconds, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                "linear_weights_mib": round(report.linear / 2**20, 3), "vs_bf16": round(report.ratio_to_bf16, 3),
                "forward_ms": ms, "unquantized_ms": full_ms[key], "speedup": round(full_ms[key] / ms, 2),
                "snr_db": _snr_db(full_out[key], out)})
        del transformer
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


LM_ROWS = (2, 16)  # one CFG song; eight at once


@torch.no_grad()
def bench_quantized_lm(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    """Does quantizing the LM pay? Its decoder's weight bytes, decode step time and logits per mode."""
    from bench.lm import codes_phase_request, lm_handler, ms_per_step, with_codes
    from acestep.lm.engine import EngineSettings

    full_ms, full_logits = {}, None
    for mode in (None, "int8_weight_only") + (("fp8_weight_only",) if fp8_supported(bench.device) else ()):
        bench.check_time()
        handler = lm_handler(bench.tiny, bench.device, dtype, EngineSettings(max_rows=max(LM_ROWS)), mode)
        try:
            backend = handler.llm
            base = codes_phase_request(handler, 0 if bench.tiny else 600)
            logits = backend.model(torch.tensor([base.prompt_ids], device=bench.device)).logits.float()
            full_logits = logits if mode is None else full_logits
            report = weight_bytes(backend.model.model)
            for rows in LM_ROWS:
                ms = ms_per_step(bench.device, lambda n, r=rows: backend.engine.generate(with_codes(base, r // 2, n)),
                                 16 if bench.tiny else 32, iters)
                full_ms.setdefault(rows, ms)
                bench.add("quantized lm", {
                    "mode": mode or "none", "rows": rows, "linear_weights_mib": round(report.linear / 2**20, 3),
                    "vs_bf16": round(report.ratio_to_bf16, 3), "decode_ms_per_step": ms,
                    "unquantized_ms_per_step": full_ms[rows], "speedup": round(full_ms[rows] / ms, 2) if ms > 0 else None,
                    "logits_snr_db": _snr_db(full_logits, logits)})
        finally:
            handler.unload()


def run(bench: Bench, dtype: torch.dtype, quick: bool = False) -> None:
    iters = 2 if quick else 5
    bench_quantized_dit(bench, dtype, iters)
    bench_quantized_lm(bench, dtype, iters)


if __name__ == "__main__":
    sys.exit(standalone(sys.argv[1:], "python -m bench.quantization", __doc__.splitlines()[0],
                        "bench/results/quantization.json", run))
