"""The offline entry point, call-compatible with vLLM's `LLM` for token classification."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from tagserve.config import POOLING_TASKS, PoolerConfig, check_removed_task
from tagserve.engine.engine import LLMEngine
from tagserve.engine.factory import EngineArgs, create_engine
from tagserve.engine.inputs import Prompt, TokenizeParams, normalize_prompts, tokenize_prompts
from tagserve.engine.request import Request
from tagserve.engine.tokenizer import Tokenizer
from tagserve.errors import ValidationError
from tagserve.outputs import PoolingOutput, PoolingRequestOutput
from tagserve.params import PoolingParams

_TASK_REQUIRED = """pooling_task required for `LLM.encode`
Please use one of the more specific methods or set the pooling_task when using `LLM.encode`:
  - For embeddings, use `LLM.embed(...)` or `pooling_task="embed"`.
  - For classification logits, use `LLM.classify(...)` or `pooling_task="classify"`.
  - For similarity scores, use `LLM.score(...)`.
  - For rewards, use `LLM.reward(...)` or `pooling_task="token_classify"`
  - For token classification, use `pooling_task="token_classify"`
  - For multi-vector retrieval, use `pooling_task="token_embed\""""

# Progress bars appear from this many prompts on.
_TQDM_MIN_PROMPTS = 64
# Prompts tokenized per call; the engine starts on the first chunk while the next is tokenized.
_CHUNK = 2048


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
                 **kwargs: Any) -> None:
        self.llm_engine: LLMEngine = create_engine(EngineArgs(
            model=model, tokenizer=tokenizer, runner=runner, convert=convert, dtype=dtype,
            max_model_len=max_model_len, pooler_config=pooler_config, hf_overrides=hf_overrides,
            trust_remote_code=trust_remote_code, seed=seed, device=device,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            load_format=load_format, revision=revision, skip_tokenizer_init=skip_tokenizer_init,
            enforce_eager=enforce_eager, extra=kwargs))
        self._request_counter = itertools.count()

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
        request_ids = [str(next(self._request_counter)) for _ in items]
        chunks = [range(s, min(s + _CHUNK, len(items))) for s in range(0, len(items), _CHUNK)]
        # Tokenize chunk k+1 in a thread while the engine runs chunk k.
        with ThreadPoolExecutor(1, thread_name_prefix="tagserve-tokenize") as pool:
            pending = deque(pool.submit(self._make_requests, items, params, tokenize,
                                        request_ids, chunk) for chunk in chunks)
            try:
                requests = self._run(pending, len(items), use_tqdm)
            finally:
                for future in pending:
                    future.cancel()
        return [PoolingRequestOutput(r.request_id, r.token_ids, PoolingOutput(r.result),
                                     offsets=r.offsets) for r in requests]

    def _make_requests(self, items: list[Prompt], params: list[PoolingParams],
                       tokenize: TokenizeParams, request_ids: list[str],
                       chunk: range) -> list[Request]:
        tokenized = tokenize_prompts([items[i] for i in chunk], self.llm_engine.tokenizer,
                                     tokenize)
        return [Request(request_ids[i], t.token_ids, params[i], t.offsets, i)
                for i, t in zip(chunk, tokenized, strict=True)]

    def _params(self, pooling_params: PoolingParams | Sequence[PoolingParams] | None, n: int,
                task: str) -> list[PoolingParams]:
        if pooling_params is None:
            pooling_params = PoolingParams()
        if isinstance(pooling_params, PoolingParams):
            pooling_params = [pooling_params] * n
        if len(pooling_params) != n:
            raise ValueError(f"The lengths of prompts ({n}) and params ({len(pooling_params)}) "
                             "must be the same.")
        mc = self.model_config
        out = []
        for p in pooling_params:
            if p.task is not None and p.task != task:
                raise ValueError(f"You cannot overwrite param.task={p.task!r} with "
                                 f"pooling_task={task!r}!")
            out.append(p.verify(task, mc.pooler_config, mc.pooler_config.pooling_type == "STEP"))
        return out

    def _run(self, pending: deque[Future[list[Request]]], total: int,
             use_tqdm: bool | Callable[..., tqdm]) -> list[Request]:
        """Feed tokenized chunks to the engine as they come; results in input order."""
        engine = self.llm_engine
        results: list[Request] = []
        bar = None
        if use_tqdm and total >= _TQDM_MIN_PROMPTS:
            factory = use_tqdm if callable(use_tqdm) else tqdm
            bar = factory(total=total, desc="Processed prompts", unit="prompt")
        try:
            while pending or engine.has_unfinished_requests():
                while pending and (pending[0].done() or len(engine.scheduler) == 0):
                    chunk = pending.popleft().result()
                    results += chunk
                    # Similar lengths side by side: fewer attention groups on CPU.
                    for request in sorted(chunk, key=lambda r: r.num_tokens):
                        engine.add_request(request)
                done = engine.step()
                for request in done:
                    if request.error is not None:
                        raise request.error
                if bar is not None:
                    bar.update(len(done))
        finally:
            engine.abort_all()
            if bar is not None:
                bar.close()
        return results
