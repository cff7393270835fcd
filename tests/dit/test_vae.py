"""VAE tiling and output post-processing."""

from __future__ import annotations

import torch

from acestep.dit import vae as vae_ops


def test_tiled_decode_equals_untiled(turbo_handler):
    vae = turbo_handler.bundle.vae
    latents = torch.randn(2, 300, vae.config.decoder_input_channels, generator=torch.Generator().manual_seed(0))
    whole = vae_ops.decode(vae, latents, window=1000)
    tiled = vae_ops.decode(vae, latents, window=128, overlap=32)
    assert whole.shape == tiled.shape == (2, 2, 300 * 1920)
    assert (whole - tiled).abs().max() <= 1e-5 * max(1.0, whole.abs().max().item())


def test_long_audio_encodes_in_tiles(turbo_handler):
    vae = turbo_handler.bundle.vae
    audio = torch.sin(torch.arange(35 * 48000) / 30.0).repeat(2, 1) * 0.3
    latents = vae_ops.encode(vae, audio, torch.Generator().manual_seed(1))
    assert latents.shape == (35 * 25, vae.config.decoder_input_channels)
    assert torch.isfinite(latents).all()


def test_postprocess_peak_guard_and_minus_one_dbfs():
    loud = torch.tensor([[0.0, 2.0, -4.0], [1.0, 0.5, 0.0]])
    out = vae_ops.postprocess(loud)
    assert abs(out.abs().max().item() - 10 ** (-1 / 20)) < 1e-6
    assert torch.allclose(out / out.abs().max(), loud / 4.0)
    silent = torch.zeros(2, 10)
    assert torch.equal(vae_ops.postprocess(silent), silent)
