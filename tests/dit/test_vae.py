"""VAE tiling and output post-processing."""

from __future__ import annotations

import pytest
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


class OomAbove:
    """The real VAE whose ``decode`` raises out of memory for calls above ``limit`` frames (all of
    them while ``everywhere``) unless it sits on the CPU after a ``to("cpu")``; records every call's
    frames and every move."""

    def __init__(self, vae, limit: int = 0, everywhere: bool = False, error=torch.OutOfMemoryError):
        self.vae, self.limit, self.everywhere, self.error = vae, limit, everywhere, error
        self.calls, self.moves, self.on_cpu = [], [], False

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def to(self, device):
        self.moves.append(str(device))
        self.on_cpu = len(self.moves) % 2 == 1  # between the move to the CPU and the move back
        self.vae.to(device)
        return self

    def decode(self, x):
        frames = x.shape[0] * x.shape[-1]
        self.calls.append(("cpu" if self.on_cpu else "device", frames))
        if not self.on_cpu and (self.everywhere or frames > self.limit):
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.vae.decode(x)


def _latents(vae, *frames):
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(n, vae.config.decoder_input_channels, generator=generator) for n in frames]


def _same_audio(got, expected, tolerance: float = 1e-5):
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= tolerance * max(1.0, b.abs().max().item())


def test_decode_out_of_memory_halves_the_frames_per_call_down_to_a_fitting_size(turbo_handler, caplog):
    vae = turbo_handler.bundle.vae
    latents = _latents(vae, 400, 400)
    expected = vae_ops.decode_batch(vae, latents, window=1000, budget=2000)
    flaky = OomAbove(vae, limit=300)
    with caplog.at_level("WARNING", logger="acestep.dit.vae"):
        got = vae_ops.decode_batch(flaky, latents, window=1000, budget=2000)
    _same_audio(got, expected)
    assert [m for m in caplog.messages if "out of memory" in m] == [
        "VAE decode out of memory at up to 800 frames per call; retrying at 400",
        "VAE decode out of memory at up to 400 frames per call; retrying at 200"]
    # both items in one call, then one item per call, then tiles of at most 200 frames that fit
    assert flaky.calls[:2] == [("device", 800), ("device", 400)]
    assert all(frames <= 200 for _, frames in flaky.calls[2:]) and len(flaky.calls) > 4
    assert flaky.moves == []


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_decode_out_of_memory_at_the_floor_decodes_on_the_cpu_and_moves_the_vae_back(turbo_handler, caplog, error):
    vae = turbo_handler.bundle.vae
    latents = _latents(vae, 400)
    expected = vae_ops.decode_batch(vae, latents, window=400, budget=400)
    flaky = OomAbove(vae, everywhere=True, error=error)
    with caplog.at_level("WARNING", logger="acestep.dit.vae"):
        got = vae_ops.decode_batch(flaky, latents, window=400, budget=400)
    _same_audio(got, expected)
    assert [m for m in caplog.messages if "out of memory" in m] == [
        "VAE decode out of memory at up to 400 frames per call; retrying at 200",
        f"VAE decode out of memory at up to 200 frames per call; retrying at {vae_ops.MIN_DECODE_WINDOW}",
        f"VAE decode out of memory at {vae_ops.MIN_DECODE_WINDOW} frames per call; decoding on the CPU"]
    on_device = [frames for where, frames in flaky.calls if where == "device"]
    assert len(on_device) == 3 and on_device[0] == 400 and max(on_device[1:]) <= 200  # one failed call per try
    assert {where for where, _ in flaky.calls[3:]} == {"cpu"} and len(flaky.calls) > 3
    assert flaky.moves == ["cpu", str(next(vae.parameters()).device)]  # there for the call, then back


def test_decode_errors_other_than_out_of_memory_are_not_retried(turbo_handler):
    flaky = OomAbove(turbo_handler.bundle.vae, everywhere=True, error=ValueError)
    with pytest.raises(ValueError):
        vae_ops.decode_batch(flaky, _latents(turbo_handler.bundle.vae, 300), window=400, budget=400)
    assert len(flaky.calls) == 1 and flaky.moves == []


def test_a_cpu_decode_out_of_memory_raises_and_the_vae_still_goes_back(turbo_handler):
    class Always(OomAbove):
        def decode(self, x):
            self.calls.append(x.shape[-1])
            raise torch.OutOfMemoryError("out of memory")

    flaky = Always(turbo_handler.bundle.vae)
    with pytest.raises(torch.OutOfMemoryError):
        vae_ops.decode_batch(flaky, _latents(turbo_handler.bundle.vae, 100), window=400, budget=400)
    assert flaky.calls == [100, 100] and flaky.moves[-1] == str(next(turbo_handler.bundle.vae.parameters()).device)


@pytest.mark.gpu
def test_cuda_decode_out_of_memory_falls_back_to_the_cpu_and_the_vae_returns_to_cuda(turbo_handler):
    vae = turbo_handler.bundle.vae
    try:
        vae.to("cuda")
        latents = [x.cuda() for x in _latents(vae, 700, 300)]
        expected = vae_ops.decode_batch(vae, latents)  # sized from the free memory (untiled here)
        flaky = OomAbove(vae, everywhere=True)
        got = vae_ops.decode_batch(flaky, latents)
        assert flaky.moves == ["cpu", "cuda:0"] and next(vae.parameters()).device.type == "cuda"
        assert all(a.device.type == "cpu" for a in got)
        _same_audio(got, [a.cpu() for a in expected], 1e-2)  # CUDA convolutions run in TF32
    finally:
        vae.to("cpu")
