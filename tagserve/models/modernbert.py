"""ModernBERT: pre-LayerNorm encoder, RoPE per layer type, global/local attention alternation."""

from __future__ import annotations

import torch
from torch import nn

from tagserve.config import HFConfig
from tagserve.layers.activation import get_activation
from tagserve.layers.attention import FULL, AttentionMetadata, Window, packed_attention
from tagserve.layers.rotary import RotaryEmbedding
from tagserve.models.base import Backbone, WeightTarget


def _layer_types(config: HFConfig) -> list[str]:
    types = config.get("layer_types")
    if types is None:
        every = config.get("global_attn_every_n_layers", 3)
        types = ["sliding_attention" if i % every else "full_attention"
                 for i in range(config.num_hidden_layers)]
    return types


def _rope_theta(config: HFConfig, layer_type: str) -> float:
    params = (config.get("rope_parameters") or {}).get(layer_type) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    if layer_type == "sliding_attention":
        return float(config.get("local_rope_theta") or 10000.0)
    return float(config.get("global_rope_theta", 160000.0))


def _layer_norm(config: HFConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.get("norm_eps", 1e-5),
                        bias=config.get("norm_bias", False))


class ModernBertLayer(nn.Module):
    def __init__(self, config: HFConfig, index: int, rotary: RotaryEmbedding,
                 window: Window) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        attn_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
        self.attn_norm = nn.Identity() if index == 0 else _layer_norm(config)
        self.Wqkv = nn.Linear(hidden, 3 * hidden, bias=attn_bias)
        self.Wo = nn.Linear(hidden, hidden, bias=attn_bias)
        self.mlp_norm = _layer_norm(config)
        self.Wi = nn.Linear(hidden, 2 * config.intermediate_size, bias=mlp_bias)
        self.mlp_Wo = nn.Linear(config.intermediate_size, hidden, bias=mlp_bias)
        self.act = get_activation(config.get("hidden_activation", "gelu"))
        self.rotary = rotary
        self.window = window

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.Wqkv(self.attn_norm(x)).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.rotary(positions, q, k)
        x = x + self.Wo(packed_attention(q, k, v, attn, self.window).reshape(x.shape))
        inputs, gate = self.Wi(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.mlp_Wo(self.act(inputs) * gate)


class ModernBertModel(Backbone):
    prefixes = ("model.",)

    def __init__(self, config: HFConfig) -> None:
        super().__init__(config)
        self.hidden_size = config.hidden_size
        head_dim = config.hidden_size // config.num_attention_heads
        max_len = config.max_position_embeddings
        half_window = config.get("local_attention", 128) // 2
        self.rotary = nn.ModuleDict({
            t: RotaryEmbedding(head_dim, _rope_theta(config, t), max_len)
            for t in ("full_attention", "sliding_attention")
        })
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_norm = _layer_norm(config)
        self.layers = nn.ModuleList(
            ModernBertLayer(config, i, self.rotary[t],
                            (half_window, half_window) if t == "sliding_attention" else FULL)
            for i, t in enumerate(_layer_types(config)))
        self.final_norm = _layer_norm(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        x = self.embed_norm(self.tok_embeddings(input_ids))
        for layer in self.layers:
            x = layer(x, positions, attn)
        return self.final_norm(x)

    def map_weight(self, name: str) -> WeightTarget | None:
        name = name.replace("embeddings.tok_embeddings.", "tok_embeddings.")
        name = name.replace("embeddings.norm.", "embed_norm.")
        return super().map_weight(name.replace(".mlp.Wo.", ".mlp_Wo.").replace(".attn.", ".")
                                  .replace(".mlp.Wi.", ".Wi."))


class ModernBertPredictionHead(nn.Module):
    """`dense -> activation -> norm`, applied before the classifier."""

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size,
                               bias=config.get("classifier_bias", False))
        self.act = get_activation(config.get("classifier_activation", "gelu"))
        self.norm = _layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))
