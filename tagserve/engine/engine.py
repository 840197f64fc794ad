"""The synchronous engine: a waiting queue, a scheduler and a model runner."""

from __future__ import annotations

from tagserve.config import ModelConfig, TagserveConfig
from tagserve.engine.request import Request
from tagserve.engine.runner import InFlight, ModelRunner
from tagserve.engine.scheduler import Scheduler
from tagserve.engine.tokenizer import Tokenizer


class LLMEngine:
    """On CUDA `step()` launches the next batch, then returns the requests of the batch before
    it: one batch is always queued on the device while the host finishes the previous one. On
    CPU launching is computing, so a step returns its own batch (no added latency)."""

    def __init__(self, config: TagserveConfig, tokenizer: Tokenizer | None,
                 runner: ModelRunner) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.scheduler = Scheduler(config.scheduler_config)
        self.in_flight: InFlight | None = None

    @property
    def vllm_config(self) -> TagserveConfig:
        """vLLM's name for the whole configuration (`...vllm_config.model_config.hf_config`)."""
        return self.config

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model_config

    def add_requests(self, requests: list[Request]) -> None:
        self.scheduler.add_all(requests)

    def has_unfinished_requests(self) -> bool:
        return len(self.scheduler) > 0 or self.in_flight is not None

    def step(self) -> list[Request]:
        """A failure fails only the batch it happened in, never the engine."""
        batch = self.scheduler.schedule()
        launched = None
        failed: list[Request] = []
        if batch:
            try:
                launched = self.runner.launch(batch)
            except Exception as exc:  # noqa: BLE001 - reported per request
                for request in batch:
                    request.error = exc
                failed = batch
        done = self._collect(self.in_flight) if self.in_flight is not None else []
        self.in_flight = launched
        if launched is not None and not self.runner.pipelined:
            done += self._collect(launched)
            self.in_flight = None
        return done + failed

    def _collect(self, flight: InFlight) -> list[Request]:
        try:
            results = self.runner.collect(flight)
        except Exception as exc:  # noqa: BLE001
            for request in flight.requests:
                request.error = exc
            return flight.requests
        for request, result in zip(flight.requests, results, strict=True):
            request.result = result
        return flight.requests

    def abort_all(self) -> None:
        """Forget every waiting and in-flight request (after an error in offline use)."""
        self.scheduler.clear()
        self.in_flight = None
