"""tagserve vs transformers on every supported architecture (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from tagserve import LLM, PoolerConfig, PoolingParams

from checkpoints import FAMILIES, oracle_dir, sentences

CONVERTED = {"bert_model", "qwen3_causal", "llama_model"}
RAW = PoolingParams(use_activation=False)


def make_llm(path, family: str, **kwargs) -> LLM:
    if family in CONVERTED:
        kwargs.setdefault("convert", "classify")
        kwargs.setdefault("pooler_config", PoolerConfig(task="token_classify"))
    return LLM(str(path), device="cpu", **kwargs)


def prompts_for(tokenizer, max_len: int) -> list:
    """>= 16 mixed prompts: short/long text, non-ASCII, emoji, one token, exactly max length."""
    texts = sentences(40, seed=3)
    texts = sorted(texts, key=len)[::3] + ["Zoë paid 5€ in Zürich 🙂🎉", "中文 русский ĳ", "a"]
    long_text = " ".join(sentences(200, seed=5))
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    vocab = tokenizer.vocab_size
    return texts + [
        [5],                                   # one token
        ids[:max_len],                         # token ids, exactly max length
        ids[:17],
        {"prompt_token_ids": ids[100:140]},
        {"prompt": texts[1]},
        [vocab - 1, 3, 4, 7],
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, make_checkpoint):
    family = request.param
    path = make_checkpoint(family)
    oracle = AutoModelForTokenClassification.from_pretrained(oracle_dir(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return family, path, oracle, tokenizer


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_parity_with_transformers(family_setup):
    family, path, oracle, tokenizer = family_setup
    llm = make_llm(path, family)
    max_len = llm.model_config.max_model_len
    prompts = prompts_for(tokenizer, max_len)
    assert len(prompts) >= 16
    raw = llm.encode(prompts, RAW, pooling_task="token_classify")
    probs = llm.encode(prompts, pooling_task="token_classify")
    assert len(raw) == len(prompts)
    for prompt, out, out_probs in zip(prompts, raw, probs, strict=True):
        if isinstance(prompt, (str, dict)) and "prompt_token_ids" not in prompt:
            text = prompt if isinstance(prompt, str) else prompt["prompt"]
            assert out.prompt_token_ids == tokenizer(text)["input_ids"], text
        ref = hf_logits(oracle, out.prompt_token_ids)
        got = out.outputs.data
        assert got.dtype == torch.float32 and got.shape == ref.shape
        rel = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
        assert rel < 1e-4, (family, prompt, rel)
        torch.testing.assert_close(out_probs.outputs.data, ref.softmax(-1), atol=1e-5, rtol=1e-4)
        assert out_probs.finished and out_probs.num_cached_tokens == 0


def test_packed_batch_equals_one_by_one(family_setup):
    """Packing many sequences (under a small token budget) changes nothing."""
    family, path, _, tokenizer = family_setup
    llm = make_llm(path, family, max_num_batched_tokens=1, max_num_seqs=3)
    prompts = sentences(12, seed=9)
    batched = llm.encode(prompts, RAW, pooling_task="token_classify")
    for prompt, out in zip(prompts, batched, strict=True):
        alone = llm.encode(prompt, RAW, pooling_task="token_classify", use_tqdm=False)[0]
        torch.testing.assert_close(out.outputs.data, alone.outputs.data, atol=1e-5, rtol=1e-4)
        assert out.prompt_token_ids == tokenizer(prompt)["input_ids"]


def test_sharded_checkpoint(make_checkpoint):
    path = make_checkpoint("bert", sharded=True)
    assert (path / "model.safetensors.index.json").exists()
    oracle = AutoModelForTokenClassification.from_pretrained(oracle_dir(path)).eval()
    out = make_llm(path, "bert").encode(sentences(4), RAW, pooling_task="token_classify")
    for o in out:
        torch.testing.assert_close(o.outputs.data, hf_logits(oracle, o.prompt_token_ids),
                                   atol=1e-5, rtol=1e-4)
