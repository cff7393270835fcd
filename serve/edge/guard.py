"""The request guard: API keys, body size limits and content types, checked before any route runs.

``Guard`` is a pure ASGI middleware, so it can refuse a request before the body is read (an
oversized ``Content-Length`` is answered at once, a chunked body as soon as it passes the limit)
and hand the route the body it buffered. Every refusal uses the one error model of
``serve.edge.errors``; a key is never logged, echoed or kept in clear (``KeyRing`` stores digests).

Wiring::

    settings = GuardSettings(keys=KeyRing.load(keys_file=...), upload_limit=max_upload)
    app.add_middleware(Guard, settings=settings)        # or: Guard(app, settings)

The decisions are small pure functions (``bearer_token``, ``authorize``, ``body_limit``,
``declared_length``, ``check_length``, ``check_content_type``, ``find_ai_token``) so each can be
tested alone; ``Guard`` only sequences them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import (Awaitable, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple,
                    Union)
from urllib.parse import parse_qsl

from serve import metrics
from serve.edge.errors import APIError
from serve.edge.safejson import JSON_LIMIT, deeper_than

__all__ = ["KeyRing", "GuardSettings", "Guard", "DEFAULT_CONTENT_TYPES", "bearer_token", "authorize",
           "body_limit", "declared_length", "check_length", "check_content_type", "find_ai_token",
           "media_type", "unauthorized"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, object]
Message = MutableMapping[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[Tuple[bytes, bytes]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_JSON_TYPES = frozenset({"application/json", "*/*+json"})
DEFAULT_CONTENT_TYPES: Mapping[str, frozenset] = {
    "/v1/understand": _JSON_TYPES,
    "/v1/create_sample": _JSON_TYPES,
    "/v1/format_sample": _JSON_TYPES,
    "/v1/generate": _JSON_TYPES | {"multipart/form-data"},
    "/v1/tasks": _JSON_TYPES | {"multipart/form-data"},
}


# -- keys ------------------------------------------------------------------------------------------


def _digest(key: Union[str, bytes]) -> bytes:
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).digest()


class KeyRing:
    """Named API keys, kept only as SHA-256 digests; empty when auth is off."""

    def __init__(self, entries: Iterable[Tuple[str, str]] = ()):
        self._entries: List[Tuple[str, bytes]] = []
        for name, key in entries:
            self._add(name, key)

    def _add(self, name: str, key: str) -> None:
        if not _KEY_NAME.fullmatch(name or ""):
            raise ValueError("a key name must be 1-64 letters, digits or _.@- characters")
        if not key or not key.strip() or key != key.strip():
            raise ValueError(f"key {name!r} is empty or has surrounding whitespace")
        digest = _digest(key)
        if any(known == name for known, _ in self._entries):
            raise ValueError(f"duplicate key name {name!r}")
        if any(hmac.compare_digest(known, digest) for _, known in self._entries):
            raise ValueError(f"key {name!r} repeats another name's key")
        self._entries.append((name, digest))

    @classmethod
    def load(cls, api_key: Optional[str] = None, keys_file: Optional[str] = None,
             env: Mapping[str, str] = os.environ) -> "KeyRing":
        """``api_key`` (else ``$ACESTEP_API_KEY``) as ``default``, plus ``name:key`` lines of ``keys_file``."""
        ring = cls()
        single = api_key if api_key is not None else env.get("ACESTEP_API_KEY")
        if single is not None:
            if not single.strip():
                raise ValueError("the API key is set but empty")
            ring._add("default", single.strip())
        if keys_file:
            with open(keys_file, encoding="utf-8") as handle:
                ring._load_lines(handle.read().splitlines(), keys_file)
        return ring

    def _load_lines(self, lines: List[str], source: str) -> None:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            name, colon, key = text.partition(":")
            try:
                if not colon:
                    raise ValueError("expected name:key")
                self._add(name.strip(), key.strip())
            except ValueError as error:  # the reason names the key's name at most, never the key
                raise ValueError(f"{source} line {number}: {error}") from None

    def identify(self, presented: Union[str, bytes]) -> Optional[str]:
        """The name of the key ``presented`` is, else None; every digest is compared (no early exit)."""
        digest = _digest(presented)
        found = None
        for name, known in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = name
        return found

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing(names={self.names!r})"


# -- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardSettings:
    """What the guard enforces. Paths are exact: a variant (trailing slash, case) matches nothing."""

    keys: KeyRing = field(default_factory=KeyRing)
    public_paths: frozenset = frozenset({"/health", "/ready"})
    official_paths: frozenset = frozenset({"/release_task", "/query_result"})
    json_limit: int = JSON_LIMIT
    upload_limit: int = 50 << 20
    upload_paths: frozenset = frozenset({"/v1/generate", "/v1/tasks", "/release_task"})
    content_types: Mapping[str, frozenset] = field(default_factory=lambda: dict(DEFAULT_CONTENT_TYPES))


# -- decisions -------------------------------------------------------------------------------------


def unauthorized() -> APIError:
    """The one answer for every auth failure, whichever part failed."""
    return APIError(401, "missing or invalid API key", loc=("header", "authorization"), code="unauthorized",
                    headers={"WWW-Authenticate": "Bearer"})


def _header_values(headers: Headers, name: bytes) -> List[bytes]:
    return [value for key, value in headers if key.lower() == name]


def bearer_token(headers: Headers) -> Optional[bytes]:
    """The token of a single ``Authorization: Bearer <token>``; anything else counts as none."""
    values = _header_values(headers, b"authorization")
    if len(values) != 1:
        return None
    parts = values[0].split()
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    return parts[1]


def authorize(settings: GuardSettings, path: str, headers: Headers) -> Tuple[Optional[str], bool]:
    """(key name or None, may the body's ``ai_token`` still decide). ``""`` means no key needed."""
    if not settings.keys.enabled or path in settings.public_paths:
        return "", False
    token = bearer_token(headers)
    name = settings.keys.identify(token) if token else None
    return name, name is None and path in settings.official_paths


def body_limit(settings: GuardSettings, path: str) -> int:
    """Bytes a body may have on ``path``: uploads routes fit two base64-sized uploads besides the JSON."""
    if path in settings.upload_paths:
        return settings.json_limit + 2 * math.ceil(settings.upload_limit * 4 / 3)
    return settings.json_limit


def declared_length(headers: Headers) -> Optional[int]:
    """The Content-Length, None without one; malformed or conflicting values → 400."""
    values = {value.strip() for value in _header_values(headers, b"content-length")}
    if not values:
        return None
    if len(values) != 1 or not re.fullmatch(rb"[0-9]{1,19}", next(iter(values))):
        raise APIError(400, "Content-Length must be one non-negative integer", loc=("header", "content-length"))
    return int(next(iter(values)))


def too_large(limit: int) -> APIError:
    return APIError(413, f"body larger than this route allows ({limit} bytes, {limit / 2 ** 20:.1f} MiB)",
                    loc=("body",), code="too_large")


def check_length(limit: int, length: Optional[int]) -> None:
    if length is not None and length > limit:
        raise too_large(limit)


def media_type(headers: Headers) -> str:
    """``type/subtype`` of the Content-Type, lower-cased without parameters; "" when absent."""
    values = _header_values(headers, b"content-type")
    if not values:
        return ""
    return values[0].decode("latin-1").split(";", 1)[0].strip().lower()


def _accepts(pattern: str, media: str) -> bool:
    kind, _, sub = media.partition("/")
    want_kind, _, want_sub = pattern.partition("/")
    if not kind or not sub or "/" in sub:
        return False
    if want_kind not in ("*", kind):
        return False
    if want_sub.startswith("*+"):
        return sub.endswith(want_sub[1:]) and len(sub) > len(want_sub) - 1
    return want_sub in ("*", sub)


def check_content_type(settings: GuardSettings, path: str, headers: Headers) -> None:
    """415 unless ``path`` takes any type or the request's type is one it lists."""
    allowed = settings.content_types.get(path)
    if allowed is None:
        return
    media = media_type(headers)
    if not any(_accepts(pattern, media) for pattern in allowed):
        raise APIError(415, "content type must be one of: " + ", ".join(sorted(allowed)),
                       loc=("header", "content-type"), code="unsupported_media_type")


# -- ai_token in official bodies -------------------------------------------------------------------


def find_ai_token(content_type: str, body: bytes) -> Optional[str]:
    """The ``ai_token`` field of a JSON object, urlencoded or multipart form; None if absent or unreadable.

    ``content_type`` is the raw header value (multipart needs its boundary); untyped bodies are
    and other types are sniffed as the official routes do: JSON when they start with ``{``, else a form."""
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if media.startswith("multipart/"):
            return _multipart_field(content_type, body, b"ai_token")
        if media == "application/x-www-form-urlencoded":
            return _form_field(body, "ai_token")
        if any(_accepts(pattern, media) for pattern in _JSON_TYPES) or body.lstrip().startswith(b"{"):
            return _json_field(body, "ai_token")
        return _form_field(body, "ai_token")
    except ValueError:
        return None


def _json_field(body: bytes, name: str) -> Optional[str]:
    text = body.decode("utf-8", "surrogateescape")
    if deeper_than(text, 64):
        return None
    # Numbers are not needed here, so none is converted (a huge integer costs nothing).
    data = json.loads(text, parse_int=lambda _: 0, parse_float=lambda _: 0.0, parse_constant=lambda _: 0.0)
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _form_field(body: bytes, name: str) -> Optional[str]:
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=10000):
        if key == name:
            return value
    return None


def _multipart_field(content_type: str, body: bytes, name: bytes) -> Optional[str]:
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return None
    part: Dict[str, object] = {}
    found: List[bytes] = []

    def on_part_begin():
        part.update(field=b"", value=b"", data=[], wanted=False)

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        if part["field"].strip().lower() == b"content-disposition":
            _, params = parse_options_header(part["value"])
            part["wanted"] = params.get(b"name") == name and b"filename" not in params
        part.update(field=b"", value=b"")

    def on_part_data(data, start, end):
        if part["wanted"] and not found:
            part["data"].append(data[start:end])

    def on_part_end():
        if part["wanted"] and not found:
            found.append(b"".join(part["data"]))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    parser.write(body)
    parser.finalize()
    return found[0].decode("utf-8", "replace") if found else None


# -- the middleware --------------------------------------------------------------------------------


async def read_body(receive: Receive, limit: int) -> Optional[bytes]:
    """The whole body, or None if the client left first; 413 as soon as it passes ``limit``."""
    chunks: List[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"") or b""
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the client sends next (a disconnect).
    It lets go of the body once given: a sync route waits minutes for its result, and an upload
    held here for that long would pin its size in memory per request."""
    pending = [body]
    del body

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


class Guard:
    """ASGI middleware enforcing ``GuardSettings`` on http requests; see the module docstring. It also
    counts every http request by route template and status (``serve.metrics``); ``routes`` (the
    app's) name the template of a request refused before routing."""

    def __init__(self, app, settings: GuardSettings, routes: Sequence[object] = ()):
        self.app = app
        self.settings = settings
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._counted(scope, receive, send)
        elif scope["type"] == "websocket" and scope.get("path") not in self.settings.public_paths:
            # No websocket route takes a key, so none but public ones may open.
            await receive()
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self.app(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            admitted = await self._admit(scope, receive)
        except APIError as error:
            logger.debug("refused %s %s: %s %s", scope.get("method"), scope.get("path"),
                         error.status_code, error.code)
            await error.response()(scope, receive, send)
            return
        if admitted is not None:  # None: the client left while sending its body
            await self.app(scope, admitted, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        status: List[object] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, sending)
        except Exception as error:  # answered by the app's outermost handler, as http_app maps it
            if not status:
                from serve.http_app import unexpected_error

                status.append(unexpected_error(error).status_code)
            raise
        finally:
            metrics.http_request(metrics.route_template(scope, self.routes), scope.get("method", ""),
                                 status[0] if status else "disconnected")

    async def _admit(self, scope: Scope, receive: Receive) -> Optional[Receive]:
        """The ``receive`` the app gets (replaying a buffered body), or an APIError to answer."""
        path, headers = scope["path"], scope.get("headers") or []
        name, token_may_decide = authorize(self.settings, path, headers)
        if name is None and not token_may_decide:
            raise unauthorized()
        if scope.get("method") in BODY_METHODS:
            limit = body_limit(self.settings, path)
            check_length(limit, declared_length(headers))
            check_content_type(self.settings, path, headers)
            body = await read_body(receive, limit)
            if body is None:
                return None
            if name is None:
                name = self._name_from_body(headers, body)
            receive = replay(body, receive)
        if name is None:
            raise unauthorized()
        if not isinstance(scope.get("state"), MutableMapping):
            scope["state"] = {}
        scope["state"]["key_name"] = name  # Starlette's request.state reads scope["state"]
        return receive

    def _name_from_body(self, headers: Headers, body: bytes) -> Optional[str]:
        values = _header_values(headers, b"content-type")
        token = find_ai_token(values[0].decode("latin-1") if values else "", body)
        return self.settings.keys.identify(token) if token else None
