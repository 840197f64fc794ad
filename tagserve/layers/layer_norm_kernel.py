"""LayerNorm of a sum, in one Triton kernel: BERT's residual adds and its embeddings.

Post-LayerNorm encoders run `LayerNorm(x + residual)` twice a layer and
`LayerNorm(word[id] + position[pos] + token_type)` once a batch. Each program owns `ROWS`
rows: it loads (or gathers) the summands, adds them in float32, normalises in float32 and
rounds once to the output dtype. On the H200 a 64k x 768 bf16 add + LayerNorm takes 74 us, the
same as Inductor's compiled kernel, but a launch costs the host ~20-40 us instead of the
~130-180 us of a compiled region's guards and wrapper (24 a BERT-base batch), which is what
holds short inputs back when the host feeds the GPU.

Remainders: the output rounded to bf16 is what the next GEMM reads, but as the next residual
it loses 8 bits a LayerNorm, 25 times in BERT-base: most of bf16's argmax flips against
float32. With `remainders=True` a kernel also writes each value's rounding error as an int8
count of 1/256ths of the bf16 value's last place (`y ~ out + lo * ulp(out) / 256`), and the
next add + LayerNorm adds it back: the residual stream keeps ~16 significant bits for one
byte a value more each way.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None

# (rows a program, warps) without and with remainders. H200, 65536 x 768 bf16 add + LayerNorm:
# 72.6 us at (4, 8) (1, 2) or (2, 2); with remainders 114 us at (4, 8), 111 us at (2, 2).
_SHAPES = {False: (4, 8), True: (2, 2)}


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:
    # 1.5 * 2**23: float32 sums with it have integer steps (its bits: 0x4B400000).
    _MAGIC = tl.constexpr(12582912.0)
    _MAGIC_BITS = tl.constexpr(0x4B400000)

    @triton.jit
    def _unit(value, invert: tl.constexpr):
        """The remainder unit of float32 `value` (or its reciprocal): its leading power of two
        times 2**-15, the last place of its bf16 rounding over 2**8; 0 (reciprocal: 2**127)
        below 2**-112. Made from the exponent bits in three or four integer operations, no
        division: with remainders the kernel's cost is its arithmetic more than its bytes."""
        bits = tl.maximum((value.to(tl.int32, bitcast=True) & 0x7F800000) - (15 << 23), 0)
        if invert:  # biased exponents e and 254 - e are reciprocal powers of two
            bits = (254 << 23) - bits
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _normalize_store(x, rows, row_ok, cols, col_ok, w_ptr, b_ptr, o_ptr, lo_ptr, eps,
                         N: tl.constexpr, LO_OUT: tl.constexpr):
        """LayerNorm of the float32 rows `x [ROWS, BLOCK]` into `o_ptr` (row stride N) and,
        with LO_OUT, the rounding remainders into `lo_ptr`."""
        mean = tl.sum(x, 1) / N
        centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        inv_std = tl.rsqrt(tl.sum(centred * centred, 1) / N + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * inv_std[:, None] * w[None, :] + b[None, :]
        out = y.to(o_ptr.dtype.element_ty)
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(o_ptr + offsets, out, mask=mask)
        if LO_OUT:
            rounded = out.to(tl.float32)
            count = tl.minimum(tl.maximum((y - rounded) * _unit(rounded, True), -127.0), 127.0)
            # Rounded to an integer by the float adder: the low byte of `count + 1.5 * 2**23`
            # is round(count) in two's complement (a float-to-int conversion costs more).
            shifted = (count + _MAGIC).to(tl.int32, bitcast=True)
            tl.store(lo_ptr + offsets, shifted.to(tl.int8), mask=mask)

    @triton.jit
    def _add_layer_norm(x_ptr, r_ptr, r_lo_ptr, w_ptr, b_ptr, o_ptr, lo_ptr, eps, n_rows,
                        N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                        LO_IN: tl.constexpr, LO_OUT: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok, col_ok = rows < n_rows, cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        residual = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + residual
        if LO_IN:
            lo = tl.load(r_lo_ptr + offsets, mask=mask, other=0).to(tl.int32)
            count = (lo + _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
            x += count * _unit(residual, False)
        _normalize_store(x, rows, row_ok, cols, col_ok, w_ptr, b_ptr, o_ptr, lo_ptr, eps, N,
                         LO_OUT)

    @triton.jit
    def _embedding_layer_norm(ids_ptr, pos_ptr, word_ptr, position_ptr, extra_ptr, w_ptr, b_ptr,
                              o_ptr, lo_ptr, eps, n_rows, N: tl.constexpr, BLOCK: tl.constexpr,
                              ROWS: tl.constexpr, LO_OUT: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok, col_ok = rows < n_rows, cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        x = tl.load(word_ptr + ids[:, None] * N + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        x += tl.load(position_ptr + pos[:, None] * N + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        x += tl.load(extra_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        _normalize_store(x, rows, row_ok, cols, col_ok, w_ptr, b_ptr, o_ptr, lo_ptr, eps, N,
                         LO_OUT)


def _launch(kernel, n_rows: int, width: int, *args, **flags: bool) -> None:
    rows, warps = _SHAPES[flags["LO_OUT"]]
    kernel[(triton.cdiv(n_rows, rows),)](*args, n_rows, N=width,
                                         BLOCK=triton.next_power_of_2(width), ROWS=rows,
                                         num_warps=warps, **flags)


def _remainders_of(out: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    if wanted and out.dtype != torch.bfloat16:
        raise ValueError("remainders are kept for bfloat16 outputs only")
    return torch.empty(out.shape, dtype=torch.int8, device=out.device) if wanted else None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, residual_lo: torch.Tensor | None = None,
                   remainders: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`layer_norm(x + residual (+ its remainders residual_lo))` of contiguous `[T, N]`
    tensors, summed in float32; returns the output and, with `remainders`, its remainders."""
    out = torch.empty_like(x)
    lo = _remainders_of(out, remainders)
    if x.shape[0]:
        _launch(_add_layer_norm, x.shape[0], x.shape[1], x.contiguous(), residual.contiguous(),
                residual if residual_lo is None else residual_lo.contiguous(), weight, bias,
                out, out if lo is None else lo, eps, LO_IN=residual_lo is not None,
                LO_OUT=remainders)
    return out, lo


def embedding_layer_norm(input_ids: torch.Tensor, positions: torch.Tensor, word: torch.Tensor,
                         position: torch.Tensor, extra: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float, remainders: bool = False,
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`layer_norm(word[input_ids] + position[positions] + extra)`, summed in float32;
    `extra [N]` is added to every row (BERT's token type 0 and ERNIE's task type 0). Returns
    the output and, with `remainders`, its remainders."""
    width = word.shape[1]
    out = torch.empty(input_ids.shape[0], width, dtype=word.dtype, device=word.device)
    lo = _remainders_of(out, remainders)
    if input_ids.shape[0]:
        _launch(_embedding_layer_norm, input_ids.shape[0], width, input_ids, positions, word,
                position, extra.contiguous(), weight, bias, out, out if lo is None else lo, eps,
                LO_OUT=remainders)
    return out, lo
