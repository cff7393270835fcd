"""Per-model presets: which default wins where, what a model forces, and what it refuses."""

from __future__ import annotations

import pytest

from acestep.inference import GenerationConfig, GenerationParams, generate_music
from acestep.presets import PRESET_FIELDS, PRESETS, apply_model, family_of
from acestep.validation import ValidationError


def test_families_come_from_the_config():
    assert family_of("turbo", True) == "turbo" and family_of("sft", False) == "sft"
    assert family_of("base", False) == "base" and family_of(None, False) == "base" and family_of(None, True) == "turbo"


def test_turbo_preset_fills_shift_and_forces_guidance():
    params, report = apply_model(GenerationParams(preset="model", guidance_scale=5.0), "turbo",
                                 model="acestep-v15-turbo", explicit={"guidance_scale"})
    assert (params.shift, params.inference_steps, params.dcw_enabled) == (3.0, 8, True)
    assert params.guidance_scale == 1.0 and report.forced == {"guidance_scale": 1.0}
    assert report.preset == "turbo" and report.filled == {"shift": 3.0, "dcw_enabled": True}
    assert params.preset is None  # spent: applying again changes nothing
    assert apply_model(params, "turbo")[0] == params


def test_sft_preset_runs_without_dcw_and_keeps_what_the_request_set():
    params, report = apply_model(GenerationParams(preset="model", shift=2.0, inference_steps=8), "sft",
                                 explicit={"shift", "inference_steps"})
    assert (params.inference_steps, params.shift, params.dcw_enabled, params.guidance_scale) == (8, 2.0, False, 7.0)
    assert report.preset == "sft" and report.forced == {}
    base, _ = apply_model(GenerationParams(preset="model"), "base")
    assert (base.inference_steps, base.shift, base.dcw_enabled) == (32, 3.0, False)


def test_python_defaults_stand_without_a_preset_but_dcw_follows_the_model():
    params, report = apply_model(GenerationParams(), "sft")
    assert (params.inference_steps, params.shift) == (8, 1.0) and report.preset is None
    assert params.dcw_enabled is False and apply_model(GenerationParams(), "turbo")[0].dcw_enabled is True
    assert apply_model(GenerationParams(dcw_enabled=True), "sft")[0].dcw_enabled is True  # set: it wins
    # the Python rule for "unset": still equal to the seed's default
    named, _ = apply_model(GenerationParams(preset="sft", shift=2.5), None)
    assert (named.inference_steps, named.shift) == (50, 2.5)


@pytest.mark.parametrize("fields,field", [({"inference_steps": 20}, "inference_steps"), ({"use_adg": True}, "use_adg"),
                                          ({"sampler_mode": "heun", "infer_method": "sde"}, "sampler_mode"),
                                          ({"preset": "xl"}, "preset")])
def test_nonsense_for_the_model_names_the_field_and_the_model(fields, field):
    with pytest.raises(ValidationError) as info:
        apply_model(GenerationParams(**fields), "turbo", model="acestep-v15-turbo")
    assert info.value.field == field
    if field in ("inference_steps", "use_adg"):
        assert "acestep-v15-turbo" in str(info.value)


def test_every_preset_sets_the_same_fields():
    assert all(tuple(p.values()) == PRESET_FIELDS for p in PRESETS.values())
    assert set(PRESET_FIELDS) <= set(GenerationParams.__dataclass_fields__)


def test_generate_music_reports_the_preset_and_what_turbo_forced(turbo_handler, tmp_path):
    params = GenerationParams(caption="calm", duration=10, inference_steps=2, guidance_scale=4.0, thinking=False,
                              preset="model", seed=3)
    result = generate_music(turbo_handler, None, params, GenerationConfig(batch_size=1, use_random_seed=False),
                            save_dir=str(tmp_path))
    assert result.success, result.error
    report = result.extra_outputs["preset"]
    assert report["preset"] == "turbo" and report["forced"] == {"guidance_scale": 1.0}
    used = result.audios[0]["params"]
    assert (used["shift"], used["guidance_scale"], used["inference_steps"], used["dcw_enabled"]) == (3.0, 1.0, 2, True)
