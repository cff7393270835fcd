"""serve/ pieces that need no Ray: the app config, the official-API compat layer, the CLI's auth rule."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from acestep.params import GenerationParams
from serve.compat import release as compat
from serve.cli import DEFAULT_CONFIG, apply_overrides, load_serve_config
from serve.config import AppConfig
from serve.edge.errors import APIError, FieldError
from serve.schemas import GenerateRequest, to_library


def test_serve_config_yaml_is_a_valid_serve_config_and_app_config():
    from ray.serve.schema import ServeDeploySchema

    raw = load_serve_config()
    ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    config = AppConfig.model_validate(app["args"])
    assert config.lm.deployment.ray_actor_options.num_gpus == 0  # the CPU profile runs on a laptop


def test_app_config_names_bad_fields():
    with pytest.raises(ValidationError, match="max_replicas"):
        AppConfig.model_validate({"demo": True, "dit": {"deployment": {"autoscaling_config": {
            "min_replicas": 3, "max_replicas": 1}}}})
    with pytest.raises(ValidationError, match="backend"):
        AppConfig.model_validate({"demo": True, "lm": {"backend": "tensorrt"}})
    with pytest.raises(ValidationError, match="checkpoints"):
        AppConfig.model_validate({})
    with pytest.raises(ValidationError, match="max_unfinished_tasks"):
        AppConfig.model_validate({"demo": True, "ingress": {"max_unfinished_tasks": 0}})
    with pytest.raises(ValidationError, match="deployment"):  # the store has no replica of its own
        AppConfig.model_validate({"demo": True, "store": {"deployment": {}}})


def test_cli_overrides_pick_the_checkpoint_source_and_address(tmp_path):
    http, app = apply_overrides(load_serve_config(DEFAULT_CONFIG), checkpoints=str(tmp_path), port=9123)
    assert http["port"] == 9123 and app["args"]["checkpoints"] == str(tmp_path) and app["args"]["demo"] is False
    _, app = apply_overrides(load_serve_config(DEFAULT_CONFIG), demo=True)
    assert app["args"]["demo"] is True


def test_generate_request_defaults_come_from_the_library():
    params, config = to_library(GenerateRequest(caption="x"))
    assert params == GenerationParams(caption="x", preset="model")  # HTTP: the model's preset fills what is left out
    assert config.batch_size == 2 and config.audio_format == "flac"
    with pytest.raises(ValidationError):
        GenerateRequest(cot_caption="outputs are not inputs")


def test_compat_aliases_lookup_order_and_upstream_defaults():
    body = {"prompt": "pop", "keyScale": "A minor", "audioDuration": "30", "inferenceSteps": 4,
            "param_obj": json.dumps({"bpm": "128", "time_signature": "3"}),
            "metas": {"vocalLanguage": "ja", "bpm": 90}, "thinking": "yes", "seed": 5, "use_random_seed": "false"}
    params, config, extras = compat.to_library(body)
    assert (params.caption, params.keyscale, params.duration, params.inference_steps) == ("pop", "A minor", 30.0, 4)
    assert params.bpm == 128, "param_obj is read before metas"
    assert params.timesignature == "3" and params.vocal_language == "ja" and params.thinking is True
    assert config.audio_format == "mp3" and params.shift == 3.0 and params.lm_cfg_scale == 2.5
    assert config.use_random_seed is False and config.seeds == [5]
    assert compat.to_library({"prompt": "x"})[0].thinking is False  # upstream default


@pytest.mark.parametrize("body,field,status,allowed", [
    ({"src_audio_path": "/etc/passwd"}, "src_audio_path", 400, "upload"),
    ({"refAudioPath": "/etc/passwd"}, "refAudioPath", 400, "upload"),
    ({"bpm": "fast"}, "bpm", 422, "30 to 300"),
    ({"bpm": "120.5"}, "bpm", 422, "30 to 300"),
    ({"audioDuration": "long"}, "audioDuration", 422, "10 to 600 seconds"),
    ({"audio_duration": "5"}, "audio_duration", 422, "10 to 600 seconds"),
    ({"param_obj": json.dumps({"targetDuration": 9000})}, "targetDuration", 422, "10 to 600 seconds"),
    ({"metas": {"key": "H major"}}, "key", 422, "'C major'"),
    ({"inferenceSteps": "0"}, "inferenceSteps", 422, "1 to 200"),
    ({"batch_size": "50"}, "batch_size", 422, "1 to 8"),
    ({"taskType": "remix"}, "taskType", 422, "text2music"),
    ({"seeds": "1,x"}, "seeds", 422, "list of integers"),
    ({"timesteps": "0.5,x"}, "timesteps", 422, "strictly decreasing"),
    ({"timesteps": "0.2,0.5"}, "timesteps", 422, "strictly decreasing"),
    ({"thinking": "maybe"}, "thinking", 422, "boolean"),
    ({"lm_temperature": "2.5"}, "lm_temperature", 422, "0.0 to 2.0"),
    ({"loraScale": "3"}, "loraScale", 422, "less than or equal to 2"),
    ({"dcw_mode": "mid"}, "dcw_mode", 422, "double"),
    ({"dcw_scaler": "0.5"}, "dcw_scaler", 422, "0.0 to 0.1"),
    ({"sampler_mode": "rk4"}, "sampler_mode", 422, "heun"),
    ({"repaint_strength": "2"}, "repaint_strength", 422, "0.0 to 1.0"),
    ({"fade_out_duration": "-1"}, "fade_out_duration", 422, "0.0 to 10.0"),
    ({"retake_variance": "1.5"}, "retake_variance", 422, "0.0 to 1.0"),
    ({"preset": "fast"}, "preset", 422, "turbo"),
])
def test_compat_rejects_paths_and_bad_values_naming_the_field_as_sent(body, field, status, allowed):
    with pytest.raises(APIError) as raised:
        compat.to_library(body)
    error = raised.value.detail()[0]
    assert raised.value.status_code == status and error["loc"] == ["body", field], error
    assert allowed in error["msg"], error


def test_compat_takes_the_newer_upstream_fields_under_their_names():
    body = {"prompt": "x", "dcw_enabled": "false", "dcw_mode": "pix", "dcw_scaler": "0.03", "dcw_high_scaler": 0.01,
            "dcw_wavelet": "db4", "sampler_mode": "heun", "velocity_norm_threshold": 2.0, "repaint_mode": "aggressive",
            "repaint_strength": 0.7, "chunk_mask_mode": "explicit", "cover_noise_strength": 0.4, "retake_seed": "9",
            "retake_variance": 0.2, "fade_in_duration": 1.5, "enable_normalization": False, "latent_shift": 0.1,
            "global_caption": "song", "audio_format": "opus"}
    params, config, extras = compat.to_library(body)
    assert (params.dcw_enabled, params.dcw_mode, params.dcw_scaler, params.dcw_wavelet) == (False, "pix", 0.03, "db4")
    assert (params.sampler_mode, params.repaint_mode, params.repaint_strength) == ("heun", "aggressive", 0.7)
    assert (params.retake_seed, params.fade_in_duration, params.enable_normalization) == ("9", 1.5, False)
    assert params.preset == "model" and set(body) - {"prompt", "audio_format"} <= set(extras["explicit"])
    assert compat.to_library({"prompt": "x"})[0].dcw_enabled is None  # left out: the model's default


def test_compat_query_items_shapes():
    base = {"created_at": 1.0, "progress": 0.5, "phase": "dit", "error": None, "message": ""}
    assert compat.query_items(base, {})[0] == 0
    assert compat.query_items({**base, "phase": "failed", "error": "boom"}, {})[1][0]["error"] == "boom"
    failed = compat.query_items({**base, "phase": "failed", "error": "replica_died", "message": "a replica died"}, {})
    assert failed[0] == 2 and failed[1][0]["error"] == "replica_died: a replica died"
    done = {**base, "phase": "done", "result": {"audios": [{"key": "k.mp3", "url": "/v1/audio/k.mp3", "seed": 3,
                                                           "params": {"bpm": 100, "caption": "c", "duration": 30}}],
                                               "metadata": {"plans": []}, "status_message": "ok"}}
    status, items = compat.query_items(done, {"lm": "lm", "dit": "dit"}, lambda key: f"/srv/audio/{key}")
    assert status == 1 and items[0]["file"] == "/v1/audio?path=%2Fsrv%2Faudio%2Fk.mp3"  # as upstream writes it
    assert items[0]["metas"]["bpm"] == 100 and items[0]["stage"] == "succeeded"
    assert items[0]["seed_value"] == "3" and items[0]["dit_model"] == "dit"
    assert compat.task_ids_from({"task_id_list": '["a", "b"]'}) == ["a", "b"]
    assert compat.task_ids_from({}) == [] and compat.task_ids_from({"task_id_list": 5}) == []
    unknown = compat.unknown_item("x")
    assert unknown["status"] == 2 and json.loads(unknown["result"])[0]["stage"] == "failed"


def test_a_missing_model_folder_is_named_before_anything_starts(demo_root):
    config = AppConfig(checkpoints=str(demo_root), lm={"model": "acestep-5Hz-lm-4B"})
    with pytest.raises(FileNotFoundError, match="acestep-5Hz-lm-4B not found; LM folders in .*acestep-5Hz-lm-0.6B"):
        config.check_model_folders()
    AppConfig(checkpoints=str(demo_root)).check_model_folders()  # the defaults name what the demo writes
    with pytest.raises(FileNotFoundError, match="acestep-v15-sft"):
        AppConfig(checkpoints=str(demo_root), dit={"model": "acestep-v15-sft"}).check_model_folders()


def test_serve_refuses_a_public_host_without_a_key():
    from serve.cli import auth_problem

    assert auth_problem("0.0.0.0", has_keys=False, insecure=False) is not None
    assert "--api-key" in auth_problem("10.0.0.5", has_keys=False, insecure=False)
    assert auth_problem("0.0.0.0", has_keys=True, insecure=False) is None
    assert auth_problem("0.0.0.0", has_keys=False, insecure=True) is None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert auth_problem(host, has_keys=False, insecure=False) is None


def test_progress_sink_keeps_each_sub_phase_start_and_the_latest_update(tmp_path):
    from serve.replica import ProgressSink
    from serve.store import open_task_store

    store = open_task_store(f"sqlite://{tmp_path}/tasks.db")
    task_id, _ = store.create({})
    sink = ProgressSink(lambda: store, period_s=3600)  # only the explicit flush below writes
    try:
        sink.report(task_id, "lm", 0.05, "cot 0", {"lm_phase": "cot"}, milestone=True)
        sink.report(task_id, "lm", 0.06, "cot 16")
        sink.report(task_id, "lm", 0.10, "codes 1", {"lm_phase": "codes"}, milestone=True)
        sink.report(task_id, "lm", 0.20, "codes 25")
        sink.report(task_id, "lm", 0.25, "codes 40")  # supersedes "codes 25"
        sink.report(task_id, "lm", 0.30, "LM done")  # supersedes "codes 40", not the milestones
        sink.flush()
        assert [e.message for e in store.events(task_id)] == ["queued", "cot 0", "codes 1", "LM done"]
        sink.report(task_id, "dit", 0.5, "step 1")
        sink.flush()
        assert store.get(task_id).message == "step 1"
    finally:
        store.close()


def test_stall_watch_fails_a_busy_replica_without_progress():
    from serve.replica import StallWatch

    now = [0.0]
    watch = StallWatch(stall_s=60, clock=lambda: now[0])
    watch.check(busy=True, progress_mark=1)
    now[0] = 59
    watch.check(busy=True, progress_mark=1)
    now[0] = 61
    with pytest.raises(RuntimeError, match="without progress"):
        watch.check(busy=True, progress_mark=1)
    watch.check(busy=True, progress_mark=2)  # progress again: healthy
    now[0] = 500
    watch.check(busy=False, progress_mark=2)  # idle is never a stall
    watch.note_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="CUDA"):
        watch.check(busy=False, progress_mark=3)


def test_event_stream_sends_heartbeats_and_ends_at_a_final_phase(tmp_path):
    from serve.store import open_task_store
    from serve.store.records import sse_events

    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    task_id, _ = store.create({})

    async def read():
        chunks = []
        async for chunk in sse_events(store, task_id, -1, heartbeat_s=0.2):
            chunks.append(chunk)
            if chunks.count(": keep-alive\n\n") == 2:
                store.update(task_id, "lm", 0.1, "LM")
                store.finish(task_id, {"audios": []})
        return chunks

    chunks = asyncio.run(asyncio.wait_for(read(), 30))
    events = [c for c in chunks if c.startswith("id: ")]
    assert chunks.count(": keep-alive\n\n") == 2
    assert [e.split("event: ")[1].split("\n")[0] for e in events] == ["queued", "lm", "done"]


def test_compat_takes_back_files_this_server_returned_and_no_other_path():
    root = "/srv/acestep/audio"
    stored = lambda value: compat.returned_file_key(value, root)  # noqa: E731
    _, _, extras = compat.to_library({"prompt": "x", "src_audio_path": "/v1/audio?path=%2Fsrv%2Facestep%2Faudio%2Fk.mp3"},
                                     stored)
    assert extras["stored_uploads"] == {"src_audio": ("src_audio_path", "k.mp3")}
    _, _, extras = compat.to_library({"prompt": "x", "ref_audio_path": f"{root}/r.wav"}, stored)
    assert extras["stored_uploads"] == {"reference_audio": ("ref_audio_path", "r.wav")}
    for path in ("/etc/passwd", f"{root}/../secret.wav", "/v1/audio?path=%2Fetc%2Fpasswd", "C:\\x\\y.wav"):
        with pytest.raises(FieldError) as raised:
            compat.to_library({"prompt": "x", "src_audio_path": path}, stored)
        assert raised.value.status_code == 400 and "upload" in raised.value.message


def test_the_app_module_imports_neither_transformers_nor_diffusers():
    """The ingress and controller import the app only (seconds of start-up each on 2 cores); the
    model replicas import what they load."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, serve.app; print(sorted({'transformers', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


# Upstream's spellings (its api_server lookup), each with a form value (a string, as a form body
# sends it), the typed JSON value and what the request must carry afterwards.
UPSTREAM_SPELLINGS = [
    ("caption", ("prompt", "caption"), "pop", "pop"),
    ("sample_query", ("sample_query", "sampleQuery", "description", "desc"), "a song", "a song"),
    ("use_format", ("use_format", "useFormat", "format"), "true", True),
    ("model", ("model", "model_name", "modelName", "dit_model", "ditModel"), "acestep-v15-turbo", "acestep-v15-turbo"),
    ("lm_model", ("lm_model_path", "lm_model", "lmModelPath", "lmModel"), "acestep-5Hz-lm-0.6B", "acestep-5Hz-lm-0.6B"),
    ("lora", ("lora", "lora_name", "loraName"), "style", "style"),
    ("lora_scale", ("lora_scale", "loraScale"), "0.5", 0.5),
    ("keyscale", ("key_scale", "keyscale", "keyScale", "key"), "A minor", "A minor"),
    ("timesignature", ("time_signature", "timesignature", "timeSignature"), "3", "3"),
    ("duration", ("audio_duration", "duration", "audioDuration", "target_duration", "targetDuration"), "30", 30.0),
    ("vocal_language", ("vocal_language", "vocalLanguage", "language"), "ja", "ja"),
    ("inference_steps", ("inference_steps", "inferenceSteps"), "4", 4),
    ("guidance_scale", ("guidance_scale", "guidanceScale"), "5.5", 5.5),
    ("use_random_seed", ("use_random_seed", "useRandomSeed"), "false", False),
    ("audio_cover_strength", ("audio_cover_strength", "audioCoverStrength"), "0.5", 0.5),
    ("task_type", ("task_type", "taskType"), "cover", "cover"),
    ("infer_method", ("infer_method", "inferMethod"), "sde", "sde"),
    ("use_constrained_decoding", ("constrained_decoding", "constrainedDecoding", "constrained"), "false", False),
    ("use_cot_caption", ("use_cot_caption", "cot_caption", "cot-caption"), "false", False),
    ("use_cot_language", ("use_cot_language", "cot_language", "cot-language"), "false", False),
    ("allow_lm_batch", ("allow_lm_batch", "allowLmBatch", "parallel_thinking"), "true", True),
    ("sample_mode", ("sample_mode", "sampleMode"), "true", True),
    ("audio_codes", ("audio_code_string", "audioCodeString", "audio_codes"), "<|audio_code_1|>", "<|audio_code_1|>"),
    ("analysis_only", ("analysis_only", "analysisOnly"), "true", True),
    ("full_analysis_only", ("full_analysis_only", "fullAnalysisOnly"), "1", True),
    ("extract_codes_only", ("extract_codes_only", "extractCodesOnly"), "yes", True),
    ("lyrics", ("lyrics",), "[verse]\nla", "[verse]\nla"),
    ("instruction", ("instruction",), "Fill it:", "Fill it:"),
    ("thinking", ("thinking",), "true", True),
    ("instrumental", ("instrumental",), "on", True),
    ("bpm", ("bpm",), "120", 120),
    ("seed", ("seed",), "5", 5),
    ("batch_size", ("batch_size",), "3", 3),
    ("repainting_start", ("repainting_start",), "1.5", 1.5),
    ("repainting_end", ("repainting_end",), "6", 6.0),
    ("use_adg", ("use_adg",), "true", True),
    ("cfg_interval_start", ("cfg_interval_start",), "0.1", 0.1),
    ("cfg_interval_end", ("cfg_interval_end",), "0.9", 0.9),
    ("shift", ("shift",), "2", 2.0),
    ("timesteps", ("timesteps",), "0.9,0.5, 0", [0.9, 0.5, 0.0]),
    ("audio_format", ("audio_format",), "wav", "wav"),
    ("lm_temperature", ("lm_temperature",), "0.7", 0.7),
    ("lm_cfg_scale", ("lm_cfg_scale",), "3", 3.0),
    ("lm_top_k", ("lm_top_k",), "40", 40),
    ("lm_top_p", ("lm_top_p",), "0.8", 0.8),
    ("lm_negative_prompt", ("lm_negative_prompt",), "noise", "noise"),
    ("use_cot_metas", ("use_cot_metas",), "false", False),
    ("use_cot_lyrics", ("use_cot_lyrics",), "true", True),
    ("seeds", ("seeds",), "3, 4", [3, 4]),
]


def _carried(result, name):
    """Where a /release_task field ends up: params, config, or the extras (the analysis modes as
    extras["analysis"])."""
    params, config, extras = result
    if name in compat.ANALYSIS_MODES:
        return extras.get("analysis") == name
    for held in (params, config):
        if hasattr(held, name):
            return getattr(held, name)
    return extras[name]


@pytest.mark.parametrize("name,spellings,form,typed", UPSTREAM_SPELLINGS, ids=[row[0] for row in UPSTREAM_SPELLINGS])
def test_compat_form_and_json_bodies_with_upstream_spellings_give_the_same_request(name, spellings, form, typed):
    for spelling in spellings:
        for body in ({spelling: form}, {spelling: typed}, {"param_obj": json.dumps({spelling: typed})}):
            assert _carried(compat.to_library(body), name) == typed, (spelling, body)


def _native(body):
    """/v1/generate's path: the request model, then the library's checks."""
    from serve.edge import intake

    params, config, _, _ = intake.to_params(body, {}, 1 << 20)
    return intake.prepare(params, config, {}, is_turbo=True)


def _lm_helper(body):
    """/v1/format_sample's path: its request model, pydantic's errors in the one error model."""
    from serve.edge.intake import ValidationFailed, validation_errors
    from serve.schemas import FormatSampleRequest

    try:
        return FormatSampleRequest.model_validate({"caption": "x", **body})
    except ValidationError as error:
        raise ValidationFailed(validation_errors(error)) from None


def _chat(body):
    from serve.compat import chat

    request = chat.parse_request({"messages": [{"role": "user", "content": "x"}], **body})
    return compat.to_library(chat.release_body(request, chat.read_messages(request.messages)))


def _format_input(body):
    from serve.compat import official

    return official.format_input_args(body)


# Each dialect's reading of a body, and the name it gives each LM sampling rule's field.
DIALECTS = {
    "/v1/generate": (_native, {"lm_temperature": "lm_temperature", "lm_top_p": "lm_top_p", "lm_top_k": "lm_top_k"}),
    "/release_task": (compat.to_library, {"lm_temperature": "lm_temperature", "lm_top_p": "lm_top_p",
                                          "lm_top_k": "lm_top_k"}),
    "/release_task form": (lambda body: compat.to_library({k: str(v) for k, v in body.items()}),
                           {"lm_temperature": "lm_temperature", "lm_top_p": "lm_top_p", "lm_top_k": "lm_top_k"}),
    "/v1/chat/completions": (_chat, {"lm_temperature": "temperature", "lm_top_p": "top_p", "lm_top_k": "top_k"}),
    "/v1/format_sample": (_lm_helper, {"lm_temperature": "temperature", "lm_top_p": "top_p", "lm_top_k": "top_k"}),
    "/format_input": (_format_input, {"lm_temperature": "temperature"}),
}
SAMPLING = {"lm_temperature": ((2.5, -0.1), (0.0, 2.0)), "lm_top_p": ((1.5, -0.1), (0.0, 1.0)),
            "lm_top_k": ((1001, -1), (0, 1000))}
SAMPLING_CASES = [(dialect, rule) for dialect, (_, names) in DIALECTS.items() for rule in SAMPLING if rule in names]


@pytest.mark.parametrize("dialect,rule", SAMPLING_CASES, ids=[f"{d}:{r}" for d, r in SAMPLING_CASES])
def test_lm_sampling_ranges_are_one_rule_in_every_dialect(dialect, rule):
    from acestep.validation import RULES

    read, names = DIALECTS[dialect]
    refused, accepted = SAMPLING[rule]
    allowed = next(r.allowed for r in RULES if r.field == rule)
    for value in accepted:
        read({names[rule]: value})
    for value in refused:
        with pytest.raises(APIError) as raised:
            read({names[rule]: value})
        error = raised.value.detail()[0]
        assert raised.value.status_code == 422 and error["loc"] == ["body", names[rule]], (value, error)
        assert allowed in error["msg"], (value, error)


def test_lm_sampling_defaults_are_stated_once():
    from acestep.params import LM_HELPER_DEFAULTS
    from serve.compat import chat, official
    from serve.schemas import FormatSampleRequest

    generation = GenerationParams()
    params, _, _ = _chat({})
    assert (params.lm_temperature, params.lm_top_p, params.lm_top_k) == \
        (generation.lm_temperature, generation.lm_top_p, generation.lm_top_k)
    assert _format_input({})[3] == FormatSampleRequest(caption="x").temperature == LM_HELPER_DEFAULTS.temperature
    assert f"default {generation.lm_temperature}" in chat.ChatRequest.model_fields["temperature"].description
    assert official.FormatInput().temperature == LM_HELPER_DEFAULTS.temperature
