"""Page-locked (pinned) host buffers, reused from batch to batch.

Copies between host and GPU run asynchronously only from pinned memory, but pinning is slow:
`Tensor.pin_memory()` took about 6 ms a call on the H200 host (gVisor), twice per batch. The
pool pins a few buffers once and hands them out again; a buffer goes back when its batch has
been collected, so the two batches the engine keeps in flight never share one.

Results leave the pinned buffer for memory of their own (`ResultArena`), which the outputs
keep for as long as they live; that memory is touched (page-faulted in) by a side thread
before the engine needs it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

_MIN_BYTES = 1 << 20


class PinnedPool:
    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def acquire(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(buffer, view)`: a pinned byte buffer to `release` later, and a 1-D `dtype` view
        of its first `numel` elements."""
        nbytes = numel * dtype.itemsize
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fits:
            buffer = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:  # powers of two, so that a few buffers serve every batch size
            size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return buffer, buffer[:nbytes].view(dtype)

    def release(self, buffers: list[torch.Tensor]) -> None:
        self._free.extend(buffers)


_ALIGN = 64


class ResultArena:
    """Fresh host memory for batch results, handed out in consecutive slices of blocks that a
    side thread allocates and touches ahead of time, with the GIL released (`zero_`): the
    first write to new memory page-faults, and copying a 64k-token batch's rows into fresh
    memory cost ~4 ms a batch on the engine thread of the H200 host (gVisor). A slice is never
    handed out twice, so results can keep it forever; a block is freed when no result holds
    any slice of it."""

    def __init__(self, block_bytes: int = 8 << 20) -> None:
        self.block_bytes = block_bytes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tagserve-prefault")
        self._next: Future[torch.Tensor] | None = None
        self._block: torch.Tensor | None = None
        self._used = 0

    @staticmethod
    def _fresh(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8).zero_()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D `dtype` tensor of `numel` elements that nothing else will ever be given."""
        nbytes = numel * dtype.itemsize
        if self._block is None or self._used + nbytes > self._block.numel():
            if nbytes > self.block_bytes // 2:  # blocks of at least two batches from now on
                self.block_bytes = 2 * nbytes
                self._next = None
            fresh = self._next.result() if self._next is not None else None
            if fresh is None or fresh.numel() < nbytes:
                fresh = self._fresh(self.block_bytes)  # faulted in here, this once
            self._block, self._used = fresh, 0
            self._next = self._thread.submit(self._fresh, self.block_bytes)
        start = self._used
        self._used = -(-(start + nbytes) // _ALIGN) * _ALIGN
        return self._block[start:start + nbytes].view(dtype)

    def copy(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows.clone()` into arena memory."""
        return self.take(rows.numel(), rows.dtype).view(rows.shape).copy_(rows)
