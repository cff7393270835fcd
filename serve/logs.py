"""Structured logs: the service's logger, extra JSON fields, and the request id a task's lines carry.

Serve writes each replica's log records to ``logs/serve/`` of the Ray session, as JSON lines when
the Serve config's ``logging_config.encoding`` is ``JSON`` (``serve_config.yaml``). A record logged
while Serve handles a request gets that request's ``request_id``: the proxy takes it from the
client's ``X-Request-ID`` header (or makes one) and echoes it in the response. So this module only
adds what Serve does not know: a logger under ``ray.serve`` (whose handlers write those files),
``extra(...)`` for fields of our own (``task_id``, ``phase``, ``duration_s``), and the request id a
task keeps in its record, so a task re-driven by another replica still logs the id of the request
that created it.

Fields are ids, phases, codes and durations only: never keys, headers, captions or lyrics.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict

LOGGER_NAME = "ray.serve.acestep"
log = logging.getLogger(LOGGER_NAME)


def extra(**fields: Any) -> Dict[str, Any]:
    """``logger.info(msg, extra=extra(task_id=...))``: Serve's JSON formatter writes these as top-level
    keys (a plain ``extra`` named ``task_id`` would be overwritten by Ray's own task id)."""
    return {"ray_serve_extra_fields": fields}


def current_request_id() -> str:
    """The id of the Serve request being handled here ("" outside one)."""
    try:
        from ray.serve.context import _get_serve_request_context
    except ImportError:
        return ""
    return _get_serve_request_context().request_id or ""


def bind_request_id(request_id: str) -> None:
    """Log the rest of the current asyncio task as part of ``request_id`` (a task's own context copy,
    so nothing else changes)."""
    if not request_id:
        return
    try:
        from ray.serve import context
        current = context._get_serve_request_context()
    except (ImportError, AttributeError):
        return
    context._serve_request_context.set(dataclasses.replace(current, request_id=request_id))
