"""CUDA parity: flash varlen attention in float32 and bfloat16 against transformers (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForTokenClassification

from tagserve import LLM, PoolerConfig, PoolingParams

from checkpoints import FAMILIES, oracle_dir, sentences

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

CONVERTED = {"bert_model", "qwen3_causal", "llama_model"}
RAW = PoolingParams(use_activation=False)


def run(path, family: str, dtype: str, prompts: list[str]):
    kwargs = {"convert": "classify", "pooler_config": PoolerConfig(task="token_classify")} \
        if family in CONVERTED else {}
    llm = LLM(str(path), device="cuda", dtype=dtype, **kwargs)
    return llm.encode(prompts, RAW, pooling_task="token_classify")


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_float32_and_bfloat16(family, make_checkpoint):
    path = make_checkpoint(family)
    oracle = AutoModelForTokenClassification.from_pretrained(oracle_dir(path)).eval()
    prompts = sentences(48, seed=11)
    fp32 = run(path, family, "float32", prompts)
    bf16 = run(path, family, "bfloat16", prompts)
    agree = total = 0
    worst32 = worst16 = 0.0
    for a, b in zip(fp32, bf16, strict=True):
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([a.prompt_token_ids])).logits[0]
        scale = ref.abs().max()
        worst32 = max(worst32, float((a.outputs.data - ref).abs().max() / scale))
        worst16 = max(worst16, float((b.outputs.data - ref).abs().max() / scale))
        assert b.outputs.data.dtype == torch.float32
        agree += int((b.outputs.data.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
    print(f"{family}: fp32 rel err {worst32:.2e}, bf16 rel err {worst16:.2e}, "
          f"bf16 argmax agreement {agree / total:.4f} ({total} tokens)")
    assert worst32 < 1e-4
    assert worst16 < 2e-2
    assert agree / total >= 0.99
