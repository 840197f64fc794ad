"""A backbone plus its label head: per-token logits for a packed batch."""

from __future__ import annotations

import torch
from torch import nn

from tagserve.layers import head_kernel
from tagserve.layers.attention import AttentionMetadata
from tagserve.models.base import Backbone


class TokenClassifier(nn.Module):
    """`backbone -> [pre_head] -> Linear(hidden, num_labels)`; the head runs in `head_dtype`.

    `head_name` is the checkpoint name of the linear head: `classifier` for native encoders,
    `score` for decoders and converted backbones. The pre-head (ModernBERT's `head`) keeps the
    model dtype, like the backbone. Fused on CUDA, a float32 head reads the 16-bit hidden
    states in one Triton kernel (`layers/head_kernel.py`) instead of upcasting them first.
    """

    def __init__(self, backbone: Backbone, num_labels: int, head_name: str, head_bias: bool,
                 head_dtype: torch.dtype, pre_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.pre_head = pre_head
        self.head_name = head_name
        self.head = nn.Linear(backbone.hidden_size, num_labels, bias=head_bias, dtype=head_dtype)
        self.fused = False  # set by `enable_fusion`

    def enable_fusion(self, enabled: bool) -> None:
        """Switch every layer that has fused kernels (layers/fused.py) on or off."""
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = enabled

    def enable_precise_residuals(self, enabled: bool) -> None:
        """Keep the residual stream more precise than bf16 where a model can (`Hidden` in
        layers/fused.py; BERT-style encoders on fused bf16: remainders on CUDA, float32 on CPU)."""
        for module in self.modules():
            if hasattr(module, "precise_residuals"):
                module.precise_residuals = enabled

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        hidden = self.backbone(input_ids, positions, attn)
        if self.pre_head is not None:
            hidden = self.pre_head(hidden)
        if self.fused and head_kernel.supported(hidden, self.head.weight):
            return head_kernel.head_logits(hidden, self.head.weight, self.head.bias)
        return self.head(hidden.to(self.head.weight.dtype))
