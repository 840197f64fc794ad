"""tagserve's opt-in NER extras: threshold, label filter, BIO repair, Viterbi decoding,
per-token output, word input; plus option checks and the async entry point."""

from __future__ import annotations

import asyncio
import itertools
import json

import numpy as np
import pytest

from tagserve import LLM
from tagserve.engine.async_engine import AsyncEngine
from tagserve.errors import ValidationError
from tagserve.postprocess.bio import BioScheme
from tagserve.postprocess.entities import Aggregator, row_argmax, row_max, row_top, softmax
from tagserve.postprocess.ner import NerOptions, jsonable, ner_async

from checkpoints import LABELS, sentences
from ner_util import STRATEGIES, assert_same_entities, run_hf

# Our sub-word heuristic warns as the pipeline does.
pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

TEXTS = sentences(24, seed=31)


def is_valid_bio(labels: list[str]) -> bool:
    previous = "O"
    for label in labels:
        if label.startswith("I-") and previous[2:] != label[2:]:
            return False
        previous = label
    return True


@pytest.mark.parametrize("strategy", ["none", "simple", "average"])
def test_threshold_and_labels_filter_after_aggregation(bert, strategy):
    key = "entity" if strategy == "none" else "entity_group"
    base = bert.ner(TEXTS, aggregation_strategy=strategy)
    cut = bert.ner(TEXTS, aggregation_strategy=strategy, threshold=0.5)
    assert cut == [[e for e in r if e["score"] >= 0.5] for r in base]
    assert 0 < sum(map(len, cut)) < sum(map(len, base))
    # `labels` keeps entities whose label, or its tag, is listed.
    only = bert.ner(TEXTS, aggregation_strategy=strategy, labels=["PER", "B-LOC"])
    wanted = {"PER", "B-PER", "I-PER", "B-LOC"} if strategy == "none" else {"PER"}
    assert only == [[e for e in r if e[key] in wanted] for r in base]
    assert sum(map(len, only)) > 0


def test_bio_repair(bert):
    kwargs = {"aggregation_strategy": "none", "ignore_labels": [], "return_tokens": True}
    plain = bert.ner(TEXTS, **kwargs)
    fixed = bert.ner(TEXTS, bio="repair", **kwargs)
    assert not all(is_valid_bio([t["label"] for t in r["tokens"]]) for r in plain)
    for p, f in zip(plain, fixed, strict=True):
        before, after = [t["label"] for t in p["tokens"]], [t["label"] for t in f["tokens"]]
        assert is_valid_bio(after)
        # Only orphan I-X change, to B-X; the score stays the model's score for the token.
        for a, b, previous in zip(before, after, ["O", *before[:-1]], strict=True):
            assert b == a or (a.startswith("I-") and b == "B-" + a[2:]
                              and previous[2:] != a[2:])
        assert [t["score"] for t in p["tokens"]] == [t["score"] for t in f["tokens"]]
        assert [e["entity"] for e in f["entities"]] == after
    # The pipeline's grouping already opens an entity at an orphan I-: groups are unchanged.
    for strategy in STRATEGIES[1:]:
        assert (bert.ner(TEXTS, aggregation_strategy=strategy, bio="repair")
                == bert.ner(TEXTS, aggregation_strategy=strategy))


def test_viterbi_matches_brute_force():
    scheme = BioScheme(LABELS)
    rng = np.random.default_rng(0)
    paths = np.array(list(itertools.product(range(len(LABELS)), repeat=4)))
    valid = np.array([is_valid_bio([LABELS[i] for i in p]) for p in paths])
    for _ in range(20):
        probs = rng.dirichlet(np.ones(len(LABELS)), size=4).astype(np.float32)
        logp = np.log(probs.astype(np.float64))
        totals = logp[np.arange(4), paths].sum(1)
        best = paths[valid][totals[valid].argmax()]
        np.testing.assert_array_equal(scheme.viterbi(probs), best)


@pytest.mark.parametrize("strategy", ["none", "simple", "first"])
def test_viterbi_labels_are_valid(bert, strategy):
    kwargs = {"aggregation_strategy": strategy, "ignore_labels": [], "return_tokens": True}
    plain = bert.ner(TEXTS, **kwargs)
    decoded = bert.ner(TEXTS, bio="viterbi", **kwargs)
    changed = 0
    for p, d in zip(plain, decoded, strict=True):
        labels = [t["label"] for t in d["tokens"]]
        assert is_valid_bio(labels)
        before = [t["label"] for t in p["tokens"]]
        if is_valid_bio(before):  # an already valid argmax path is the best path
            assert labels == before
        changed += labels != before
    assert changed > 0


def test_return_tokens(bert):
    tokenizer = bert.get_tokenizer()
    out = bert.ner(TEXTS[:5], aggregation_strategy="average", return_tokens=True)
    rows = bert.encode(TEXTS[:5], pooling_task="token_classify")
    for text, result, row in zip(TEXTS[:5], out, rows, strict=True):
        assert set(result) == {"entities", "tokens"}
        assert result["entities"] == bert.ner(text, aggregation_strategy="average")
        tokens = result["tokens"]
        ids = row.prompt_token_ids
        assert [t["index"] for t in tokens] == list(range(1, len(ids) - 1))
        assert [t["token"] for t in tokens] == tokenizer.convert_ids_to_tokens(ids[1:-1])
        assert [(t["start"], t["end"]) for t in tokens] == row.offsets[1:-1]
        # average labels whole words; each token reports its word's label and its own score
        data = row.outputs.data.numpy()
        label_ids = [LABELS.index(t["label"]) for t in tokens]
        np.testing.assert_allclose([t["score"] for t in tokens],
                                   data[np.arange(1, len(ids) - 1), label_ids], atol=1e-5)
    simple = bert.ner(TEXTS[:5], aggregation_strategy="simple", return_tokens=True)
    for result, row in zip(simple, rows, strict=True):
        argmax = row.outputs.data.argmax(-1)[1:-1].tolist()
        assert [t["label"] for t in result["tokens"]] == [LABELS[i] for i in argmax]


@pytest.mark.parametrize("family", ["bert", "roberta", "xlmr"])
def test_word_input_matches_pipeline(make_checkpoint, family):
    path = make_checkpoint(family)
    llm = LLM(str(path), device="cpu")
    words = [text.split() for text in TEXTS]
    for strategy in ("none", "simple", "first"):
        ours = llm.ner(words, aggregation_strategy=strategy, is_split_into_words=True)
        theirs = run_hf(path, words, aggregation_strategy=strategy, is_split_into_words=True)
        for a, b in zip(ours, theirs, strict=True):
            assert_same_entities(a, b, (family, strategy))
    # One list of words gives a list of one result, as in transformers.
    one = llm.ner(words[0], is_split_into_words=True)
    assert len(one) == 1
    assert_same_entities(one[0], run_hf(path, words[0], aggregation_strategy="simple",
                                        is_split_into_words=True)[0])


def test_word_input_offsets_index_joined_words(bert):
    words = [["Zoë", "Müller", "moved", "to", "São", "Paulo", "."], ["x"], []]
    for delimiter in (" ", " | "):
        out = bert.ner(words, aggregation_strategy="none", is_split_into_words=True,
                       delimiter=delimiter, ignore_labels=[], return_tokens=True)
        for ws, result in zip(words, out, strict=True):
            text = delimiter.join(ws)
            starts = np.cumsum([0] + [len(w) + len(delimiter) for w in ws])
            for token in result["tokens"]:  # within one word
                word = np.searchsorted(starts, token["start"], side="right") - 1
                assert token["end"] <= starts[word] + len(ws[word])
            assert "".join(text[t["start"]:t["end"]] for t in result["tokens"]) == "".join(ws)
    assert out[2] == {"entities": [], "tokens": []}


def test_option_errors(bert):
    for kwargs, match in [({"aggregation_strategy": "mean"}, "aggregation_strategy"),
                          ({"window_merge": "votes"}, "window_merge"),
                          ({"bio": "strict"}, "bio"), ({"threshold": 1.5}, "threshold")]:
        with pytest.raises(ValidationError, match=match):
            bert.ner("x", **kwargs)
    with pytest.raises(ValidationError, match="At least one input"):
        bert.ner([])
    with pytest.raises(ValidationError, match="must be a string"):
        bert.ner([["a", "b"]])
    with pytest.raises(ValidationError, match="list of words"):
        bert.ner([["a"], "b"], is_split_into_words=True)
    with pytest.raises(TypeError, match="Unknown NER options"):
        NerOptions.create(grouped_entities=True)
    assert bert.ner("x", aggregation_strategy="SIMPLE") == bert.ner("x")


def test_async_entry_point_and_json(bert_path, bert):
    engine = AsyncEngine(LLM(str(bert_path), device="cpu").llm_engine)
    try:
        options = NerOptions.create(aggregation_strategy="first", stride=16)
        long = " ".join(TEXTS)
        got = asyncio.run(ner_async(engine, [long, *TEXTS[:3]], options))
    finally:
        engine.shutdown()
    assert got == bert.ner([long, *TEXTS[:3]], aggregation_strategy="first", stride=16)
    data = json.loads(json.dumps(jsonable(got)))
    assert data[1][0]["score"] == pytest.approx(float(got[1][0]["score"]))
    assert isinstance(data[1][0]["score"], float)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_repeated_and_unknown_words_match_pipeline(make_checkpoint, family):
    """Words are decoded once per distinct group of tokens (cached by token ids): repeats of
    short and long groups in one call, and unknown tokens, whose word is their text, must
    still give the pipeline's words (all groups shown, "O" included)."""
    path = make_checkpoint(family)
    llm = LLM(str(path), device="cpu")
    texts = [f"{a} met Zoë Müller-Lüdenscheidt in {b} {c}"
             for a in ("Ana", "Bob", "Ana") for b in ("☃", "✈", "Oslo") for c in ("🙂", "x")]
    texts += ["Supercalifragilisticexpialidocious " * 3, "a" * 150 + " b", "☃✈ 🙂"]
    for strategy in STRATEGIES:
        ours = llm.ner(texts, aggregation_strategy=strategy, ignore_labels=[])
        theirs = run_hf(path, texts, aggregation_strategy=strategy, ignore_labels=[])
        for text, a, b in zip(texts, ours, theirs, strict=True):
            assert_same_entities(a, b, (family, strategy, text))


def test_row_argmax_matches_numpy():
    """The column-by-column argmax and max equal numpy's, ties (first wins) and NaN included;
    `row_top`'s values are the rows' values at the argmax, to the bit."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(500, 9)).astype(np.float32)  # many ties
    x[7, 3] = np.nan
    x[8, [2, 5]] = np.nan
    x[9] = np.nan
    for rows in (x[:7], x, x[:, :1], x[:0]):
        assert np.array_equal(row_argmax(rows), rows.argmax(axis=1))
        assert np.array_equal(row_max(rows), rows.max(axis=1), equal_nan=True)
        for probs in (rows, rows + 0.5):  # maxima 0 (the fallback) and positive (the keys)
            labels, values = row_top(probs)
            assert np.array_equal(labels, probs.argmax(axis=1))
            assert values.tobytes() == probs[np.arange(len(probs)), labels].tobytes()
    logits = rng.standard_normal((300, 9)).astype(np.float32) * 8
    expected = np.exp(logits - logits.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    assert softmax(logits).tobytes() == expected.tobytes()  # transformers' float32 softmax


def test_word_cache_is_shared_per_tokenizer(bert):
    """Aggregators of one tokenizer share a word cache per key kind (token ids; ids and word
    starts), so a second call finds the first one's words, and gives the same entities."""
    tokenizer = bert.get_tokenizer()
    id2label = dict(enumerate(LABELS))
    simple = Aggregator(tokenizer, id2label, "simple")
    assert Aggregator(tokenizer, id2label, "simple", threshold=0.5)._words is simple._words
    first = Aggregator(tokenizer, id2label, "first")
    assert Aggregator(tokenizer, id2label, "max")._words is first._words
    assert first._words is not simple._words
    simple._words.clear()
    texts = sentences(8, seed=5)
    cold = bert.ner(texts)
    assert simple._words  # filled by that call
    assert bert.ner(texts) == cold
