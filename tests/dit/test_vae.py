"""VAE tiling and output post-processing."""

from __future__ import annotations

import torch

from acestep.dit import vae as vae_ops
from acestep.dit.items import PostProcess


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


def test_postprocess_without_normalization_keeps_only_the_peak_guard():
    off = PostProcess(normalize=False)
    loud = torch.tensor([[0.0, 2.0, -4.0], [1.0, 0.5, 0.0]])
    assert torch.equal(vae_ops.postprocess(loud, off), loud / 4.0)
    quiet = torch.tensor([[0.0, 0.2, -0.1], [0.1, 0.05, 0.0]])
    assert torch.equal(vae_ops.postprocess(quiet, off), quiet)


def test_inplace_snake_equals_diffusers_snake_bit_for_bit():
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    snake = Snake1d(4)
    with torch.no_grad():
        snake.alpha.normal_(0.0, 0.5)
        snake.beta.normal_(0.0, 0.5)
    x = torch.randn(2, 4, 1000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = snake(x)
        vae_ops.use_inplace_snakes(torch.nn.Sequential(snake))
        assert isinstance(snake, vae_ops.InPlaceSnake1d)
        assert torch.equal(snake(x), expected)
    x.requires_grad_(True)
    snake(x).sum().backward()  # with autograd it takes diffusers' out-of-place path
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_loaded_vae_uses_the_inplace_snake(turbo_handler):
    snakes = [m for m in turbo_handler.bundle.vae.modules() if "Snake" in type(m).__name__]
    assert snakes and all(isinstance(m, vae_ops.InPlaceSnake1d) for m in snakes)
