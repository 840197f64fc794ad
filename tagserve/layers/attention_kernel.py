"""Flash attention over packed variable-length sequences, written in Triton.

One program owns `BLOCK_M` queries of one sequence and one head: it streams that sequence's keys
and values through shared memory `BLOCK_N` at a time, keeps the running row maximum and sum of
the softmax (the online softmax of flash attention) and writes each output row once. No
padding exists anywhere: `cu_seqlens` says where each sequence starts. Grouped k/v heads (GQA)
are read in place. Causal programs stop at their diagonal and mask only the blocks that cross it.

Which (sequence, query block) a program owns comes from a work list built on the host
(`work_items`), so a batch launches one program per block of real queries and head, heads
fastest: the programs that run side by side read neighbouring pieces of the same packed q/k/v
rows (5-7% faster on 50-token batches than one head's blocks side by side). Without one, the
grid is `max_seqlen / BLOCK_M` blocks for every sequence, and programs past their sequence's
end return at once: cheap in a batch of similar lengths, but a CUDA graph, captured for the
longest sequences and the most sequences it may ever hold, would launch up to ten times more
programs than it has work for.

On the H200, 64k-token bf16 batches launched from a work list
(`benchmarks/attention_kernels.py`):

| shape | torch's flash varlen (FA2) | this kernel |
|---|---:|---:|
| 16-512 tokens, 12 heads x 64 (BERT-base) | 155 TFLOP/s | 258 TFLOP/s |
| 50 tokens, same | 27 | 73 |
| 16-512 tokens, causal, 16/8 heads x 128 (Qwen3-0.6B) | 99 | 170 |
| 50 tokens, causal, same | 26 | 39 |
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None

_LOG2_E = 1.4426950408889634
QUERY_BLOCK = 64  # BLOCK_M of every configuration: the work list's unit
_IDLE_BLOCK = 1 << 24  # a work item past any sequence's end: its program returns at once


def work_items(seq_lens: np.ndarray, capacity: int | None = None) -> np.ndarray:
    """The work list of a batch, `[2, W]` int64: sequence index and query block of every
    program, sequences in order (empty ones get none). With `capacity`, padded to that many
    items with idle ones (a CUDA graph's fixed launch size)."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    blocks = -(-lens // QUERY_BLOCK)
    seq = np.repeat(np.arange(len(lens), dtype=np.int64), blocks)
    block = np.arange(len(seq), dtype=np.int64) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    if capacity is not None:
        if capacity < len(seq):
            raise ValueError(f"{len(seq)} attention work items exceed the capacity {capacity}")
        idle = capacity - len(seq)
        seq = np.concatenate([seq, np.zeros(idle, np.int64)])
        block = np.concatenate([block, np.full(idle, _IDLE_BLOCK, np.int64)])
    return np.stack([seq, block])


def work_capacity(num_tokens: int, num_seqs: int) -> int:
    """The most work items `num_seqs` sequences of `num_tokens` tokens in all can need."""
    return -(-num_tokens // QUERY_BLOCK) + num_seqs


def supported(q: torch.Tensor) -> bool:
    """CUDA, 16-bit, a power-of-two head size from 16 to 256, and Triton present."""
    head_dim = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0)


if triton is not None:

    @triton.jit
    def _attend_block(acc, m, row_sum, q, k_ptrs, v_ptrs, rows, cols, length, scale_log2,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr):
        """One key block: scores, online-softmax update, weighted values."""
        if MASKED:
            col_ok = cols < length
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, row_sum

    @triton.jit
    def _varlen_attention(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, work_ptr, num_work, stride_qt,
                          stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
                          stride_oh, scale_log2, HEADS: tl.constexpr, GROUP: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, WORK: tl.constexpr):
        if WORK:  # one axis, heads fastest: the heads of a block run side by side
            item, head = tl.program_id(0) // HEADS, tl.program_id(0) % HEADS
            seq = tl.load(work_ptr + item).to(tl.int32)
            block = tl.load(work_ptr + num_work + item).to(tl.int32)
        else:  # grid (query blocks, sequences, heads)
            block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(cu_ptr + seq)
        length = tl.load(cu_ptr + seq + 1) - start
        q_lo = block * BLOCK_M
        if q_lo >= length:
            return
        kv_head = head // GROUP
        rows = q_lo + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        row_ok = rows < length
        tokens = (start + rows).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Key blocks wholly inside the sequence (and, causal, wholly left of every row of this
        # block) need no mask; the rest do.
        end = tl.minimum(length, q_lo + BLOCK_M) if CAUSAL else length
        free_end = (q_lo // BLOCK_N) * BLOCK_N if CAUSAL else (length // BLOCK_N) * BLOCK_N
        free_end = tl.minimum(free_end, (length // BLOCK_N) * BLOCK_N)
        k_base = k_ptr + start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = v_ptr + start.to(tl.int64) * stride_vt + kv_head * stride_vh
        for n_lo in range(0, free_end, BLOCK_N):
            cols = n_lo + tl.arange(0, BLOCK_N)
            acc, m, row_sum = _attend_block(
                acc, m, row_sum, q, k_base + cols[:, None] * stride_kt + d[None, :],
                v_base + cols[:, None] * stride_vt + d[None, :], rows, cols, length, scale_log2,
                False, CAUSAL)
        for n_lo in range(free_end, end, BLOCK_N):
            cols = n_lo + tl.arange(0, BLOCK_N)
            acc, m, row_sum = _attend_block(
                acc, m, row_sum, q, k_base + cols[:, None] * stride_kt + d[None, :],
                v_base + cols[:, None] * stride_vt + d[None, :], rows, cols, length, scale_log2,
                True, CAUSAL)
        out = acc / row_sum[:, None]
        tl.store(o_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _config(max_seqlen: int) -> dict[str, int]:
    """Block sizes measured best on the H200 (bf16, head dims 64 and 128, 64k-token batches):
    64 queries a program everywhere, 64 keys a step for 16-512-token sequences, 32 keys and
    two pipeline stages when no sequence exceeds 64 tokens."""
    if max_seqlen <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                     scale: float | None = None, config: dict[str, int] | None = None,
                     work: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of `q [T, Hq, D]` over `k, v [T, Hkv, D]` within each sequence of
    `cu_seqlens [B+1]` (int32, starts of the sequences in T), bidirectional or causal.
    q, k and v may be strided views (unit stride in D). `work`: the batch's `work_items` on
    the device (`[2, W]` int64, contiguous), or None for a grid over `max_seqlen`. Returns a
    new `[T, Hq, D]` tensor."""
    tokens, heads, head_dim = q.shape
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    config = config or _config(max_seqlen)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if work is not None:
        assert config["BLOCK_M"] == QUERY_BLOCK, "the work list is cut in QUERY_BLOCK queries"
        grid: tuple[int, ...] = (work.shape[1] * heads,)
        num_work = work.shape[1]
    else:
        grid = (triton.cdiv(max_seqlen, config["BLOCK_M"]), len(cu_seqlens) - 1, heads)
        num_work = 0
    _varlen_attention[grid](
        q, k, v, out, cu_seqlens, cu_seqlens if work is None else work, num_work, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1), scale * _LOG2_E, HEADS=heads, GROUP=heads // k.shape[1],
        HEAD_DIM=head_dim, CAUSAL=causal, WORK=work is not None, **config)
    return out
