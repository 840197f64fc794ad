"""NER post-processing in worker processes (`NerPool`): the same results, to the byte, as in
the main process, for every option; worker failures raise instead of hanging."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import numpy as np
import pytest

from tagserve import LLM
from tagserve.cli import main
from tagserve.postprocess.ner import NerOptions, Recognizer
from tagserve.postprocess.ner_pool import Cut, NerPool, NerWorkerError, Shipment, WindowIds
from tagserve.postprocess.windows import Document

from checkpoints import sentences

pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

# Short texts, an empty one, and long documents (about 100 to 900 tokens) for `stride`.
TEXTS = [*sentences(24, seed=5), "", "Paris", *(" ".join(sentences(n, seed=s))
                                               for s, n in ((21, 3), (22, 8), (23, 16)))]
CASES = [
    *({"aggregation_strategy": s} for s in ("none", "simple", "first", "average", "max")),
    *({"aggregation_strategy": s, "stride": 16} for s in ("simple", "first", "average", "max")),
    {"aggregation_strategy": "none", "stride": 7, "window_merge": "probabilities"},
    {"aggregation_strategy": "first", "stride": 0, "window_merge": "probabilities",
     "return_tokens": True},
    {"aggregation_strategy": "simple", "threshold": 0.3, "labels": ["PER"]},
    {"aggregation_strategy": "none", "bio": "repair", "return_tokens": True},
    {"aggregation_strategy": "average", "bio": "viterbi", "stride": 16, "return_tokens": True},
]


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types; numpy scalars equal to the byte."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.generic):
        return a.tobytes() == b.tobytes()
    return a == b


@pytest.fixture(scope="module", params=["bert", "roberta"])
def llm(request, make_checkpoint) -> LLM:
    # A small token budget: many engine steps, so many batches go to the workers.
    return LLM(str(make_checkpoint(request.param)), device="cpu", ner_workers=2,
               max_num_batched_tokens=256)


@pytest.fixture(params=[False, True], ids=["entities-in-workers", "tokenize-only"])
def tokenize_only(llm, request):
    """Both ways of using the workers: all of NER there, or only cutting the inputs."""
    llm.ner_tokenize_only = request.param
    yield request.param
    llm.ner_tokenize_only = False


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                    o.items()))
def test_workers_match_in_process(llm, options, tokenize_only):
    ours = llm.ner(TEXTS, use_tqdm=False, **options)
    assert same(ours, llm.ner(TEXTS, use_tqdm=False, postprocess_workers=0, **options))
    assert sum(map(len, ours)) > 0


def test_word_input_and_single_text(llm, tokenize_only):
    words = [text.split() for text in TEXTS if text]
    for kwargs in ({"aggregation_strategy": "first"}, {"aggregation_strategy": "max",
                                                       "stride": 20, "delimiter": "  "}):
        assert same(llm.ner(words, is_split_into_words=True, use_tqdm=False, **kwargs),
                    llm.ner(words, is_split_into_words=True, use_tqdm=False,
                            postprocess_workers=0, **kwargs))
    assert same(llm.ner(TEXTS[0]), llm.ner(TEXTS[0], postprocess_workers=0))


def test_a_pool_for_one_call(llm):
    assert same(llm.ner(TEXTS, use_tqdm=False, postprocess_workers=1),
                llm.ner(TEXTS, use_tqdm=False, postprocess_workers=0))


def test_shipment_round_trip(llm):
    recognizer = Recognizer.for_model(llm.model_config, llm.get_tokenizer(),
                                      NerOptions(stride=16))
    rng = np.random.default_rng(0)
    docs, kept = recognizer.prepare(TEXTS), {}
    cuts = []
    for key, doc in enumerate(docs):
        doc.rows = [rng.standard_normal((len(w.ids), recognizer.width), dtype=np.float32)
                    for w in doc.windows]
        cut = Cut(0, key, [WindowIds(w.ids.astype(np.int32)) for w in doc.windows])
        cut.rows = doc.rows
        cuts.append(cut)
        kept[key] = Document(doc.text, doc.windows, doc.stride)
    again = Shipment.of(cuts).documents(kept)
    assert same(recognizer.finish(again), recognizer.finish(docs)) and not kept
    last = len(docs) - 1  # a long document: several windows
    kept = {last: Document(docs[-1].text, docs[-1].windows, docs[-1].stride)}
    cuts[-1].rows = cuts[-1].rows[:-1]  # a window's rows missing
    with pytest.raises(RuntimeError, match="rows of logits for"):
        Shipment.of(cuts[-1:]).documents(kept)
    kept = {last: Document(docs[-1].text, docs[-1].windows, docs[-1].stride)}
    cuts[-1].windows = cuts[-1].windows[:-1]  # and the window
    with pytest.raises(RuntimeError, match="windows differ"):
        Shipment.of(cuts[-1:]).documents(kept)


def test_workers_cut_as_this_process(llm):
    recognizer = Recognizer.for_model(llm.model_config, llm.get_tokenizer(),
                                      NerOptions(stride=16))
    with NerPool.for_model(2, llm.model_config, llm.get_tokenizer()) as pool:
        cuts = pool.prepare(recognizer, TEXTS * 3)
    docs = recognizer.prepare(TEXTS * 3)
    assert {c.worker for c in cuts} == {0, 1} and len({c.key for c in cuts}) == len(cuts)
    for cut, doc in zip(cuts, docs, strict=True):
        assert [w.ids.tolist() for w in cut.windows] == [w.ids.tolist() for w in doc.windows]


def test_a_worker_error_is_raised(make_checkpoint):
    llm = LLM(str(make_checkpoint("bert")), device="cpu")
    recognizer = Recognizer.for_model(llm.model_config, llm.get_tokenizer(), NerOptions())
    with NerPool.for_model(1, llm.model_config, llm.get_tokenizer()) as pool:
        cuts = pool.prepare(recognizer, TEXTS[:3])
        for cut in cuts:  # one row for each window, not one for each token
            cut.rows = [np.zeros((1, recognizer.width), np.float32) for _ in cut.windows]
        finished, _ = pool.submit(recognizer.options, cuts)[0]
        with pytest.raises(RuntimeError, match="rows of logits for"):  # raised in the worker
            finished.result()
        cuts, docs = pool.prepare(recognizer, TEXTS[:3]), recognizer.prepare(TEXTS[:3])
        for cut, doc in zip(cuts, docs, strict=True):  # the pool still works
            cut.rows = doc.rows = [np.zeros((len(w.ids), recognizer.width), np.float32)
                                   for w in doc.windows]
        finished, _ = pool.submit(recognizer.options, cuts)[0]
        assert same(finished.result(), recognizer.finish(docs))


def test_a_dead_worker_raises_and_the_next_call_gets_a_new_pool(make_checkpoint):
    llm = LLM(str(make_checkpoint("bert")), device="cpu", ner_workers=1)
    expected = llm.ner(TEXTS, use_tqdm=False, postprocess_workers=0)
    assert same(llm.ner(TEXTS, use_tqdm=False), expected)
    for executor in llm._ner_pool._executors:
        for pid in list(executor._processes):
            os.kill(pid, signal.SIGKILL)
    with pytest.raises(NerWorkerError, match="worker"):
        llm.ner(TEXTS, use_tqdm=False)
    assert same(llm.ner(TEXTS, use_tqdm=False), expected)


def test_a_failing_initializer_raises(tmp_path):
    cut = Cut(0, 0, [WindowIds(np.array([5], np.int32))])
    cut.rows = [np.zeros((1, 1), np.float32)]
    # no tokenizer.json there
    with NerPool(1, tmp_path, {0: "O"}, 16) as pool, pytest.raises(NerWorkerError):
        pool.submit(NerOptions(), [cut])[0][0].result()


@pytest.mark.parametrize("options", [[], ["--aggregation-strategy", "first", "--stride", "16",
                                          "--threshold", "0.2"]])
def test_corpus_job_with_workers_writes_the_same_bytes(make_checkpoint, tmp_path, options):
    # One batch: the engine's batches (and so the last bits of its logits) do not depend on
    # timing; its 2 * 29 documents are shared by both workers.
    ckpt, texts = str(make_checkpoint("bert")), TEXTS * 2
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(texts)), encoding="utf-8")
    outputs = []
    for workers in ("0", "2"):
        output = tmp_path / f"out{workers}.jsonl"
        assert main(["ner", ckpt, "--input", str(source), "--output", str(output),
                     "--batch-size", "100", "--workers", workers, *options]) == 0
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == len(texts)
