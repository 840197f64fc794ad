"""LayerNorm of a sum, in one Triton kernel: BERT's residual adds and its embeddings.

Post-LayerNorm encoders run `LayerNorm(x + residual)` twice a layer and
`LayerNorm(word[id] + position[pos] + token_type)` once a batch. Each program owns `ROWS`
rows: it loads (or gathers) the summands, adds them in float32, normalises in float32 and
rounds once to the output dtype. A row is held in two power-of-two column parts
(`column_parts`: 768 = 512 + 256), so no lane computes on padding. On the H200 a 64k x 768
bf16 add + LayerNorm takes 73-76 us, Inductor's time, but a launch costs the host ~20-40 us
instead of the ~130-180 us of a compiled region's guards and wrapper (24 a BERT-base batch),
which is what holds short inputs back when the host feeds the GPU.

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

# Rows a program and warps. H200, 65536 x 768 bf16 add + LayerNorm in two column parts
# (512 + 256): 76.0 us at (1, 1), 78-95 at (2, 2) to (8, 8); with remainders 100.8 us at
# (1, 1), 101-122 at the others. One 1,024-wide block took 76 us and 110.6 us at its best
# (1, 1) on the same GPU: its masked quarter costs only the arithmetic.
_ROWS, _WARPS = 1, 1


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
    def _scale_store(centred, inv_std, rows, row_ok, cols, w_ptr, b_ptr, o_ptr, lo_ptr,
                     N: tl.constexpr, LO_OUT: tl.constexpr):
        """Scale, shift and store one column part of the normalised rows (and, with LO_OUT,
        the rounding remainders)."""
        col_ok = cols < N
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
    def _normalize_store(xa, xb, rows, row_ok, w_ptr, b_ptr, o_ptr, lo_ptr, eps,
                         N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                         LO_OUT: tl.constexpr):
        """LayerNorm of float32 rows held in two column parts, `xa [ROWS, BLOCK_A]` (columns
        0..BLOCK_A, all inside the row) and, when BLOCK_B > 0, `xb [ROWS, BLOCK_B]` (the rest,
        zero past N), into `o_ptr` (row stride N) and `lo_ptr`."""
        cols_a = tl.arange(0, BLOCK_A)
        total = tl.sum(xa, 1)
        if BLOCK_B > 0:
            cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
            total += tl.sum(xb, 1)
        mean = total / N
        centred_a = xa - mean[:, None]
        squares = tl.sum(centred_a * centred_a, 1)
        if BLOCK_B > 0:
            centred_b = tl.where((cols_b < N)[None, :], xb - mean[:, None], 0.0)
            squares += tl.sum(centred_b * centred_b, 1)
        inv_std = tl.rsqrt(squares / N + eps)
        _scale_store(centred_a, inv_std, rows, row_ok, cols_a, w_ptr, b_ptr, o_ptr, lo_ptr, N,
                     LO_OUT)
        if BLOCK_B > 0:
            _scale_store(centred_b, inv_std, rows, row_ok, cols_b, w_ptr, b_ptr, o_ptr, lo_ptr,
                         N, LO_OUT)

    @triton.jit
    def _residual_sum(x_ptr, r_ptr, r_lo_ptr, rows, row_ok, cols, N: tl.constexpr,
                      LO_IN: tl.constexpr):
        """`x + residual (+ its remainders)` in float32 for one column part of the rows."""
        mask = row_ok[:, None] & (cols < N)[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        residual = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + residual
        if LO_IN:
            lo = tl.load(r_lo_ptr + offsets, mask=mask, other=0).to(tl.int32)
            count = (lo + _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
            x += count * _unit(residual, False)
        return x

    @triton.jit
    def _add_layer_norm(x_ptr, r_ptr, r_lo_ptr, w_ptr, b_ptr, o_ptr, lo_ptr, eps, n_rows,
                        N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                        ROWS: tl.constexpr, LO_IN: tl.constexpr, LO_OUT: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        xa = _residual_sum(x_ptr, r_ptr, r_lo_ptr, rows, row_ok, tl.arange(0, BLOCK_A), N, LO_IN)
        xb = xa
        if BLOCK_B > 0:
            xb = _residual_sum(x_ptr, r_ptr, r_lo_ptr, rows, row_ok,
                               BLOCK_A + tl.arange(0, BLOCK_B), N, LO_IN)
        _normalize_store(xa, xb, rows, row_ok, w_ptr, b_ptr, o_ptr, lo_ptr, eps, N, BLOCK_A,
                         BLOCK_B, LO_OUT)

    @triton.jit
    def _embedding_sum(ids, pos, row_ok, cols, word_ptr, position_ptr, extra_ptr,
                       N: tl.constexpr):
        """`word[ids] + position[pos] + extra` in float32 for one column part of the rows."""
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(word_ptr + ids[:, None] * N + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        x += tl.load(position_ptr + pos[:, None] * N + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        return x + tl.load(extra_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _embedding_layer_norm(ids_ptr, pos_ptr, word_ptr, position_ptr, extra_ptr, w_ptr, b_ptr,
                              o_ptr, lo_ptr, eps, n_rows, N: tl.constexpr,
                              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                              ROWS: tl.constexpr, LO_OUT: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        xa = _embedding_sum(ids, pos, row_ok, tl.arange(0, BLOCK_A), word_ptr, position_ptr,
                            extra_ptr, N)
        xb = xa
        if BLOCK_B > 0:
            xb = _embedding_sum(ids, pos, row_ok, BLOCK_A + tl.arange(0, BLOCK_B), word_ptr,
                                position_ptr, extra_ptr, N)
        _normalize_store(xa, xb, rows, row_ok, w_ptr, b_ptr, o_ptr, lo_ptr, eps, N, BLOCK_A,
                         BLOCK_B, LO_OUT)


def column_parts(width: int) -> tuple[int, int]:
    """A row of `width` as two power-of-two parts: the largest that fits, and the rest padded
    to a power of two (0 when none is left). 768 = 512 + 256: no lane idles, where one
    1,024-wide block would leave a quarter of them masked."""
    head = 1 << (width.bit_length() - 1)
    rest = width - head
    return head, 1 << (rest - 1).bit_length() if rest else 0


def _launch(kernel, n_rows: int, width: int, *args, **flags: bool) -> None:
    block_a, block_b = column_parts(width)
    kernel[(triton.cdiv(n_rows, _ROWS),)](*args, n_rows, N=width, BLOCK_A=block_a,
                                          BLOCK_B=block_b, ROWS=_ROWS, num_warps=_WARPS,
                                          **flags)


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
