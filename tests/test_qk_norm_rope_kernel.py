"""The Triton q/k RMSNorm + RoPE kernel against the eager code it replaces (GPU)."""

from __future__ import annotations

import pytest
import torch

from tagserve.layers import qk_norm_rope_kernel
from tagserve.layers.fused import _qk_norm_rope
from tagserve.layers.rotary import RotaryEmbedding

from gpu import needs_triton


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "norm"),
                         [(16, 8, 128, True), (14, 2, 64, False), (12, 12, 64, True),
                          (8, 4, 80, True)])
def test_kernel_matches_eager(dtype, heads, kv_heads, head_dim, norm):
    torch.manual_seed(0)
    tokens, device = 1000, torch.device("cuda")
    rotary = RotaryEmbedding(head_dim, 1e6, 4096).to(device)
    # q and k as strided views of one fused projection output, as in the decoder layer
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    weights = [torch.rand(head_dim, device=device, dtype=dtype) + 0.5 if norm else None
               for _ in range(2)]
    want_q, want_k = _qk_norm_rope(q.clone(), k.clone(), positions, rotary.cos, rotary.sin,
                                   *weights, 1e-6)
    got_q = qk_norm_rope_kernel.norm_rope_(q, positions, rotary.cos, rotary.sin, weights[0],
                                           1e-6)
    got_k = qk_norm_rope_kernel.norm_rope_(k, positions, rotary.cos, rotary.sin, weights[1],
                                           1e-6)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    for got, want in ((got_q, want_q), (got_k, want_k)):
        diff = (got.float() - want.float()).abs()
        # float32 sums in another order may move a normalised value across a rounding
        # boundary: one step of the 16-bit format, which the rotation mixes into two outputs
        # (at most two steps of the head's largest value), on few elements
        row_max = want.float().abs().amax(-1, keepdim=True)
        assert (diff <= row_max * 2 ** -6).all()
        assert (diff == 0).float().mean() > 0.97
