"""Checkpoints that cannot be run get a clear exception naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tagserve import LLM, PoolingParams
from tagserve.errors import ModelLoadError


@pytest.fixture
def bert_copy(make_checkpoint, tmp_path):
    src = make_checkpoint("bert")
    dst = tmp_path / "bert"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("oracle"))
    return dst


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_lists_supported(bert_copy):
    edit_config(bert_copy, architectures=["FancyNetForTokenClassification"])
    with pytest.raises(ModelLoadError, match="not supported.*BertForTokenClassification"):
        LLM(str(bert_copy), device="cpu")


def test_remote_code_refused(bert_copy):
    edit_config(bert_copy, architectures=["FancyNet"], auto_map={"AutoModel": "fancy.FancyNet"})
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        LLM(str(bert_copy), device="cpu")


def test_missing_and_corrupt_weights(bert_copy):
    weights = bert_copy / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Cannot read weights from .*model.safetensors"):
        LLM(str(bert_copy), device="cpu")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="No weight files"):
        LLM(str(bert_copy), device="cpu")


def test_shape_mismatch_names_tensor(bert_copy):
    with pytest.raises(ModelLoadError, match=r"Weight 'classifier\.(weight|bias)' has shape"):
        LLM(str(bert_copy), device="cpu", hf_overrides={"num_labels": 7})


def test_missing_tensor_is_named(bert_copy):
    weights = bert_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["bert.encoder.layer.0.output.dense.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"Missing weights.*layers\.0\.down\.weight"):
        LLM(str(bert_copy), device="cpu")


def test_pickle_refused_unless_opted_in(bert_copy):
    weights = bert_copy / "model.safetensors"
    expected = LLM(str(bert_copy), device="cpu").encode(
        "Alice", PoolingParams(use_activation=False), pooling_task="token_classify")[0]
    torch.save(load_file(weights), bert_copy / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="load_format='pt'"):
        LLM(str(bert_copy), device="cpu")
    got = LLM(str(bert_copy), device="cpu", load_format="pt").encode(
        "Alice", PoolingParams(use_activation=False), pooling_task="token_classify")[0]
    torch.testing.assert_close(got.outputs.data, expected.outputs.data)


def test_backbone_needs_convert(make_checkpoint):
    with pytest.raises(ValueError, match="convert='classify'"):
        LLM(str(make_checkpoint("qwen3_causal")), device="cpu")
    with pytest.raises(ValueError, match="convert='classify'"):
        LLM(str(make_checkpoint("bert_model")), device="cpu")


def test_backbone_without_head(bert_copy):
    weights = bert_copy / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier")}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="no token-classification head"):
        LLM(str(bert_copy), device="cpu")


def test_unknown_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Invalid repository ID or local directory"):
        LLM("no-such-org/no-such-model", device="cpu")
    with pytest.raises(ModelLoadError, match="not a directory"):
        LLM(str(tmp_path / "missing"), device="cpu")
