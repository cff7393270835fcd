"""Many models in one app over HTTP: two DiT variants and two LM sizes, each its own deployment,
picked per request; DiT adapters from the server's adapter directory, per request, multiplexed,
in a bounded LRU per replica. Real local Ray, demo checkpoints, real HTTP."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

from acestep.checkpoints.demo_lora import write_demo_lora
from tests.conftest import write_tone
from tests.serve.conftest import deployed_app
from tests.serve.conftest import wav_bytes as _wav_bytes

BIG_LM = "acestep-5Hz-lm-1.7B"
BASE = "acestep-v15-base"
XL = "acestep-v15-xl-turbo"
SONG = {"caption": "calm piano", "duration": 10, "inference_steps": 4, "thinking": False, "audio_format": "wav",
        "batch_size": 1, "seeds": [11], "use_random_seed": False}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("warm", "bright", "dark"), start=1):
        write_demo_lora(root / name, seed=seed)
    return root


@pytest.fixture(scope="module")
def song_dirs(tmp_path_factory):
    """Server directories /v1/dataset/scan may read: one with a song and its caption, one with none."""
    songs, empty = tmp_path_factory.mktemp("scan-songs"), tmp_path_factory.mktemp("scan-empty")
    write_tone(songs / "drone.wav", 1.0)
    (songs / "drone.caption.txt").write_text("a low drone")
    (empty / "notes.txt").write_text("no audio here")
    return songs, empty


@pytest.fixture(scope="module")
def models_app(demo_root, tmp_path_factory, adapters, song_dirs):
    if not (demo_root / BIG_LM).exists():  # a second LM "size": the demo LM under another served name
        shutil.copytree(demo_root / "acestep-5Hz-lm-0.6B", demo_root / BIG_LM)
    if not (demo_root / XL).exists():  # a tiny XL turbo in the XL layout, served like any other variant
        from acestep.checkpoints.demo import write_dit_folder

        write_dit_folder(demo_root / XL, "xl-turbo", seed=6)
    batch = {"max_forward_rows": 16, "max_row_frames": 96000, "max_padding": 0.25}
    yield from deployed_app(demo_root, tmp_path_factory.mktemp("models-state"),
                            dit={"extra_models": [BASE, XL], "batch": batch,
                                 "adapters": {"dir": str(adapters), "max_loaded": 2}},
                            lm={"extra_models": [BIG_LM]}, ingress={"allowed_audio_dirs": [str(d) for d in song_dirs]})


@pytest.fixture(scope="module")
def http(models_app):
    with httpx.Client(base_url=models_app.url, timeout=300, headers=models_app.headers) as client:
        yield client


def _stats(models_app, deployment):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=models_app.name).stats.remote().result()


def _audio(http, output):
    response = http.get(output["audios"][0]["url"])
    assert response.status_code == 200
    samples, rate = sf.read(io.BytesIO(response.content), dtype="float32", always_2d=True)
    return samples


def _generate(http, **fields):
    response = http.post("/v1/generate", json={**SONG, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_every_model_is_its_own_deployment_and_listed(http, models_app):
    ready = http.get("/ready").json()
    assert set(ready["running_replicas"]) == {"Ingress", "LMDeployment", f"LMDeployment-{BIG_LM}",
                                              "DiTDeployment", f"DiTDeployment-{BASE}", f"DiTDeployment-{XL}"}
    ids = [entry["id"] for entry in http.get("/v1/models").json()["data"]]
    assert ids == ["acestep/acestep-v15-turbo", f"acestep/{BASE}", f"acestep/{XL}"]


def test_lego_without_a_model_routes_to_the_base_variant(http, models_app):
    before = _stats(models_app, f"DiTDeployment-{BASE}")["worker"]["requests"]
    request = {**SONG, "task_type": "lego", "instruction": "Generate the GUITAR track based on the audio context:",
               "guidance_scale": 3.0}
    response = http.post("/v1/generate", data={"request": json.dumps(request)},
                         files={"src_audio": ("take.wav", _wav_bytes(10.0), "audio/wav")})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"]["models"]["dit"] == BASE
    assert abs(_audio(http, response.json()).shape[0] / 48000 - 10.0) < 0.5
    assert _stats(models_app, f"DiTDeployment-{BASE}")["worker"]["requests"] == before + 1
    refused = http.post("/v1/generate", data={"request": json.dumps({**request, "model": "acestep-v15-turbo"})},
                        files={"src_audio": ("take.wav", _wav_bytes(10.0), "audio/wav")})
    assert refused.status_code == 422
    detail = refused.json()["detail"][0]
    assert detail["loc"] == ["body", "task_type"] and BASE in detail["msg"]


def test_lm_model_picks_the_lm_deployment_and_never_takes_a_path(http, models_app):
    before = _stats(models_app, f"LMDeployment-{BIG_LM}")["requests"]
    output = _generate(http, thinking=True, lm_model=BIG_LM)
    assert output["metadata"]["models"]["lm"] == BIG_LM
    assert _stats(models_app, f"LMDeployment-{BIG_LM}")["requests"] == before + 1
    for bad in ("/opt/models/" + BIG_LM, "../" + BIG_LM, "acestep-5Hz-lm-4B"):
        response = http.post("/v1/generate", json={**SONG, "lm_model": bad})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "lm_model"]
    released = http.post("/release_task", json={"prompt": "calm", "lm_model_path": "/etc/passwd"})
    assert released.status_code == 422 and "lm_model" in released.text


def test_a_lora_changes_the_song_and_the_same_seed_reproduces_it(http):
    plain_output = _generate(http)
    plain = _audio(http, plain_output)
    warm = _generate(http, lora="warm")
    assert warm["metadata"]["models"]["adapters"] == [["warm", 1.0]]
    # same params, another adapter: another file (the key covers the adapters)
    assert warm["audios"][0]["key"] != plain_output["audios"][0]["key"]
    first = _audio(http, warm)
    assert not np.allclose(first, plain, atol=1e-3)
    assert np.array_equal(_audio(http, _generate(http, lora="warm")), first)
    assert np.array_equal(_audio(http, _generate(http, lora="warm", lora_scale=0)), plain)
    for body, field in (({"lora": "../warm"}, "lora"), ({"lora": "cold"}, "lora"),
                        ({"lora": "warm", "lora_scale": 2.5}, "lora_scale")):
        response = http.post("/v1/generate", json={**SONG, **body})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field], response.text


def test_requests_with_different_adapters_never_share_a_forward(http, models_app):
    solo_out = {name: _generate(http, lora=name, seeds=[21]) for name in ("warm", "bright")}
    solo = {name: _audio(http, out) for name, out in solo_out.items()}
    before = _stats(models_app, "DiTDeployment")["worker"]["forwards_by_adapters"]
    with ThreadPoolExecutor(2) as pool:
        outputs = dict(zip(("warm", "bright"), pool.map(lambda n: _generate(http, lora=n, seeds=[21]), ("warm", "bright"))))
    for name, output in outputs.items():
        assert output["audios"][0]["key"] == solo_out[name]["audios"][0]["key"]
        assert np.allclose(_audio(http, output), solo[name], atol=1e-4)
    after = _stats(models_app, "DiTDeployment")["worker"]["forwards_by_adapters"]
    grew = {label for label, count in after.items() if count > before.get(label, 0)}
    assert grew == {"warm@1", "bright@1"}  # one label per forward: never a mixed one


def test_several_adapters_with_weights_in_one_request(http, models_app):
    warm = _generate(http, lora="warm", seeds=[41])
    # a zero weight drops out: the same setting, the same file as `lora` alone
    assert _generate(http, loras={"warm": 1.0, "bright": 0}, seeds=[41])["audios"][0]["key"] == warm["audios"][0]["key"]
    before = _stats(models_app, "DiTDeployment")["worker"]["forwards_by_adapters"].get("bright@0.5+warm@0.5", 0)
    mixed = _generate(http, loras={"warm": 0.5, "bright": 0.5}, seeds=[41])
    assert mixed["metadata"]["models"]["adapters"] == [["bright", 0.5], ["warm", 0.5]]
    assert _stats(models_app, "DiTDeployment")["worker"]["forwards_by_adapters"]["bright@0.5+warm@0.5"] > before
    blend = _audio(http, mixed)
    assert not np.allclose(blend, _audio(http, warm), atol=1e-3)
    assert np.array_equal(_audio(http, _generate(http, loras={"bright": 0.5, "warm": 0.5}, seeds=[41])), blend)
    for body in ({"loras": {"warm": 1, "bright": 1, "dark": 1}}, {"loras": {"cold": 1}},
                 {"loras": {"warm": 1}, "lora": "bright"}, {"loras": {"warm": 9}}):
        response = http.post("/v1/generate", json={**SONG, **body})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][:2] == ["body", "loras"], response.text


def test_three_adapters_in_an_lru_of_two(http, models_app):
    for name in ("warm", "bright"):
        _generate(http, lora=name)
    start = _stats(models_app, "DiTDeployment")["adapters"]
    assert set(start["loaded"]) == {"warm", "bright"} and start["max_loaded"] == 2
    _generate(http, lora="dark")  # evicts the least recently used: warm
    pool = _stats(models_app, "DiTDeployment")["adapters"]
    assert pool["loaded"] == ["bright", "dark"] and pool["evictions"] == start["evictions"] + 1
    _generate(http, lora="warm")  # reloads it, evicting bright
    pool = _stats(models_app, "DiTDeployment")["adapters"]
    assert pool["loaded"] == ["dark", "warm"] and pool["loads"] == start["loads"] + 2


def _lora(http, route, body=None):
    response = http.post(f"/v1/lora/{route}", json=body) if body is not None else http.post(f"/v1/lora/{route}")
    return response


def test_official_lora_routes_set_the_default_adapter(http, models_app):
    plain = _audio(http, _generate(http, seeds=[31]))
    warm = _audio(http, _generate(http, lora="warm", seeds=[31]))
    loaded = _lora(http, "load", {"lora_path": "warm"})
    assert loaded.status_code == 200 and loaded.json()["code"] == 200
    assert loaded.json()["data"] == {"message": "LoRA warm is the default adapter", "lora_path": "warm"}
    status = http.get("/v1/lora/status").json()["data"]
    assert (status["lora_loaded"], status["use_lora"], status["lora_scale"], status["adapters"]) == (
        True, True, 1.0, ["warm"])
    try:
        assert np.array_equal(_audio(http, _generate(http, seeds=[31])), warm)  # a request naming none
        scaled = _lora(http, "scale", {"scale": 0.0}).json()
        assert scaled["code"] == 200 and scaled["data"]["scale"] == 0.0
        assert np.array_equal(_audio(http, _generate(http, seeds=[31])), plain)
        _lora(http, "scale", {"scale": 1.0})
        toggled = _lora(http, "toggle", {"use_lora": False}).json()
        assert toggled["data"] == {"message": "LoRA disabled", "use_lora": False}
        assert np.array_equal(_audio(http, _generate(http, seeds=[31])), plain)
        _lora(http, "toggle", {"use_lora": True})
        assert _lora(http, "scale", {"scale": 0.5, "adapter_name": "cold"}).json()["code"] == 400
    finally:
        assert _lora(http, "unload").json()["data"]["message"].startswith("LoRA unloaded")
    assert http.get("/v1/lora/status").json()["data"]["lora_loaded"] is False
    assert _lora(http, "toggle", {"use_lora": True}).json()["code"] == 400
    assert np.array_equal(_audio(http, _generate(http, seeds=[31])), plain)


def test_lora_path_is_a_name_never_a_path(http, adapters, tmp_path):
    outside = write_demo_lora(tmp_path / "outside")
    for bad in ("/etc", str(outside), "../outside", "warm/../../outside", "a/b", "~root", "cold"):
        response = _lora(http, "load", {"lora_path": bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", "lora_path"]
    assert http.get("/v1/lora/status").json()["data"]["lora_loaded"] is False


def test_adapters_lists_the_directory_with_formats_and_holders(http, models_app):
    _generate(http, lora="dark")
    listed = http.get("/v1/adapters").json()
    by_name = {entry["name"]: entry for entry in listed["adapters"]}
    assert set(by_name) == {"warm", "bright", "dark"} and listed["max_loaded_per_replica"] == 2
    dark = by_name["dark"]
    assert (dark["format"], dark["kind"], dark["rank"], dark["alpha"]) == ("peft", "lora", 4, 8.0)
    assert len(dark["target_modules"]) == 16 and dark["size_bytes"] > 0 and "path" not in dark
    assert listed["default"] == {"adapters": {}, "use_lora": False}
    (turbo_replica,) = by_name["dark"]["replicas"]  # published by the replica when it loaded it
    assert turbo_replica.startswith("DiTDeployment#")
    _generate(http, lora="dark", model="base")  # the base variant's replica loads it too
    by_name = {entry["name"]: entry for entry in http.get("/v1/adapters").json()["adapters"]}
    assert by_name["dark"]["replicas"] == sorted([turbo_replica, _stats(models_app, f"DiTDeployment-{BASE}")["replica"]])
    assert not by_name["bright"]["replicas"] or by_name["bright"]["replicas"] == [turbo_replica]


def _engine_requests(models_app, lm: str) -> int:
    deployment = "LMDeployment" if lm == "acestep-5Hz-lm-0.6B" else f"LMDeployment-{lm}"
    return _stats(models_app, deployment)["engine"]["requests_finished"]


def test_official_sample_format_and_analysis_modes_use_the_chosen_lm(http, models_app):
    """Every task path asks the same ``models_for``: the official LM steps run on the LM the body
    names, and the result says which it was."""
    from tests.serve.app_official import _poll, _release

    default_before = _engine_requests(models_app, "acestep-5Hz-lm-0.6B")
    big_before = _engine_requests(models_app, BIG_LM)
    bodies = ({"prompt": "calm piano", "lyrics": "[Instrumental]", "use_format": True},
              {"sample_query": "a calm piano piece", "thinking": False},
              {"prompt": "warm jazz trio", "analysis_only": True})
    for body in bodies:
        item = _poll(http, _release(http, json={**body, "lm_model_path": BIG_LM, "audio_duration": 10,
                                                "inference_steps": 2, "batch_size": 1}))
        assert item["status"] == 1, item
        assert all(entry["lm_model"] == BIG_LM for entry in json.loads(item["result"])), item
    assert _engine_requests(models_app, BIG_LM) >= big_before + len(bodies)
    assert _engine_requests(models_app, "acestep-5Hz-lm-0.6B") == default_before


def test_each_model_serves_its_preset_and_the_result_says_which_applied(http):
    entries = {e["id"]: e for e in http.get("/v1/models").json()["data"]}
    turbo, base = entries["acestep/acestep-v15-turbo"]["preset"], entries[f"acestep/{BASE}"]["preset"]
    assert (turbo["inference_steps"], turbo["shift"], turbo["guidance_scale"], turbo["dcw_enabled"]) == (8, 3.0, 1.0, True)
    assert (base["inference_steps"], base["dcw_enabled"]) == (32, False)
    inventory = {m["name"]: m for m in http.get("/v1/model_inventory").json()["data"]["models"]}
    assert inventory[BASE]["preset"] == base and inventory[BASE]["family"] == "base"
    # turbo, no shift and a guidance scale: shift 3.0 from the preset, guidance forced to 1.0 and said so
    output = _generate(http, guidance_scale=5.0)
    used = output["audios"][0]["params"]
    assert (used["shift"], used["guidance_scale"], used["dcw_enabled"]) == (3.0, 1.0, True)
    report = output["metadata"]["preset"]
    assert report["preset"] == "turbo" and report["forced"] == {"guidance_scale": 1.0} and "inference_steps" not in report["filled"]
    # base with no DCW setting: the preset's DCW (off); the request's own steps and shift win
    output = _generate(http, model=BASE, shift=2.0)
    used = output["audios"][0]["params"]
    assert (used["dcw_enabled"], used["shift"], used["inference_steps"]) == (False, 2.0, SONG["inference_steps"])
    assert output["metadata"]["preset"]["preset"] == "base"
    # the XL turbo, named by its official alias: its own deployment, the turbo preset
    output = _generate(http, model="xl-turbo")
    assert output["metadata"]["models"]["dit"] == XL and output["metadata"]["preset"]["preset"] == "turbo"
    assert abs(_audio(http, output).shape[0] / 48000 - SONG["duration"]) < 0.5
    # null: no preset, the library's defaults (shift 1.0); nonsense for the model: 422 naming field and model
    assert _generate(http, preset=None)["audios"][0]["params"]["shift"] == 1.0
    refused = http.post("/v1/generate", json={**SONG, "inference_steps": 20})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "inference_steps"]
    assert "acestep-v15-turbo" in refused.json()["detail"][0]["msg"]


def _poll(http, path, done, timeout_s=600.0):
    """GET ``path`` until ``done(json)`` (a bounded wait: the jobs run on the module's small Ray)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = http.get(path).json()
        if done(body):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{path}: not finished within {timeout_s}s: {body}")


def _training_dir(models_app):
    return models_app.config.training_path()


def _manifest(models_app, dataset):
    lines = (_training_dir(models_app) / "datasets" / dataset / "prepared" / "manifest.jsonl").read_text()
    return [json.loads(line) for line in lines.splitlines()]


def test_dataset_routes_walk_upstreams_workflow(http, models_app):
    """Upload with an activation tag -> a sample read and labelled -> saved under another name and
    loaded -> auto-labels for the unlabelled song (a job) -> preprocess (awaited) -> the prepared
    dataset's info; the caption a sample trains on is upstream's full caption."""
    for index, fields in enumerate(({"caption": "soft hum", "custom_tag": "zq", "tag_position": "prepend"}, {})):
        files = {"file": (f"walk {index}.wav", _wav_bytes(1.0), "audio/wav")}
        reply = http.post("/v1/dataset/upload", files=files, data={"dataset_name": "walk", **fields})
        assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [(s["caption"], s["labeled"], s["custom_tag"]) for s in data["samples"]] == [
        ("soft hum", True, "zq"), ("", False, "zq")]
    sample = http.get("/v1/dataset/sample/1").json()["data"]
    assert (sample["index"], sample["filename"], sample["duration"], sample["lyrics"]) == (1, "0001-walk_1.wav", 1,
                                                                                           "[Instrumental]")
    label = {"caption": "bright bells", "genre": "ambient", "lyrics": "la la", "language": "en", "bpm": 90,
             "is_instrumental": True}
    updated = http.put("/v1/dataset/sample/0", json={"sample_idx": 0, **label}).json()["data"]["sample"]
    assert (updated["caption"], updated["genre"], updated["bpm"], updated["lyrics"], updated["language"]) == (
        "bright bells", "ambient", 90, "[Instrumental]", "unknown")
    assert http.get("/v1/dataset/sample/0").json()["data"] == updated
    saved = http.post("/v1/dataset/save", json={"save_path": "./walk-copy.json", "tag_position": "append"})
    assert saved.json()["data"]["save_path"] == "walk-copy", saved.text
    loaded = http.post("/v1/dataset/load", json={"dataset_path": "walk-copy.json"}).json()["data"]
    assert (loaded["dataset_name"], loaded["num_samples"], loaded["samples"][0]["caption"]) == ("walk-copy", 2,
                                                                                               "bright bells")
    started = http.post("/v1/dataset/auto_label_async", json={"only_unlabeled": True}).json()["data"]
    assert started["total"] == 1, started
    labelled = _poll(http, f"/v1/dataset/auto_label_status/{started['task_id']}",
                     lambda body: body["data"]["status"] != "running")["data"]
    assert labelled["status"] == "completed" and labelled["last_updated_index"] == 1, labelled
    samples = http.get("/v1/dataset/samples").json()["data"]["samples"]
    assert samples[1]["labeled"] and samples[0]["caption"] == "bright bells"  # only the unlabelled one
    prepared = http.post("/v1/dataset/preprocess", json={"output_dir": "./ignored"})
    assert prepared.status_code == 200 and prepared.json()["data"]["num_tensors"] == 2, prepared.text
    assert _manifest(models_app, "walk-copy")[0]["caption"] == "bright bells, zq"  # upstream's, tag appended
    info = http.post("/v1/training/load_tensor_info", json={"tensor_dir": "./walk-copy"}).json()["data"]
    assert (info["dataset_name"], info["num_samples"], info["custom_tag"]) == ("walk-copy", 2, "zq")
    _start_then_stop(http, "walk-copy")


def _start_then_stop(http, dataset):
    """A long run stopped over HTTP: its task ends cancelled, the status says so, and its job actor
    (with the Ray Train run it owns) is gone."""
    started = http.post("/v1/training/start", json={"tensor_dir": dataset, "train_steps": 5000,
                                                    "lora_output_dir": "stopped-run"})
    assert started.status_code == 200, started.text
    task_id = started.json()["data"]["task_id"]
    assert http.post("/v1/training/start", json={"tensor_dir": dataset}).status_code == 409  # one run per key
    assert _wait(lambda: _job_actor(task_id) is not None), "the job's actor started"
    stopped = http.post("/v1/training/stop").json()["data"]
    assert stopped == {"message": "Stopping training...", "task_id": task_id}
    record = http.get(f"/v1/tasks/{task_id}").json()
    assert (record["phase"], record["error"]) == ("failed", "cancelled"), record
    status = http.get("/v1/training/status").json()["data"]
    assert (status["task_id"], status["is_training"], status["error"]) == (task_id, False, "cancelled")
    assert http.post("/v1/training/stop").json()["data"] == {"message": "No training in progress"}
    # the actor sees its task ended at its next poll, then exits
    assert _wait(lambda: _job_actor(task_id) is None), f"job-{task_id} still runs after its run was stopped"


def _job_actor(task_id):
    import ray

    from serve.training import NAMESPACE

    try:
        return ray.get_actor(f"job-{task_id}", namespace=NAMESPACE)
    except ValueError:
        return None


def _wait(condition, timeout_s: float = 60.0) -> bool:
    """``condition()`` until true or ``timeout_s`` passed (a bounded wait, its length never asserted)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def test_a_scan_copies_an_allowed_directory_and_an_empty_one_changes_nothing(models_app, song_dirs):
    songs, empty = song_dirs
    with httpx.Client(base_url=models_app.url, timeout=60,
                      headers={"Authorization": f"Bearer {models_app.keys['alice']}"}) as alice:
        refused = alice.post("/v1/dataset/scan", json={"audio_dir": str(empty), "dataset_name": "nothing"})
        assert refused.status_code == 400 and refused.json()["detail"][0]["loc"] == ["body", "audio_dir"]
        assert not (models_app.config.training_path() / "datasets" / "nothing").exists()
        assert alice.get("/v1/dataset/samples").json()["code"] == 400  # no latest dataset came of it
        scanned = alice.post("/v1/dataset/scan", json={"audio_dir": str(songs), "dataset_name": "scanned",
                                                       "custom_tag": "zz", "tag_position": "append"})
        assert scanned.status_code == 200, scanned.text
        data = scanned.json()["data"]
        assert (data["dataset_name"], data["num_samples"], data["labeled_count"]) == ("scanned", 1, 1)
        (sample,) = data["samples"]
        assert (sample["filename"], sample["caption"], sample["custom_tag"]) == ("drone.wav", "a low drone", "zz")
        assert alice.get("/v1/dataset/samples").json()["data"]["dataset_name"] == "scanned"


def test_training_routes_refuse_paths_and_unknown_names(http):
    refused = [
        (http.post("/v1/dataset/scan", json={"audio_dir": "/etc"}), 400, "audio_dir"),
        (http.post("/v1/training/start", json={"tensor_dir": "no-such-dataset"}), 400, "tensor_dir"),
        (http.post("/v1/training/start", json={"tensor_dir": "../etc"}), 422, "tensor_dir"),
        (http.post("/v1/training/export", json={"export_path": "/tmp/x", "lora_output_dir": "r"}), 422, "export_path"),
        (http.post("/v1/training/export", json={"export_path": "x", "lora_output_dir": "no-run"}), 404,
         "lora_output_dir"),
        (http.post("/v1/dataset/upload", files={"file": ("a.wav", b"not audio", "audio/wav")}), 422, "file"),
    ]
    for response, status, field in refused:
        assert response.status_code == status, response.text
        assert response.json()["detail"][0]["loc"] == ["body", field], response.text
    missing = http.get("/v1/dataset/preprocess_status/0123456789abcdef")
    assert missing.status_code == 404


def test_dataset_and_training_routes_refuse_what_they_cannot_honour(http, models_app):
    """422 / 400 / 404 naming the field (and the allowed values) for upstream's fields this server
    cannot honour or a client got wrong."""
    with httpx.Client(base_url=models_app.url, timeout=60,
                      headers={"Authorization": f"Bearer {models_app.keys['bob']}"}) as bob:
        no_dataset = bob.get("/v1/dataset/sample/0")  # bob has no dataset yet
        wav = {"file": ("a.wav", _wav_bytes(1.0), "audio/wav")}
        refused = [
            (no_dataset, 400, ["body", "dataset_name"]),
            (bob.post("/v1/dataset/scan", json={"audio_dir": "/x", "tag_position": "middle"}), 422,
             ["body", "tag_position"]),
            (bob.post("/v1/dataset/upload", files=wav, data={"dataset_name": "r", "tag_position": "middle"}), 422,
             ["body", "tag_position"]),
            (bob.post("/v1/dataset/upload", files=wav, data={"dataset_name": "r", "genre_ratio": "101"}), 422,
             ["body", "genre_ratio"]),
            (bob.post("/v1/dataset/load", json={"dataset_path": "no-such"}), 400, ["body", "dataset_path"]),
            (bob.post("/v1/dataset/load", json={"dataset_path": "../etc/x.json"}), 422, ["body", "dataset_path"]),
            (bob.post("/v1/training/start", json={"tensor_dir": "x", "use_fp8": True}), 422, ["body", "use_fp8"]),
            (bob.post("/v1/training/start_lokr", json={"tensor_dir": "x", "lokr_weight_decompose": True}), 422,
             ["body", "lokr_weight_decompose"]),
            (bob.post("/v1/training/load_tensor_info", json={}), 400, ["body", "tensor_dir"]),
            (bob.post("/v1/training/load_tensor_info", json={"tensor_dir": "no-such"}), 400, ["body", "tensor_dir"]),
            (bob.get("/v1/dataset/auto_label_status/0123456789abcdef"), 404, ["path", "task_id"]),
        ]
        assert "prepend" in refused[1][0].json()["detail"][0]["msg"]
        assert bob.post("/v1/dataset/upload", files=wav, data={"dataset_name": "r"}).status_code == 200
        refused += [
            (bob.get("/v1/dataset/sample/7"), 404, ["path", "sample_idx"]),
            (bob.put("/v1/dataset/sample/0", json={"sample_idx": 3}), 422, ["body", "sample_idx"]),
            (bob.put("/v1/dataset/sample/0", json={"prompt_override": "lyrics"}), 422, ["body", "prompt_override"]),
            (bob.post("/v1/dataset/save", json={"save_path": "r", "genre_ratio": 101}), 422, ["body", "genre_ratio"]),
            (bob.post("/v1/dataset/save", json={"save_path": "/tmp/r.json"}), 422, ["body", "save_path"]),
            (bob.post("/v1/dataset/auto_label_async", json={"format_lyrics": True}), 422, ["body", "format_lyrics"]),
            (bob.post("/v1/dataset/auto_label", json={"lm_model_path": "/opt/lm"}), 422, ["body", "lm_model_path"]),
        ]
        for response, status, loc in refused:
            assert (response.status_code, response.json()["detail"][0]["loc"]) == (status, loc), response.text
        # the same bodies within what this server honours are accepted (upstream's defaults included)
        assert bob.post("/v1/dataset/save", json={"save_path": "r.json", "genre_ratio": 100}).status_code == 200
        assert bob.put("/v1/dataset/sample/0", json={"sample_idx": 0, "prompt_override": "genre"}).status_code == 200
