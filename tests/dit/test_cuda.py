"""The DiT side on a CUDA device (marker ``gpu``; skipped without one): the compiled FlexAttention
band path equals the dense mask, compiled blocks equal eager ones, the VAE's untiled CUDA decode
equals the tiled one, and a whole generate_music run renders finite audio on the GPU."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch

from acestep.checkpoints.demo import tiny_dit_config
from acestep.checkpoints.loader import build_dit_modules
from acestep.dit import vae as vae_ops
from acestep.dit.attention import use_band_attention, use_dense_attention

pytestmark = pytest.mark.gpu


def _transformer_inputs(transformer, batch: int, frames: int, dtype: torch.dtype):
    channels = transformer.config.audio_acoustic_hidden_dim
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
    steps = torch.linspace(0.8, 0.2, batch, device="cuda", dtype=dtype)
    return dict(hidden_states=make(batch, frames, channels), timestep=steps, timestep_r=steps,
                encoder_hidden_states=make(batch, 9, transformer.config.hidden_size),
                context_latents=make(batch, frames, 2 * channels), return_dict=False)


def _cuda_transformer(dtype: torch.dtype):
    torch.manual_seed(0)
    return build_dit_modules(tiny_dit_config("turbo"), device="cuda")["transformer"].to(dtype).eval()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@torch.no_grad()
def test_compiled_band_attention_matches_dense_on_cuda(dtype, tolerance):
    transformer = _cuda_transformer(dtype)
    frames = 6 * transformer.config.sliding_window + 3
    inputs = _transformer_inputs(transformer, 2, frames, dtype)
    dense = transformer(**inputs)[0].float()
    assert use_band_attention(transformer) >= 1
    band = transformer(**inputs)[0].float()  # the compiled flex kernel on CUDA
    use_dense_attention(transformer)
    scale = dense.abs().max().item()
    assert scale > 1e-3
    assert (band - dense).abs().max().item() <= tolerance * max(1.0, scale)


@torch.no_grad()
def test_compiled_blocks_match_eager_on_cuda():
    transformer = _cuda_transformer(torch.float32)
    use_band_attention(transformer)
    inputs = _transformer_inputs(transformer, 2, 4 * transformer.config.sliding_window + 1, torch.float32)
    eager = transformer(**inputs)[0]
    for block in transformer.layers:
        block.compile()
    compiled = transformer(**inputs)[0]
    again = transformer(**inputs)[0]  # a second call replays the compiled code
    assert (compiled - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())
    assert torch.equal(compiled, again)


@torch.no_grad()
def test_untiled_cuda_decode_equals_tiled(turbo_handler):
    vae = turbo_handler.bundle.vae
    try:
        vae.to("cuda")
        latents = torch.randn(2, 700, vae.config.decoder_input_channels, device="cuda",
                              generator=torch.Generator("cuda").manual_seed(0))
        assert vae_ops.decode_window(latents.device, 700, 2) == 700  # fits: one window, no overlap work
        whole = vae_ops.decode(vae, latents)
        tiled = vae_ops.decode(vae, latents, window=256, overlap=64)
        assert whole.shape == tiled.shape == (2, 2, 700 * vae_ops.HOP)
        assert (whole - tiled).abs().max().item() <= 1e-4 * max(1.0, whole.abs().max().item())
        batched = vae_ops.decode_batch(vae, [latents[0, :300], latents[1]], window=256, overlap=64)
        assert torch.allclose(batched[1], tiled[1], atol=1e-5, rtol=0)
    finally:
        vae.to("cpu")


def test_generate_music_on_cuda(demo_root, tmp_path):
    from acestep.handler import AceStepHandler
    from acestep.inference import GenerationConfig, GenerationParams, generate_music
    from acestep.llm_inference import LLMHandler

    dit = AceStepHandler()
    dit.initialize_service(str(demo_root), "acestep-v15-turbo", device="cuda")
    llm = LLMHandler()
    llm.initialize(str(demo_root), "acestep-5Hz-lm-0.6B", backend="pt", device="cuda")
    try:
        params = GenerationParams(caption="warm lo-fi piano", lyrics="[Instrumental]", duration=10, seed=3,
                                  thinking=True)
        result = generate_music(dit, llm, params, GenerationConfig(batch_size=2, audio_format="wav"),
                                save_dir=str(tmp_path))
        assert result.success, result.error
        assert len(result.audios) == 2
        for audio in result.audios:
            data, rate = sf.read(audio["path"])
            assert rate == 48000 and data.shape[1] == 2 and abs(len(data) / rate - 10) < 0.5
            assert (abs(data) > 1e-4).any()
    finally:
        dit.loop.close()
