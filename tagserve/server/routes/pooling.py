"""`POST /pooling` (and SageMaker's `/invocations`): vLLM's Pooling API.

Two doors to the same `pool` function: the FastAPI route (OpenAPI schema, and every error
answer), and `FastPoolingMiddleware` in front of it, which answers valid JSON requests without
FastAPI's per-request machinery (routing, dependency solving, a worker thread for the sync
dependencies) and hands anything it would not validate to the route unchanged. Tests check
that both doors answer every body byte for byte alike.
"""

from __future__ import annotations

import functools
import json
import time

from fastapi import APIRouter, Depends, Request, Response
from pydantic import TypeAdapter
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from tagserve.config import ModelConfig
from tagserve.engine.inputs import TokenizeParams
from tagserve.errors import ValidationError
from tagserve.params import PoolingParams
from tagserve.server.disconnect import cancel_on_disconnect
from tagserve.server.encoding import ResponseInfo, pooling_response
from tagserve.server.errors import exception_response
from tagserve.server.middleware import read_body, replay_body
from tagserve.server.prompts import completion_prompts, render_chat
from tagserve.server.protocol import PoolingCompletionRequest, PoolingRequest, PoolingResponse
from tagserve.server.routes.common import ERROR_RESPONSES, random_id, require_json
from tagserve.server.state import ServerState, State

router = APIRouter()

# Larger responses are built in the thread pool (numpy releases the GIL), not on the event loop.
INLINE_RESPONSE_TOKENS = 2048


def resolve_task(requested: str | None, model_config: ModelConfig) -> str:
    """The request's task: the served one when omitted; anything else is vLLM's 400."""
    served = model_config.pooling_task
    if requested is None or requested == served:
        return served
    if requested == "plugin":
        raise ValidationError("No IOProcessor plugin installed. tagserve serves "
                              f"'{served}' only.", parameter="task")
    if requested in model_config.supported_tasks:
        raise ValidationError("Try switching the model's pooling_task via --pooler-config.task "
                              f"{requested}.", parameter="task")
    raise ValidationError(f"Unsupported task: {requested!r} Supported tasks: "
                          f"{list(model_config.supported_tasks)}", parameter="task")


def _check_unsupported_fields(body: PoolingRequest) -> None:
    if body.dimensions is not None:
        raise ValidationError("dimensions is currently not supported", parameter="dimensions")
    if body.priority != 0:
        raise ValidationError(f"Got priority {body.priority} but Priority scheduling is not "
                              "enabled.", parameter="priority")
    if body.cache_salt is not None and not body.cache_salt:
        raise ValidationError("Parameter 'cache_salt' must be a non-empty string if provided.",
                              parameter="cache_salt")


async def pool(body: PoolingRequest, state: ServerState,
               header_request_id: str | None) -> Response:
    """Validate the options, tokenize, run the engine and build the response."""
    engine = state.engine
    config = engine.model_config
    model = state.model_name(body.model)
    task = resolve_task(body.task, config)
    _check_unsupported_fields(body)
    params = PoolingParams(use_activation=body.use_activation).verify(
        task, config.pooler_config, config.pooler_config.pooling_type == "STEP")
    tokenize_params = TokenizeParams(config.max_model_len, body.truncate_prompt_tokens,
                                     body.truncation_side, body.add_special_tokens,
                                     offsets=False).checked()
    if isinstance(body, PoolingCompletionRequest):
        prompts = completion_prompts(body.input, state.settings.max_inputs_per_request)
    else:
        prompts = [await render_chat(engine, body)]
    outputs, prompt_tokens = await engine.encode_prompts(prompts, tokenize_params, params)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    request_id = header_request_id or body.request_id or random_id()
    info = ResponseInfo(f"pooling-{request_id}", int(time.time()), model, prompt_tokens)
    build = functools.partial(pooling_response, outputs, info, body.encoding_format,
                              body.embed_dtype, body.endianness)
    return build() if prompt_tokens <= INLINE_RESPONSE_TOKENS else await engine.run_in_pool(build)


@router.post("/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)])
@router.post("/invocations", response_model=PoolingResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)])
async def create_pooling(body: PoolingRequest, request: Request,
                         state: State) -> Response:
    """One `[num_tokens, num_labels]` result per input, in input order.

    `input` is a string, a list of strings, a list of token ids or a list of such lists; or
    send `messages` to render a conversation with the tokenizer's chat template. With
    `encoding_format` `bytes`/`bytes_only` the body is the raw concatenated tensors
    (`application/octet-stream`; shapes in the `metadata` header for `bytes`)."""
    return await cancel_on_disconnect(request.receive, pool(body, state,
                                                            request.headers.get("x-request-id")))


# ------------------------------------------------------------------------- fast path

POOLING_PATHS = ("/pooling", "/invocations")
_REQUEST = TypeAdapter(PoolingRequest)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case), as Starlette's `Headers.get`."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def parse_fast(scope: Scope, body: bytes) -> PoolingRequest | None:
    """The body as the FastAPI route validates it, or None where that route answers with an
    error (content type, JSON or schema): the route then answers instead, in its own words."""
    content_type = _header(scope, b"content-type") or ""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return None
    try:
        return _REQUEST.validate_python(json.loads(body), from_attributes=True)
    except Exception:  # noqa: BLE001 - the route reports it
        return None


class FastPoolingMiddleware:
    """Answers valid `POST /pooling` and `/invocations` JSON requests by calling `pool`
    directly; everything else goes on to the FastAPI app."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: dict[str, BaseRoute]) -> None:
        self.app = app
        self.state = state
        self.routes = routes  # path -> the FastAPI route, named in metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # client gone before the body arrived
            return
        parsed = parse_fast(scope, body)
        if parsed is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        scope["route"] = route
        work = pool(parsed, self.state, _header(scope, b"x-request-id"))
        try:
            response = await cancel_on_disconnect(receive, work)
        except Exception as exc:  # noqa: BLE001 - as the route's exception handlers answer
            response = exception_response(exc)
        await response(scope, receive, send)
