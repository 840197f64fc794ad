"""`LLM.ner` against transformers' token-classification pipeline, for every aggregation
strategy and the three tokenizer kinds (WordPiece, byte-level BPE, Unigram)."""

from __future__ import annotations

import pytest

from tagserve import LLM

from checkpoints import sentences
from ner_util import FAMILIES, STRATEGIES, assert_same_entities, run_hf

# Our sub-word heuristic warns as the pipeline does.
pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

# Varied sentences (names, places, numbers, punctuation, non-ASCII, emoji), then edge cases:
# empty and blank text, special tokens typed in the text, unknown or over-long words, odd spaces.
TEXTS = sentences(30, seed=11) + [
    "", "   ", "Hello [SEP] world <s> x </s> [UNK]", "🙂🙂 ☕ 👍🏽", "a" * 150,
    "Zoë\u00a0Müller\tin  北京。", "Ана-Мария O'Brien-Smith (São Paulo), e-mail: x@y.de!",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, make_checkpoint):
    path = make_checkpoint(request.param)
    return request.param, path, LLM(str(path), device="cpu")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_match_pipeline(family, strategy):
    name, path, llm = family
    theirs = run_hf(path, TEXTS, aggregation_strategy=strategy)
    ours = llm.ner(TEXTS, aggregation_strategy=strategy)
    assert len(ours) == len(TEXTS)
    for text, a, b in zip(TEXTS, ours, theirs, strict=True):
        assert_same_entities(a, b, (name, strategy, text))
    assert sum(map(len, ours)) > len(TEXTS)  # the random heads do predict entities


def test_single_text_and_pipeline_defaults(family):
    name, path, llm = family
    text = TEXTS[3]
    # One text gives one list (not a list of lists); ignore_labels=[] keeps "O" entities.
    assert_same_entities(llm.ner(text, ignore_labels=[]),
                         run_hf(path, text, aggregation_strategy="simple", ignore_labels=[]))
    assert_same_entities(llm.ner(text, aggregation_strategy="none", ignore_labels=["O", "B-PER"]),
                         run_hf(path, text, ignore_labels=["O", "B-PER"]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_labels_without_bio_prefix(make_checkpoint, strategy):
    """Plain labels continue each other's groups (`get_tag` counts them as I-), and the group
    name is the label after its first "-" (so "LOC-CITY" groups as "CITY")."""
    labels = ("O", "PER", "LOC-CITY", "B-MISC", "I-MISC")
    path = make_checkpoint("bert", id2label=dict(enumerate(labels)),
                           label2id={label: i for i, label in enumerate(labels)})
    llm = LLM(str(path), device="cpu")
    ours = llm.ner(TEXTS, aggregation_strategy=strategy)
    theirs = run_hf(path, TEXTS, aggregation_strategy=strategy)
    for text, a, b in zip(TEXTS, ours, theirs, strict=True):
        assert_same_entities(a, b, (strategy, text))
    if strategy == "simple":
        assert {e["entity_group"] for r in ours for e in r} >= {"PER", "CITY", "MISC"}
