"""The Triton varlen attention kernel against per-sequence float32 attention (GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tagserve.layers import attention_kernel

from gpu import needs_triton

# Lengths on both sides of the block sizes, a single token, and the longest BERT input.
LENGTHS = [1, 5, 63, 64, 65, 127, 128, 129, 200, 511, 512, 17, 300]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
              causal: bool) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
        start += n
    return torch.cat(out)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(12, 12, 64), (16, 8, 128),
                                                             (8, 2, 32)])
@pytest.mark.parametrize("lengths", [LENGTHS, [50] * 40])
def test_kernel_matches_reference(causal, heads, kv_heads, head_dim, lengths):
    torch.manual_seed(0)
    device, tokens = torch.device("cuda"), sum(lengths)
    # q, k, v as strided views of one fused projection output, as in the models
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=device,
                      dtype=torch.bfloat16)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32,
                      device=device)
    got = attention_kernel.varlen_attention(q, k, v, cu, max(lengths), causal)
    want = reference(q, k, v, lengths, causal)
    flash = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max(lengths), max(lengths), 0.0, causal, False)[0]
    err, flash_err = ((x.float() - want).abs().max().item() for x in (got, flash))
    # both round the same float32 result to bf16; the kernel may not be less exact than FA2
    assert err <= 1.25 * flash_err + 1e-3, (err, flash_err)
    assert (got.float() - want).abs().mean() <= 1.25 * (flash.float() - want).abs().mean()


def test_work_items_cover_every_query_block():
    lens = np.array([1, 64, 65, 0, 200])
    seq, block = attention_kernel.work_items(lens)
    assert seq.tolist() == [0, 1, 2, 2, 4, 4, 4, 4]
    assert block.tolist() == [0, 0, 0, 1, 0, 1, 2, 3]
    capacity = attention_kernel.work_capacity(int(lens.sum()), len(lens))
    assert capacity >= len(seq)
    padded = attention_kernel.work_items(lens, capacity)
    assert padded.shape == (2, capacity)
    assert (padded[:, :len(seq)] == [seq, block]).all()
    assert (padded[1, len(seq):] * attention_kernel.QUERY_BLOCK > lens.max()).all()
    with pytest.raises(ValueError, match="capacity"):
        attention_kernel.work_items(lens, len(seq) - 1)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(16, 8, 128), (12, 12, 64)])
def test_work_list_launch_equals_grid_launch(causal, heads, kv_heads, head_dim):
    """The same programs run from the work list (with idle items) as from the full grid."""
    torch.manual_seed(0)
    device, lengths = torch.device("cuda"), [*LENGTHS, 0, 3]
    qkv = torch.randn(sum(lengths), heads + 2 * kv_heads, head_dim, device=device,
                      dtype=torch.bfloat16)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32,
                      device=device)
    grid = attention_kernel.varlen_attention(q, k, v, cu, max(lengths), causal)
    capacity = attention_kernel.work_capacity(sum(lengths), len(lengths)) + 7
    work = torch.from_numpy(attention_kernel.work_items(np.array(lengths), capacity)).to(device)
    listed = attention_kernel.varlen_attention(q, k, v, cu, max(lengths), causal, work=work)
    assert torch.equal(grid, listed)
