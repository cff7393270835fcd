"""The FastAPI app the ingress routes hang on, its error handlers and shared OpenAPI helpers.

Routes are methods of ``serve.api.Ingress`` and of the route groups it inherits
(``serve.adapter_api``); they all register on this one app."""

import importlib.metadata
from typing import Any, Dict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.driver import store_unavailable
from serve.edge.errors import APIError, error_responses, retry_after

api = FastAPI(
    title="ACE-Step serve",
    version=importlib.metadata.version("acestep-serve"),
    description="ACE-Step 1.5 music generation on Ray Serve: a 5 Hz LM plans, a DiT + VAE renders 48 kHz "
                "stereo. Authenticate with `Authorization: Bearer <key>` when the server has keys. Every "
                "error of the /v1 routes has the shape `{\"detail\": [{\"loc\", \"msg\", \"type\"}]}`.",
    responses=error_responses(401, 413, 415, 429, 503),
)


def json_body(model) -> Dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@api.exception_handler(APIError)
async def _api_error(request: Request, error: APIError):
    return error.response()


def unexpected_error(error: Exception) -> APIError:
    """Anything unforeseen: a code in the error model, never a traceback (the log has it)."""
    if store_unavailable(error):
        return APIError(503, "the task store is unavailable; retry", loc=("service",), code="store_unavailable",
                        headers=retry_after(5))
    return APIError(500, "internal error", loc=("service",), code="internal")


@api.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception):
    return unexpected_error(error).response()


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def not_found(what: str) -> APIError:
    return APIError(404, f"unknown {what}", loc=("path", what.replace(" ", "_")), code="not_found")


