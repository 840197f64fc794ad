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
    got, lo = layer_norm_kernel.add_layer_norm(x, residual, weight, bias, 1e-12)
    want = F.layer_norm(x.float() + residual.float(), (width,), weight.float(), bias.float(),
                        1e-12)
    assert got.dtype == dtype and lo is None
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
    want = F.layer_norm(word[ids].float() + position[positions].float() + extra, (width,),
                        weight.float(), bias.float(), 1e-12)
    got, lo = layer_norm_kernel.embedding_layer_norm(ids, positions, word, position, extra,
                                                     weight, bias, 1e-12)
    assert lo is None
    assert_one_rounding(got, want)
    got, lo = layer_norm_kernel.embedding_layer_norm(ids, positions, word, position, extra,
                                                     weight, bias, 1e-12, remainders=True)
    assert_one_rounding(got, want)
    assert_remainders(got, lo, want)


def test_column_parts():
    """Rows split into a power of two and the rest padded to one: exact for BERT widths."""
    assert layer_norm_kernel.column_parts(768) == (512, 256)
    assert layer_norm_kernel.column_parts(1024) == (1024, 0)
    assert layer_norm_kernel.column_parts(96) == (64, 32)
    assert layer_norm_kernel.column_parts(3584) == (2048, 2048)
    assert layer_norm_kernel.column_parts(1) == (1, 0)


def unit(x: torch.Tensor) -> torch.Tensor:
    """A remainder's unit: 2**-15 of the leading power of two of each (bf16) value."""
    _, exponent = torch.frexp(x.float())
    return torch.where(x == 0, 0.0, torch.ldexp(torch.ones_like(x, dtype=torch.float32),
                                                exponent - 16))


def joined(x: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return x.float() + lo.float() * unit(x)


def split(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `y` as bf16 values and int8 remainders, as the kernels write them."""
    x = y.bfloat16()
    counts = torch.where(x == 0, 0.0, (y - x.float()) / unit(x).clamp_min(1e-38))
    return x, counts.round().clamp(-127, 127).to(torch.int8)


def assert_remainders(got: torch.Tensor, lo: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 + remainders hold `want` to ~16 significant bits (half a unit, plus float32
    arithmetic in another order), ~100x closer than bf16 alone."""
    assert lo.dtype == torch.int8 and lo.shape == got.shape
    if not got.numel():
        return
    assert (lo.abs() <= 127).all() and (lo != 0).float().mean() > 0.9
    err = (joined(got, lo) - want).abs()
    assert (err <= want.abs() * 2.0 ** -15 + 2e-5).all()
    assert err.mean() < (got.float() - want).abs().mean() / 64


@needs_triton
@pytest.mark.parametrize(("tokens", "width"), SHAPES)
def test_add_layer_norm_remainders(tokens, width):
    """With the residual's remainders added back, the output is the float32 LayerNorm of the
    residual stream they hold (~16 bits), and far closer to that of the float32 stream than
    the LayerNorm of the bf16 residual alone."""
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    stream = torch.randn(tokens, width, device="cuda") * 3
    weight, bias = (torch.randn(width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    residual, residual_lo = split(stream)
    assert torch.equal(joined(residual, residual_lo).bfloat16(), residual)
    got, lo = layer_norm_kernel.add_layer_norm(x, residual, weight, bias, 1e-12, residual_lo,
                                               remainders=True)
    def norm(residual_stream: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float() + residual_stream, (width,), weight.float(), bias.float(),
                            1e-12)

    want = norm(joined(residual, residual_lo))
    assert_one_rounding(got, want)
    assert_remainders(got, lo, want)
    rounded, _ = layer_norm_kernel.add_layer_norm(x, residual, weight, bias, 1e-12)
    assert_one_rounding(rounded, norm(residual.float()))
    if tokens:
        exact = norm(stream)
        assert (joined(got, lo) - exact).abs().mean() < (rounded.float() - exact).abs().mean() / 8
