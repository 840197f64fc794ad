"""Token-budget scheduling: which waiting requests share the next forward pass."""

from __future__ import annotations

import threading
from collections import deque

from tagserve.config import SchedulerConfig
from tagserve.engine.request import Request
from tagserve.errors import QueueFullError


class Scheduler:
    """First come, first served; a batch holds at most `max_num_batched_tokens` tokens and
    `max_num_seqs` sequences (a single request longer than the budget runs alone).

    Thread-safe: the server adds from its event loop while the engine thread schedules.
    Cancelled requests are dropped instead of scheduled."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()

    def add_all(self, requests: list[Request]) -> None:
        """Queue all of `requests` or, when that would pass the limit, none of them."""
        limit = self.config.max_waiting_requests
        with self._lock:
            if len(self.waiting) + len(requests) > limit:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            if len(self.waiting) + len(requests) > limit:
                raise QueueFullError(f"The server is at its queue limit ({limit} waiting "
                                     "sequences); retry later.")
            self.waiting.extend(requests)

    def __len__(self) -> int:
        return len(self.waiting)

    def schedule(self) -> list[Request]:
        batch: list[Request] = []
        tokens = 0
        with self._lock:
            while self.waiting and len(batch) < self.config.max_num_seqs:
                if self.waiting[0].cancelled:
                    self.waiting.popleft()
                    continue
                n = self.waiting[0].num_tokens
                if batch and tokens + n > self.config.max_num_batched_tokens:
                    break
                batch.append(self.waiting.popleft())
                tokens += n
        return batch
