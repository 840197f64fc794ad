"""Attention over a packed batch: tokens of all sequences in one `[T, heads, head_dim]` tensor.

Four kernels, one interface (`packed_attention`):
- CUDA: our Triton flash attention for variable-length sequences (`attention_kernel.py`,
  1.4-2.5x torch's FA2 on the H200), no padding at all;
- CUDA with sliding windows or head sizes Triton's tiles do not take: torch's FA2 varlen kernel
  (the one behind `varlen_attn`, called directly: its Python wrapper costs ~0.3 ms a call on a
  slow host, and only torch >= 2.13's wrapper passes grouped k/v heads through);
- CPU with our C++ kernel (`cpu_attention.py`: bf16 on AMX, or fp32; compiled on first use):
  packed like CUDA, no padding in attention nor in any GEMM;
- otherwise (CPU without the kernel, CUDA without varlen flash or in float32): the runner lays
  the batch out in length buckets, each padded to its longest member (at most 12.5% padding),
  so every bucket is one dense SDPA call on a view of the activations (a key mask hides the
  padding): no block-diagonal waste, no per-layer gathers, few kernel calls.

A window is `(left, right)` as in flash attention: query i sees key j iff i-left <= j <= i+right,
-1 meaning unbounded; `(-1, 0)` is causal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tagserve.layers import attention_kernel, cpu_attention

Window = tuple[int, int]
FULL: Window = (-1, -1)
CAUSAL: Window = (-1, 0)

def _flash_schema() -> str:
    try:
        return str(torch.ops.aten._flash_attention_forward.default._schema)
    except (AttributeError, RuntimeError):
        return ""


_FLASH_SCHEMA = _flash_schema()
_HAS_FLASH_VARLEN = "cum_seq_q" in _FLASH_SCHEMA
_HAS_FLASH_WINDOW = "window_size_left" in _FLASH_SCHEMA


# Sequences share a padded SDPA call when the shortest is within this share of the longest.
_BUCKET_SLACK = 0.125


@dataclass
class LengthGroup:
    """`n` sequences of similar length padded to `length`, stored as one contiguous block of
    `n * length` token slots from `start`, so that every layer views it without a copy.
    `key_mask [n, 1, 1, length]` hides padding keys (None when all lengths are equal)."""

    start: int
    n: int
    length: int
    key_mask: torch.Tensor | None = None


PaddedLayout = tuple[list[tuple[int, list[int]]], np.ndarray, int]


def padded_layout(seq_lens: list[int]) -> PaddedLayout:
    """Bucket sequences by length (longest first, at most `_BUCKET_SLACK` padding per bucket).

    Returns the buckets as `(start slot, member lengths)`, the slot of every packed token, and
    the number of slots."""
    lens = np.asarray(seq_lens)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    order = np.argsort(-lens, kind="stable")
    buckets: list[tuple[int, list[int]]] = []
    slots = np.empty(int(lens.sum()), dtype=np.int64)
    members: list[int] = []
    start = 0

    def close() -> None:
        nonlocal start
        width = int(lens[members[0]])
        for k, i in enumerate(members):
            slots[offsets[i]:offsets[i + 1]] = start + k * width + np.arange(lens[i])
        buckets.append((start, [int(lens[i]) for i in members]))
        start += width * len(members)

    for i in order:
        if members and lens[i] < lens[members[0]] * (1 - _BUCKET_SLACK):
            close()
            members = []
        members.append(int(i))
    close()
    return buckets, slots, start


@dataclass
class AttentionMetadata:
    """Where each sequence lives in the batch; built once per batch, shared by all layers.

    With flash varlen (or our CPU kernel) the batch is packed (`[T]` tokens). Otherwise it is
    laid out in padded length buckets (`groups`), and `slots[t]` is where packed token t sits
    in that layout."""

    seq_lens: list[int]
    cu_seqlens: torch.Tensor  # [B+1] int32 on the model device
    max_seqlen: int
    use_varlen: bool
    groups: list[LengthGroup] = field(default_factory=list)
    slots: np.ndarray | None = None
    num_slots: int = 0
    work: torch.Tensor | None = None  # the Triton kernel's work list (`work_items`), varlen only
    _masks: dict[tuple[int, Window], torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def build(cls, seq_lens: list[int], cu_seqlens: torch.Tensor,
              layout: PaddedLayout | None = None,
              work: torch.Tensor | None = None) -> AttentionMetadata:
        """`cu_seqlens [B+1]`: the sequences' start offsets, int32 on the model's device;
        `layout`: the `padded_layout` of `seq_lens`, or None for varlen, with `work`
        the batch's `attention_kernel.work_items` on the device (or None)."""
        if layout is None:
            return cls(seq_lens, cu_seqlens, max(seq_lens), True, work=work)
        buckets, slots, num_slots = layout
        groups = []
        for start, lens in buckets:
            width = lens[0]
            mask = None
            if lens[-1] != width:
                valid = torch.arange(width).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
                mask = valid[:, None, None, :].to(cu_seqlens.device)
            groups.append(LengthGroup(start, len(lens), width, mask))
        return cls(seq_lens, cu_seqlens, max(seq_lens), False, groups, slots, num_slots)

    def mask(self, length: int, window: Window, device: torch.device) -> torch.Tensor | None:
        """Boolean `[L, L]` mask (True = attend) for a window, or None when it allows everything."""
        key = (length, window)
        if key not in self._masks:
            left, right = window
            if (left < 0 or left >= length - 1) and (right < 0 or right >= length - 1):
                self._masks[key] = None
            else:
                pos = torch.arange(length, device=device)
                rel = pos.unsqueeze(0) - pos.unsqueeze(1)  # j - i
                ok = torch.ones(length, length, dtype=torch.bool, device=device)
                if left >= 0:
                    ok &= rel >= -left
                if right >= 0:
                    ok &= rel <= right
                self._masks[key] = ok
        return self._masks[key]


def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Flash varlen needs CUDA, 16-bit activations and a torch that ships it."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and _HAS_FLASH_VARLEN)


def cpu_varlen_supported(device: torch.device, dtype: torch.dtype, head_dims: set[int]) -> bool:
    """Whether our CPU kernel runs packed batches of these head sizes (compiles it once)."""
    return (device.type == "cpu" and bool(head_dims)
            and all(cpu_attention.available(dtype, d) for d in head_dims))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                     window: Window = FULL, scale: float | None = None) -> torch.Tensor:
    """Attention of `q [T, Hq, D]` over `k, v [T, Hkv, D]` within each packed sequence."""
    if meta.use_varlen and q.device.type == "cpu":
        return cpu_attention.varlen_attention(q, k, v, meta.cu_seqlens, window, scale)
    if meta.use_varlen and window in (FULL, CAUSAL) and attention_kernel.supported(q):
        return attention_kernel.varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen,
                                                 window == CAUSAL, scale, work=meta.work)
    if meta.use_varlen and (window in (FULL, CAUSAL) or _HAS_FLASH_WINDOW):
        return _flash_varlen(q, k, v, meta, window, scale)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for group in meta.groups:
        rows = slice(group.start, group.start + group.n * group.length)
        # [n * L, H, D] -> [n, H, L, D], views only
        qg, kg, vg = (t[rows].view(group.n, group.length, *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v))
        mask = meta.mask(group.length, window, q.device)
        if group.key_mask is not None:
            mask = group.key_mask if mask is None else group.key_mask & mask
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                            enable_gqa=gqa)
        out[rows].view(group.n, group.length, *q.shape[1:]).copy_(og.transpose(1, 2))
    return out


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                  window: Window, scale: float | None) -> torch.Tensor:
    """Flash attention over the packed sequences; k/v may have fewer heads than q (GQA)."""
    left, right = window
    causal = right == 0
    kwargs: dict = {"scale": scale}
    if _HAS_FLASH_WINDOW:
        kwargs["window_size_left"] = left if left >= 0 else None
        kwargs["window_size_right"] = None if causal or right < 0 else right
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen, 0.0,
        causal, False, **kwargs)
    return out[0]
