"""training/row_gradients.py: the table's gradient kept as rows trains exactly like nn.Embedding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from row_gradients import RowGradients  # noqa: E402

PAD = 0


def tiny_model() -> BertForTokenClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, pad_token_id=PAD,
                        num_labels=5, attn_implementation="eager")
    return BertForTokenClassification(config)


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, 40, (4, 9), generator=gen)  # few rows: repeats in a batch
        ids[0, 6:] = PAD
        mask = (ids != PAD).long()
        labels = torch.randint(0, 5, (4, 9), generator=gen).masked_fill(mask == 0, -100)
        out.append((ids, mask, labels))
    return out


def train(model: BertForTokenClassification, rows: bool, max_norm: float
          ) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    params = list(model.parameters())
    table = RowGradients(model.bert.embeddings.word_embeddings) if rows else None
    for ids, mask, labels in batches(6):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        if table is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            table.clip(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if table is not None:
            table.reset()
    if table is not None:
        table.detach()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("max_norm", [1e-3, 100.0], ids=["clipped", "unclipped"])
def test_same_weights_as_plain_embedding(max_norm: float) -> None:
    plain = train(tiny_model(), rows=False, max_norm=max_norm)
    with_rows = train(tiny_model(), rows=True, max_norm=max_norm)
    table = "bert.embeddings.word_embeddings.weight"
    start = tiny_model().state_dict()[table]
    assert not torch.equal(with_rows[table][:40], start[:40])  # the used rows trained
    # rows never looked up still move: AdamW's weight decay, as with the dense gradient
    assert not torch.equal(with_rows[table][40:], start[40:])
    assert torch.equal(with_rows[table][PAD], plain[table][PAD])
    for name, value in plain.items():
        torch.testing.assert_close(with_rows[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_buffer_is_zero_after_reset_and_detach_restores_module() -> None:
    model = tiny_model()
    embedding = model.bert.embeddings.word_embeddings
    table = RowGradients(embedding)
    ids, mask, labels = batches(1)[0]
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    used = torch.unique(ids[ids != PAD])
    assert torch.equal(table.rows, used)
    assert table.buffer[used].abs().sum() > 0 and table.buffer[PAD].abs().sum() == 0
    table.reset()
    assert table.buffer.abs().sum() == 0 and embedding.weight.grad is table.buffer
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert table.rows.numel() == 0  # inference does not record rows
    table.detach()
    assert "forward" not in vars(embedding) and embedding.weight.grad is None
