"""The offline entry point, call-compatible with vLLM's `LLM` for token classification."""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tokenizers import Encoding
from tqdm.auto import tqdm

from tagserve.config import POOLING_TASKS, PoolerConfig, check_removed_task
from tagserve.engine.engine import LLMEngine
from tagserve.engine.factory import EngineArgs, create_engine
from tagserve.engine.inputs import (
    Prompt,
    TokenizeParams,
    encode_texts,
    normalize_prompts,
    prompt_text,
    tokenize_chunk,
)
from tagserve.engine.offline import (
    ENCODE_AHEAD,
    StartedAhead,
    chunk_preparer,
    progress_bar,
    prompt_chunks,
    run_requests,
)
from tagserve.engine.request import Request
from tagserve.engine.tokenizer import Tokenizer
from tagserve.errors import ValidationError
from tagserve.outputs import PoolingOutput, PoolingRequestOutput
from tagserve.params import PoolingParams
from tagserve.postprocess.documents import run_documents, tokenizer_thread
from tagserve.postprocess.ner import NerOptions, NerResult, run_ner
from tagserve.postprocess.ner_pool import NerPool
from tagserve.postprocess.windows import documents_of, encode_windows

_TASK_REQUIRED = """pooling_task required for `LLM.encode`
Please use one of the more specific methods or set the pooling_task when using `LLM.encode`:
  - For embeddings, use `LLM.embed(...)` or `pooling_task="embed"`.
  - For classification logits, use `LLM.classify(...)` or `pooling_task="classify"`.
  - For similarity scores, use `LLM.score(...)`.
  - For rewards, use `LLM.reward(...)` or `pooling_task="token_classify"`
  - For token classification, use `pooling_task="token_classify"`
  - For multi-vector retrieval, use `pooling_task="token_embed\""""

class LLM:
    """Load a token-classification checkpoint and run it: `LLM(model).encode(prompts, ...)`."""

    def __init__(self, model: str, tokenizer: str | None = None, runner: str = "auto",
                 convert: str = "auto", dtype: Any = "auto", max_model_len: int | None = None,
                 pooler_config: PoolerConfig | dict[str, Any] | None = None,
                 hf_overrides: dict[str, Any] | Callable | None = None,
                 trust_remote_code: bool = False, seed: int = 0, device: str = "auto",
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 load_format: str = "auto", revision: str | None = None,
                 skip_tokenizer_init: bool = False, enforce_eager: bool = False,
                 precise_residuals: bool = True, ner_workers: int = 0,
                 ner_tokenize_only: bool = True,
                 **kwargs: Any) -> None:
        self.llm_engine: LLMEngine = create_engine(EngineArgs(
            model=model, tokenizer=tokenizer, runner=runner, convert=convert, dtype=dtype,
            max_model_len=max_model_len, pooler_config=pooler_config, hf_overrides=hf_overrides,
            trust_remote_code=trust_remote_code, seed=seed, device=device,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            load_format=load_format, revision=revision, skip_tokenizer_init=skip_tokenizer_init,
            enforce_eager=enforce_eager, precise_residuals=precise_residuals, extra=kwargs))
        self._request_counter = itertools.count()
        self.ner_workers = ner_workers  # `ner`'s post-processing processes (0: in this one)
        # Workers only tokenize and cut the inputs, entities are built here (False: both there)
        self.ner_tokenize_only = ner_tokenize_only
        self._ner_pool: NerPool | None = None

    @property
    def model_config(self):  # noqa: ANN201
        return self.llm_engine.config.model_config

    @property
    def id2label(self) -> dict[int, str]:
        return self.model_config.hf_config.id2label

    def get_tokenizer(self) -> Tokenizer | None:
        return self.llm_engine.tokenizer

    def _check_task(self, pooling_task: str | None) -> str:
        if pooling_task is None:
            raise ValueError(_TASK_REQUIRED)
        check_removed_task(pooling_task)
        mc = self.model_config
        if pooling_task not in POOLING_TASKS:
            raise ValidationError(f"Unsupported task: {pooling_task!r} Supported tasks: "
                                  f"{list(mc.supported_tasks)}", parameter="task")
        if pooling_task in ("embed", "token_embed"):
            raise ValueError("Embedding API is not supported by this model. Try converting the "
                             "model using `--convert embed`.")
        if pooling_task not in mc.supported_tasks:
            raise ValidationError(f"Unsupported task: {pooling_task!r} Supported tasks: "
                                  f"{list(mc.supported_tasks)}", parameter="task")
        if pooling_task != mc.pooling_task:
            raise ValueError("Try switching the model's pooling_task via "
                             f'`PoolerConfig(task="{pooling_task}")`')
        return pooling_task

    def encode(self, prompts: Prompt | Sequence[Prompt],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
               use_tqdm: bool | Callable[..., tqdm] = True, lora_request: Any = None,
               pooling_task: str | None = None,
               tokenization_kwargs: dict[str, Any] | None = None) -> list[PoolingRequestOutput]:
        """One `PoolingRequestOutput` per prompt, in input order; `outputs.data` is
        `[num_tokens, num_labels]` float32 (probabilities unless `use_activation=False`)."""
        if lora_request is not None:
            raise ValidationError("LoRA adapters are not supported by tagserve yet",
                                  parameter="lora_request")
        task = self._check_task(pooling_task)
        items = normalize_prompts(prompts)
        if not items:
            raise ValidationError("You must pass at least one prompt")
        params = self._params(pooling_params, len(items), task)
        tokenize = TokenizeParams.from_kwargs(self.model_config.max_model_len,
                                              tokenization_kwargs)
        chunks = prompt_chunks(self.llm_engine, len(items))
        outputs: list[PoolingRequestOutput] = [None] * len(items)  # type: ignore[list-item]
        bar = progress_bar(use_tqdm, len(items), "Processed prompts")

        def finished(done: list[Request]) -> None:
            # Runs while the next batch is on the GPU: output objects cost no extra time.
            for r in done:
                outputs[r.arrival_index] = PoolingRequestOutput(
                    r.request_id, r.token_ids, PoolingOutput(r.result), token_spans=r.offsets)
            if bar is not None:
                bar.update(len(done))

        # On CUDA the next chunks are tokenized in a thread while the engine runs this one.
        with chunk_preparer(self.llm_engine) as submit:
            pending = StartedAhead(
                chunks, lambda chunk: submit(self._encode_chunk, items, tokenize, chunk),
                ENCODE_AHEAD)
            try:
                run_requests(self.llm_engine, pending, finished, functools.partial(
                    self._make_requests, items, params, tokenize))
            finally:
                if bar is not None:
                    bar.close()
        return outputs

    def ner(self, inputs: str | Sequence[str] | Sequence[Sequence[str]],
            aggregation_strategy: str = "simple", ignore_labels: Sequence[str] = ("O",),
            stride: int | None = None, is_split_into_words: bool = False, *,
            delimiter: str = " ", window_merge: str = "entities",
            threshold: float | None = None, labels: Sequence[str] | None = None,
            bio: str | None = None, return_tokens: bool = False,
            use_tqdm: bool | Callable[..., tqdm] = True,
            postprocess_workers: int | None = None) -> NerResult | list[NerResult]:
        """Entities per input, as transformers' token-classification pipeline returns them
        (one list for one input, a list of lists for a list); see README "Entities (NER)".
        `postprocess_workers`: processes that tokenize and cut the inputs beside the engine
        (default: the LLM's `ner_workers`; 0: this process; other counts start a pool for
        this call); with the LLM's `ner_tokenize_only=False` they build the entities too."""
        self._check_task("token_classify")
        options = NerOptions.create(
            aggregation_strategy=aggregation_strategy, ignore_labels=ignore_labels,
            stride=stride, is_split_into_words=is_split_into_words, delimiter=delimiter,
            window_merge=window_merge, threshold=threshold, labels=labels, bio=bio,
            return_tokens=return_tokens)
        workers = self.ner_workers if postprocess_workers is None else postprocess_workers
        if workers and workers != self.ner_workers:
            with self._new_ner_pool(workers) as pool:
                return run_ner(self.llm_engine, inputs, options, self._request_counter,
                               use_tqdm, pool, self.ner_tokenize_only)
        return run_ner(self.llm_engine, inputs, options, self._request_counter, use_tqdm,
                       self._shared_ner_pool() if workers else None, self.ner_tokenize_only)

    def _new_ner_pool(self, workers: int) -> NerPool:
        return NerPool.for_model(workers, self.model_config, self.llm_engine.tokenizer)

    def _shared_ner_pool(self) -> NerPool:
        """The LLM's pool of `ner_workers` processes, started on first use (and again after a
        worker died or `ner_workers` changed); shut down when the LLM is collected or at exit."""
        pool = self._ner_pool
        if pool is None or pool.broken or pool.workers != self.ner_workers:
            if pool is not None:
                pool.close()
            self._ner_pool = self._new_ner_pool(self.ner_workers)
            weakref.finalize(self, self._ner_pool.close)
        return self._ner_pool

    def encode_long(self, prompts: str | Sequence[str], pooling_params: PoolingParams | None = None,
                    *, stride: int = 0, use_tqdm: bool | Callable[..., tqdm] = True,
                    pooling_task: str = "token_classify") -> list[PoolingRequestOutput]:
        """`encode` for texts of any length: each text is cut into windows of `max_model_len`
        tokens overlapping by `stride`, every window runs as its own sequence, and the rows
        come back for the whole document (as if encoded in one piece), each token's rows
        averaged over its windows, weighted toward window centres."""
        task = self._check_task(pooling_task)
        mc = self.model_config
        tokenizer = self.llm_engine.tokenizer
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValidationError("encode_long takes a text or a non-empty list of texts")
        if tokenizer is None or mc.pooler_config.pooling_type == "STEP":
            raise ValidationError("encode_long needs a tokenizer and per-token rows (no STEP)")
        params = self._params(pooling_params, 1, task)[0]
        window, specials = mc.max_model_len, tokenizer.num_special_tokens_to_add()
        if not 0 <= stride < window - specials:
            raise ValidationError(f"stride must be in [0, {window - specials})",
                                  parameter="stride", value=stride)
        ids = [str(next(self._request_counter)) for _ in texts]
        bar = progress_bar(use_tqdm, len(texts), "Processed prompts")
        try:
            with tokenizer_thread(self.llm_engine,
                                  lambda items: encode_windows(tokenizer, items, window, stride),
                                  lambda items, enc: documents_of(items, enc, stride)) as prepare:
                docs = run_documents(
                    self.llm_engine, texts, prepare,
                    lambda done: [(d.whole, d.merge_rows()) for d in done], params,
                    self._request_counter, mc.hf_config.num_labels,
                    None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        return [PoolingRequestOutput(i, whole.ids.tolist(), PoolingOutput(torch.from_numpy(rows)),
                                     token_spans=[tuple(o) for o in whole.offsets.tolist()])
                for i, (whole, rows) in zip(ids, docs, strict=True)]

    def _encode_chunk(self, items: list[Prompt], tokenize: TokenizeParams,
                      chunk: range) -> tuple[range, list[Encoding]]:
        """The tokenizer thread's part: the chunk's texts through the Rust tokenizer, which
        releases the GIL. Everything that makes Python objects runs on the engine's thread
        (`_make_requests`): a second thread running Python would hold the GIL whenever the
        engine's thread wakes from a CUDA wait or returns from a torch call, for up to the
        interpreter's 5 ms switch interval each time."""
        texts = [t for t in map(prompt_text, (items[i] for i in chunk)) if t is not None]
        return chunk, encode_texts(texts, self.llm_engine.tokenizer, tokenize)

    def _make_requests(self, items: list[Prompt], params: list[PoolingParams],
                       tokenize: TokenizeParams,
                       encoded: tuple[range, list[Encoding]]) -> list[Request]:
        """A chunk's requests, made (request ids too) on the engine's thread as the chunk is
        taken: nothing per prompt runs before the first batch but the first chunks' share."""
        chunk, encodings = encoded
        made = tokenize_chunk(items[chunk.start:chunk.stop], self.llm_engine.tokenizer,
                              tokenize, encodings)
        counter = self._request_counter
        return [Request(str(next(counter)), token_ids, params[i], offsets, i, ids=ids)
                for i, token_ids, offsets, ids in zip(chunk, made.token_ids, made.offsets,
                                                      made.ids_views(), strict=True)]

    def _params(self, pooling_params: PoolingParams | Sequence[PoolingParams] | None, n: int,
                task: str) -> list[PoolingParams]:
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):  # one check, not one per prompt
            return [self._params([pooling_params], 1, task)[0]] * n
        if len(pooling_params) != n:
            raise ValueError(f"The lengths of prompts ({n}) and params ({len(pooling_params)}) "
                             "must be the same.")
        mc = self.model_config
        verified: dict[int, PoolingParams] = {}  # the same object is verified once
        for p in pooling_params:
            if id(p) in verified:
                continue
            if p.task is not None and p.task != task:
                raise ValueError(f"You cannot overwrite param.task={p.task!r} with "
                                 f"pooling_task={task!r}!")
            verified[id(p)] = p.verify(task, mc.pooler_config,
                                       mc.pooler_config.pooling_type == "STEP")
        return [verified[id(p)] for p in pooling_params]
