"""Seeds, schedules, samplers and layouts: same inputs give the same audio, and only those."""

from __future__ import annotations

import pytest
import torch

from acestep.checkpoints.convert import convert_to_diffusers
from acestep.dit.guidance import guided
from acestep.dit.samplers import ode_step, sample
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, generate_music, resolve_seeds


def _audio(handler, seeds, **fields):
    params = GenerationParams(thinking=False, caption="seeded", duration=10, **fields)
    config = GenerationConfig(batch_size=len(seeds), seeds=seeds, use_random_seed=False)
    result = generate_music(handler, None, params, config)
    assert result.success, result.error
    return [a["tensor"] for a in result.audios]


def test_same_seed_same_audio_different_seed_different(turbo_handler):
    first = _audio(turbo_handler, [11, 12])
    again = _audio(turbo_handler, [11, 12])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])


def test_item_seed_does_not_depend_on_batch(turbo_handler):
    alone = _audio(turbo_handler, [12])
    batched = _audio(turbo_handler, [11, 12])
    assert torch.allclose(alone[0], batched[1], atol=1e-4)


@pytest.mark.parametrize("fields", [{"infer_method": "sde"}, {"shift": 3.0},
                                    {"timesteps": [0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085, 0]}])
def test_sampler_options_are_deterministic_and_matter(turbo_handler, fields):
    reference = _audio(turbo_handler, [5])[0]
    first = _audio(turbo_handler, [5], **fields)[0]
    assert torch.equal(first, _audio(turbo_handler, [5], **fields)[0])
    assert not torch.equal(first, reference)


@pytest.mark.parametrize("fields", [{"use_adg": True}, {"cfg_interval_start": 0.3, "cfg_interval_end": 0.7},
                                    {"shift": 2.0, "inference_steps": 6}])
def test_base_guidance_options(base_handler, fields):
    reference = _audio(base_handler, [5], inference_steps=4, guidance_scale=5.0)[0]
    changed = _audio(base_handler, [5], **{"inference_steps": 4, "guidance_scale": 5.0, **fields})[0]
    assert torch.isfinite(changed).all()
    assert not torch.equal(changed, reference)


def test_zero_velocity_leaves_latents_unchanged_under_ode():
    x = torch.randn(2, 30, 64)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert torch.equal(sample(zero, x.clone(), [1.0, 0.75, 0.5, 0.25, 0.0]), x)
    wrapped = guided(lambda x, t: (torch.zeros_like(x), torch.zeros_like(x)), zero, 7.0, (0.0, 1.0))
    assert torch.equal(sample(wrapped, x.clone(), [1.0, 0.5, 0.0]), x)
    assert torch.equal(ode_step(lambda x, t: torch.ones_like(x), x, 1.0, 0.25), x - 0.75)


def test_cfg_runs_only_inside_the_interval():
    calls = []
    pair = lambda x, t: (calls.append(("pair", t)), (x, x * 0))[1]  # noqa: E731
    cond = lambda x, t: (calls.append(("cond", t)), x)[1]  # noqa: E731
    model = guided(pair, cond, 3.0, (0.4, 0.8))
    for t in (1.0, 0.8, 0.5, 0.4, 0.2):
        model(torch.ones(1, 4, 3), t)
    assert calls == [("cond", 1.0), ("pair", 0.8), ("pair", 0.5), ("pair", 0.4), ("cond", 0.2)]


def test_official_and_diffusers_layouts_give_identical_audio(demo_root, turbo_handler, tmp_path):
    repo = convert_to_diffusers(demo_root, "acestep-v15-turbo", tmp_path / "turbo-diffusers")
    handler = AceStepHandler()
    status, ok = handler.initialize_service(None, str(repo), device="cpu")
    assert ok and "diffusers layout" in status
    assert torch.equal(_audio(handler, [21])[0], _audio(turbo_handler, [21])[0])


def test_seed_resolution_rules():
    params = GenerationParams(seed=42)
    assert resolve_seeds(params, GenerationConfig(batch_size=3, use_random_seed=False)) == [42, 43, 44]
    padded = resolve_seeds(params, GenerationConfig(batch_size=4, seeds=[1, -1, 3], use_random_seed=False))
    assert padded[0] == 1 and padded[2] == 3 and len(padded) == 4 and all(0 <= s < 2**32 for s in padded)
    assert resolve_seeds(params, GenerationConfig(batch_size=1, seeds=9, use_random_seed=False)) == [9]
    randoms = resolve_seeds(params, GenerationConfig(batch_size=8, seeds=[1] * 8, use_random_seed=True))
    assert randoms != [1] * 8 and len(set(randoms)) > 1
