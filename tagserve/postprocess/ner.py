"""Named-entity recognition: texts (or words) in, entities with character offsets out.

`Recognizer.prepare` tokenizes and cuts inputs into windows, the engine runs every window as
its own sequence (raw logits), `Recognizer.finish` applies transformers' float32 softmax,
merges windows and aggregates. `run_ner` drives the offline engine (`LLM.ner`); `ner_async`
does the same through an `AsyncEngine` in one call, for an HTTP route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tokenizers import Encoding
from tqdm.auto import tqdm

from tagserve.config import ModelConfig
from tagserve.engine.engine import LLMEngine
from tagserve.engine.inputs import TokenizedPrompt
from tagserve.engine.offline import progress_bar
from tagserve.engine.tokenizer import Tokenizer
from tagserve.errors import ValidationError
from tagserve.params import PoolingParams
from tagserve.postprocess.documents import run_documents, tokenizer_thread, windows_to_run
from tagserve.postprocess.entities import (
    BIO_MODES,
    STRATEGIES,
    Aggregator,
    Sequences,
    softmax,
)
from tagserve.postprocess.windows import (
    Document,
    SpecialLayout,
    Window,
    documents_of,
    encode_windows,
    merge_entities,
)

if TYPE_CHECKING:
    from tagserve.postprocess.ner_pool import NerPool

logger = logging.getLogger(__name__)

WINDOW_MERGES = ("entities", "probabilities")
# config.json key of a model's recommended entity decoding, e.g. {"aggregation_strategy":
# "first", "bio": "viterbi", "threshold": 0.5}: the default of `tagserve ner` and of the page,
# never of `LLM.ner` or of the HTTP routes (those keep transformers' "simple").
DECODING_KEY = "tagserve_ner_decoding"
PIPELINE_DECODING = {"aggregation_strategy": "simple", "bio": None, "threshold": None}
Entities = list[dict[str, Any]]
# Per input: its entities, or {"entities": ..., "tokens": ...} with `return_tokens`.
NerResult = Entities | dict[str, list[dict[str, Any]]]


def recommended_decoding(hf_config: Any) -> dict[str, Any]:
    """The entity decoding a model recommends (`config.json`'s "tagserve_ner_decoding":
    `aggregation_strategy`, `bio` and `threshold`), or transformers' pipeline default ("simple",
    no BIO decoding, no threshold) when it names none. A malformed entry is logged and ignored
    as a whole."""
    entry = hf_config.get(DECODING_KEY) if hf_config is not None else None
    if entry is None:
        return dict(PIPELINE_DECODING)
    fields = entry if isinstance(entry, dict) else {}
    strategy = fields.get("aggregation_strategy", "simple")
    bio, threshold = fields.get("bio"), fields.get("threshold")
    threshold_ok = threshold is None or (isinstance(threshold, (int, float))
                                         and not isinstance(threshold, bool)
                                         and 0.0 <= threshold <= 1.0)
    if (not isinstance(entry, dict) or strategy not in STRATEGIES or bio not in BIO_MODES
            or not threshold_ok):
        logger.warning("Ignoring the model's %s %r: aggregation_strategy must be one of %s, "
                       "bio one of %s and threshold a number from 0 to 1", DECODING_KEY, entry,
                       list(STRATEGIES), list(BIO_MODES))
        return dict(PIPELINE_DECODING)
    return {"aggregation_strategy": strategy, "bio": bio,
            "threshold": None if threshold is None else float(threshold)}


@dataclass(frozen=True)
class NerOptions:
    """transformers' pipeline parameters, then tagserve's opt-in extras."""

    aggregation_strategy: str = "simple"
    ignore_labels: tuple[str, ...] = ("O",)
    stride: int | None = None
    is_split_into_words: bool = False
    delimiter: str = " "
    window_merge: str = "entities"
    threshold: float | None = None
    labels: tuple[str, ...] | None = None
    bio: str | None = None
    return_tokens: bool = False

    @classmethod
    def create(cls, **kwargs: Any) -> NerOptions:
        """Options from keyword arguments as users pass them (`None` means the default)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        strategy = kwargs.pop("aggregation_strategy", "simple")
        if not isinstance(strategy, str):  # transformers' AggregationStrategy enum
            strategy = getattr(strategy, "value", strategy)
        for key in ("ignore_labels", "labels"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = (kwargs[key],)
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"Unknown NER options: {unknown}")
        return cls(aggregation_strategy=str(strategy).lower(), **kwargs)

    def checked(self, max_length: int, specials: int) -> NerOptions:
        if self.aggregation_strategy not in STRATEGIES:
            raise ValidationError(f"aggregation_strategy must be one of {list(STRATEGIES)}",
                                  parameter="aggregation_strategy",
                                  value=self.aggregation_strategy)
        if self.window_merge not in WINDOW_MERGES:
            raise ValidationError(f"window_merge must be one of {list(WINDOW_MERGES)}",
                                  parameter="window_merge", value=self.window_merge)
        if self.bio not in BIO_MODES:
            raise ValidationError(f"bio must be one of {list(BIO_MODES)}", parameter="bio",
                                  value=self.bio)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValidationError("threshold must be between 0 and 1", parameter="threshold",
                                  value=self.threshold)
        if self.stride is not None:
            self._check_stride(max_length, specials)
        return self

    def _check_stride(self, max_length: int, specials: int) -> None:
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 0:
            raise ValidationError("stride must be a non-negative integer", parameter="stride",
                                  value=self.stride)
        if self.stride >= max_length:  # transformers' message
            raise ValidationError("`stride` must be less than `tokenizer.model_max_length` (or "
                                  "even lower if the tokenizer adds special tokens)",
                                  parameter="stride", value=self.stride)
        if self.stride >= max_length - specials:
            raise ValidationError(f"`stride` must be less than {max_length - specials}: "
                                  f"windows hold {max_length} tokens, {specials} of them "
                                  "special", parameter="stride", value=self.stride)
        if self.aggregation_strategy == "none" and self.window_merge == "entities":
            raise ValidationError(
                "`stride` was provided to process all the text but `aggregation_strategy="
                '"none"`, please select another one instead (or window_merge="probabilities").',
                parameter="stride", value=self.stride)


class Recognizer:
    """One model's NER with one set of options: `prepare` inputs, run, `finish` documents."""

    def __init__(self, tokenizer: Tokenizer, id2label: dict[int, str], max_length: int,
                 options: NerOptions) -> None:
        self.tokenizer = tokenizer
        self.id2label = id2label
        self.max_length = max_length
        self.options = options.checked(max_length, tokenizer.num_special_tokens_to_add())
        o = self.options
        self.aggregator = Aggregator(tokenizer, id2label, o.aggregation_strategy,
                                     o.ignore_labels, threshold=o.threshold, labels=o.labels,
                                     bio=o.bio)

    @classmethod
    def for_model(cls, model_config: ModelConfig, tokenizer: Tokenizer | None,
                  options: NerOptions) -> Recognizer:
        if tokenizer is None:
            raise ValidationError("NER needs the model's tokenizer (skip_tokenizer_init=False)")
        if model_config.pooling_task != "token_classify" or \
                model_config.pooler_config.pooling_type == "STEP":
            raise ValidationError("NER needs a token-classification model (pooling task "
                                  "token_classify, without STEP pooling)")
        hf = model_config.hf_config
        id2label = getattr(hf, "id2label", None) or {
            i: f"LABEL_{i}" for i in range(hf.num_labels)}
        max_length = min(model_config.max_model_len, tokenizer.model_max_length)
        return cls(tokenizer, id2label, max_length, options)

    @property
    def layout(self) -> SpecialLayout | None:
        """Where the tokenizer's template puts special tokens (probed once per tokenizer)."""
        return SpecialLayout.probe(self.tokenizer)

    @property
    def width(self) -> int:
        return len(self.id2label)

    def inputs(self, inputs: Any) -> tuple[list[Any], bool]:
        """The list of inputs, and whether one result (not a list) is returned: for a single
        text. A single list of words gives a list of one result, as in transformers."""
        words = self.options.is_split_into_words
        one_word_list = words and isinstance(inputs, (list, tuple)) and bool(inputs) and all(
            isinstance(w, str) for w in inputs)
        items = [inputs] if isinstance(inputs, str) or one_word_list else inputs
        if not isinstance(items, (list, tuple)) or not items:
            raise ValidationError("At least one input is required.", parameter="inputs")
        for item in items:
            ok = (isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item)
                  if words else isinstance(item, str))
            if not ok:
                raise ValidationError("When `is_split_into_words=True`, each input must be a "
                                      "list of words" if words else "Each input must be a "
                                      "string (or pass is_split_into_words=True for words)",
                                      parameter="inputs")
        return list(items), isinstance(inputs, str)

    def prepare(self, items: list[Any]) -> list[Document]:
        """`cut` the inputs, warning about truncated ones."""
        return self.prepared(items, self.encode(items))

    def cut(self, items: list[Any]) -> list[Document]:
        """Tokenize the inputs and cut them into windows (the same ones every time)."""
        return self.documents(items, self.encode(items))

    def encode(self, items: list[Any]) -> list[list[Encoding]]:
        """The Rust half of `cut` (releases the GIL): each input's windows' encodings."""
        o = self.options
        return encode_windows(self.tokenizer, items, self.max_length, o.stride,
                              is_split_into_words=o.is_split_into_words)

    def documents(self, items: list[Any], encodings: list[list[Encoding]]) -> list[Document]:
        """The Python half of `cut`: the documents of `encode(items)`."""
        o = self.options
        return documents_of(items, encodings, o.stride,
                            is_split_into_words=o.is_split_into_words, delimiter=o.delimiter,
                            layout=self.layout)

    def prepared(self, items: list[Any], encodings: list[list[Encoding]]) -> list[Document]:
        """`prepare` from `encode(items)`."""
        docs = self.documents(items, encodings)
        self.warn_truncated(sum(d.truncated for d in docs))
        return docs

    def warn_truncated(self, truncated: int) -> None:
        if truncated:
            logger.warning("%d input(s) longer than %d tokens were truncated, as transformers' "
                           "pipeline does; pass stride=... to cover whole documents.",
                           truncated, self.max_length)

    def finish(self, docs: list[Document]) -> list[NerResult]:
        """Entities of documents whose `rows` (raw logits per window) are all in."""
        rows = [r for d in docs for r in d.rows]
        probs = (softmax(np.concatenate(rows)) if rows
                 else np.zeros((0, self.width), dtype=np.float32))
        seqs, plans = self._sequences(docs, probs)
        tagged = self.aggregator(seqs)
        results: list[NerResult] = []
        for doc, (entity_seqs, token_seq) in zip(docs, plans, strict=True):
            entities = (tagged.entities[entity_seqs[0]] if len(entity_seqs) == 1 else
                        merge_entities([e for s in entity_seqs for e in tagged.entities[s]]))
            if not self.options.return_tokens:
                results.append(entities)
                continue
            tokens = self._tokens(doc.whole, *tagged.tokens(token_seq))
            results.append({"entities": entities, "tokens": tokens})
        return results

    def _sequences(self, docs: list[Document],
                   probs: np.ndarray) -> tuple[Sequences, list[tuple[range, int | None]]]:
        """What to aggregate: each window of a document whose windows' entities are merged (and
        the whole document, for its tokens), or the whole document with its rows merged. And
        per document, its entity sequences and its token sequence. `probs`: all windows' rows,
        concatenated."""
        if all(len(doc.windows) == 1 for doc in docs):  # one window each: probs as they are
            return (Sequences.of([d.text for d in docs], [d.windows[0] for d in docs], probs),
                    [(range(i, i + 1), i) for i in range(len(docs))])
        split = np.split(probs, np.cumsum([len(r) for d in docs for r in d.rows])[:-1])
        merge_windows = self.options.window_merge == "entities"
        texts: list[str] = []
        windows: list[Window] = []
        parts: list[np.ndarray] = []
        plans: list[tuple[range, int | None]] = []
        at = 0
        for doc in docs:
            doc_probs, at = split[at:at + len(doc.windows)], at + len(doc.windows)
            first = len(windows)
            if len(doc.windows) > 1 and merge_windows:
                windows += doc.windows
                parts += doc_probs
                tokens = None
                if self.options.return_tokens:
                    tokens = len(windows)
                    windows.append(doc.whole)
                    parts.append(doc.merge_rows(doc_probs))
                texts += [doc.text] * (len(windows) - first)
                plans.append((range(first, first + len(doc.windows)), tokens))
            else:
                texts.append(doc.text)
                windows.append(doc.whole)
                parts.append(doc.merge_rows(doc_probs))
                plans.append((range(first, first + 1), first))
        return Sequences.of(texts, windows, np.concatenate(parts)), plans

    def _tokens(self, whole: Window, at: np.ndarray, labels: np.ndarray,
                scores: np.ndarray) -> list[dict[str, Any]]:
        """`return_tokens`: each non-special token's string, span, label and its score."""
        names, vocab = self.aggregator.names, self.aggregator.vocab
        return [{"index": i, "token": vocab[token_id], "start": start, "end": end,
                 "label": names[label], "score": score}
                for i, token_id, start, end, label, score in zip(
                    at.tolist(), whole.ids[at].tolist(), whole.offsets[at, 0].tolist(),
                    whole.offsets[at, 1].tolist(), labels.tolist(), scores, strict=True)]


def logits_params(model_config: ModelConfig) -> PoolingParams:
    """Raw logits: the pipeline's softmax is applied in `finish`, whatever the model's head."""
    return PoolingParams(use_activation=False).verify(
        "token_classify", model_config.pooler_config, False)


def run_ner(engine: LLMEngine, inputs: Any, options: NerOptions, request_ids: Iterator[int],
            use_tqdm: bool | Callable[..., tqdm] = True, pool: NerPool | None = None,
            tokenize_only: bool = False) -> NerResult | list[NerResult]:
    """Offline NER over the synchronous engine (what `LLM.ner` calls); with a `pool`, inputs are
    tokenized and documents finished in its worker processes (the bar then counts documents
    handed to them), or with `tokenize_only` only tokenized there (this process never holds
    an `Encoding`: freeing them, reading their ids and spans is ~40 us of the engine thread's
    time per 265-token text)."""
    recognizer = Recognizer.for_model(engine.model_config, engine.tokenizer, options)
    items, single = recognizer.inputs(inputs)
    bar = progress_bar(use_tqdm, len(items), "Recognized entities")
    try:
        with _stages(engine, recognizer, pool, tokenize_only) as (prepare, finish, collect):
            results = run_documents(engine, items, prepare, finish,
                                    logits_params(engine.model_config), request_ids,
                                    recognizer.width, None if bar is None else bar.update)
            return _one_or_all(collect(results), single)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.finished()


@contextmanager
def _stages(engine: LLMEngine, recognizer: Recognizer, pool: NerPool | None,
            tokenize_only: bool) -> Iterator[tuple[Any, Any, Callable[[list[Any]], list[Any]]]]:
    """`prepare`, `finish` and `collect` for `run_ner`: in this process (the Rust tokenizer in
    a thread on CUDA) or with the pool."""
    if pool is not None:
        yield pool.stages(recognizer, tokenize_only)
        return
    with tokenizer_thread(engine, recognizer.encode, recognizer.prepared) as prepare:
        yield prepare, recognizer.finish, list


def _one_or_all(results: list[NerResult], single: bool) -> NerResult | list[NerResult]:
    return results[0] if single else results


class AsyncEngineLike(Protocol):
    """What `ner_async` needs of `tagserve.engine.async_engine.AsyncEngine`."""

    model_config: ModelConfig
    tokenizer: Tokenizer | None

    async def run_in_pool(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    async def encode(self, prompts: list[TokenizedPrompt],
                     params: PoolingParams) -> list[torch.Tensor]: ...


async def ner_async(engine: AsyncEngineLike, inputs: Any,
                    options: NerOptions) -> NerResult | list[NerResult]:
    """NER through the async engine: tokenization and post-processing in its thread pool, the
    windows of all inputs in one `encode` call. Results as `run_ner`; see `jsonable`."""
    recognizer = Recognizer.for_model(engine.model_config, engine.tokenizer, options)
    items, single = recognizer.inputs(inputs)
    docs = await documents_async(engine, recognizer, items)
    results = await engine.run_in_pool(recognizer.finish, docs)
    return results[0] if single else results


async def documents_async(engine: AsyncEngineLike, recognizer: Recognizer, items: list[Any],
                          prepare: Callable[[list[Any]], list[Document]] | None = None,
                          ) -> list[Document]:
    """`items` prepared (by default `recognizer.prepare`, in the engine's thread pool) and run:
    documents with all their rows, ready to finish."""
    docs = await engine.run_in_pool(prepare or recognizer.prepare, items)
    todo = [(doc, k) for doc in docs for k in windows_to_run(doc, recognizer.width)]
    if todo:
        prompts = [TokenizedPrompt(doc.windows[k].ids.tolist(), None, None) for doc, k in todo]
        rows = await engine.encode(prompts, logits_params(engine.model_config))
        for (doc, k), row in zip(todo, rows, strict=True):
            doc.rows[k] = row.numpy()
    return docs


def jsonable(value: Any) -> Any:
    """Results with numpy scalars (the pipeline's float32 scores) as Python numbers."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value

