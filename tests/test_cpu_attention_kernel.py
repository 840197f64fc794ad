"""The C++ CPU attention kernel against torch's SDPA in float32, and its fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from tagserve.layers import attention, cpu_attention
from tagserve.layers.attention import AttentionMetadata, cpu_varlen_supported

needs_kernel = pytest.mark.skipif(not cpu_attention.available(torch.float32, 64),
                                  reason="CPU attention kernel unavailable here")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int],
              window: tuple[int, int], scale: float | None = None) -> torch.Tensor:
    """Per-sequence float32 SDPA with an explicit window mask."""
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1], cu[1:], strict=False):
        if a == b:
            continue
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None]
        ok = torch.ones(b - a, b - a, dtype=torch.bool)
        if window[0] >= 0:
            ok &= j >= i - window[0]
        if window[1] >= 0:
            ok &= j <= i + window[1]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ok,
                                                  scale=scale).transpose(0, 1)
    return out


def batch(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return q, k, v, cu


LENS = [1, 7, 64, 65, 130, 513, 600, 0, 17]  # 1, block tails, > a 512-key block, empty


@needs_kernel
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (32, 32), (100, 0)])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_float32_matches_sdpa(window, heads, cu_dtype):
    q, k, v, cu = batch(LENS, *heads, 64, torch.float32)
    out = cpu_attention.varlen_attention(q, k, v, torch.tensor(cu, dtype=cu_dtype), window)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out, reference(q, k, v, cu, window), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not cpu_attention.available(torch.bfloat16, 64),
                    reason="bf16 kernel needs AMX")
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)])
@pytest.mark.parametrize("d", [64, 128])
def test_bfloat16_error_within_torch_flash(window, d):
    """bf16 error against float32 no worse than torch's own bf16 kernel's (P is split in two
    bf16 parts, so only the output rounding remains)."""
    lens = [1, 33, 200, 513]
    q, k, v, cu = batch(lens, 8, 4, d, torch.bfloat16, seed=1)
    ref = reference(q, k, v, cu, window)
    ours = cpu_attention.varlen_attention(q, k, v, torch.tensor(cu), window).float()
    theirs = torch.empty_like(ref)
    for a, b in zip(cu[:-1], cu[1:], strict=False):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        theirs[a:b] = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=window == (-1, 0), enable_gqa=True).transpose(0, 1).float()
    err, torch_err = (ours - ref).abs().mean().item(), (theirs - ref).abs().mean().item()
    assert err <= 1.05 * torch_err, (err, torch_err)
    print(f"mean error {err:.3g}, torch bf16 {torch_err:.3g}")
    assert (ours - ref).abs().max().item() < 0.05


@needs_kernel
def test_strided_inputs_and_scale():
    """q, k, v as views of one fused projection (rows strided), with an explicit scale."""
    lens = [5, 70]
    qkv = torch.randn(sum(lens), 3, 4, 32)
    q, k, v = qkv.unbind(1)
    cu = [0, 5, 75]
    out = cpu_attention.varlen_attention(q, k, v, torch.tensor(cu), scale=0.3)
    torch.testing.assert_close(out, reference(q, k, v, cu, (-1, -1), scale=0.3),
                               atol=2e-5, rtol=1e-4)


@needs_kernel
def test_packed_attention_uses_kernel_on_cpu():
    q, k, v, cu = batch([3, 40, 9], 4, 4, 64, torch.float32)
    meta = AttentionMetadata.build([3, 40, 9], torch.tensor(cu, dtype=torch.int32))
    out = attention.packed_attention(q, k, v, meta, attention.CAUSAL)
    torch.testing.assert_close(out, reference(q, k, v, cu, (-1, 0)), atol=2e-5, rtol=1e-4)


def test_env_falls_back_to_sdpa(monkeypatch, caplog):
    """TAGSERVE_CPU_ATTENTION=torch: not available, with one warning; the runner keeps the
    padded buckets."""
    monkeypatch.setenv(cpu_attention.ENV, "torch")
    cpu_attention._disabled.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert not cpu_attention.available(torch.float32, 64)
        assert not cpu_varlen_supported(torch.device("cpu"), torch.float32, {64})
    assert sum(cpu_attention.ENV in r.message for r in caplog.records) == 1


def test_failed_build_falls_back(monkeypatch, caplog):
    """A compile failure (no compiler, bad flags) disables the kernel with a warning."""
    def broken() -> None:
        raise RuntimeError("compiling cpu_attention.cpp failed")

    monkeypatch.setattr(cpu_attention, "_build", broken)
    # the build is reached only on an AVX-512 CPU: pretend to be one
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpu_attention._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not cpu_attention._load()
        assert "unavailable" in caplog.text
    finally:
        cpu_attention._load.cache_clear()


def test_unsupported_shapes_and_devices():
    assert not cpu_attention.available(torch.float16, 64)
    assert not cpu_attention.available(torch.float32, 48)
    assert not cpu_varlen_supported(torch.device("cpu"), torch.float32, set())
    assert not cpu_varlen_supported(torch.device("cuda"), torch.float32, {64})
