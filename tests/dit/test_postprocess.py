"""Output post-processing: latent shift/rescale before the decode, then peak normalisation and fades,
equal to upstream's own functions (fixture from tests/fixtures/upstream/gen_postprocess.py) and
applied per item through generate_music."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acestep.dit import vae as vae_ops
from acestep.dit.items import PostProcess
from acestep.inference import GenerationConfig, GenerationParams, generate_music

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "upstream" / "postprocess.json").read_text())
RATE = 48000


def _close(ours: torch.Tensor, expected) -> None:
    expected = torch.tensor(expected, dtype=torch.float32)
    assert ours.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    assert (ours - expected).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("case", FIXTURE["normalize"], ids=lambda c: f"{c['db']}dB")
def test_normalization_matches_upstream(case):
    _close(vae_ops.normalize_peak(torch.tensor(case["audio"], dtype=torch.float32), case["db"]), case["expected"])


@pytest.mark.parametrize("case", FIXTURE["fade"], ids=lambda c: f"in{c['fade_in']}-out{c['fade_out']}")
def test_fades_match_upstream(case):
    audio = torch.tensor(case["audio"], dtype=torch.float32)
    _close(vae_ops.apply_fades(audio, case["fade_in"], case["fade_out"]), case["expected"])


@pytest.mark.parametrize("case", FIXTURE["chain"], ids=lambda c: json.dumps(c["post"], sort_keys=True))
def test_latents_to_waveform_chain_matches_upstream(case):
    """Latent shift/rescale, then (the fixture's identity decode) the clip guard, normalisation when
    enabled, fades in seconds: upstream's per-item order."""
    post = PostProcess(**case["post"])
    shaped = vae_ops.transform_latents(torch.tensor(case["latents"], dtype=torch.float32), post)
    _close(shaped, case["shaped"])
    _close(vae_ops.postprocess(shaped.T, post, case["sample_rate"]), case["expected"])


def test_fade_lengths_round_as_upstream():
    assert vae_ops.fade_samples(0.0) == 0
    assert vae_ops.fade_samples(1.5) == 72000
    assert vae_ops.fade_samples(0.5 / RATE) == 0  # round half to even, as Python's round
    assert vae_ops.fade_samples(1.5 / RATE) == 2


# --- through generate_music (tiny checkpoints) ---------------------------------------------------


def _render(handler, **fields):
    params = GenerationParams(thinking=False, caption="warm test tone", lyrics="[Verse]\nla la", duration=10,
                              **fields)
    result = generate_music(handler, None, params, GenerationConfig(use_random_seed=False, batch_size=1, seeds=[7]))
    assert result.success, result.error
    return result


@pytest.fixture(scope="module")
def plain(turbo_handler):
    return _render(turbo_handler)


def test_default_output_peaks_at_minus_one_dbfs(plain):
    assert abs(plain.audios[0]["tensor"].abs().max().item() - 10 ** (-1 / 20)) < 1e-6


def test_normalization_off_keeps_the_level_and_fades_shape_the_ends(turbo_handler, plain):
    faded = _render(turbo_handler, enable_normalization=False, fade_in_duration=1.0, fade_out_duration=0.5)
    a, b = plain.audios[0]["tensor"], faded.audios[0]["tensor"]
    assert a.shape == b.shape
    middle = slice(RATE, a.shape[-1] - RATE // 2)
    # Away from the fades the output is the decoded audio itself: a fixed gain from the normalised one
    gain = (b[:, middle] * a[:, middle]).sum() / (a[:, middle] ** 2).sum()
    assert abs(gain.item() - 1.0) > 1e-3, "normalisation stayed on"
    assert b.abs().max().item() <= 1.0
    ramp_in = torch.linspace(0.0, 1.0, RATE)
    ramp_out = torch.linspace(1.0, 0.0, RATE // 2)
    expected = a * gain
    expected[:, :RATE] *= ramp_in
    expected[:, -(RATE // 2):] *= ramp_out
    assert torch.allclose(b, expected, atol=1e-6)
    assert (b[:, 0] == 0).all() and (b[:, -1] == 0).all()


def test_latent_shift_and_rescale_apply_before_the_decode(turbo_handler, plain):
    shifted = _render(turbo_handler, latent_shift=0.1, latent_rescale=1.2)
    latents = plain.extra_outputs["pred_latents"]
    assert torch.equal(shifted.extra_outputs["pred_latents"], latents), "sampling does not depend on them"
    bundle = turbo_handler.bundle
    x = latents[0].to(bundle.device) * 1.2 + 0.1
    expected = vae_ops.postprocess(vae_ops.decode_batch(bundle.vae, [x.to(bundle.dtype)])[0]).cpu()
    audio = shifted.audios[0]["tensor"]
    assert torch.allclose(audio, expected, atol=1e-5)
    assert not torch.allclose(audio, plain.audios[0]["tensor"], atol=1e-3)
