"""`POST /v1/ner` (entities of texts) and `POST /v1/redact` (texts with their entities
redacted): tagserve's own routes, next to vLLM's.

Both run `ner_async` on the server's engine: every window of every request is a sequence in
the same forward passes as all other traffic, `/pooling`'s included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pydantic_core
from fastapi import APIRouter, Depends, Request, Response

from tagserve.engine.counting import CountingEngine
from tagserve.errors import ValidationError
from tagserve.postprocess.ner import NerOptions, NerResult, ner_async, recommended_decoding
from tagserve.postprocess.redact import redact
from tagserve.server.disconnect import cancel_on_disconnect
from tagserve.server.errors import RequestTooLargeError
from tagserve.server.ner_protocol import (
    NerDecodingResponse,
    NerRequest,
    NerResponse,
    RedactRequest,
    RedactResponse,
)
from tagserve.server.routes.common import ERROR_RESPONSES, random_id, require_json
from tagserve.server.routes.pooling import INLINE_RESPONSE_TOKENS
from tagserve.server.state import ServerState, State

router = APIRouter()


async def _recognize(state: ServerState, route: str, items: list[Any],
                     options: NerOptions) -> tuple[list[NerResult], int]:
    """Results of every item and the tokens the model ran."""
    if not items:
        raise ValidationError("You must pass at least one input", parameter="input")
    limit = state.settings.max_inputs_per_request
    if len(items) > limit:
        raise RequestTooLargeError(f"This request has {len(items)} inputs; the server accepts "
                                   f"at most {limit} per request (--max-inputs-per-request).")
    engine = CountingEngine(state.engine)
    results = await ner_async(engine, items, options)
    state.metrics.prompt_tokens.inc(engine.prompt_tokens)
    state.metrics.entities.labels(route).inc(sum(
        len(r["entities"] if isinstance(r, dict) else r) for r in results))
    return results, engine.prompt_tokens


def _number(value: np.generic) -> Any:
    """JSON for the numpy scalars of results (the pipeline's float32 scores)."""
    return value.item()


async def _respond(state: ServerState, request: Request, request_id: str | None, model: str,
                   prefix: str, prompt_tokens: int,
                   build: Callable[[], list[dict[str, Any]]]) -> Response:
    """The response around `build()`'s data items, made in the thread pool when large."""
    request_id = request.headers.get("x-request-id") or request_id or random_id()
    created = int(time.time())

    def render() -> Response:
        body = {"id": f"{prefix}-{request_id}", "object": "list", "created": created,
                "model": model, "data": build(),
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
        return Response(pydantic_core.to_json(body, fallback=_number),
                        media_type="application/json")

    if prompt_tokens <= INLINE_RESPONSE_TOKENS:
        return render()
    return await state.engine.run_in_pool(render)


async def _ner(body: NerRequest, request: Request, state: ServerState) -> Response:
    model = state.model_name(body.model)
    items = [body.input] if isinstance(body.input, str) else body.input
    options = NerOptions.create(
        aggregation_strategy=body.aggregation_strategy, ignore_labels=body.ignore_labels,
        stride=body.stride, is_split_into_words=bool(items) and isinstance(items[0], list),
        delimiter=body.delimiter, window_merge=body.window_merge, threshold=body.threshold,
        labels=body.labels, bio=body.bio, return_tokens=body.return_tokens)
    results, prompt_tokens = await _recognize(state, "/v1/ner", items, options)

    def build() -> list[dict[str, Any]]:
        return [{"index": i, "object": "entities",
                 **(r if isinstance(r, dict) else {"entities": r})}
                for i, r in enumerate(results)]

    return await _respond(state, request, body.request_id, model, "ner", prompt_tokens, build)


def _redaction_stride(state: ServerState) -> int:
    """Default window overlap of `/v1/redact`: a quarter of the window (as long as
    `Recognizer.for_model` makes it)."""
    config, tokenizer = state.engine.model_config, state.engine.tokenizer
    window = config.max_model_len if tokenizer is None else min(config.max_model_len,
                                                                 tokenizer.model_max_length)
    return window // 4


async def _redact(body: RedactRequest, request: Request, state: ServerState) -> Response:
    model = state.model_name(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    # Whole texts, and windows merged by probabilities: no span is dropped as an overlap.
    options = NerOptions.create(
        aggregation_strategy=body.aggregation_strategy, threshold=body.threshold,
        labels=body.labels, bio=body.bio, window_merge="probabilities",
        stride=_redaction_stride(state) if body.stride is None else body.stride)
    results, prompt_tokens = await _recognize(state, "/v1/redact", texts, options)

    def build() -> list[dict[str, Any]]:
        data = []
        for i, (text, entities) in enumerate(zip(texts, results, strict=True)):
            redacted, spans = redact(text, entities, body.mode, body.modes_by_label,
                                     body.mask_char, body.hash_salt)
            data.append({"index": i, "object": "redaction", "text": redacted,
                         "entities": spans})
        return data

    return await _respond(state, request, body.request_id, model, "redact", prompt_tokens,
                          build)


@router.get("/v1/ner/decoding", response_model=NerDecodingResponse, responses=ERROR_RESPONSES)
async def ner_decoding(state: State) -> NerDecodingResponse:
    """The served model's recommended `aggregation_strategy`, `bio` and `threshold` (the page's
    defaults; `/v1/ner` and `/v1/redact` themselves default to "simple" without BIO decoding or
    threshold)."""
    return NerDecodingResponse(model=state.model_name(None),
                               **recommended_decoding(state.engine.model_config.hf_config))


@router.post("/v1/ner", response_model=NerResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)])
async def create_ner(body: NerRequest, request: Request, state: State) -> Response:
    """Entities of each input, as `LLM.ner` (transformers' token-classification pipeline)
    finds them: `input` is a text, a list of texts or a list of word lists."""
    return await cancel_on_disconnect(request.receive, _ner(body, request, state))


@router.post("/v1/redact", response_model=RedactResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)])
async def create_redaction(body: RedactRequest, request: Request, state: State) -> Response:
    """Each text with its entities replaced (`[LABEL]`), masked (`*****`) or hashed
    (`<LABEL:sha256 prefix>`), per label if asked, and the redacted spans."""
    return await cancel_on_disconnect(request.receive, _redact(body, request, state))
