"""The Serve app under hostile clients: keys on every route, hostile input → 4xx naming the field,
an OpenAPI fuzz run with no server errors; and the app's metrics and logs (tests/serve/app_metrics.py).
Real local Ray, demo checkpoints, real HTTP.

The app here has small bounds (see ``hard_app``) so that refusals are cheap to reach on 2 cores;
``tests/serve/test_resilience.py`` kills replicas and overloads its own app.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from acestep.checkpoints.demo_lora import write_demo_lora
from tests.serve.conftest import deployed_app
from tests.serve.test_uploads import HOSTILE

MAX_UPLOAD_MB = 2
SONG = {"caption": "soft piano", "duration": 10, "inference_steps": 2, "batch_size": 1, "thinking": False}


@pytest.fixture(scope="module")
def hard_app(demo_root, tmp_path_factory):
    """Small bounds, a short LM context, adapters "warm" and "bright" with one loaded at a time (an
    eviction for the metrics), workers reporting metrics every second (the LM holds KV rows for a few
    seconds only, less than Ray's default 10 s report interval)."""
    adapters = tmp_path_factory.mktemp("hard-adapters")
    for seed, name in enumerate(("warm", "bright"), start=1):
        write_demo_lora(adapters / name, seed=seed)
    # A short LM context (the smallest allowed is 256): the demo LM's random weights never stop on
    # their own, so the sampling, analysis and format routes decode to the context's end; hostile
    # prompts must still meet a 4xx where they do not fit.
    yield from deployed_app(demo_root, tmp_path_factory.mktemp("hard-state"), metrics_report_ms=1000,
                            dit={"adapters": {"dir": str(adapters), "max_loaded": 1}},
                            lm={"engine": {"max_model_len": 1024}},
                            ingress={"max_upload_mb": MAX_UPLOAD_MB, "max_unfinished_tasks": 16,
                                     "max_sync_requests": 2, "request_timeout_s": 120})


@pytest.fixture(scope="module")
def http(hard_app):
    with httpx.Client(base_url=hard_app.url, timeout=120, headers=hard_app.headers) as client:
        yield client


# -- keys -------------------------------------------------------------------------------------------

OFFICIAL = [("POST", "/release_task"), ("POST", "/query_result")]
PUBLIC = {"/health", "/ready"}


def _operations(http):
    spec = http.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method in methods:
            yield method.upper(), path.replace("{task_id}", "x" * 32).replace("{key}", "nope.flac")


def test_every_route_needs_a_key(hard_app, http):
    operations = sorted(set(_operations(http)) | set(OFFICIAL))
    assert len(operations) >= 14
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": "Bearer"},
                   {"Authorization": f"Basic {hard_app.keys['default']}"},
                   {"Authorization": f"Bearer {hard_app.keys['default']}x"}]
    seen = []
    with httpx.Client(base_url=hard_app.url, timeout=30) as anonymous:
        for method, path in operations:
            for headers in bad_headers:
                response = anonymous.request(method, path, headers=headers, json={})
                seen.append(response)
                expected = 200 if path in PUBLIC else 401
                assert response.status_code == expected, (method, path, headers, response.text)
            if path not in PUBLIC:
                assert response.json()["detail"][0]["type"] == "unauthorized"
                assert response.headers["www-authenticate"].lower().startswith("bearer")
        for variant in ("/v1/models/", "//v1/models", "/V1/MODELS", "/v1//models", "/v1/models%2F"):
            response = anonymous.get(variant)
            seen.append(response)
            assert response.status_code in (401, 404), (variant, response.status_code)
        for name in ("alice", "bob"):  # the keys file's keys work too
            assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {hard_app.keys[name]}"}).is_success
        _assert_no_key_leaks(hard_app, seen)


def test_ai_token_counts_on_the_official_routes_only(hard_app):
    key = hard_app.keys["default"]
    with httpx.Client(base_url=hard_app.url, timeout=30) as anonymous:
        official = anonymous.post("/query_result", json={"ai_token": key, "task_id_list": ["nope"]})
        assert official.status_code == 200 and official.json()["data"][0]["task_id"] == "nope", official.text
        form = anonymous.post("/query_result", data={"ai_token": key, "task_id_list": '["nope"]'})
        assert form.status_code == 200 and form.json()["data"][0]["status"] == 2, form.text  # unknown id: failed
        wrong = anonymous.post("/query_result", json={"ai_token": "nope", "task_id_list": ["nope"]})
        assert wrong.status_code == 401
        native = anonymous.post("/v1/tasks", json={"ai_token": key, **SONG})
        assert native.status_code == 401
        _assert_no_key_leaks(hard_app, [official, form, wrong, native])


def _assert_no_key_leaks(hard_app, responses):
    import ray

    secrets_ = list(hard_app.keys.values())
    for response in responses:
        text = response.text + json.dumps(dict(response.headers))
        assert not any(secret in text for secret in secrets_), response.request.url
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 64 << 20:
            content = path.read_bytes()
            assert not any(secret.encode() in content for secret in secrets_), f"a key is in {path.name}"


# -- hostile input ----------------------------------------------------------------------------------

_JSON = {"content-type": "application/json"}
_DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_BODIES = [
    # (name, path, content, headers, status, field or None)
    ("invalid utf-8 value", "/v1/tasks", b'{"caption": "a\xff\xfeb"}', _JSON, 422, "caption"),
    ("invalid utf-8 key", "/v1/generate", b'{"capt\xffion": "x"}', _JSON, 422, None),
    ("lone surrogate", "/v1/tasks", b'{"lyrics": "\\ud800 la la"}', _JSON, 422, "lyrics"),
    ("surrogate in official json", "/release_task", b'{"prompt": "\\udfff"}', _JSON, 422, "prompt"),
    ("deep nesting", "/v1/generate", _DEEP, _JSON, 422, None),
    ("deep nesting official", "/release_task", b'{"a": ' + _DEEP + b"}", _JSON, 422, None),
    ("huge integer", "/v1/generate", b'{"bpm": ' + b"9" * 100_000 + b"}", _JSON, 422, None),
    ("huge integer official", "/release_task", b'{"bpm": ' + b"9" * 100_000 + b"}", _JSON, 422, None),
    ("NaN", "/v1/tasks", b'{"guidance_scale": NaN}', _JSON, 422, "guidance_scale"),
    ("Infinity", "/v1/tasks", b'{"shift": Infinity}', _JSON, 422, "shift"),
    ("-Infinity", "/v1/tasks", b'{"shift": -Infinity}', _JSON, 422, "shift"),
    ("1e309", "/v1/tasks", b'{"duration": 1e309}', _JSON, 422, "duration"),
    ("long language", "/v1/tasks", json.dumps({"vocal_language": "x" * 10_000}).encode(), _JSON, 422, "vocal_language"),
    ("long keyscale", "/v1/tasks", json.dumps({"keyscale": "C" * 10_000}).encode(), _JSON, 422, "keyscale"),
    ("bad keyscale", "/v1/tasks", json.dumps({"keyscale": "H major"}).encode(), _JSON, 422, "keyscale"),
    ("long timesignature", "/v1/tasks", json.dumps({"timesignature": "4" * 10_000}).encode(), _JSON, 422,
     "timesignature"),
    ("long caption", "/v1/tasks", json.dumps({"caption": "c" * 200_000}).encode(), _JSON, 422, "caption"),
    ("long lyrics", "/v1/tasks", json.dumps({"lyrics": "l" * 500_000}).encode(), _JSON, 422, "lyrics"),
    ("text/plain", "/v1/tasks", json.dumps(SONG).encode(), {"content-type": "text/plain"}, 415, None),
    ("no content type", "/v1/understand", b'{"audio_codes": "x"}', {}, 415, None),
    ("form on a json route", "/v1/format_sample", b"caption=x", {"content-type": "application/x-www-form-urlencoded"},
     415, None),
    ("empty body", "/v1/tasks", b"", _JSON, 400, None),
    ("json array", "/v1/generate", b"[1, 2]", _JSON, 400, None),
    ("over 1 MiB", "/v1/understand", b'{"audio_codes": "' + b"x" * (2 << 20) + b'"}', _JSON, 413, None),
    ("over the upload limit", "/v1/tasks", b'{"src_audio_base64": "' + b"A" * (12 << 20) + b'"}', _JSON, 413, None),
    # an upload route's body may reach two uploads' size, but only inside the base64 upload values
    ("JSON over 1 MiB on an upload route", "/v1/tasks", b'{"caption": "' + b"c" * (3 << 20) + b'"}', _JSON, 413,
     "body"),
    ("official JSON over 1 MiB", "/release_task", b'{"prompt": "' + b"p" * (3 << 20) + b'"}', _JSON, 413, "body"),
]


@pytest.mark.parametrize("name,path,content,headers,status,field", HOSTILE_BODIES, ids=[c[0] for c in HOSTILE_BODIES])
def test_hostile_bodies_get_a_4xx_naming_the_field(http, name, path, content, headers, status, field):
    response = http.post(path, content=content, headers=headers)
    assert response.status_code == status, (name, response.status_code, response.text[:500])
    assert len(response.content) < 4096, "errors never echo the input"
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail[0]["msg"]
    if field is not None:
        assert field in detail[0]["loc"], detail


_UPLOADS = {name: case for name, case in HOSTILE.items() if name != "empty"}


@pytest.mark.parametrize("name", sorted(_UPLOADS))
def test_hostile_uploads_get_422_invalid_audio(http, name):
    data, status, code = _UPLOADS[name]
    status = 413 if len(data) > MAX_UPLOAD_MB * 2**20 else status
    body = {**SONG, "task_type": "cover"}
    as_b64 = http.post("/v1/tasks", json={**body, "src_audio_base64": base64.b64encode(data).decode()})
    as_file = http.post("/v1/tasks", data={"request": json.dumps(body)}, files={"src_audio": ("x.wav", data)})
    official = http.post("/release_task", data={"prompt": "x", "task_type": "cover"}, files={"ctx_audio": ("a", data)})
    for response, field in ((as_b64, "src_audio_base64"), (as_file, "src_audio"), (official, None)):
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        item = response.json()["detail"][0]
        assert item["type"] == (code if status == 422 else "too_large"), item
        if status == 422 and field is not None:  # (a body over the route's size is refused before parsing)
            assert item["loc"][-1] == field, item  # the field as the client sent it


def test_an_empty_upload_is_refused(http):
    response = http.post("/v1/tasks", data={"request": json.dumps({**SONG, "task_type": "cover"})},
                         files={"src_audio": ("x.wav", b"")})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "invalid_audio"


# -- idempotency, ranges --------------------------------------------------------------------------

def test_idempotency_key_gives_the_same_task_and_409_for_another_body(http):
    first = http.post("/v1/tasks", json=SONG, headers={"Idempotency-Key": "song-1"})
    again = http.post("/v1/tasks", json=SONG, headers={"Idempotency-Key": "song-1"})
    other = http.post("/v1/tasks", json={**SONG, "caption": "loud drums"}, headers={"Idempotency-Key": "song-1"})
    assert first.status_code == again.status_code == 202, first.text
    assert first.json()["task_id"] == again.json()["task_id"]
    assert other.status_code == 409 and other.json()["detail"][0]["type"] == "conflict"
    assert http.post("/v1/tasks", json=SONG, headers={"Idempotency-Key": "x" * 300}).status_code == 400
    form = {"files": {"request": (None, json.dumps(SONG))}, "headers": {"Idempotency-Key": "song-2"}}
    as_form = http.post("/v1/tasks", **form)
    assert as_form.status_code == 202, as_form.text  # multipart bodies are digested too
    assert http.post("/v1/tasks", **form).json()["task_id"] == as_form.json()["task_id"]


def test_audio_is_streamed_from_the_store_with_ranges(http):
    result = http.post("/v1/generate", json={**SONG, "audio_format": "wav"})
    assert result.status_code == 200, result.text
    url = result.json()["audios"][0]["url"]
    whole = http.get(url)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    part = http.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == whole.content[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(whole.content)}"
    tail = http.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    assert http.get(url, headers={"Range": f"bytes={len(whole.content) + 5}-"}).status_code == 416


# -- metrics and logs (the group's traffic first: the fuzz below leaves tasks running) --------------

from tests.serve.app_metrics import (  # noqa: E402,F401
    test_each_metric_family_has_a_nonzero_sample,
    test_json_logs_carry_request_and_task_ids_and_phase_durations,
    test_the_dashboard_has_one_panel_per_family_with_fitting_queries,
    traffic,
)

# -- fuzzing ----------------------------------------------------------------------------------------

def test_openapi_fuzz_finds_no_server_error(hard_app):
    """schemathesis over every operation of /openapi.json (seeded, bounded examples per operation,
    each distinct request sent once): no 5xx, every response in its documented schema. Last in the module: the tasks it starts keep
    the app busy afterwards."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{hard_app.url}/openapi.json", headers=hard_app.headers)
    failures, operations, calls, sent = [], 0, [], set()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @hypothesis.settings(max_examples=3, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def run(case):
            # hypothesis may draw the same request twice (the empty body, say); once is enough
            # for both checks, and on the rendering routes a repeat costs a whole song
            request = repr((case.operation.method, case.operation.path, case.path_parameters, case.query,
                            case.headers, case.cookies, case.media_type, case.body))
            if request in sent:
                return
            sent.add(request)
            calls.append((case.operation.method, case.operation.path))
            case.call_and_validate(headers=hard_app.headers, timeout=120,
                                   checks=[not_a_server_error, response_schema_conformance])

        try:
            run()
        except Exception as error:  # collect all operations' failures, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {str(error)[:400]}")
    assert operations >= 14 and len(set(calls)) == operations, "every operation got generated requests"
    assert len(calls) > operations  # operations without parameters get one distinct example
    assert not failures, "\n".join(failures)
