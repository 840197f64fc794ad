"""Attention over a packed batch: tokens of all sequences in one `[T, heads, head_dim]` tensor.

Two kernels, one interface (`packed_attention`):
- CUDA: flash attention for variable-length sequences (`torch.nn.attention.varlen.varlen_attn`),
  no padding at all.
- CPU (and CUDA without varlen flash, or in float32): sequences are bucketed by length; each
  bucket runs as one dense SDPA call, padded to its longest member (at most 12.5% padding) with
  a key mask, so there is no block-diagonal waste and few kernel calls.

A window is `(left, right)` as in flash attention: query i sees key j iff i-left <= j <= i+right,
-1 meaning unbounded; `(-1, 0)` is causal.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Window = tuple[int, int]
FULL: Window = (-1, -1)
CAUSAL: Window = (-1, 0)

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # torch < 2.9
    _varlen_attn = None
    _VARLEN_PARAMS = set()


# Sequences share a padded SDPA call when the shortest is within this share of the longest.
_BUCKET_SLACK = 0.125


@dataclass
class LengthGroup:
    """Sequences of similar length run as one dense `[n, length]` SDPA call.

    `index [n, length]` gathers their tokens from the batch (padding slots repeat a real token);
    `key_mask [n, 1, 1, length]` hides padding keys (None when all lengths are equal);
    `rows` picks the real tokens out of the flattened `[n * length]` output and `tokens` says
    where they go in the batch (both None when there is no padding).
    """

    length: int
    index: torch.Tensor
    key_mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    @classmethod
    def build(cls, starts: list[int], lens: list[int], device: torch.device) -> LengthGroup:
        length = max(lens)
        pos = torch.arange(length)
        lens_t = torch.tensor(lens).unsqueeze(1)
        valid = pos.unsqueeze(0) < lens_t
        index = torch.tensor(starts).unsqueeze(1) + torch.minimum(pos.unsqueeze(0), lens_t - 1)
        if bool(valid.all()):
            return cls(length, index.to(device))
        rows = valid.flatten().nonzero().squeeze(1)
        return cls(length, index.to(device), valid[:, None, None, :].to(device), rows.to(device),
                   index.flatten()[rows].to(device))


def _length_groups(seq_lens: list[int], offsets: list[int],
                   device: torch.device) -> list[LengthGroup]:
    """Bucket sequences by length (longest first) so that padding stays under the slack."""
    order = sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])
    groups: list[LengthGroup] = []
    members: list[int] = []
    for i in order:
        if members and seq_lens[i] < seq_lens[members[0]] * (1 - _BUCKET_SLACK):
            groups.append(LengthGroup.build([offsets[j] for j in members],
                                            [seq_lens[j] for j in members], device))
            members = []
        members.append(i)
    groups.append(LengthGroup.build([offsets[j] for j in members],
                                    [seq_lens[j] for j in members], device))
    return groups


@dataclass
class AttentionMetadata:
    """Where each sequence lives in the packed batch; built once per batch, shared by all layers."""

    seq_lens: list[int]
    cu_seqlens: torch.Tensor  # [B+1] int32 on the model device
    max_seqlen: int
    use_varlen: bool
    groups: list[LengthGroup] = field(default_factory=list)
    _masks: dict[tuple[int, Window], torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device,
              use_varlen: bool) -> AttentionMetadata:
        offsets = [0]
        for n in seq_lens:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32)
        groups = [] if use_varlen else _length_groups(seq_lens, offsets, device)
        return cls(seq_lens, cu.to(device, non_blocking=True), max(seq_lens), use_varlen, groups)

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
            and _varlen_attn is not None)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                     window: Window = FULL, scale: float | None = None) -> torch.Tensor:
    """Attention of `q [T, Hq, D]` over `k, v [T, Hkv, D]` within each packed sequence."""
    if meta.use_varlen and (window in (FULL, CAUSAL) or "window_size" in _VARLEN_PARAMS):
        return _flash_varlen(q, k, v, meta, window, scale)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for group in meta.groups:
        # [n, L, H, D] -> [n, H, L, D]
        qg, kg, vg = (t[group.index].transpose(1, 2) for t in (q, k, v))
        mask = meta.mask(group.length, window, q.device)
        if group.key_mask is not None:
            mask = group.key_mask if mask is None else group.key_mask & mask
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale,
                                            enable_gqa=gqa).transpose(1, 2)
        if group.rows is None:
            out[group.index] = og
        else:
            out[group.tokens] = og.reshape(-1, *og.shape[2:])[group.rows]
    return out


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                  window: Window, scale: float | None) -> torch.Tensor:
    kwargs: dict = {"scale": scale}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = window
    elif window == CAUSAL:
        kwargs["is_causal"] = True
    return _varlen_attn(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen,
                        meta.max_seqlen, **kwargs)
