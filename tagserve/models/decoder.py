"""Llama-style decoders: Llama, Mistral, Qwen2 and Qwen3 (pre-RMSNorm, RoPE, GQA, causal)."""

from __future__ import annotations

import torch
from torch import nn

from tagserve.config import HFConfig
from tagserve.layers.attention import CAUSAL, AttentionMetadata, Window, packed_attention
from tagserve.layers.fused import add_rms_norm, qk_norm_rope, silu_mul
from tagserve.layers.norm import RMSNorm
from tagserve.layers.rotary import RotaryEmbedding
from tagserve.models.base import Backbone, WeightTarget


def rope_settings(config: HFConfig) -> tuple[float, dict | None]:
    """`(theta, scaling)` from either the transformers-4 or the transformers-5 config layout."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params
    return float(config.get("rope_theta", 10000.0)), config.get("rope_scaling")


def layer_windows(config: HFConfig) -> list[Window]:
    """Causal attention per layer, limited to `sliding_window` tokens on sliding layers."""
    n, window = config.num_hidden_layers, config.get("sliding_window")
    types = config.get("layer_types")
    if types is None:
        uses_window = config.get("model_type") == "mistral" or config.get("use_sliding_window")
        types = ["sliding_attention" if uses_window else "full_attention"] * n
    if window is None:
        return [CAUSAL] * n
    return [(window - 1, 0) if t == "sliding_attention" else CAUSAL for t in types]


class DecoderLayer(nn.Module):
    def __init__(self, config: HFConfig, rotary: RotaryEmbedding, window: Window) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.get("num_key_value_heads", self.num_heads)
        self.head_dim = config.get("head_dim", hidden // self.num_heads)
        qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias"))
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        o_bias = config.get("model_type") != "qwen2" and bool(config.get("attention_bias"))
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        eps = config.get("rms_norm_eps", 1e-6)
        qk_norm = config.get("model_type") == "qwen3"
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        inter, mlp_bias = config.intermediate_size, bool(config.get("mlp_bias"))
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=mlp_bias)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.rotary = rotary
        self.window = window
        self.fused = False  # set by the loader on 16-bit CUDA (layers/fused.py)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                attn: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (MLP output, residual stream); the next layer adds them in its norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = add_rms_norm(x, residual, self.input_layernorm, self.fused)
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = qk_norm_rope(q, k, positions, self.rotary, self.q_norm, self.k_norm, self.fused)
        a = packed_attention(q, k, v, attn, self.window).reshape(-1, self.q_size)
        h, residual = add_rms_norm(self.o_proj(a), residual, self.post_attention_layernorm,
                                   self.fused)
        return self.down_proj(silu_mul(self.gate_up_proj(h), self.fused)), residual


class DecoderModel(Backbone):
    """The shared decoder body; checkpoints may be `*ForCausalLM` (`model.` prefix) or `*Model`."""

    prefixes = ("model.",)
    ignored = ("lm_head.",)
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: HFConfig) -> None:
        super().__init__(config)
        self.hidden_size = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = config.get("head_dim", config.hidden_size // config.num_attention_heads)
        theta, scaling = rope_settings(config)
        self.rotary = RotaryEmbedding(head_dim, theta, config.max_position_embeddings, scaling)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rotary, w)
                                    for w in layer_windows(config))
        self.norm = RMSNorm(config.hidden_size, config.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, attn)
        return add_rms_norm(x, residual, self.norm, self.layers[0].fused)[0]

    def map_weight(self, name: str) -> WeightTarget | None:
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "layers" and parts[3] in self._FUSED:
            layer = self.layers[int(parts[1])]
            fused, shard = self._FUSED[parts[3]]
            if fused == "qkv_proj":
                sizes = (layer.q_size, layer.kv_size, layer.kv_size)
            else:
                sizes = (self.config.intermediate_size,) * 2
            start = sum(sizes[:shard])
            return WeightTarget(f"layers.{parts[1]}.{parts[2]}.{fused}.{parts[4]}".replace(
                ".self_attn.", ".").replace(".mlp.", "."), start, sizes[shard])
        return WeightTarget(name.replace(".self_attn.", ".").replace(".mlp.", "."))
