"""Module sections of bench.gpu: the DiT forward, the VAE decode and the encoders, each built from
its real config with random weights and timed beside the stock path in the same run."""

from __future__ import annotations

import torch

from acestep.dit import vae as vae_ops
from acestep.dit.attention import use_band_attention, use_dense_attention
from bench import models
from bench.common import Bench, median_ms


def grid(tiny: bool):
    return [(10, 1), (20, 2)] if tiny else [(30, 1), (120, 1), (240, 1), (30, 8), (120, 8), (240, 8)]


@torch.no_grad()
def bench_dit(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    modules = models.build_dit(bench.tiny, bench.device, dtype)
    transformer = modules["transformer"]
    channels = transformer.config.audio_acoustic_hidden_dim
    encoder_width = transformer.config.hidden_size
    for seconds, batch in grid(bench.tiny):
        bench.check_time()
        frames = seconds * 25
        inputs = dict(hidden_states=torch.randn(batch, frames, channels, device=bench.device, dtype=dtype),
                      timestep=torch.full((batch,), 0.5, device=bench.device, dtype=dtype),
                      timestep_r=torch.full((batch,), 0.5, device=bench.device, dtype=dtype),
                      encoder_hidden_states=torch.randn(batch, 200, encoder_width, device=bench.device, dtype=dtype),
                      context_latents=torch.randn(batch, frames, 2 * channels, device=bench.device, dtype=dtype),
                      return_dict=False)
        use_dense_attention(transformer)
        baseline = median_ms(lambda: transformer(**inputs), bench.device, iters)
        use_band_attention(transformer)
        ours = median_ms(lambda: transformer(**inputs), bench.device, iters, warmup=2)
        bench.add("dit ms/forward", {"song_s": seconds, "batch": batch, "diffusers_dense_ms": baseline,
                                     "ours_band_ms": ours, "speedup": round(baseline / ours, 2)})
    use_dense_attention(transformer)


@torch.no_grad()
def bench_vae(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    vae = models.build_vae(bench.tiny, bench.device, dtype)
    channels = vae.config.decoder_input_channels
    for seconds in ([10, 20] if bench.tiny else [30, 120, 240]):
        bench.check_time()
        latents = torch.randn(1, seconds * 25, channels, device=bench.device, dtype=dtype)
        baseline = median_ms(lambda: vae_ops.decode(vae, latents, window=512), bench.device, iters)
        if bench.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bench.device)
        start_mem = torch.cuda.memory_allocated(bench.device) if bench.device.type == "cuda" else 0
        ours = median_ms(lambda: vae_ops.decode(vae, latents), bench.device, iters)
        peak = (torch.cuda.max_memory_allocated(bench.device) - start_mem) / 2**30 if bench.device.type == "cuda" else 0
        bench.add("vae decode", {"song_s": seconds, "tiled_512_ms": baseline, "ours_ms": ours,
                                 "ours_window": vae_ops.decode_window(bench.device, seconds * 25),
                                 "ours_peak_gib": round(peak, 2), "speedup": round(baseline / ours, 2)})


@torch.no_grad()
def bench_encoders(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    bench.check_time()
    text_encoder = models.build_text_encoder(bench.tiny, bench.device, dtype)
    ids = torch.randint(0, 1000, (1, 256), device=bench.device)
    text_ms = median_ms(lambda: text_encoder(input_ids=ids), bench.device, iters)
    modules = models.build_dit(bench.tiny, bench.device, dtype)
    encoder = modules["condition_encoder"]
    width = encoder.config.text_hidden_dim
    timbre = encoder.config.timbre_hidden_dim
    args = dict(text_hidden_states=torch.randn(1, 256, width, device=bench.device, dtype=dtype),
                text_attention_mask=torch.ones(1, 256, dtype=torch.bool, device=bench.device),
                lyric_hidden_states=torch.randn(1, 400, width, device=bench.device, dtype=dtype),
                lyric_attention_mask=torch.ones(1, 400, dtype=torch.bool, device=bench.device),
                refer_audio_acoustic_hidden_states_packed=torch.randn(1, 750, timbre, device=bench.device, dtype=dtype),
                refer_audio_order_mask=torch.zeros(1, dtype=torch.long, device=bench.device))
    cond_ms = median_ms(lambda: encoder(**args), bench.device, iters)
    bench.add("encoders", {"text_encoder_256_tokens_ms": text_ms, "condition_encoder_ms": cond_ms})


@torch.no_grad()
def bench_samplers(bench: Bench, dtype: torch.dtype, iters: int) -> None:
    """One sampler step (DiT forward + update) of Euler and Heun (two forwards), and one DCW
    correction (double, haar) on the same latents: what each control adds per step beside Euler."""
    from acestep.dit.dcw import DCWSettings, dcw_correct
    from acestep.dit.samplers import heun_step, ode_step

    modules = models.build_dit(bench.tiny, bench.device, dtype)
    transformer = modules["transformer"]
    channels, width = transformer.config.audio_acoustic_hidden_dim, transformer.config.hidden_size
    seconds = 10 if bench.tiny else 120
    bench.check_time()
    frames = seconds * 25
    states = torch.randn(1, 200, width, device=bench.device, dtype=dtype)
    context = torch.randn(1, frames, 2 * channels, device=bench.device, dtype=dtype)
    x = torch.randn(1, frames, channels, device=bench.device)

    def model_fn(latents, t):
        time = torch.full((1,), t, device=bench.device, dtype=dtype)
        return transformer(hidden_states=latents.to(dtype), timestep=time, timestep_r=time,
                           encoder_hidden_states=states, context_latents=context, return_dict=False)[0].float()

    dcw = DCWSettings()
    euler = median_ms(lambda: ode_step(model_fn, x, 0.5, 0.4), bench.device, iters)
    heun = median_ms(lambda: heun_step(model_fn, x, 0.5, 0.4), bench.device, iters)
    dcw_only = median_ms(lambda: dcw_correct(x, x * 0.9, 0.5, dcw), bench.device, iters)
    bench.add("sampler step", {"song_s": seconds, "euler_ms": euler, "heun_ms": heun, "dcw_ms": dcw_only,
                               "heun_vs_euler": round(heun / euler, 2),
                               "euler_dcw_vs_euler": round((euler + dcw_only) / euler, 3)})
