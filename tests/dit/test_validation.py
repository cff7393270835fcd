"""Every validation rule names its field; generate_music turns failures into success=False."""

from __future__ import annotations

import pytest

from acestep.inference import GenerationConfig, GenerationParams, generate_music, prepare_request
from acestep.validation import ValidationError

BAD_PARAMS = [
    ("bpm", 20), ("bpm", 301), ("duration", 5), ("duration", 601), ("inference_steps", 201),
    ("guidance_scale", 0.5), ("guidance_scale", 16), ("shift", 0.5), ("shift", 6), ("cfg_interval_start", -0.1),
    ("cfg_interval_end", 1.5), ("infer_method", "euler"), ("timesteps", [0.5, 0.7, 0]), ("timesteps", [1.2, 0]),
    ("timesteps", []), ("timesteps", [0]), ("timesteps", [0.0]), ("task_type", "remix"), ("audio_cover_strength", 1.5), ("lm_temperature", 3.0),
    ("lm_top_p", 1.5), ("lm_cfg_scale", 0.5), ("caption", "x" * 513), ("lyrics", "y" * 4097), ("seed", -2),
    ("repainting_start", -1.0), ("keyscale", "H major"), ("keyscale", "C" * 10_000), ("timesignature", "5"),
    ("timesignature", "4" * 10_000), ("vocal_language", "klingon"), ("vocal_language", "x" * 10_000),
    # fields added upstream after v1.5.2
    ("sampler_mode", "rk4"), ("velocity_norm_threshold", 5.5), ("velocity_ema_factor", -0.1), ("dcw_enabled", "yes"),
    ("dcw_mode", "mid"), ("dcw_scaler", 0.2), ("dcw_high_scaler", -0.01), ("dcw_wavelet", "db9"),
    ("chunk_mask_mode", "manual"), ("repaint_latent_crossfade_frames", 251), ("repaint_latent_crossfade_frames", 2.5),
    ("repaint_wav_crossfade_sec", 11.0), ("repaint_mode", "wild"), ("repaint_strength", 1.2), ("retake_seed", "1,x"),
    ("retake_seed", -5), ("retake_variance", 1.1), ("flow_edit_morph", 1), ("flow_edit_source_caption", "x" * 513),
    ("flow_edit_n_min", -0.1), ("flow_edit_n_max", 1.1), ("flow_edit_n_avg", 0), ("flow_edit_n_avg", 9),
    ("cover_noise_strength", 1.5), ("global_caption", "g" * 513), ("enable_normalization", "off"),
    ("normalization_db", 0.5), ("normalization_db", -11.0), ("fade_in_duration", -1.0), ("fade_out_duration", 10.5),
    ("latent_shift", 0.3), ("latent_rescale", 0.4),
]
BAD_CONFIG = [("batch_size", 0), ("batch_size", 9), ("audio_format", "ogg"), ("seeds", [1, "2"]),
              ("lm_batch_chunk_size", 0)]


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(**{field: value}), GenerationConfig())
    assert info.value.field == field
    assert field in str(info.value)
    if isinstance(value, str):  # free text is never echoed back (a huge caption would return in the error)
        assert value[:20] not in str(info.value).split("allowed:")[0] and len(str(info.value)) < 300
    elif isinstance(value, (int, float)):
        assert repr(value)[:20] in str(info.value)


def test_shift_and_steps_are_corrected_as_upstream_does():
    """GenerationParams.__post_init__ (upstream): shift <= 0 becomes 1.0, fewer than 1 step becomes 1."""
    params = GenerationParams(shift=0, inference_steps=0)
    assert (params.shift, params.inference_steps) == (1.0, 1)
    assert GenerationParams(shift=-2.0).shift == 1.0 and GenerationParams(shift=0.5).shift == 0.5


def test_flow_edit_window_must_be_ordered():
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(flow_edit_n_min=0.8, flow_edit_n_max=0.2), GenerationConfig())
    assert info.value.field == "flow_edit_n_min"


@pytest.mark.parametrize("field,value", [("retake_seed", "12, 34"), ("retake_seed", 7), ("dcw_enabled", False),
                                         ("dcw_wavelet", "sym8"), ("sampler_mode", "heun")])
def test_new_fields_accept_upstream_values(field, value):
    prepare_request(GenerationParams(**{field: value}), GenerationConfig())


@pytest.mark.parametrize("field,value", [("keyscale", " C Major "), ("keyscale", "F# minor"), ("keyscale", "Bb major"),
                                         ("keyscale", "N/A"), ("keyscale", ""), ("timesignature", "4/4"),
                                         ("timesignature", " 3 "), ("timesignature", "6/8"), ("vocal_language", "EN"),
                                         ("vocal_language", "unknown"), ("vocal_language", "yue")])
def test_metadata_tables_accept_what_the_lm_knows(field, value):
    prepare_request(GenerationParams(**{field: value}), GenerationConfig())


@pytest.mark.parametrize("field,value", BAD_CONFIG)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(), GenerationConfig(**{field: value}))
    assert info.value.field == field


def test_allowed_range_is_in_the_message():
    with pytest.raises(ValidationError, match="30 to 300"):
        prepare_request(GenerationParams(bpm=999), GenerationConfig())


@pytest.mark.parametrize("timesteps", [[0], (0.0,)])
def test_a_schedule_without_a_step_is_refused_at_intake(timesteps):
    """A lone 0 is strictly decreasing but leaves no step once the terminal 0 is dropped."""
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(timesteps=timesteps), GenerationConfig())
    assert info.value.field == "timesteps" and "above 0" in info.value.allowed
    prepare_request(GenerationParams(timesteps=[0.5, 0]), GenerationConfig())  # one step: fine


def test_auto_duration_and_null_bpm_are_fine():
    params, config, seeds = prepare_request(GenerationParams(duration=-1, bpm=None), GenerationConfig(batch_size=3))
    assert len(seeds) == 3 and params.duration == -1


def test_cfg_interval_order():
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(cfg_interval_start=0.8, cfg_interval_end=0.2), GenerationConfig())
    assert info.value.field == "cfg_interval_start"


def test_repaint_window_must_be_inside_the_source(source_audio):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="repaint", src_audio=source_audio, repainting_start=2,
                                         repainting_end=30), GenerationConfig())
    assert info.value.field == "repainting_end" and "12.00" in str(info.value)
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="repaint", src_audio=source_audio, repainting_start=13),
                        GenerationConfig())
    assert info.value.field == "repainting_start"
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="repaint", src_audio=source_audio, repainting_start=5,
                                         repainting_end=4), GenerationConfig())
    assert info.value.field == "repainting_end"


def test_source_tasks_need_source_audio_and_an_existing_file(tmp_path):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="repaint"), GenerationConfig())
    assert info.value.field == "src_audio"
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="cover", src_audio=str(tmp_path / "missing.wav")),
                        GenerationConfig())
    assert info.value.field == "src_audio"
    bad = tmp_path / "not-audio.wav"
    bad.write_text("hello")
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type="cover", src_audio=str(bad)), GenerationConfig())
    assert info.value.field == "src_audio"


def test_cover_without_anything_to_cover_falls_back_to_text2music():
    params, _, _ = prepare_request(GenerationParams(task_type="cover"), GenerationConfig())
    assert params.task_type == "text2music"


@pytest.mark.parametrize("task_type", ["lego", "extract", "complete"])
def test_base_only_tasks_rejected_on_turbo(source_audio, task_type):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type=task_type, src_audio=source_audio), GenerationConfig(),
                        is_turbo=True)
    assert info.value.field == "task_type" and "base" in str(info.value)


@pytest.mark.parametrize("task_type,instruction", [
    ("lego", "Generate the KAZOO track based on the audio context:"),
    ("extract", "Extract the theremin track from the audio:"),
    ("complete", "Complete the input track with drums | kazoo:"),
])
def test_track_names_come_from_the_list(source_audio, task_type, instruction):
    with pytest.raises(ValidationError) as info:
        prepare_request(GenerationParams(task_type=task_type, src_audio=source_audio, instruction=instruction),
                        GenerationConfig(), is_turbo=False)
    assert info.value.field == "instruction" and "vocals" in str(info.value)


def test_generate_music_reports_errors_without_raising(turbo_handler):
    result = generate_music(turbo_handler, None, GenerationParams(bpm=1000), GenerationConfig())
    assert result.success is False and result.audios == []
    assert "bpm" in result.error and "30 to 300" in result.error
    result = generate_music(turbo_handler, None, GenerationParams(task_type="lego", src_audio=None),
                            GenerationConfig())
    assert result.success is False and "task_type" in result.error
