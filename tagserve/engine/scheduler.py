"""Token-budget scheduling: which waiting requests share the next forward pass."""

from __future__ import annotations

import threading
from collections import deque

from tagserve.config import SchedulerConfig
from tagserve.engine.request import Request
from tagserve.errors import QueueFullError


class Scheduler:
    """First come, first served; a batch holds at most `max_num_batched_tokens` tokens and
    `max_num_seqs` sequences (a single request longer than the budget runs alone). A batch
    that would end inside a call (requests of one `Request.call`) ends before it instead,
    unless that call is all the batch holds: the call's answer waits for its last request, and
    a few requests left behind ran as a batch of their own whenever the queue was short.

    Thread-safe: the server adds from its event loop while the engine thread schedules.
    Cancelled requests are dropped instead of scheduled."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.waiting_tokens = 0  # tokens of `waiting`, cancelled requests included
        self._lock = threading.Lock()

    def add_all(self, requests: list[Request]) -> None:
        """Queue all of `requests` or, when that would pass the limit, none of them."""
        limit = self.config.max_waiting_requests
        with self._lock:
            if len(self.waiting) + len(requests) > limit:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
                self.waiting_tokens = sum(r.num_tokens for r in self.waiting)
            if len(self.waiting) + len(requests) > limit:
                raise QueueFullError(f"The server is at its queue limit ({limit} waiting "
                                     "sequences); retry later.")
            self.waiting.extend(requests)
            self.waiting_tokens += sum(r.num_tokens for r in requests)

    def __len__(self) -> int:
        return len(self.waiting)

    def clear(self) -> None:
        with self._lock:
            self.waiting.clear()
            self.waiting_tokens = 0

    def schedule(self) -> list[Request]:
        batch: list[Request] = []
        tokens = 0
        max_seqs, budget = self.config.max_num_seqs, self.config.max_num_batched_tokens
        with self._lock:
            waiting = self.waiting
            while waiting and len(batch) < max_seqs:
                request = waiting[0]
                n = request.num_tokens
                if request.cancelled:
                    waiting.popleft()
                    self.waiting_tokens -= n
                    continue
                if batch and tokens + n > budget:
                    break
                batch.append(waiting.popleft())
                tokens += n
            call = batch[-1].call if batch else None
            if call is not None and waiting and waiting[0].call is call:
                keep = len(batch)
                while keep and batch[keep - 1].call is call:
                    keep -= 1
                if keep:
                    for request in reversed(batch[keep:]):
                        waiting.appendleft(request)
                        tokens -= request.num_tokens
                    del batch[keep:]
            self.waiting_tokens -= tokens
        return batch
