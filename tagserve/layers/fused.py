"""Fused elementwise kernels for 16-bit CUDA inference.

The profiler shows a BERT layer's LayerNorms, residual adds and GELU costing about a quarter of
its GPU time at large batches, all of it memory traffic. On CUDA with 16-bit weights (unless
`enforce_eager=True`):
- residual add + LayerNorm / RMSNorm, gated activations and the decoders' q/k RMSNorm + RoPE
  are compiled with `torch.compile` into one kernel each (the token count turns into a
  dynamic dimension at the second batch size seen; hidden sizes stay constants);
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

from tagserve.layers.norm import RMSNorm, rms_norm
from tagserve.layers.rotary import RotaryEmbedding, apply_rotary


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


def _qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if q_weight is not None and k_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return apply_rotary(positions, q, k, cos, sin)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # Automatic dynamic shapes: after the first batch the token dimension becomes symbolic while
    # hidden sizes stay constants, so reductions over them compile to single-pass kernels.
    return torch.compile(fn)


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


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 rotary: RotaryEmbedding, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of `q, k [T, H, D]` (Qwen3; skipped when the norms are None), then
    RoPE. Eagerly that is about ten float32 passes over q and k; fused, one kernel."""
    eps = q_norm.eps if q_norm is not None else 0.0
    return _maybe_compiled(_qk_norm_rope, fused)(
        q, k, positions, rotary.cos, rotary.sin, None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight, eps)


def linear_gelu(x: torch.Tensor, linear: nn.Linear, act: Callable[[torch.Tensor], torch.Tensor],
                fused: bool) -> torch.Tensor:
    """`act(linear(x))`; with `fused`, GELU runs in the GEMM epilogue."""
    if fused and linear.bias is not None:
        return torch._addmm_activation(linear.bias, x, linear.weight.t(), use_gelu=True)
    return act(linear(x))


def fusion_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
