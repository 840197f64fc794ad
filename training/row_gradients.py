"""The word-embedding table's gradient, filled only at the rows a batch uses.

A plain ``nn.Embedding`` backward allocates and zeroes a dense gradient of the whole table every
step (30k x 256 floats), and clipping then reads and scales all of it: ~15 ms of a ~220 ms step
on two AVX2 cores, for a gradient that is zero outside the batch's few hundred rows. Here the
gradient lives in one persistent buffer: backward adds the batch's rows into it, clipping reads
and scales those rows only, and only they are zeroed after the optimiser step. The optimiser
still sees a dense gradient of the whole table, so AdamW's update (decay and moments of every
row) is the same as with the plain embedding, unlike a lazy sparse Adam.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _LookupAddingRows(torch.autograd.Function):
    """``F.embedding`` whose backward adds the output gradient into ``buffer`` at the looked-up
    rows (``padding_idx`` excluded, as nn.Embedding does) and returns no weight gradient."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor,
                padding_idx: int) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.buffer, ctx.padding_idx = buffer, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None, None]:
        (ids,) = ctx.saved_tensors
        keep = ids != ctx.padding_idx
        ctx.buffer.index_add_(0, ids[keep], grad[keep].to(ctx.buffer.dtype))
        return None, None, None, None


class RowGradients:
    """Attach to an ``nn.Embedding`` for training; ``detach`` restores the plain module.

    Per step: forward (records the rows), backward, ``clip(params, max_norm)`` (all of the
    model's parameters; the table's are read as rows), the
    optimiser step, ``optimizer.zero_grad()``, then ``reset()``.
    """

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        if embedding.padding_idx is None:
            raise ValueError("RowGradients expects an embedding with a padding_idx")
        self.embedding = embedding
        self.buffer = torch.zeros_like(embedding.weight)
        self.rows = torch.empty(0, dtype=torch.long, device=self.buffer.device)
        embedding.weight.grad = self.buffer
        embedding.forward = self._lookup  # instance attribute: shadows nn.Embedding.forward

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.embedding.weight.requires_grad:
            used = ids[ids != self.embedding.padding_idx]
            self.rows = torch.unique(torch.cat([self.rows, used.reshape(-1)]))
            return _LookupAddingRows.apply(ids, self.embedding.weight, self.buffer,
                                           self.embedding.padding_idx)
        return torch.nn.functional.embedding(ids, self.embedding.weight,
                                             self.embedding.padding_idx)

    def clip(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over ``params`` and the table together, reading only the table's
        used rows: one total norm, every gradient scaled by ``min(1, max_norm / norm)``."""
        grads = [p.grad for p in params if p.grad is not None and p.grad is not self.buffer]
        rows = self.buffer.index_select(0, self.rows)
        norms = [*torch._foreach_norm(grads), torch.linalg.vector_norm(rows)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        self.buffer.index_copy_(0, self.rows, rows * coef)
        return total

    def reset(self) -> None:
        """Zero the used rows and give the (now all-zero) buffer back to the table."""
        self.buffer.index_fill_(0, self.rows, 0.0)
        self.rows = self.rows[:0]
        self.embedding.weight.grad = self.buffer

    def detach(self) -> None:
        del self.embedding.forward
        self.embedding.weight.grad = None
