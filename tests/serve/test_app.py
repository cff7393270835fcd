"""The Serve app end to end: real local Ray, demo checkpoints, real HTTP (httpx), audio read back (soundfile).

All tests share one module-scoped app (tests/serve/conftest.py), also those of the groups imported at
the end (each in its own file, not collected on its own): a deployed app costs half a minute."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from serve.store.records import PHASES
from tests.serve.conftest import wav_bytes as _wav_bytes

SONG = {"caption": "calm piano with soft strings", "lyrics": "[verse]\nhello night", "duration": 10,
        "inference_steps": 2, "batch_size": 1}


def _read_audio(client, url):
    response = client.get(url)
    assert response.status_code == 200, response.text
    data, rate = sf.read(io.BytesIO(response.content), dtype="float32", always_2d=True)
    return data, rate, response.headers["content-type"]


def test_sync_generate_returns_files(client):
    response = client.post("/v1/generate", json={**SONG, "batch_size": 2, "audio_format": "wav", "thinking": True,
                                                 "use_random_seed": False, "seeds": [1, 2]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [a["seed"] for a in body["audios"]] == [1, 2]
    assert body["metadata"]["plans"], "thinking=true: the LM planned each item"
    # each item's codes come back once, in its params, not again in its plan
    assert all("audio_codes" not in plan for plan in body["metadata"]["plans"])
    assert all(a["params"]["audio_codes"].startswith("<|audio_code_") for a in body["audios"])
    for audio in body["audios"]:
        data, rate, media = _read_audio(client, audio["url"])
        assert rate == 48000 and data.shape[1] == 2 and media == "audio/wav"
        assert abs(data.shape[0] / rate - 10.0) < 0.5
        assert np.abs(data).max() > 0


def test_async_task_progress_events_in_order(client):
    response = client.post("/v1/tasks", json={**SONG, "audio_format": "flac"})
    assert response.status_code == 202, response.text
    task = response.json()
    events = []
    with client.stream("GET", task["events_url"]) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    phases = [e["phase"] for e in events]
    assert phases[0] == "queued" and phases[-1] == "done"
    assert {"lm", "dit", "encode"} <= set(phases)
    ranks = [PHASES.index(p) for p in phases]
    assert ranks == sorted(ranks), phases
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    # token-level LM progress, rising; replicas write it at most every 0.1 s per task (the demo LM
    # writes a 10 s song's 50 codes in about that), but always the first event of the codes
    lm_details = [e["detail"] for e in events if (e.get("detail") or {}).get("lm_phase") == "codes"]
    codes = [d["tokens_done"] for d in lm_details]
    assert codes and codes == sorted(set(codes)) and all(d["tokens_expected"] for d in lm_details), codes
    last_lm = max(i for i, e in enumerate(events) if e["phase"] == "lm")
    dit = [i for i, e in enumerate(events) if e["phase"] == "dit"]
    assert len(dit) >= 2 and min(dit) > last_lm  # then the DiT's steps, then done

    status = client.get(task["status_url"]).json()
    assert status["phase"] == "done" and status["finished"] and status["progress"] == 1.0
    data, rate, media = _read_audio(client, status["result"]["audios"][0]["url"])
    assert media == "audio/flac" and rate == 48000 and data.shape[1] == 2


def test_v1_uploads_multipart_and_base64(client):
    source = _wav_bytes(12.0)
    request = {**SONG, "task_type": "cover", "thinking": False, "audio_format": "wav"}
    response = client.post("/v1/generate", data={"request": json.dumps(request)},
                           files={"src_audio": ("song.wav", source, "audio/wav")})
    assert response.status_code == 200, response.text
    data, rate, _ = _read_audio(client, response.json()["audios"][0]["url"])
    assert rate == 48000 and abs(data.shape[0] / rate - 12.0) < 0.5, "cover follows the uploaded source's length"
    body = {**SONG, "thinking": False, "reference_audio_base64": base64.b64encode(_wav_bytes(4.0)).decode()}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text


def test_handle_generate_matches_generate_music(serve_app, turbo_handler):
    from ray import serve

    from acestep.inference import GenerationConfig, GenerationParams, GenerationResult, generate_music

    params = GenerationParams(caption="a short drum loop", duration=10, inference_steps=2, thinking=False,
                              use_cot_metas=False, use_cot_caption=False, use_cot_language=False)
    config = GenerationConfig(batch_size=1, use_random_seed=False, seeds=[7], audio_format="wav")
    handle = serve.get_app_handle(serve_app.name)
    result = handle.generate.remote(params, config).result(timeout_s=300)
    local = generate_music(turbo_handler, None, params, config)
    assert isinstance(result, GenerationResult) and result.success, result.error
    assert local.success, local.error
    assert len(result.audios) == len(local.audios) == 1
    served, direct = result.audios[0], local.audios[0]
    assert set(direct) - {"silent"} <= set(served)
    assert served["key"] == direct["key"] and served["params"]["seed"] == 7
    assert served["tensor"].shape == direct["tensor"].shape
    assert np.allclose(served["tensor"].numpy(), direct["tensor"].numpy(), atol=1e-4)
    # the stored file as it is (what GET /v1/audio serves); without tensors nothing is decoded
    fetch = lambda: httpx.get(serve_app.url + served["url"], headers=serve_app.headers, timeout=60).content  # noqa: E731
    assert served["bytes"] == fetch()
    bare = handle.generate.remote(params, config, include_tensors=False).result(timeout_s=300)
    assert bare.audios[0]["tensor"] is None and bare.audios[0]["bytes"] == fetch()  # the same key, written again
    # the deployments behind the ingress are reachable by name too
    lm = serve.get_deployment_handle("LMDeployment", app_name=serve_app.name)
    assert lm.info.remote().result(timeout_s=30)["enabled"] is True
    # bad input comes back in the result, as generate_music does
    bad = handle.generate.remote(GenerationParams(bpm=5), config).result(timeout_s=60)
    assert not bad.success and "bpm" in bad.error


def test_eight_concurrent_thinking_requests_share_the_lm_engine_and_dit_forwards(serve_app):
    """The normal case: the LM writes each song's plan, so no two songs have the same caption or
    length; they still share LM decode steps and DiT forwards."""
    from ray import serve

    def fresh_stats():  # from the replicas (GET /v1/stats shows the ingress's view, up to 2 s old)
        return {name: serve.get_deployment_handle(deployment, app_name=serve_app.name).stats.remote().result(timeout_s=60)
                for name, deployment in (("lm", "LMDeployment"), ("dit", "DiTDeployment"))}

    start = fresh_stats()
    # each replica's memory (what /v1/stats shows under data.serve): on the CPU its process's RSS only
    assert [(s["device_memory"]["device"], s["device_memory"]["reserved_bytes"], s["device_memory"]["process_rss_bytes"] > 0)
            for s in start.values()] == [("cpu", None, True)] * 2
    before, steps_before = start["dit"]["worker"]["items_per_forward"], start["lm"]["engine"]["rows_per_step"]

    async def run():
        async with httpx.AsyncClient(base_url=serve_app.url, timeout=600, headers=serve_app.headers) as http:
            bodies = [{**SONG, "caption": f"song number {i}", "duration": 10 + 2 * i, "inference_steps": 8,
                       "thinking": True, "audio_format": "flac"} for i in range(8)]
            return await asyncio.gather(*(http.post("/v1/generate", json=b) for b in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    lengths = set()
    with httpx.Client(base_url=serve_app.url, headers=serve_app.headers) as http:
        for response in responses:
            data, _, _ = _read_audio(http, response.json()["audios"][0]["url"])
            lengths.add(data.shape[0])

    seen = []

    def idle():  # the worker's counters drop just after it hands back the last result: a bounded wait
        seen.append(fresh_stats())
        engine, worker = seen[-1]["lm"]["engine"], seen[-1]["dit"]["worker"]
        return engine["rows_in_use"] == engine["waiting"] == worker["running"] == worker["waiting"] == 0

    _wait_for(idle, timeout_s=60.0)  # fails the test when the LM engine or DiT worker never empties
    engine, worker = seen[-1]["lm"]["engine"], seen[-1]["dit"]["worker"]
    assert len(lengths) > 1, "the songs differ in length"
    # this test's own LM steps (the counters are the replica's since it started): several requests'
    # CFG pairs decoded in one step
    steps = {int(k): v - steps_before.get(k, 0) for k, v in engine["rows_per_step"].items()}
    assert max(k for k, v in steps.items() if v > 0) > 2, (steps, engine)
    shared = {int(k): v - before.get(k, 0) for k, v in worker["items_per_forward"].items()}
    assert max(k for k, v in shared.items() if v > 0) > 1, worker  # songs of different lengths in one forward


def test_lm_deployment_requests_joining_mid_decode_get_their_solo_plans(serve_app):
    """Through the Serve LM deployment: 10 requests (CoT + codes, CFG and constraints on) joining the
    engine while a long request decodes get exactly the plans they get alone."""
    from ray import serve

    from acestep.inference import GenerationConfig, GenerationParams
    from serve.deployments import PlanRequest

    lm = serve.get_deployment_handle("LMDeployment", app_name=serve_app.name)
    config = GenerationConfig(batch_size=1)

    def job(name, seed, duration):
        params = GenerationParams(caption=f"{name} song", lyrics="[verse]\nla", duration=duration)
        return PlanRequest(f"join-{name}-{seed}", params, config, [seed])

    def key(outcome):
        return [(p.metadata, p.audio_codes) for p in outcome.plans]

    jobs = [job("joiner", seed, 10) for seed in range(10)]
    solo = [key(lm.plan.remote(j).result(timeout_s=300)) for j in jobs]
    long = lm.plan.remote(job("long", 99, 120))
    _wait_for(lambda: lm.stats.remote().result()["engine"]["running"] >= 1)
    joined = [lm.plan.remote(j) for j in jobs]
    assert [key(r.result(timeout_s=300)) for r in joined] == solo
    assert long.result(timeout_s=300).plans[0].audio_codes.count("<|audio_code_") == 600


def test_deleting_a_task_frees_its_lm_rows(client, serve_app):
    from ray import serve

    lm = serve.get_deployment_handle("LMDeployment", app_name=serve_app.name)
    engine = lambda: lm.stats.remote().result()["engine"]  # noqa: E731
    before = engine()
    task = client.post("/v1/tasks", json={**SONG, "duration": 240, "thinking": True}).json()
    _wait_for(lambda: (client.get(task["status_url"]).json().get("detail") or {}).get("tokens_done", 0) > 0)
    response = client.delete(task["status_url"])
    assert response.status_code == 200, response.text
    assert response.json()["phase"] == "failed" and response.json()["error"] == "cancelled"
    # the engine is empty again, and the 1200-token codes request never finished: it was aborted in
    # the engine, or (cancelled between the two phases) never admitted
    _wait_for(lambda: (lambda e: e["rows_in_use"] == e["running"] == e["waiting"] == 0)(engine()))
    after = engine()
    assert after["requests_finished"] - before["requests_finished"] <= 1  # the CoT request at most
    assert after["requests_aborted"] - before["requests_aborted"] <= 1
    assert client.delete(task["status_url"]).status_code == 409
    assert client.delete("/v1/tasks/nope").status_code == 404


def _wait_for(condition, timeout_s=120.0):
    """Poll a condition with a generous bound (it guards against hangs; no timing is asserted)."""
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition never held"
        time.sleep(0.05)


def test_serve_status_shows_each_deployments_bounds(serve_app):
    from ray import serve
    from ray.serve.context import _get_global_client

    app_status = serve.status().applications[serve_app.name]
    assert app_status.status == "RUNNING"
    expected = {"Ingress": serve_app.config.ingress, "LMDeployment": serve_app.config.lm,
                "DiTDeployment": serve_app.config.dit, "DiTDeployment-acestep-v15-base": serve_app.config.dit}
    assert set(app_status.deployments) == set(expected)
    details = _get_global_client().get_serve_details()["applications"][serve_app.name]["deployments"]
    bounds = set()
    for name, settings in expected.items():
        scaling = settings.deployment.autoscaling_config
        running = app_status.deployments[name].replica_states.get("RUNNING", 0)
        assert scaling.min_replicas <= running <= scaling.max_replicas
        deployed = details[name]["deployment_config"]
        assert deployed["autoscaling_config"]["min_replicas"] == scaling.min_replicas
        assert deployed["autoscaling_config"]["max_replicas"] == scaling.max_replicas
        assert deployed["max_ongoing_requests"] == settings.deployment.max_ongoing_requests
        assert deployed["max_queued_requests"] == settings.deployment.max_queued_requests
        assert deployed["ray_actor_options"]["num_cpus"] == settings.deployment.ray_actor_options.num_cpus
        bounds.add((scaling.min_replicas, scaling.max_replicas, settings.deployment.max_ongoing_requests))
    assert len(bounds) == 3, "each deployment has its own bounds in serve_config.yaml"


BAD_INPUTS = [
    ("/v1/generate", {"bpm": 500}, 422, "bpm", "30 to 300"),
    ("/v1/generate", {"duration": 5000}, 422, "duration", "600"),
    ("/v1/generate", {"batch_size": 99}, 422, "batch_size", "1 to 8"),
    ("/v1/generate", {"audio_format": "aiff"}, 422, "audio_format", "flac"),
    ("/v1/generate", {"bpm": "fast"}, 422, "bpm", "integer"),
    ("/v1/generate", {"captoin": "typo"}, 422, "captoin", "Extra inputs"),
    ("/v1/generate", {"src_audio": "/etc/passwd", "task_type": "cover"}, 400, "src_audio", "path"),
    ("/v1/generate", {"src_audio_base64": "@@notbase64@@"}, 422, "src_audio_base64", "base64"),
    ("/v1/generate", {"src_audio_base64": base64.b64encode(b"not audio").decode()}, 422, "src_audio", "audio"),
    ("/v1/generate", {"task_type": "repaint"}, 422, "src_audio", "required"),
    ("/v1/tasks", {"inference_steps": 0}, 422, "inference_steps", "1 to 200"),
    ("/v1/tasks", {"shift": 0}, 422, "shift", "1.0 to 5.0"),
    ("/v1/tasks", {"dcw_mode": "mid"}, 422, "dcw_mode", "double"),
    ("/v1/tasks", {"dcw_scaler": 0.5}, 422, "dcw_scaler", "0.0 to 0.1"),
    ("/v1/tasks", {"sampler_mode": "heun", "infer_method": "sde"}, 422, "sampler_mode", "euler"),
    ("/v1/tasks", {"repaint_mode": "wild"}, 422, "repaint_mode", "balanced"),
    ("/v1/tasks", {"fade_in_duration": 11}, 422, "fade_in_duration", "0.0 to 10.0"),
    ("/v1/tasks", {"latent_rescale": 2}, 422, "latent_rescale", "0.5 to 1.5"),
    ("/v1/tasks", {"retake_seed": "1,x"}, 422, "retake_seed", "commas"),
    ("/v1/tasks", {"inference_steps": 12}, 422, "inference_steps", "1 to 8 on acestep-v15-turbo"),
    ("/v1/tasks", {"priority": "urgent"}, 422, "priority", "'high'"),
    ("/v1/tasks", {"priority": "high"}, 422, "priority", "allowed: low, normal"),
    ("/release_task", {"prompt": "x", "dcw_high_scaler": "0.5"}, 422, "dcw_high_scaler", "0.0 to 0.1"),
    ("/release_task", {"prompt": "x", "bpm": "fast"}, 422, "bpm", "integer"),
    ("/release_task", {"prompt": "x", "src_audio_path": "/etc/passwd"}, 400, "src_audio_path", "path"),
    ("/release_task", {"prompt": "x", "batch_size": 50}, 422, "batch_size", "1 to 8"),
    ("/v1/understand", {"audio_codes": ""}, 422, "audio_codes", "at least 1"),
    ("/v1/create_sample", {"query": "x", "temperature": 9}, 422, "temperature", "less than or equal"),
]


@pytest.mark.parametrize("path,body,status,field,hint", BAD_INPUTS, ids=[f"{p}:{f}" for p, _, _, f, _ in BAD_INPUTS])
def test_bad_input_gets_4xx_naming_the_field(client, path, body, status, field, hint):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(field in str(item["loc"]) for item in detail), detail
    assert hint in json.dumps(detail), detail


def test_malformed_bodies_and_unknown_ids_are_4xx(client):
    nan = client.post("/v1/generate", content=b'{"guidance_scale": NaN}', headers={"content-type": "application/json"})
    assert nan.status_code == 422 and "guidance_scale" in nan.text
    assert client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/generate", json=[1, 2]).status_code == 400
    assert client.get("/v1/tasks/nope").status_code == 404
    assert client.get("/v1/tasks/nope/events").status_code == 404
    assert client.get("/v1/audio/nope.flac").status_code == 404


def test_lm_helpers_info_and_docs(client):
    sample = client.post("/v1/create_sample", json={"query": "a quiet folk song", "temperature": 0.85})
    assert sample.status_code == 200, sample.text
    assert {"caption", "lyrics", "bpm", "duration", "success"} <= set(sample.json())
    formatted = client.post("/v1/format_sample", json={"caption": "latin pop", "lyrics": "[verse]\nhola",
                                                       "user_metadata": {"bpm": 95}})
    assert formatted.status_code == 200, formatted.text
    understood = client.post("/v1/understand", json={"audio_codes": "<|audio_code_1|><|audio_code_2|>" * 10})
    assert understood.status_code == 200, understood.text
    models = client.get("/v1/info").json()
    assert models["default_model"] == "acestep-v15-turbo" and models["lm"]["enabled"]
    assert client.get("/docs").status_code == 200
    openapi = client.get("/openapi.json")
    assert openapi.status_code == 200, openapi.text
    paths = openapi.json()["paths"]
    for path in ("/v1/generate", "/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/events", "/release_task",
                 "/query_result", "/v1/audio/{key}", "/v1/understand", "/v1/create_sample", "/v1/format_sample"):
        assert path in paths


def test_every_route_group_answers_on_a_replica(client):
    """The routes the ingress inherits from groups in other modules (studio, adapters, the official
    dialect) get their injected ``self`` in the replica too, as the native ones do."""
    for method, path, body in (("get", "/v1/task_types", None), ("get", "/studio", None),
                               ("get", "/v1/adapters", None), ("get", "/v1/lora/status", None),
                               ("post", "/query_result", {"task_id_list": ["nope"]}),
                               ("post", "/create_random_sample", {}), ("get", "/v1/info", None)):
        response = client.request(method, path, json=body)
        assert response.status_code == 200, (path, response.text)
    tasks = {t["task_type"]: t for t in client.get("/v1/task_types").json()["tasks"]}
    assert len(tasks) == 8 and tasks["cover-nofsq"]["servable"] and tasks["cover-nofsq"]["needs_source"]


def test_lm_helpers_take_a_served_lm_by_name(client):
    sample = client.post("/v1/create_sample", json={"query": "a quiet folk song", "lm_model": "acestep-5Hz-lm-0.6B"})
    assert sample.status_code == 200, sample.text
    refused = client.post("/v1/create_sample", json={"query": "a quiet folk song", "lm_model": "../lm"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "lm_model"


# Groups sharing this module's app.
from tests.serve.app_stems import (  # noqa: E402,F401
    source_b64,
    test_a_tracks_value_of_the_wrong_type_is_a_422_naming_tracks,
    test_an_async_multipart_task_takes_the_dual_track_preset,
    test_bad_tracks_get_422_naming_tracks_and_the_allowed_names,
    test_one_request_gives_each_track_labelled_in_order,
    test_task_types_say_what_a_chosen_dit_can_serve,
)
from tests.serve.app_official import (  # noqa: E402,F401
    http,
    test_allow_listed_file_is_read_like_an_upload,
    test_bad_values_are_refused_naming_the_field_as_sent_with_the_one_sampling_rule,
    test_chat_completions_input_audio_is_the_cover_source,
    test_chat_completions_refusals_are_4xx_and_keys_apply,
    test_chat_completions_stream_description_in_sample_mode,
    test_chat_completions_tagged_prompt_returns_markdown_and_audio,
    test_client_paths_outside_the_allowed_directory_are_refused,
    test_format_input_random_sample_and_init_take_json_and_form,
    test_full_analysis_extract_codes_and_analysis_only,
    test_query_result_known_unknown_and_missing_ids_in_order,
    test_release_task_form_and_multipart,
    test_release_task_json_then_download_base_plus_file,
    test_service_routes_answer_in_the_official_shapes,
)
from tests.serve.app_extend import (  # noqa: E402,F401
    extend_source_b64,
    test_an_extension_needs_a_source_and_the_schema_states_the_range,
    test_bad_extensions_are_422_naming_the_field,
    test_generate_extends_the_upload_with_the_lm_planning_the_new_part,
)
from tests.serve.app_webhooks import (  # noqa: E402,F401
    hook,
    test_native_and_release_tasks_are_delivered_once_signed,
    test_refused_webhook_urls_are_422_naming_the_field,
)
from tests.serve.app_fair import test_a_keys_flood_does_not_hold_back_another_keys_song  # noqa: E402,F401
from tests.serve.app_upload import (  # noqa: E402,F401
    test_a_failing_upload_url_leaves_the_task_done_with_the_error_recorded,
    test_native_and_release_tasks_put_each_audio_to_its_url,
    test_upload_urls_that_do_not_fit_the_task_are_422_naming_the_field,
)
from tests.serve.app_stream import (  # noqa: E402,F401
    streamed,
    test_a_60s_song_plays_before_its_task_is_done_and_streams_the_files_length,
    test_chat_stream_sends_the_song_as_it_decodes_then_the_file,
    test_stream_refusals_name_the_field,
    test_the_stream_as_events_carries_the_same_bytes_and_resumes,
)
