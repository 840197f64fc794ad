"""The Triton label head against a float32 `F.linear` of the upcast rows (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagserve.layers import head_kernel

from gpu import needs_triton


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "hidden", "labels", "bias"),
                         [(65_537, 768, 9, True), (1, 256, 1, False), (300, 1024, 2, True),
                          (129, 96, 128, True), (0, 768, 9, True)])
def test_head_matches_float32_linear(dtype, tokens, hidden, labels, bias):
    torch.manual_seed(0)
    device = torch.device("cuda")
    # rows as a strided view (a slice of wider storage), as after a gather in the models
    x = torch.randn(tokens, hidden + 32, device=device, dtype=dtype)[:, :hidden]
    w = torch.randn(labels, hidden, device=device)
    b = torch.randn(labels, device=device) if bias else None
    assert head_kernel.supported(x, w)
    got = head_kernel.head_logits(x, w, b)
    want = F.linear(x.float(), w, b)
    assert got.dtype == torch.float32 and got.shape == (tokens, labels)
    if tokens:
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale


def test_unsupported_inputs_fall_back():
    w = torch.randn(9, 64)
    assert not head_kernel.supported(torch.randn(4, 64, dtype=torch.bfloat16), w)  # CPU
    if torch.cuda.is_available():
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        assert not head_kernel.supported(x.float(), w.cuda())  # float32 rows
        assert not head_kernel.supported(x, torch.randn(200, 64, device="cuda"))  # too many
