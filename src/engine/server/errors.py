"""Every failure leaves the server as OpenAI's error JSON with the status a client expects.

`install_error_handlers` maps the engine's error vocabulary, FastAPI's validation errors and
Starlette's HTTP errors onto `{"error": {"message", "type", "param", "code"}}`, so the
official client raises its matching exception (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardline.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
)
from shardline.engine.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("shardline.server")

_HTTP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the server answers with, already in OpenAI's terms."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _HTTP_ERROR_TYPES.get(status_code, "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {...}}`."""
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The whole HTTP response."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def api_error_from(exc: BaseException) -> APIError:
    """Translate any exception into the APIError a client should see (500 for the unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=exc.field, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.field, code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, f"engine overloaded: {exc}; retry later", code="engine_overloaded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"engine is not running: {exc}", code="engine_dead")
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    """`messages.0.role` from pydantic's location, minus FastAPI's "body" prefix and the
    union-member tags pydantic inserts (`str`, `list[int]`, `constrained-str`, ...)."""
    parts: list[str] = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, int) or (
            isinstance(part, str) and part.isidentifier() and part.lower() not in _TYPE_TAGS
        ):
            parts.append(str(part))
    return ".".join(parts) or None


NOT_JSON_MESSAGE = "the request body must be JSON (Content-Type: application/json)"


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first offending field.

    A body FastAPI did not read as JSON (it keeps the raw bytes when the Content-Type is not
    `application/json` or `application/*+json`, or missing) is refused as such, instead of
    with pydantic's "Input should be a valid dictionary"; `content_type` is the request's.
    """
    if isinstance(exc.body, bytes | bytearray) and exc.body:
        got = f"got Content-Type: {content_type}" if content_type else "the request has no Content-Type"
        return APIError(400, f"{NOT_JSON_MESSAGE}; {got}", code="invalid_content_type")
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request body", code="invalid_value")
    first = errors[0]
    loc = first.get("loc", ())
    param = _loc_to_param(loc)
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    where = f"'{param}'" if param else "request body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that put every error in OpenAI's shape."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return api_error_from(exc).response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # registered for this type only
        return validation_error(exc, request.headers.get("content-type")).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # registered for this type only
        # FastAPI raises a plain 400 for bodies it cannot decode (e.g. invalid UTF-8).
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        error = APIError(exc.status_code, message, code=code)
        return error.response(headers=dict(exc.headers) if exc.headers else None)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return api_error_from(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidRequestError, on_api_error)
    app.add_exception_handler(EngineOverloadedError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
