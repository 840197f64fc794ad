"""Host-side structures of the engine: chunks of prompts in one array, the result arena."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagserve.engine.inputs import (
    LazyOffsets,
    PromptChunk,
    TokenizeParams,
    tokenize_chunk,
    tokenize_prompts,
)
from tagserve.engine.staging import ResultArena
from tagserve.errors import ValidationError


def test_prompt_chunk_views_match_the_lists():
    lists = [[1, 2, 3], [4], [5, 6]]
    chunk = PromptChunk.of(lists, [None] * 3)
    assert chunk.flat.dtype == np.int64 and chunk.flat.tolist() == [1, 2, 3, 4, 5, 6]
    views = chunk.ids_views()
    assert [v.tolist() for v in views] == lists
    assert all(v.base is chunk.flat for v in views)  # views, not copies
    assert PromptChunk.of([], []).ids_views() == []


@pytest.mark.parametrize("prompts", [
    [[101, 7, 102], [101, 8, 9, 102]],  # token ids: the whole-chunk path
    [[101, 7, 102], (5, 6), {"prompt_token_ids": [3, 4]}],  # mixed: prompt by prompt
    [[101, np.int64(7), 102]],  # numpy ints: prompt by prompt
])
def test_tokenize_chunk_matches_tokenize_prompts(prompts):
    params = TokenizeParams(16)
    chunk = tokenize_chunk(prompts, None, params)
    expected = tokenize_prompts(prompts, None, params)
    assert chunk.token_ids == [t.token_ids for t in expected]
    assert [type(t) for t in chunk.token_ids] == [list] * len(prompts)
    assert [v.tolist() for v in chunk.ids_views()] == chunk.token_ids
    assert chunk.offsets == [None] * len(prompts)


def test_tokenize_chunk_copies_token_id_lists():
    ids = [1, 2, 3]
    chunk = tokenize_chunk([ids], None, TokenizeParams(16))
    assert chunk.token_ids == [ids] and chunk.token_ids[0] is not ids


@pytest.mark.parametrize(("prompts", "params", "message"), [
    ([[1, 2], [True, 3]], TokenizeParams(16), "Unsupported prompt"),
    ([[1, 2], [1.0, 3]], TokenizeParams(16), "Unsupported prompt"),
    ([[1, 2], []], TokenizeParams(16), "cannot be empty"),
    ([[1, 2], list(range(20))], TokenizeParams(16), "maximum context length"),
])
def test_tokenize_chunk_errors_are_the_per_prompt_ones(prompts, params, message):
    with pytest.raises(ValidationError, match=message):
        tokenize_chunk(prompts, None, params)


def test_tokenize_chunk_truncates_token_ids_like_tokenize_prompts():
    params = TokenizeParams(16, truncate_prompt_tokens=2)
    chunk = tokenize_chunk([[1, 2, 3], [4]], None, params)
    assert chunk.token_ids == [t.token_ids for t in tokenize_prompts([[1, 2, 3], [4]], None,
                                                                      params)]


def test_tokenize_chunk_texts(bert):
    tokenizer = bert.get_tokenizer()
    texts = ["Alice lives in Paris.", "Bob works at Acme in Berlin today."]
    for params in (TokenizeParams(512), TokenizeParams(512, truncate_prompt_tokens=5),
                   TokenizeParams(512, offsets=False)):
        chunk = tokenize_chunk(texts, tokenizer, params)
        expected = tokenize_prompts(texts, tokenizer, params)
        assert chunk.token_ids == [t.token_ids for t in expected]
        assert [v.tolist() for v in chunk.ids_views()] == chunk.token_ids
        for got, want in zip(chunk.offsets, expected, strict=True):
            assert (got is None) == (want.offsets is None)
            if got is not None:
                assert isinstance(got, LazyOffsets) and got.resolve() == want.offsets.resolve()


def test_result_arena_slices_are_never_shared():
    arena = ResultArena(block_bytes=1024)
    rows = [torch.full((n, 3), float(i)) for i, n in enumerate([10, 40, 7, 100, 60, 5])]
    copies = [arena.copy(r) for r in rows]  # 400 rows of 3 floats: several blocks, a bigger one
    for r, c in zip(rows, copies, strict=True):
        assert c.shape == r.shape and c.dtype == r.dtype and torch.equal(c, r)
        r.zero_()  # the copies own their memory
    assert [int(c[0, 0]) for c in copies] == list(range(6))
    assert all(torch.all(c == c[0, 0]) for c in copies)
    assert arena.block_bytes >= 2 * 100 * 3 * 4
