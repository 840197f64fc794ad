"""Long documents: overlapping windows as transformers cuts them, merged as its pipeline does
(or, opt-in, by probabilities), offsets into the original text, and `LLM.encode_long`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tagserve import LLM, PoolingParams
from tagserve.errors import ValidationError
from tagserve.postprocess.windows import (
    Document,
    SpecialLayout,
    Window,
    cut_documents,
    documents_of,
    encode_windows,
)

from checkpoints import MAX_LEN, sentences
from ner_util import FAMILIES, assert_same_entities, in_order, run_hf

# Our sub-word heuristic warns as the pipeline does.
pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

# About 100 to 900 tokens: from one window to many.
LONG = [" ".join(sentences(n, seed=s)) for s, n in ((21, 3), (22, 8), (23, 16))]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, make_checkpoint):
    path = make_checkpoint(request.param)
    return request.param, path, LLM(str(path), device="cpu")


@pytest.mark.parametrize("stride", [0, 16, 100])
def test_windows_match_pipeline(family, stride):
    name, path, llm = family
    for strategy in ("simple", "first", "average", "max"):
        ours = llm.ner(LONG, aggregation_strategy=strategy, stride=stride)
        theirs = run_hf(path, LONG, aggregation_strategy=strategy, stride=stride)
        for text, a, b in zip(LONG, ours, theirs, strict=True):
            assert_same_entities(a, b, (name, strategy, stride))
            assert all(0 <= e["start"] <= e["end"] <= len(text) for e in a)
            assert in_order(a)
        assert a[-1]["end"] > len(LONG[-1]) - 100  # the end of the last text is covered


def test_word_input_windows_match_pipeline(family):
    name, path, llm = family
    words = [text.split() for text in LONG]
    ours = llm.ner(words, aggregation_strategy="first", stride=20, is_split_into_words=True)
    theirs = run_hf(path, words, aggregation_strategy="first", stride=20,
                    is_split_into_words=True)
    for a, b in zip(ours, theirs, strict=True):
        assert_same_entities(a, b, name)


def test_no_stride_truncates_like_pipeline(family, caplog):
    name, path, llm = family
    with caplog.at_level(logging.WARNING, logger="tagserve.postprocess.ner"):
        ours = llm.ner(LONG)
    assert "input(s) longer than 128 tokens were truncated" in caplog.text
    for a, b in zip(ours, run_hf(path, LONG, aggregation_strategy="simple"), strict=True):
        assert_same_entities(a, b, name)


@pytest.mark.parametrize("stride", [0, 7, 64])
def test_document_layout_is_the_whole_encoding(family, stride):
    """Windows put back together give the document as if encoded in one piece."""
    name, path, llm = family
    tokenizer = llm.get_tokenizer()
    words = [text.split() for text in LONG]
    for inputs, is_words in ((LONG, False), (words, True)):
        docs = cut_documents(tokenizer, inputs, MAX_LEN, stride, is_split_into_words=is_words)
        full = tokenizer.rust.encode_batch(inputs, is_pretokenized=is_words)
        for doc, enc in zip(docs, full, strict=True):
            assert all(len(w.ids) <= MAX_LEN for w in doc.windows)
            assert doc.whole.ids.tolist() == enc.ids
            if not is_words:
                assert [tuple(o) for o in doc.whole.offsets.tolist()] == enc.offsets
            assert doc.whole.special.tolist() == [bool(m) for m in enc.special_tokens_mask]
        assert len(docs[-1].windows) > 2


def test_probability_merge_weights():
    """Each token's rows are averaged over its windows with weight 1 + distance to the
    nearest cut edge of the window."""
    def window(n: int) -> Window:
        special = np.zeros(n + 2, bool)
        special[[0, -1]] = True
        content = ~special
        return Window(np.zeros(n + 2, np.int64), np.zeros((n + 2, 2), np.int64), special, content)

    # Content of 6 tokens, windows of 4 content tokens overlapping by 2: [0, 4) and [2, 6).
    doc = Document("", [window(4), window(4)], stride=2)
    rows = [np.full((6, 1), 1.0, np.float32), np.full((6, 1), 3.0, np.float32)]
    merged = doc.merge_rows(rows)[:, 0]
    # Token 2 is 1 from the first window's cut end (weight 2) and 0 from the second's cut
    # start (weight 1); token 3: weights 1 and 2.
    np.testing.assert_allclose(merged, [1, 1, 1, 1 * 2 / 3 + 3 / 3, 1 / 3 + 3 * 2 / 3, 3, 3, 3])


def test_probability_merge_mode(family):
    name, path, llm = family
    tokenizer = llm.get_tokenizer()
    for strategy in ("none", "simple", "average"):
        out = llm.ner(LONG, aggregation_strategy=strategy, stride=32,
                      window_merge="probabilities", return_tokens=True)
        for text, result, enc in zip(LONG, out, tokenizer.rust.encode_batch(LONG), strict=True):
            tokens, entities = result["tokens"], result["entities"]
            assert [t["index"] for t in tokens] == [
                i for i, m in enumerate(enc.special_tokens_mask) if not m]
            assert [(t["start"], t["end"]) for t in tokens] == [
                enc.offsets[t["index"]] for t in tokens]
            assert all(0 <= e["start"] <= e["end"] <= len(text) for e in entities)
            if strategy != "none":
                assert in_order(entities)
    # A text that fits in one window: both merges are the pipeline's result.
    short = sentences(5, seed=3)
    for merge in ("entities", "probabilities"):
        ours = llm.ner(short, aggregation_strategy="max", stride=8, window_merge=merge)
        for a, b in zip(ours, run_hf(path, short, aggregation_strategy="max"), strict=True):
            assert_same_entities(a, b, (name, merge))


def test_encode_long(family):
    name, path, llm = family
    tokenizer = llm.get_tokenizer()
    stride = 24
    out = llm.encode_long(LONG, stride=stride)
    docs = cut_documents(tokenizer, LONG, MAX_LEN, stride)
    for result, doc, enc in zip(out, docs, tokenizer.rust.encode_batch(LONG), strict=True):
        assert result.prompt_token_ids == enc.ids
        assert result.offsets == enc.offsets
        data = result.outputs.data
        assert data.shape == (len(enc.ids), 5) and data.dtype == torch.float32
        torch.testing.assert_close(data.sum(-1), torch.ones(len(enc.ids)))
        # Rows of tokens that only one window holds are that window's rows.
        windows = llm.encode([w.ids.tolist() for w in doc.windows],
                             pooling_task="token_classify")
        counts = np.bincount(np.concatenate([p[p >= 0] for p in doc.positions]),
                             minlength=len(enc.ids))
        for pos, rows in zip(doc.positions, windows, strict=True):
            alone = (pos >= 0) & (counts[np.maximum(pos, 0)] == 1)
            torch.testing.assert_close(data[pos[alone]], rows.outputs.data[alone])
    # Short texts: exactly `encode`.
    short = sentences(4, seed=5)
    for a, b in zip(llm.encode_long(short, PoolingParams(use_activation=False)),
                    llm.encode(short, PoolingParams(use_activation=False),
                               pooling_task="token_classify"), strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        torch.testing.assert_close(a.outputs.data, b.outputs.data)


def test_stride_errors(make_checkpoint):
    llm = LLM(str(make_checkpoint("bert")), device="cpu")
    with pytest.raises(ValidationError, match="must be less than `tokenizer.model_max_length`"):
        llm.ner("x", stride=MAX_LEN)
    with pytest.raises(ValidationError, match="must be less than 126"):
        llm.ner("x", stride=126)
    with pytest.raises(ValidationError, match='aggregation_strategy="none"'):
        llm.ner("x", aggregation_strategy="none", stride=4)
    with pytest.raises(ValidationError, match="non-negative"):
        llm.ner("x", stride=-1)
    with pytest.raises(ValidationError, match="stride"):
        llm.encode_long("x", stride=126)


@pytest.mark.parametrize("stride", [None, 7])
def test_special_layout_flags_match_the_mask(family, stride):
    """Special-token flags from the template's layout are each window's
    `special_tokens_mask`, also for special-token strings inside the text and empty text."""
    name, path, llm = family
    tokenizer = llm.get_tokenizer()
    layout = SpecialLayout.probe(tokenizer)
    assert layout is not None, name
    texts = [*LONG, "", " ".join(tokenizer.all_special_tokens) + " " + LONG[0]]
    encodings = encode_windows(tokenizer, texts, MAX_LEN, stride)
    docs = documents_of(texts, encodings, stride, layout=layout)
    for doc, windows in zip(docs, encodings, strict=True):
        for window, encoding in zip(doc.windows, windows[:len(doc.windows)], strict=True):
            assert window.special.tolist() == [bool(m) for m in encoding.special_tokens_mask]
