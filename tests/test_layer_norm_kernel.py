"""The Triton add + LayerNorm and embedding + LayerNorm kernels against float32 (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagserve.layers import layer_norm_kernel

from gpu import needs_triton

SHAPES = [(65_537, 768), (3, 1024), (1, 96), (0, 768), (1000, 384)]


def assert_one_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` is `want` (float32) rounded once to a 16-bit dtype, within one unit in the last
    place (float32 sums in another order may round the other way at a tie)."""
    assert got.shape == want.shape
    ulp = 2.0 ** -7 if got.dtype == torch.bfloat16 else 2.0 ** -10
    assert ((got.float() - want).abs() <= want.abs() * ulp + 1e-6).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "width"), SHAPES)
def test_add_layer_norm(dtype, tokens, width):
    torch.manual_seed(0)
    x, residual = (torch.randn(tokens, width, device="cuda", dtype=dtype) for _ in range(2))
    weight, bias = (torch.randn(width, device="cuda", dtype=dtype) for _ in range(2))
    got = layer_norm_kernel.add_layer_norm(x, residual, weight, bias, 1e-12)
    want = F.layer_norm(x.float() + residual.float(), (width,), weight.float(), bias.float(),
                        1e-12)
    assert got.dtype == dtype
    assert_one_rounding(got, want)


@needs_triton
@pytest.mark.parametrize(("tokens", "width"), SHAPES)
def test_embedding_layer_norm(tokens, width):
    torch.manual_seed(0)
    dtype, vocab, max_pos = torch.bfloat16, 30_522, 512
    word = torch.randn(vocab, width, device="cuda", dtype=dtype)
    position = torch.randn(max_pos, width, device="cuda", dtype=dtype)
    extra = torch.randn(width, device="cuda")
    weight, bias = (torch.randn(width, device="cuda", dtype=dtype) for _ in range(2))
    ids = torch.randint(0, vocab, (tokens,), device="cuda")
    positions = torch.randint(0, max_pos, (tokens,), device="cuda")
    got = layer_norm_kernel.embedding_layer_norm(ids, positions, word, position, extra, weight,
                                                 bias, 1e-12)
    want = F.layer_norm(word[ids].float() + position[positions].float() + extra, (width,),
                        weight.float(), bias.float(), 1e-12)
    assert_one_rounding(got, want)
