"""The native API's one error model: ``{"detail": [{"loc": [...], "msg": "...", "type": "<code>"}]}``.

FastAPI's own validation errors already have this shape, so every 4xx/5xx of the ``/v1`` routes and
of the request guard (auth, size, content type) uses it too. ``type`` is a stable code a client can
branch on (``value_error``, ``unauthorized``, ``too_large``, ``unsupported_media_type``,
``overloaded``, ``invalid_audio``, ``not_found``...); ``msg`` names the allowed range and never
echoes the client's input. The official routes keep their own envelope (``serve.compat.release``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse


class APIError(Exception):
    """An error answered with ``status_code`` in the one error model; ``loc`` says where (e.g.
    ``("body", "bpm")``, ``("header", "authorization")``), ``code`` is the item's ``type``."""

    def __init__(self, status_code: int, message: str, *, loc: Sequence[Union[str, int]] = ("body",),
                 code: str = "value_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status_code, self.message, self.code = status_code, message, code
        self.loc = list(loc)
        self.headers = dict(headers or {})

    def detail(self) -> List[Dict[str, Any]]:
        return [{"loc": self.loc, "msg": self.message, "type": self.code}]

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail()}, status_code=self.status_code, headers=self.headers or None)


class FieldError(APIError, ValueError):
    """Bad client input, answered with 4xx naming ``field`` (a body field, or ``body`` itself)."""

    def __init__(self, field: str, message: str, status_code: int = 422, code: str = "value_error",
                 headers: Optional[Dict[str, str]] = None):
        loc = ("body",) if field == "body" else ("body", field)
        super().__init__(status_code, message, loc=loc, code=code, headers=headers)
        self.field = field


def retry_after(seconds: float) -> Dict[str, str]:
    """The Retry-After header for a refusal: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, int(seconds + 0.999)))}


class ErrorItem(BaseModel):
    loc: List[Union[str, int]] = Field(description="Where the problem is: ['body', field], ['header', name], ...")
    msg: str = Field(description="What is wrong and what is allowed; never the submitted value.")
    type: str = Field(description="Stable error code, e.g. value_error, unauthorized, too_large, overloaded.")


class ErrorBody(BaseModel):
    detail: List[ErrorItem]


_DESCRIPTIONS = {
    400: "Malformed request (not JSON, not an object).",
    401: "Missing or wrong API key.",
    404: "Unknown id or route.",
    408: "No result within the sync route's timeout; poll the task id in the answer.",
    409: "Conflict (task already finished, or an Idempotency-Key reused with a different body).",
    413: "Body or upload larger than allowed.",
    416: "Range not satisfiable for this file.",
    415: "Content type not accepted by this route.",
    422: "A field is invalid; loc names it and msg the allowed range.",
    429: "Too many unfinished tasks or requests for this key or server; see Retry-After.",
    503: "Overloaded, draining or not ready; see Retry-After.",
}


def error_responses(*codes: int) -> Dict[int, Dict[str, Any]]:
    """FastAPI ``responses=`` entries documenting the error model for ``codes`` (default: all)."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in (codes or _DESCRIPTIONS)}
