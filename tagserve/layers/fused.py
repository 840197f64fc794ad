"""Fused kernels for 16-bit CUDA and bf16 CPU inference.

The profiler shows a BERT layer's LayerNorms, residual adds and GELU costing about a quarter of
its GPU time at large batches, all of it memory traffic. On CUDA with 16-bit weights (unless
`enforce_eager=True`):
- residual add + LayerNorm, and BERT's embedding lookups, adds and LayerNorm, are one
  hand-written Triton kernel each (`layer_norm_kernel.py`: the GPU time of Inductor's kernels
  at a fraction of their launch cost on the host); with `precise_residuals` (bf16) they
  pass on the remainders of their rounding (`Hidden.lo`), so that BERT's residual stream is
  not rounded to bf16 25 times;
- residual add + RMSNorm and gated activations are compiled with `torch.compile`
  into one kernel each (the token count turns into a dynamic dimension at the second batch
  size seen; hidden sizes stay constants); the decoders' q/k RMSNorm + RoPE is a hand-written
  Triton kernel (`qk_norm_rope_kernel.py`), compiled only where Triton is missing;
- GELU after the up-projection runs in the cuBLASLt epilogue of its GEMM
  (`torch._addmm_activation`), so the `[T, intermediate]` tensor is written once. The epilogue
  computes GELU's tanh form, within 4.8e-4 of the exact (erf) GELU everywhere: below bf16's
  resolution for activations above 0.06.
On CPU in bf16 (oneDNN, e.g. AMX) the linear layers run as oneDNN matmuls with the bias,
GELU and the residual add applied inside the kernel (`torch.ops.mkldnn._linear_pointwise`):
eager `addmm` first copies the bias into the output and GELU is another pass, 13% and 12% of
the CPU time of a BERT-small layer; the residual adds were 2.4%. With `precise_residuals` the
residual stream stays float32 instead (`Hidden.x32`): the add and LayerNorm run in float32 and
only the rows the next GEMM reads are rounded to bf16. Everywhere else the same functions run
eagerly, so results are identical in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tagserve.layers import layer_norm_kernel, qk_norm_rope_kernel
from tagserve.layers.norm import RMSNorm, rms_norm
from tagserve.layers.rotary import RotaryEmbedding, apply_rotary


@dataclass
class Hidden:
    """Post-LayerNorm hidden states: the rows `x` that the next GEMM reads and, with
    `precise_residuals`, what their rounding to bf16 lost, added back where `x` is the
    residual: `lo`, int8 remainders from the fused CUDA kernels (`layer_norm_kernel.py`), or
    `x32`, the rows in float32 on CPU."""

    x: torch.Tensor
    lo: torch.Tensor | None = None
    x32: torch.Tensor | None = None

    @property
    def rows(self) -> torch.Tensor:
        """The most precise form of the rows, for the label head."""
        return self.x if self.x32 is None else self.x32


def _layer_norm32(x: torch.Tensor, norm: nn.LayerNorm, dtype: torch.dtype) -> Hidden:
    """LayerNorm of float32 rows in float32 (`precise_residuals` on CPU)."""
    bias = None if norm.bias is None else norm.bias.float()
    out = F.layer_norm(x, (x.shape[-1],), norm.weight.float(), bias, norm.eps)
    return Hidden(out.to(dtype), x32=out)


def _add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def _embedding_sum(input_ids: torch.Tensor, positions: torch.Tensor, word: torch.Tensor,
                   position: torch.Tensor, token_type: torch.Tensor,
                   task_type: torch.Tensor | None) -> torch.Tensor:
    x = F.embedding(input_ids, word) + token_type
    x = x + F.embedding(positions, position)
    return x if task_type is None else x + task_type


def _embedding_layer_norm(input_ids: torch.Tensor, positions: torch.Tensor, word: torch.Tensor,
                          position: torch.Tensor, token_type: torch.Tensor,
                          task_type: torch.Tensor | None, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float) -> torch.Tensor:
    x = _embedding_sum(input_ids, positions, word, position, token_type, task_type)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


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


def _maybe_compiled(fn: Callable, fused: bool, x: torch.Tensor) -> Callable:
    """`fn` compiled for fused CUDA execution; as is on CPU (oneDNN fuses only linears)."""
    return _compiled(fn) if fused and x.is_cuda else fn


def add_layer_norm(x: torch.Tensor, residual: Hidden, norm: nn.LayerNorm,
                   fused: bool) -> Hidden:
    """`norm(x + residual)`; fused on CUDA, one Triton kernel (`layer_norm_kernel.py`) that
    keeps remainders when the residual has them."""
    if fused and layer_norm_kernel.available(x):
        return Hidden(*layer_norm_kernel.add_layer_norm(
            x, residual.x, norm.weight, norm.bias, norm.eps, residual.lo,
            remainders=residual.lo is not None))
    return Hidden(_maybe_compiled(_add_layer_norm, fused, x)(x, residual.x, norm.weight,
                                                             norm.bias, norm.eps))


def embedding_layer_norm(input_ids: torch.Tensor, positions: torch.Tensor, word: torch.Tensor,
                         position: torch.Tensor, token_type: torch.Tensor,
                         task_type: torch.Tensor | None, norm: nn.LayerNorm,
                         fused: bool, precise: bool = False) -> Hidden:
    """`LayerNorm(word[ids] + token_type + position[positions] (+ task_type))`: BERT's
    embeddings, one Triton kernel when fused on CUDA (eagerly two gathers, three adds and the
    norm: 0.42 ms per 64k-token W1 batch on the H200; compiled 0.05 ms). With `precise`
    (bf16, `precise_residuals`) it starts the residual stream's remainders (CUDA) or float32
    copy (CPU), which the add + LayerNorms pass on."""
    if fused and precise and not word.is_cuda:
        x = _embedding_sum(input_ids, positions, word, position, token_type.float(), task_type)
        return _layer_norm32(x, norm, word.dtype)
    if fused and layer_norm_kernel.available(word):
        extra = token_type.float() if task_type is None else token_type.float() + task_type
        return Hidden(*layer_norm_kernel.embedding_layer_norm(
            input_ids, positions, word, position, extra, norm.weight, norm.bias, norm.eps,
            remainders=precise))
    return Hidden(_maybe_compiled(_embedding_layer_norm, fused, word)(
        input_ids, positions, word, position, token_type, task_type, norm.weight, norm.bias,
        norm.eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _maybe_compiled(_add_rms_norm, fused, x)(x, residual, norm.weight, norm.eps)


def silu_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    return _maybe_compiled(_silu_mul, fused, gate_up)(gate_up)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 rotary: RotaryEmbedding, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of `q, k [T, H, D]` (Qwen3; skipped when the norms are None), then
    RoPE. Eagerly that is about ten float32 passes over q and k; fused on CUDA, one Triton
    kernel each, in place (`layers/qk_norm_rope_kernel.py`)."""
    eps = q_norm.eps if q_norm is not None else 0.0
    if fused and qk_norm_rope_kernel.available(q):
        def norm_rope_(x: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
            return qk_norm_rope_kernel.norm_rope_(x, positions, rotary.cos, rotary.sin,
                                                  None if norm is None else norm.weight, eps)

        return norm_rope_(q, q_norm), norm_rope_(k, k_norm)
    return _maybe_compiled(_qk_norm_rope, fused, q)(
        q, k, positions, rotary.cos, rotary.sin, None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight, eps)


def linear(x: torch.Tensor, layer: nn.Linear, fused: bool) -> torch.Tensor:
    """`layer(x)`; fused on CPU, the bias is added inside the oneDNN matmul."""
    if fused and not x.is_cuda and layer.bias is not None:
        return _onednn_linear(x, layer.weight, layer.bias, "none", [], "")
    return layer(x)


def linear_add_layer_norm(x: torch.Tensor, layer: nn.Linear, residual: Hidden,
                          norm: nn.LayerNorm, fused: bool) -> Hidden:
    """`norm(layer(x) + residual)`; fused on CPU, the residual is added inside the oneDNN
    matmul (a binary post-op, before the result is rounded to bf16) instead of in a pass of
    its own."""
    if fused and not x.is_cuda and layer.bias is not None:
        if residual.x32 is not None:
            return _layer_norm32(residual.x32 + linear(x, layer, fused), norm, x.dtype)
        y = _onednn_linear.binary(x, residual.x, layer.weight, layer.bias, "add")
        return Hidden(F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps))
    return add_layer_norm(linear(x, layer, fused), residual, norm, fused)


def linear_gelu(x: torch.Tensor, layer: nn.Linear, approximate: str, fused: bool) -> torch.Tensor:
    """`gelu(layer(x), approximate)` (`"none"`: exact, `"tanh"`); fused, GELU runs inside
    the GEMM (the cuBLASLt epilogue on CUDA, a oneDNN post-op on CPU)."""
    if fused and layer.bias is not None:
        if x.is_cuda:
            return torch._addmm_activation(layer.bias, x, layer.weight.t(), use_gelu=True)
        return _onednn_linear(x, layer.weight, layer.bias, "gelu", [], approximate)
    return F.gelu(layer(x), approximate=approximate)


def _onednn_linear_op() -> Callable | None:
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() \
            else None
    except (AttributeError, RuntimeError):
        return None


_onednn_linear = _onednn_linear_op()


@functools.cache
def _onednn_bf16_works() -> bool:
    """Whether oneDNN builds a bf16 linear on this CPU: without bf16 instructions (AMX,
    AVX512-BF16), e.g. on an AVX2-only AMD EPYC, it refuses ("could not create a primitive
    descriptor"), and the layers run as plain torch ops instead."""
    if _onednn_linear is None:
        return False
    x = torch.ones(2, 16, dtype=torch.bfloat16)
    try:
        _onednn_linear(x, torch.ones(8, 16, dtype=torch.bfloat16), None, "none", [], "")
    except RuntimeError:
        return False
    return True


def fusion_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """16-bit CUDA (compiled kernels, GEMM epilogues) or bf16 on a CPU whose oneDNN runs bf16
    linears."""
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_bf16_works()
