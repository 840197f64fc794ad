"""BERT-style encoders: BERT, RoBERTa, XLM-R and ERNIE (post-LayerNorm, absolute positions)."""

from __future__ import annotations

import torch
from torch import nn

from tagserve.config import HFConfig
from tagserve.layers.activation import GELU_FORMS, get_activation
from tagserve.layers.attention import AttentionMetadata, packed_attention
from tagserve.layers.fused import (
    Hidden,
    embedding_layer_norm,
    linear,
    linear_add_layer_norm,
    linear_gelu,
)
from tagserve.models.base import Backbone, WeightTarget


class BertEmbeddings(nn.Module):
    def __init__(self, config: HFConfig, position_offset: int, use_task_id: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), hidden)
        if use_task_id:
            self.task_type_embeddings = nn.Embedding(config.get("task_type_vocab_size", 3), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.get("layer_norm_eps", 1e-12))
        self.position_offset = position_offset
        self.fused = False  # set by the loader on 16-bit CUDA and bf16 CPU (layers/fused.py)
        self.precise_residuals = False  # set by the loader on fused bf16 (`precise_residuals`)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Hidden:
        # Single-segment inputs: token type 0 (and ERNIE task type 0) for every token.
        task = getattr(self, "task_type_embeddings", None)
        return embedding_layer_norm(
            input_ids, positions + self.position_offset, self.word_embeddings.weight,
            self.position_embeddings.weight, self.token_type_embeddings.weight[0],
            None if task is None else task.weight[0], self.LayerNorm, self.fused,
            self.precise_residuals)


class BertLayer(nn.Module):
    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        eps = config.get("layer_norm_eps", 1e-12)
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, inter)
        self.down = nn.Linear(inter, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)
        act = config.get("hidden_act", "gelu")
        self.act = get_activation(act)
        self.gelu = GELU_FORMS.get(act)  # "none" (exact) or "tanh"; None: not a GELU
        self.fused = False  # set by the loader on 16-bit CUDA and bf16 CPU (layers/fused.py)

    def forward(self, hidden: Hidden, attn: AttentionMetadata) -> Hidden:
        qkv = linear(hidden.x, self.qkv, self.fused)
        q, k, v = qkv.view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        a = packed_attention(q, k, v, attn).reshape(hidden.x.shape)
        hidden = linear_add_layer_norm(a, self.attn_out, hidden, self.attn_norm, self.fused)
        if self.gelu is None:
            h = self.act(linear(hidden.x, self.up, self.fused))
        else:
            h = linear_gelu(hidden.x, self.up, self.gelu, self.fused)
        return linear_add_layer_norm(h, self.down, hidden, self.mlp_norm, self.fused)


class BertModel(Backbone):
    """The BERT family body. RoBERTa/XLM-R shift positions by `pad_token_id + 1`."""

    prefixes = ("bert.", "roberta.", "ernie.")
    ignored = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids",
               "embeddings.token_type_ids")

    # HF layer-relative names -> ours; q/k/v are fused into `qkv`.
    _LAYER_NAMES = {
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "up",
        "output.dense": "down",
        "output.LayerNorm": "mlp_norm",
    }
    _QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}

    def __init__(self, config: HFConfig) -> None:
        super().__init__(config)
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("Only 'absolute' position_embedding_type is supported")
        is_roberta = config.get("model_type") in ("roberta", "xlm-roberta", "camembert")
        offset = config.get("pad_token_id", 1) + 1 if is_roberta else 0
        use_task_id = config.get("model_type") == "ernie" and bool(config.get("use_task_id"))
        self.hidden_size = config.hidden_size
        self.embeddings = BertEmbeddings(config, offset, use_task_id)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions)
        for layer in self.layers:
            hidden = layer(hidden, attn)
        return hidden.rows

    def map_weight(self, name: str) -> WeightTarget | None:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        if not name.startswith("encoder.layer."):
            return WeightTarget(name)
        index, rest = name[len("encoder.layer."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        prefix = f"layers.{index}"
        if module in self._QKV:
            size = self.hidden_size
            return WeightTarget(f"{prefix}.qkv.{param}", self._QKV[module] * size, size)
        if module in self._LAYER_NAMES:
            return WeightTarget(f"{prefix}.{self._LAYER_NAMES[module]}.{param}")
        return WeightTarget(f"{prefix}.{rest}")


def max_positions(config: HFConfig) -> int:
    """Usable sequence length: RoBERTa-style models lose `pad_token_id + 1` positions."""
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        return config.max_position_embeddings - config.get("pad_token_id", 1) - 1
    return config.max_position_embeddings

