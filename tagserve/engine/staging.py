"""Page-locked (pinned) host buffers, reused from batch to batch.

Copies between host and GPU run asynchronously only from pinned memory, but pinning is slow:
`Tensor.pin_memory()` took about 6 ms a call on the H200 host (gVisor), twice per batch. The
pool pins a few buffers once and hands them out again; a buffer goes back when its batch has
been collected, so the two batches the engine keeps in flight never share one.
"""

from __future__ import annotations

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
