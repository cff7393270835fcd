"""The fused band-attention path equals the dense-mask path (fp32, window < sequence)."""

from __future__ import annotations

import torch

from acestep.checkpoints.demo import tiny_dit_config
from acestep.checkpoints.loader import build_dit_modules
from acestep.dit.attention import use_band_attention, use_dense_attention


def test_band_attention_matches_dense_mask():
    torch.manual_seed(0)
    transformer = build_dit_modules(tiny_dit_config("turbo"), device="cpu")["transformer"].eval()
    window = transformer.config.sliding_window
    frames = 6 * window + 3  # odd length: exercises the patch padding too; window ≪ sequence
    channels = transformer.config.audio_acoustic_hidden_dim
    inputs = dict(hidden_states=torch.randn(2, frames, channels), timestep=torch.tensor([0.7, 0.3]),
                  timestep_r=torch.tensor([0.7, 0.3]), encoder_hidden_states=torch.randn(2, 9, 32),
                  context_latents=torch.randn(2, frames, 2 * channels), return_dict=False)
    with torch.no_grad():
        dense = transformer(**inputs)[0]
        assert use_band_attention(transformer) == 1
        band = transformer(**inputs)[0]
        use_dense_attention(transformer)
        again = transformer(**inputs)[0]
    assert torch.equal(dense, again)
    assert (band - dense).abs().max().item() <= 1e-5
    assert dense.abs().max().item() > 1e-3  # a real signal, not zeros on both sides
