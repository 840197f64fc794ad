"""Token-budget scheduling: which waiting requests share the next forward pass."""

from __future__ import annotations

from collections import deque

from tagserve.config import SchedulerConfig
from tagserve.engine.request import Request
from tagserve.errors import QueueFullError


class Scheduler:
    """First come, first served; a batch holds at most `max_num_batched_tokens` tokens and
    `max_num_seqs` sequences (a single request longer than the budget runs alone)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise QueueFullError(
                f"The server is at its queue limit ({self.config.max_waiting_requests} waiting "
                "sequences); retry later.")
        self.waiting.append(request)

    def __len__(self) -> int:
        return len(self.waiting)

    def schedule(self) -> list[Request]:
        batch: list[Request] = []
        tokens = 0
        while self.waiting and len(batch) < self.config.max_num_seqs:
            n = self.waiting[0].num_tokens
            if batch and tokens + n > self.config.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        return batch
