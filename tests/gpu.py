"""Skip markers for tests that need a CUDA device (and Triton, for the hand-written kernels)."""

from __future__ import annotations

import pytest
import torch

from tagserve.layers import attention_kernel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Every kernel module imports Triton the same way: one check covers them all.
needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or attention_kernel.triton is None,
    reason="needs a CUDA device and Triton")
