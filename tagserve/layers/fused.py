"""Fused elementwise kernels for 16-bit CUDA inference.

The profiler shows a BERT layer's LayerNorms, residual adds and GELU costing about a quarter of
its GPU time at large batches, all of it memory traffic. On CUDA with 16-bit weights (unless
`enforce_eager=True`):
- residual add + LayerNorm / RMSNorm and gated activations are compiled with `torch.compile`
  into one kernel each (dynamic shapes: one compilation serves every token count);
- GELU after the up-projection runs in the cuBLASLt epilogue of its GEMM
  (`torch._addmm_activation`), so the `[T, intermediate]` tensor is written once.
Everywhere else the same functions run eagerly, so results are identical in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tagserve.layers.norm import rms_norm


def _add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new residual stream)."""
    x = x + residual
    return rms_norm(x, weight, eps), x


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _maybe_compiled(fn: Callable, fused: bool) -> Callable:
    return _compiled(fn) if fused else fn


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm,
                   fused: bool) -> torch.Tensor:
    return _maybe_compiled(_add_layer_norm, fused)(x, residual, norm.weight, norm.bias, norm.eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _maybe_compiled(_add_rms_norm, fused)(x, residual, norm.weight, norm.eps)


def silu_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    return _maybe_compiled(_silu_mul, fused)(gate_up)


def linear_gelu(x: torch.Tensor, linear: nn.Linear, act: Callable[[torch.Tensor], torch.Tensor],
                fused: bool) -> torch.Tensor:
    """`act(linear(x))`; with `fused`, GELU runs in the GEMM epilogue."""
    if fused and linear.bias is not None:
        return torch._addmm_activation(linear.bias, x, linear.weight.t(), use_gelu=True)
    return act(linear(x))


def fusion_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
