"""The request guard and the safe JSON parser, without Ray.

A small FastAPI app mirroring the real routes is wrapped in ``Guard`` and driven through
Starlette's TestClient; the Content-Length and chunked cases go through real HTTP (uvicorn on a
free port in a thread), and the "never read the body" cases call the middleware with a
recording ``receive``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile
from starlette.testclient import TestClient

from serve.edge.errors import APIError, FieldError
from serve.edge.guard import (Guard, GuardSettings, KeyRing, bearer_token, body_limit, check_content_type,
                         declared_length, find_ai_token)
from serve.edge.safejson import check_text, nesting_depth, parse_json

KEY = "k-alice-0123456789abcdef"
BOB_KEY = "k-bob-fedcba9876543210"
UNAUTHORIZED = {"detail": [{"loc": ["header", "authorization"], "msg": "missing or invalid API key",
                            "type": "unauthorized"}]}
CALLS: list = []


def build_app(settings: GuardSettings) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(APIError, lambda request, error: error.response())

    @app.get("/health")
    @app.get("/ready")
    async def health(request: Request):
        return {"ok": True, "key_name": request.state.key_name}

    @app.get("/v1/models")
    async def models(request: Request):
        CALLS.append("/v1/models")
        return {"key_name": request.state.key_name}

    @app.post("/v1/understand")
    async def understand(request: Request):
        CALLS.append("/v1/understand")
        return {"key_name": request.state.key_name, "body": parse_json(await request.body())}

    @app.post("/v1/tasks")
    async def tasks(request: Request):
        CALLS.append("/v1/tasks")
        return {"key_name": request.state.key_name, "size": len(await request.body())}

    @app.post("/release_task")
    @app.post("/query_result")
    async def official(request: Request):
        CALLS.append(request.url.path)
        media = request.headers.get("content-type", "").split(";")[0]
        if media.startswith("multipart/") or media == "application/x-www-form-urlencoded":
            form = await request.form()
            fields = {name: (len(await value.read()) if isinstance(value, UploadFile) else value)
                      for name, value in form.multi_items()}
        else:
            fields = parse_json(await request.body() or b"{}")
        return {"key_name": request.state.key_name, "fields": fields}

    app.add_middleware(Guard, settings=settings)
    return app


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# who may call\n\nalice:{KEY}\n  bob : {BOB_KEY}  \n")
    return str(path)


@pytest.fixture(scope="module")
def settings(keys_file):
    return GuardSettings(keys=KeyRing.load(keys_file=keys_file, env={}), json_limit=4096, upload_limit=3000)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(build_app(settings), follow_redirects=False) as client:
        yield client


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- KeyRing ---------------------------------------------------------------------------------------


def test_keyring_loads_names_and_stores_only_digests(keys_file):
    ring = KeyRing.load(api_key="k-default-secret", keys_file=keys_file, env={"ACESTEP_API_KEY": "ignored"})
    assert ring.enabled and ring.names == ["default", "alice", "bob"]
    assert ring.identify("k-default-secret") == "default"
    assert ring.identify(KEY) == "alice" and ring.identify(BOB_KEY.encode()) == "bob"
    assert ring.identify("ignored") is None and ring.identify("") is None and ring.identify(KEY + "x") is None
    for secret in ("k-default-secret", KEY, BOB_KEY):
        assert secret not in repr(ring) and secret not in repr(vars(ring))


def test_keyring_from_env_and_disabled():
    assert KeyRing.load(env={"ACESTEP_API_KEY": "from-env"}).identify("from-env") == "default"
    ring = KeyRing.load(env={})
    assert not ring.enabled and ring.identify("anything") is None


@pytest.mark.parametrize("text, reason", [
    ("alice:k1\nnot-a-pair\n", "line 2"),
    ("# c\nalice:\n", "line 2"),
    ("alice:k1\n:k2\n", "line 2"),
    ("alice:k1\nalice:k2\n", "line 2: duplicate key name 'alice'"),
    ("alice:k1\nbob:k1\n", "line 2"),
    ("bad name:k1\n", "line 1"),
])
def test_keyring_file_errors_name_the_line_never_the_key(tmp_path, text, reason):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=reason) as error:
        KeyRing.load(keys_file=str(path), env={})
    assert "k1" not in str(error.value) and "k2" not in str(error.value)


def test_keyring_refuses_empty_keys_and_duplicate_default(tmp_path):
    for api_key in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            KeyRing.load(api_key=api_key, env={})
    with pytest.raises(ValueError, match="empty"):
        KeyRing.load(env={"ACESTEP_API_KEY": ""})
    path = tmp_path / "keys.txt"
    path.write_text("default:k2\n")
    with pytest.raises(ValueError, match="duplicate"):
        KeyRing.load(api_key="k1", keys_file=str(path), env={})


# -- pure decisions --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, token", [
    (b"Bearer abc", b"abc"), (b"bearer abc", b"abc"), (b"BEARER  abc ", b"abc"),
    (b"Bearer", None), (b"Bearer ", None), (b"", None), (b"Basic abc", None), (b"Bearer a b", None),
])
def test_bearer_token(value, token):
    assert bearer_token([(b"authorization", value)]) == token
    assert bearer_token([(b"authorization", b"Bearer x"), (b"authorization", b"Bearer y")]) is None


def test_body_limit_and_declared_length(settings):
    assert body_limit(settings, "/v1/understand") == 4096
    assert body_limit(settings, "/v1/tasks") == body_limit(settings, "/release_task") == 4096 + 2 * 4000
    assert body_limit(GuardSettings(), "/v1/generate") == (1 << 20) + 2 * -(-(50 << 20) * 4 // 3)
    assert declared_length([]) is None and declared_length([(b"content-length", b"12")]) == 12
    for bad in ([(b"content-length", b"-1")], [(b"content-length", b"1e3")], [(b"content-length", b"")],
                [(b"content-length", b"1"), (b"content-length", b"2")]):
        with pytest.raises(Exception) as error:
            declared_length(bad)
        assert error.value.status_code == 400


@pytest.mark.parametrize("path, media, ok", [
    ("/v1/understand", "application/json", True), ("/v1/understand", "application/json; charset=utf-8", True),
    ("/v1/understand", "application/vnd.api+json", True), ("/v1/understand", "text/plain", False),
    ("/v1/understand", None, False), ("/v1/understand", "multipart/form-data; boundary=x", False),
    ("/v1/understand", "application/x-www-form-urlencoded", False), ("/v1/understand", "+json", False),
    ("/v1/tasks", "multipart/form-data; boundary=x", True), ("/v1/tasks", "text/plain", False),
    ("/release_task", "text/plain", True), ("/release_task", None, True),
])
def test_check_content_type(settings, path, media, ok):
    headers = [] if media is None else [(b"content-type", media.encode())]
    if ok:
        check_content_type(settings, path, headers)
    else:
        with pytest.raises(Exception) as error:
            check_content_type(settings, path, headers)
        assert error.value.status_code == 415 and error.value.code == "unsupported_media_type"
        assert "application/json" in error.value.message


def test_find_ai_token_reads_json_form_and_multipart():
    assert find_ai_token("application/json", b'{"ai_token": "t1", "n": ' + b"9" * 10000 + b"}") == "t1"
    assert find_ai_token("", b'  {"ai_token": "t2"}') == "t2"
    assert find_ai_token("application/x-www-form-urlencoded", b"a=1&ai_token=t3") == "t3"
    assert find_ai_token("text/plain", b"ai_token=t4") == "t4"
    multipart = (b'--B\r\nContent-Disposition: form-data; name="ai_token"\r\n\r\nt5\r\n'
                 b'--B\r\nContent-Disposition: form-data; name="f"; filename="a.wav"\r\n\r\nxyz\r\n--B--\r\n')
    assert find_ai_token("multipart/form-data; boundary=B", multipart) == "t5"
    for content_type, body in [("application/json", b"[" * 100000), ("application/json", b"{bad"),
                               ("application/json", b'{"ai_token": 5}'), ("multipart/form-data", multipart),
                               ("multipart/form-data; boundary=B", b"garbage")]:
        assert find_ai_token(content_type, body) is None


# -- the auth matrix -------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, status, name", [
    ({}, 401, None),
    (bearer("wrong"), 401, None),
    ({"Authorization": "Bearer "}, 401, None),
    ({"Authorization": "Bearer"}, 401, None),
    ({"Authorization": KEY}, 401, None),
    ({"Authorization": f"Basic {KEY}"}, 401, None),
    ({"Authorization": f"bearer {KEY}"}, 200, "alice"),
    (bearer(), 200, "alice"),
    (bearer(BOB_KEY), 200, "bob"),
])
def test_auth_matrix(client, headers, status, name):
    response = client.get("/v1/models", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json() == UNAUTHORIZED and response.headers["www-authenticate"] == "Bearer"
    else:
        assert response.json() == {"key_name": name}


@pytest.mark.parametrize("path", ["/v1/models/", "//v1/models", "/V1/MODELS", "/v1//models", "/health/",
                                  "/HEALTH", "/v1/models%2F"])
def test_path_variants_are_not_public(client, path):
    CALLS.clear()
    url = "http://testserver" + path
    assert client.get(url).status_code == 401
    assert client.get(url, headers=bearer()).status_code in (307, 401, 404)
    assert "/v1/models" not in CALLS


def test_public_paths_need_no_key(client):
    for path in ("/health", "/ready"):
        response = client.get(path)
        assert response.status_code == 200 and response.json() == {"ok": True, "key_name": ""}


def test_keys_disabled_lets_everything_through():
    with TestClient(build_app(GuardSettings(keys=KeyRing()))) as open_client:
        assert open_client.get("/v1/models").json() == {"key_name": ""}
        assert open_client.post("/v1/understand", json={"a": 1}).json() == {"key_name": "", "body": {"a": 1}}


def multipart_body(fields: dict, boundary: str = "XyZ") -> tuple:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_ai_token_accepted_on_official_routes(client):
    ok = {"ai_token": KEY, "caption": "piano"}
    response = client.post("/release_task", json=ok)
    assert response.status_code == 200 and response.json()["key_name"] == "alice"
    assert response.json()["fields"] == ok
    response = client.post("/release_task", data=ok)
    assert response.status_code == 200 and response.json() == {"key_name": "alice", "fields": ok}
    body, headers = multipart_body(ok)
    response = client.post("/query_result", content=body, headers=headers)
    assert response.status_code == 200 and response.json() == {"key_name": "alice", "fields": ok}
    response = client.post("/release_task", json=ok, headers=bearer(BOB_KEY))
    assert response.json()["key_name"] == "bob"  # a valid header wins
    response = client.post("/release_task", json=ok, headers=bearer("wrong"))
    assert response.json()["key_name"] == "alice"  # a bad header still lets the body's token decide


def test_bad_ai_token_and_ai_token_off_official_routes_refused(client):
    CALLS.clear()
    for body in ({"ai_token": "wrong"}, {"ai_token": ""}, {"caption": "x"}, {"ai_token": [KEY]}):
        assert client.post("/release_task", json=body).json() == UNAUTHORIZED
        assert client.post("/release_task", data={k: str(v) for k, v in body.items()}).status_code == 401
    assert client.post("/release_task").status_code == 401
    assert client.post("/v1/understand", json={"ai_token": KEY}).status_code == 401
    body, headers = multipart_body({"ai_token": KEY})
    assert client.post("/v1/tasks", content=body, headers=headers).status_code == 401
    assert client.get("/v1/models", params={"ai_token": KEY}).status_code == 401
    assert CALLS == []


def test_official_routes_accept_form_json_and_multipart(client):
    for kwargs in ({"json": {"caption": "a"}}, {"data": {"caption": "a"}},
                   {"files": {"ref_audio": ("a.wav", b"RIFF" * 10)}, "data": {"caption": "a"}},
                   {"content": b'{"caption": "a"}', "headers": {"Content-Type": "text/plain"}}):
        kwargs["headers"] = {**kwargs.get("headers", {}), **bearer()}
        response = client.post("/release_task", **kwargs)
        assert response.status_code == 200 and response.json()["fields"]["caption"] == "a"


def test_content_types_on_v1_routes(client):
    CALLS.clear()
    for headers in ({"Content-Type": "text/plain"}, {}, {"Content-Type": "application/x-www-form-urlencoded"}):
        response = client.post("/v1/understand", content=b'{"a": 1}', headers={**headers, **bearer()})
        assert response.status_code == 415
        assert response.json()["detail"][0]["type"] == "unsupported_media_type"
    assert CALLS == []
    ok = client.post("/v1/understand", content=b'{"a": 1}',
                     headers={"Content-Type": "application/vnd.x+json", **bearer()})
    assert ok.status_code == 200 and ok.json()["body"] == {"a": 1}
    response = client.post("/v1/tasks", files={"src_audio": ("a.wav", b"x" * 100)}, headers=bearer())
    assert response.status_code == 200 and response.json()["key_name"] == "alice"
    assert client.post("/v1/tasks", content=b"x", headers={"Content-Type": "text/plain", **bearer()}).status_code == 415


def test_key_never_in_responses_or_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    responses = [
        client.get("/v1/models", headers=bearer(KEY + "x")),
        client.get("/v1/models", headers={"Authorization": KEY}),
        client.get("/v1/models", headers=bearer()),
        client.post("/release_task", json={"ai_token": KEY + "x"}),
        client.post("/release_task", data={"ai_token": KEY}),
        client.post("/v1/understand", json={"ai_token": KEY}),
        client.post("/v1/understand", content=b"x" * 5000, headers=bearer()),
        client.post("/v1/understand", content=b"{}", headers={"Content-Type": "text/plain", **bearer()}),
    ]
    assert [r.status_code for r in responses] == [401, 401, 200, 401, 200, 401, 413, 415]
    for index, response in enumerate(responses):
        assert index == 4 or KEY not in response.text  # 4: the test route echoes the form it was sent
        assert all(KEY not in value for value in response.headers.values())
    assert caplog.records and KEY not in caplog.text


# -- body size ---------------------------------------------------------------------------------------


def run_guard(app_settings: GuardSettings, scope_extra: dict, chunks=None):
    """Call the middleware directly; returns (status, app called, receive calls)."""
    state = {"receives": 0, "app": False, "status": None}
    chunk_source = iter(chunks or [])

    async def receive():
        state["receives"] += 1
        try:
            return {"type": "http.request", "body": next(chunk_source), "more_body": True}
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            state["status"] = message["status"]

    async def app(scope, receive, send):
        state["app"] = True

    scope = {"type": "http", "method": "POST", "path": "/v1/understand", "headers": [], **scope_extra}
    asyncio.run(Guard(app, app_settings)(scope, receive, send))
    return state


def test_413_by_content_length_reads_no_body(settings):
    headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-length", b"1000000000"),
               (b"content-type", b"application/json")]
    state = run_guard(settings, {"headers": headers})
    assert state == {"receives": 0, "app": False, "status": 413}
    state = run_guard(settings, {"headers": headers[:1] + [(b"content-length", b"12x")]})
    assert state == {"receives": 0, "app": False, "status": 400}
    state = run_guard(settings, {"headers": headers[1:]})  # no key: refused before anything else
    assert state == {"receives": 0, "app": False, "status": 401}


def test_413_as_soon_as_a_stream_passes_the_limit(settings):
    headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]
    endless = iter(lambda: b"x" * 1024, None)
    state = run_guard(settings, {"headers": headers}, endless)
    assert state == {"receives": 5, "app": False, "status": 413}  # 4096 bytes allowed, the 5th KiB refused


def test_websockets_closed_unless_public(settings):
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        sent.append("app")

    guard = Guard(app, settings)
    asyncio.run(guard({"type": "websocket", "path": "/v1/tasks/x/events", "headers": []}, receive, send))
    asyncio.run(guard({"type": "websocket", "path": "/health", "headers": []}, receive, send))
    asyncio.run(guard({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}, "app", "app"]


@pytest.fixture(scope="module")
def server(settings):
    config = uvicorn.Config(build_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", port
    instance.should_exit = True
    thread.join(5)


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    return reply


def test_real_http_content_length_over_limit_answered_before_the_body(server):
    _, port = server
    CALLS.clear()
    head = (f"POST /v1/understand HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n").encode()
    # the body is never sent: a server waiting for it would leave the socket's timeout to fail this
    reply = raw_request(port, head)
    assert reply.startswith(b"HTTP/1.1 413") and b'"too_large"' in reply and b"4096 bytes" in reply
    assert CALLS == []


def test_real_http_chunked_bodies(server):
    url, port = server
    CALLS.clear()

    def chunks(total: int):
        for _ in range(total // 512):
            yield b" " * 512

    with httpx.Client(base_url=url, timeout=5) as http:
        headers = {"Content-Type": "application/json", **bearer()}
        response = http.post("/v1/tasks", content=(part for part in [b'{"a":', b' 1}']), headers=headers)
        assert response.status_code == 200 and response.json() == {"key_name": "alice", "size": 8}
        response = http.post("/v1/understand", content=chunks(3072), headers=headers)
        assert response.status_code == 400  # within the limit: only spaces, so the route says not JSON
        try:
            response = http.post("/v1/understand", content=chunks(64 * 1024), headers=headers)
            assert response.status_code == 413 and response.json()["detail"][0]["type"] == "too_large"
        except httpx.TransportError:  # the server may close before the client finishes sending
            pass
    head = (f"POST /v1/understand HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    body = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(5))  # 5 KiB, left unterminated
    assert raw_request(port, head, body).startswith(b"HTTP/1.1 413")
    assert CALLS == ["/v1/tasks", "/v1/understand"]


# -- safe JSON ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, status, field", [
    (b'{"lyrics": "la \xff la"}', 422, "lyrics"),
    (b'{"metas": {"caption": "\xed\xa0\x80"}}', 422, "metas.caption"),
    (b'{"metas": {"cap\xfftion": "x"}}', 422, "metas"),
    (b'{"\xff": 1}', 422, "body"),
    (rb'{"lyrics": "\ud800"}', 422, "lyrics"),
    (rb'{"items": [{"a": "ok"}, {"\udfff": 1}]}', 422, "items[1]"),
    (b"[" * 100000, 422, "body"),
    (b"[" * 100000 + b"]" * 100000, 422, "body"),
    (b'{"a":' * 100000, 422, "body"),
    (b'{"a":' * 100000 + b"1" + b"}" * 100000, 422, "body"),
    (b'{"seed": ' + b"9" * 100000 + b"}", 422, "seed"),
    (b'{"seeds": [1, 2, 3, -' + b"1" * 21 + b"]}", 422, "seeds[3]"),
    (b'{"bpm": NaN}', 422, "bpm"),
    (b'{"x": {"y": Infinity}}', 422, "x.y"),
    (b'{"z": -Infinity}', 422, "z"),
    (b'{"duration": 1e309}', 422, "duration"),
    (b"not json", 400, "body"),
    (b"", 400, "body"),
    (b"\xff{}", 400, "body"),
    (b'{"a": 1} \xff', 400, "body"),
    (b'"unterminated \\', 400, "body"),
])
def test_parse_json_refusals(raw, status, field):
    with pytest.raises(FieldError) as error:
        parse_json(raw)
    assert (error.value.status_code, error.value.code, error.value.field) == (status, "value_error", field)
    assert error.value.loc == (["body"] if field == "body" else ["body", field])
    assert "la la" not in error.value.message and "999" not in error.value.message


def test_parse_json_invalid_json_names_line_and_column():
    with pytest.raises(FieldError, match=r"line 2, column 6"):
        parse_json('{"a":\n  1, }')


def test_parse_json_accepts_valid_input_within_limits():
    assert parse_json('{"a": [1, -2.5, "\\ud83c\\udfb5", true, null], "b": {"c": "é"}}') == {
        "a": [1, -2.5, "\U0001f3b5", True, None], "b": {"c": "é"}}
    assert parse_json(b"[" * 32 + b"]" * 32) is not None
    assert parse_json(b'{"n": ' + b"9" * 20 + b"}") == {"n": 10 ** 20 - 1}
    assert parse_json(b'"[[[[{{{{"', max_depth=1) == "[[[[{{{{"
    assert nesting_depth('[{"a": "]]]"}, [[]]]') == 3


def test_parse_json_takes_a_one_mib_body_whole():
    body = json.dumps({"lyrics": "la la land " * 70000, "seeds": list(range(20000)),
                       "items": [{"caption": "x\u00e9", "bpm": i} for i in range(5000)]}).encode()
    assert len(body) > 1 << 20
    assert parse_json(body) == json.loads(body)


def test_check_text():
    assert check_text("caption", "fine é") == "fine é"
    with pytest.raises(FieldError) as error:
        check_text("caption", "bad \udcff")
    assert (error.value.status_code, error.value.field) == (422, "caption")


def test_the_replayed_body_is_let_go_once_given():
    """The guard hands the buffered body to the route once and keeps no reference to it: a sync route
    waits minutes for its result, and an upload held meanwhile would pin its size per request."""
    import sys

    from serve.edge.guard import replay

    body = bytes(1 << 20)
    baseline = sys.getrefcount(body)

    async def disconnect():
        return {"type": "http.disconnect"}

    receive = replay(body, disconnect)
    assert sys.getrefcount(body) == baseline + 1  # held until given
    message = asyncio.run(receive())
    assert message["body"] is body and not message["more_body"]
    del message
    assert sys.getrefcount(body) == baseline
    assert asyncio.run(receive())["type"] == "http.disconnect"


def test_a_json_generate_body_is_not_cached_on_the_request():
    from starlette.requests import Request

    from serve.edge.intake import read_generate_body

    payload = b'{"caption": "calm", "src_audio_base64": "' + b"A" * 4096 + b'"}'
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/v1/tasks", "headers":
                       [(b"content-type", b"application/json")]}, receive)
    body, files = asyncio.run(read_generate_body(request, 1 << 20))
    assert body["caption"] == "calm" and files == {}
    assert "_body" not in request.__dict__  # nothing upload-sized stays with the request
