"""The label head in one Triton kernel: 16-bit hidden rows times a float32 weight.

A token classifier's head is a `[hidden, num_labels]` linear layer with a handful of labels,
run in float32 for precision. Eagerly that is a float32 copy of the whole `[T, hidden]` batch
(written at twice its 16-bit size) and a float32 GEMM that cuBLAS tiles for wide outputs: on
the H200, per 64k-token W1 batch, 0.2 ms for the copy and 0.11 ms for the GEMM. Here each
program reads `BLOCK_T` rows of 16-bit hidden states once, converts them in registers and
multiplies them by the whole (tiny) weight on the tensor cores in three TF32 passes
(`tf32x3`): 16-bit values are exact in TF32 and the weight is split into a high and a low
part, so the products match float32 to ~1e-6 relative (an IEEE float32 `tl.dot` runs on the
FMA units instead and took 0.3 ms). The cost is one read of the batch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None

_MAX_LABELS = 128


def supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """CUDA, 16-bit rows, a float32 head of at most `_MAX_LABELS` labels, Triton present."""
    return (triton is not None and hidden.is_cuda and hidden.dim() == 2
            and hidden.stride(-1) == 1 and hidden.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == torch.float32 and weight.shape[0] <= _MAX_LABELS)


if triton is not None:

    @triton.jit
    def _head(x_ptr, w_ptr, b_ptr, o_ptr, n_rows, stride_x, HIDDEN: tl.constexpr,
              LABELS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        labels = tl.arange(0, BLOCK_L)
        row_ok = rows < n_rows
        label_ok = labels < LABELS
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        acc = tl.zeros([BLOCK_T, BLOCK_L], tl.float32)
        for h0 in range(0, HIDDEN, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_ok = h < HIDDEN
            x = tl.load(x_rows + h[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            w = tl.load(w_ptr + labels[None, :] * HIDDEN + h[:, None],
                        mask=label_ok[None, :] & h_ok[:, None], other=0.0)
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="tf32x3")
        if HAS_BIAS:
            acc += tl.load(b_ptr + labels, mask=label_ok, other=0.0)[None, :]
        tl.store(o_ptr + rows.to(tl.int64)[:, None] * LABELS + labels[None, :], acc,
                 mask=row_ok[:, None] & label_ok[None, :])


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """`hidden [T, H]` (16-bit, unit stride in H) @ `weight [L, H]`.T + `bias [L]`, in
    float32: the same products as `F.linear(hidden.float(), weight, bias)`."""
    tokens, width = hidden.shape
    labels = weight.shape[0]
    out = torch.empty(tokens, labels, dtype=torch.float32, device=hidden.device)
    if tokens == 0:
        return out
    block_t = 64
    _head[(triton.cdiv(tokens, block_t),)](
        hidden, weight.contiguous(), bias if bias is not None else weight, out, tokens,
        hidden.stride(0), HIDDEN=width, LABELS=labels, BLOCK_T=block_t, BLOCK_H=64,
        BLOCK_L=max(16, triton.next_power_of_2(labels)), HAS_BIAS=bias is not None,
        num_warps=4)
    return out
