"""Exceptions -> vLLM-shaped HTTP errors, in one place.

Every error body is `{"error": {"message", "type", "param", "code"}}`. Problems are raised
where they are detected (engine, tokenizer, routes) as plain exceptions; this module alone
decides their status code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tagserve.engine.async_engine import EngineDeadError, ModelExecutionError
from tagserve.errors import ModelNotFoundError, QueueFullError, ValidationError

logger = logging.getLogger(__name__)


class RequestTooLargeError(Exception):
    """The request body or its number of inputs is over the server's limit (HTTP 413)."""


# First match wins: (exception class, status, error type).
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (ValidationError, 400, "BadRequestError"),
    (ModelNotFoundError, 404, "NotFoundError"),
    (RequestTooLargeError, 413, "RequestTooLargeError"),
    (QueueFullError, 503, "ServiceUnavailableError"),
    (EngineDeadError, 500, "InternalServerError"),
    (ModelExecutionError, 500, "InternalServerError"),
    (NotImplementedError, 501, "NotImplementedError"),
    (ValueError, 400, "BadRequestError"),
    (TypeError, 400, "BadRequestError"),
    (OverflowError, 400, "BadRequestError"),
)


def error_response(status: int, message: str, err_type: str,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param,
                                   "code": status}}, status_code=status)


def exception_response(exc: BaseException) -> JSONResponse:
    """The response for an exception raised while serving a request."""
    for exc_type, status, err_type in _STATUS:
        if isinstance(exc, exc_type):
            return error_response(status, str(exc), err_type, getattr(exc, "parameter", None))
    logger.error("Unexpected error while serving a request", exc_info=exc)
    return error_response(500, f"Internal server error ({type(exc).__name__})",
                          "InternalServerError")


def _summarize(value: Any) -> Any:
    """Keep error messages short: large inputs are described, not echoed."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, (list, tuple)) and (
            len(value) > 10 or any(isinstance(v, (dict, list, tuple)) for v in value)):
        return f"<list of {len(value)} items>"
    if isinstance(value, (str, bytes)) and len(value) > 100:
        return value[:100] + ("..." if isinstance(value, str) else b"...")
    return value


def _is_union_tag(part: Any) -> bool:
    """Pydantic names union members in error locations ('PoolingChatRequest', 'list[int]',
    'str'); vLLM's messages show field paths only. Field names here are lower snake case."""
    return isinstance(part, str) and (
        "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "none"))


def format_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """vLLM's schema-error message ("N validation errors:\\n  {...}") and its `param` (the
    dotted location of the first error)."""
    lines: list[str] = []
    param = None
    for error in errors:
        if not isinstance(error, dict):
            lines.append(f"  {error}")
            continue
        loc = ".".join(str(p) for p in error.get("loc", ()) if not _is_union_tag(p))
        param = param or loc or None
        item = {"type": error.get("type"), "loc": loc, "msg": error.get("msg"),
                "input": _summarize(error.get("input"))}
        if error.get("ctx"):
            item["ctx"] = {k: str(v) if isinstance(v, BaseException) else v
                           for k, v in error["ctx"].items()}
        lines.append(f"  {item}")
    plural = "" if len(errors) == 1 else "s"
    return f"{len(errors)} validation error{plural}:\n" + "\n".join(lines), param


async def _on_request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for error in errors:  # our own checks run inside model validators: report them plainly
        cause = error.get("ctx", {}).get("error") if isinstance(error, dict) else None
        if isinstance(cause, ValidationError):
            return exception_response(cause)
    message, param = format_validation_errors(errors)
    return error_response(400, message, HTTPStatus.BAD_REQUEST.phrase, param)


async def _on_http_exception(_: Request, exc: HTTPException) -> JSONResponse:
    response = error_response(exc.status_code, str(exc.detail),
                              HTTPStatus(exc.status_code).phrase)
    response.headers.update(exc.headers or {})
    return response


async def _on_exception(_: Request, exc: Exception) -> JSONResponse:
    return exception_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(HTTPException, _on_http_exception)
    for exc_type, _, _ in _STATUS:
        app.add_exception_handler(exc_type, _on_exception)


class InternalErrorMiddleware:
    """Turns any other exception into a 500 error body, without tracebacks or paths."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - every unexpected error becomes a 500
            if started:
                raise
            await exception_response(exc)(scope, receive, send)
