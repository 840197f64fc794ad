"""`POST /tokenize` and `/detokenize`, as vLLM's, plus character offsets per token."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from tagserve.engine.async_engine import check_token_ids
from tagserve.engine.tokenizer import Tokenizer
from tagserve.errors import ValidationError
from tagserve.server.prompts import render_chat
from tagserve.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeCompletionRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from tagserve.server.routes.common import ERROR_RESPONSES, require_json
from tagserve.server.state import ServerState, State

router = APIRouter()


def _tokenizer(state: ServerState) -> Tokenizer:
    if state.engine.tokenizer is None:
        raise ValidationError("This server runs without a tokenizer.")
    return state.engine.tokenizer


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)])
async def tokenize(body: TokenizeRequest,
                   state: State) -> TokenizeResponse:
    """Token ids of a prompt or a rendered chat; no length limit applies. `offsets` (a tagserve
    extra) gives each token's `[start, end)` characters in the text."""
    state.model_name(body.model)
    tokenizer = _tokenizer(state)
    if isinstance(body, TokenizeCompletionRequest):
        text = body.prompt
    else:
        text = await render_chat(state.engine, body)
    [encoding] = await state.engine.run_in_pool(tokenizer.encode_batch, [text],
                                                body.add_special_tokens)
    return TokenizeResponse(
        count=len(encoding.ids), max_model_len=state.engine.model_config.max_model_len,
        tokens=encoding.ids, token_strs=encoding.tokens if body.return_token_strs else None,
        offsets=encoding.offsets)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)])
async def detokenize(body: DetokenizeRequest,
                     state: State) -> DetokenizeResponse:
    """The text of a list of token ids."""
    state.model_name(body.model)
    tokenizer = _tokenizer(state)
    if body.tokens:
        check_token_ids(body.tokens, tokenizer.vocab_size)
    prompt = await state.engine.run_in_pool(tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=prompt)
