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
from serve.edge.errors import FieldError
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
    assert params == GenerationParams(caption="x")
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


@pytest.mark.parametrize("body,field,status", [
    ({"src_audio_path": "/etc/passwd"}, "src_audio_path", 400),
    ({"refAudioPath": "/etc/passwd"}, "refAudioPath", 400),
    ({"bpm": "fast"}, "bpm", 422),
    ({"bpm": "120.5"}, "bpm", 422),
])
def test_compat_rejects_paths_and_bad_values_naming_the_field(body, field, status):
    with pytest.raises(FieldError) as raised:
        compat.to_library(body)
    assert raised.value.field == field and raised.value.status_code == status


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
