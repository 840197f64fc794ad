"""The synchronous engine: a waiting queue, a scheduler and a model runner."""

from __future__ import annotations

from tagserve.config import TagserveConfig
from tagserve.engine.request import Request
from tagserve.engine.runner import ModelRunner
from tagserve.engine.scheduler import Scheduler
from tagserve.engine.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: TagserveConfig, tokenizer: Tokenizer | None,
                 runner: ModelRunner) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.scheduler = Scheduler(config.scheduler_config)

    @property
    def vllm_config(self) -> TagserveConfig:
        """vLLM's name for the whole configuration (`...vllm_config.model_config.hf_config`)."""
        return self.config

    @property
    def model_config(self):  # noqa: ANN201 - same object as config.model_config
        return self.config.model_config

    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def has_unfinished_requests(self) -> bool:
        return len(self.scheduler) > 0

    def step(self) -> list[Request]:
        """Run one batch; a failure fails that batch's requests, never the engine."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            results = self.runner.run(batch)
        except Exception as exc:  # noqa: BLE001 - reported per request
            for request in batch:
                request.error = exc
            return batch
        for request, result in zip(batch, results, strict=True):
            request.result = result
        return batch
