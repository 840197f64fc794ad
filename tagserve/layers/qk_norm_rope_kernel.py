"""One Triton kernel for the decoders' per-head q/k RMSNorm (Qwen3) and RoPE, in place.

`torch.compile` turns the same code into a looped two-pass reduction (0.6 ms a layer for q on a
W2 batch on the H200). Here one program owns one token's heads: it loads each row once, reduces
over the head dimension in registers, scales, rotates and writes back over its input. The
rounding follows the eager code (`layers/norm.py`, `layers/rotary.py`): the norm in float32,
rounded to the input dtype, times the weight, rounded again; the rotation in float32, rounded
once.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _norm_rope(x_ptr, stride_t, stride_h, positions_ptr, cos_ptr, sin_ptr, weight_ptr,
                   eps, HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        in_half = d < HALF
        mask = (h < HEADS) & in_half
        row = x_ptr + t * stride_t + h * stride_h
        dtype = x_ptr.dtype.element_ty
        x1 = tl.load(row + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + HALF + d, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            square_sum = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
            inv_rms = tl.rsqrt(square_sum / (2 * HALF) + eps)[:, None]
            w1 = tl.load(weight_ptr + d, mask=in_half, other=0.0).to(tl.float32)
            w2 = tl.load(weight_ptr + HALF + d, mask=in_half, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        pos = tl.load(positions_ptr + t)
        cos = tl.load(cos_ptr + pos * HALF + d, mask=in_half, other=0.0)
        sin = tl.load(sin_ptr + pos * HALF + d, mask=in_half, other=0.0)
        tl.store(row + d, (x1 * cos - x2 * sin).to(dtype), mask=mask)
        tl.store(row + HALF + d, (x2 * cos + x1 * sin).to(dtype), mask=mask)


def norm_rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm each head of `x [T, H, D]` by `weight [D]` (skipped when None), then rotate it
    by the `cos, sin [max_len, D/2]` rows of `positions [T]`; writes over `x` and returns it.
    `x` may be a strided view (q or k inside the fused qkv output) with unit stride in D."""
    tokens, heads, head_dim = x.shape
    if tokens == 0:
        return x
    assert x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
    half = head_dim // 2
    _norm_rope[(tokens,)](
        x, x.stride(0), x.stride(1), positions, cos, sin, cos if weight is None else weight,
        eps, HEADS=heads, HALF=half, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(half), NORM=weight is not None,
        num_warps=4 if heads * head_dim <= 2048 else 8)
    return x
