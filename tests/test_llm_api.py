"""The offline API: vLLM names, defaults, truncation, pooling options and outputs."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from tagserve import LLM, PoolerConfig, PoolingParams, PoolingRequestOutput

from checkpoints import oracle_dir, sentences

RAW = PoolingParams(use_activation=False)


@pytest.fixture(scope="module")
def hf_tokenizer(bert_path):
    return AutoTokenizer.from_pretrained(bert_path)


def test_vllm_ner_example_runs_unchanged(bert):
    """The steps of vLLM's offline NER example."""
    tokenizer = bert.get_tokenizer()
    label_map = bert.llm_engine.vllm_config.model_config.hf_config.id2label
    outputs = bert.encode(["Barack Obama visited Microsoft in Seattle."],
                          pooling_task="token_classify")
    for output in outputs:
        predictions = output.outputs.data.argmax(dim=-1)
        tokens = tokenizer.convert_ids_to_tokens(output.prompt_token_ids)
        labels = [label_map[int(p)] for p in predictions]
        assert len(tokens) == len(labels) == output.outputs.data.shape[0]
        assert tokens[0] in tokenizer.all_special_tokens
        assert all(label in label_map.values() for label in labels)
    assert bert.id2label == label_map


def test_output_object_and_order(bert, hf_tokenizer):
    prompts = sentences(10, seed=1)
    first = bert.encode(prompts, pooling_task="token_classify")
    second = bert.encode(prompts[:2], pooling_task="token_classify")
    assert all(isinstance(o, PoolingRequestOutput) for o in first)
    ids = [int(o.request_id) for o in first + second]
    assert ids == list(range(ids[0], ids[0] + 12))  # counter continues across calls
    for prompt, out in zip(prompts, first, strict=True):
        assert out.prompt_token_ids == hf_tokenizer(prompt)["input_ids"]
        assert out.outputs.data.shape == (len(out.prompt_token_ids), 5)
        torch.testing.assert_close(out.outputs.data.sum(-1), torch.ones(len(out.prompt_token_ids)))


def test_prompt_forms(bert, hf_tokenizer):
    text = "Zoë lives in Zürich."
    ids = hf_tokenizer(text)["input_ids"]
    forms = [text, [text], ids, [ids], {"prompt": text}, {"prompt_token_ids": ids}]
    expected = bert.encode(text, pooling_task="token_classify")[0].outputs.data
    for form in forms:
        out = bert.encode(form, pooling_task="token_classify")
        assert len(out) == 1 and out[0].prompt_token_ids == ids
        torch.testing.assert_close(out[0].outputs.data, expected)


def test_activation_on_off_and_per_prompt_params(bert):
    prompts = ["Alice met Bob.", "Paris"]
    raw = bert.encode(prompts, RAW, pooling_task="token_classify")
    mixed = bert.encode(prompts, [RAW, PoolingParams(use_activation=True)],
                        pooling_task="token_classify")
    torch.testing.assert_close(mixed[0].outputs.data, raw[0].outputs.data)
    torch.testing.assert_close(mixed[1].outputs.data, raw[1].outputs.data.softmax(-1))
    with pytest.raises(ValueError, match=r"The lengths of prompts \(2\) and params \(1\)"):
        bert.encode(prompts, [RAW], pooling_task="token_classify")


def test_truncation_variants(bert, hf_tokenizer):
    text = " ".join(sentences(30, seed=2))
    n = 12
    kept = bert.encode(text, pooling_task="token_classify",
                       tokenization_kwargs={"truncate_prompt_tokens": n})[0]
    assert kept.prompt_token_ids == hf_tokenizer(text, truncation=True, max_length=n)["input_ids"]
    full = hf_tokenizer(text)["input_ids"]
    right = bert.encode(text, pooling_task="token_classify", tokenization_kwargs={
        "truncate_prompt_tokens": n, "truncation_side": "right"})[0]
    left = bert.encode(text, pooling_task="token_classify", tokenization_kwargs={
        "truncate_prompt_tokens": n, "truncation_side": "left"})[0]
    assert right.prompt_token_ids == full[:n] and left.prompt_token_ids == full[-n:]
    max_len = bert.model_config.max_model_len
    to_max = bert.encode(text, pooling_task="token_classify",
                         tokenization_kwargs={"truncate_prompt_tokens": -1})[0]
    assert len(to_max.prompt_token_ids) == max_len
    ids = bert.encode(full, pooling_task="token_classify",
                      tokenization_kwargs={"truncate_prompt_tokens": 5})[0]
    assert ids.prompt_token_ids == full[:5]
    no_special = bert.encode("Alice met Bob.", pooling_task="token_classify",
                             tokenization_kwargs={"add_special_tokens": False})[0]
    assert no_special.prompt_token_ids == hf_tokenizer("Alice met Bob.",
                                                       add_special_tokens=False)["input_ids"]


def test_length_errors(bert, hf_tokenizer):
    max_len = bert.model_config.max_model_len
    words = " ".join(sentences(200, seed=4)).split()
    text = next(" ".join(words[:n]) for n in range(10, len(words))
                if len(hf_tokenizer(" ".join(words[:n]))["input_ids"]) > max_len + 20)
    with pytest.raises(ValueError, match=rf"maximum context length is {max_len} tokens. "
                       rf"However, your prompt contains at least {max_len + 1} input tokens"):
        bert.encode(text, pooling_task="token_classify")
    with pytest.raises(ValueError, match=rf"your prompt contains {max_len + 3} input tokens"):
        bert.encode([[7] * (max_len + 3)], pooling_task="token_classify")
    with pytest.raises(ValueError, match="characters"):
        bert.encode("x" * (max_len * 1000), pooling_task="token_classify")
    with pytest.raises(ValueError, match="truncate_prompt_tokens value is greater than"):
        bert.encode("hi", pooling_task="token_classify",
                    tokenization_kwargs={"truncate_prompt_tokens": max_len + 1})
    assert len(bert.encode([[7] * max_len], pooling_task="token_classify")[0].outputs.data) \
        == max_len


def test_cycle_collector_paused_only_while_encoding(bert, monkeypatch):
    seen = []
    original = bert.llm_engine.step
    monkeypatch.setattr(bert.llm_engine, "step", lambda: seen.append(gc.isenabled()) or original())
    bert.encode(["a b c", "d e"], pooling_task="token_classify")
    assert seen and not any(seen)
    assert gc.isenabled()
    with pytest.raises(ValueError):
        bert.encode([[7] * (bert.model_config.max_model_len + 3)], pooling_task="token_classify")
    assert gc.isenabled()


def test_empty_inputs(bert, make_checkpoint):
    with pytest.raises(ValueError, match="You must pass at least one prompt"):
        bert.encode([], pooling_task="token_classify")
    # BERT adds [CLS] [SEP]: an empty string is two rows, as in vLLM.
    assert bert.encode("", pooling_task="token_classify")[0].outputs.data.shape[0] == 2
    qwen = LLM(str(make_checkpoint("qwen3")), device="cpu")
    with pytest.raises(ValueError, match="The decoder prompt cannot be empty"):
        qwen.encode([""], pooling_task="token_classify")


def test_task_errors(bert, make_checkpoint):
    with pytest.raises(ValueError, match="pooling_task required for `LLM.encode`"):
        bert.encode("hi")
    with pytest.raises(ValueError, match=r"Unsupported task: 'classify' Supported tasks: "):
        bert.encode("hi", pooling_task="classify")
    with pytest.raises(ValueError, match="Embedding API is not supported by this model"):
        bert.encode("hi", pooling_task="embed")
    with pytest.raises(ValueError, match="`score` task was removed"):
        bert.encode("hi", pooling_task="score")
    qwen = LLM(str(make_checkpoint("qwen3")), device="cpu")
    assert qwen.model_config.supported_tasks == ("token_classify", "classify")
    with pytest.raises(ValueError, match="Try switching the model's pooling_task via"):
        qwen.encode("hi", pooling_task="classify")
    with pytest.raises(ValueError, match="only supports \\['use_activation'\\] parameters, does "
                                         "not support \\['step_tag_id'\\]"):
        bert.encode("hi", PoolingParams(step_tag_id=3), pooling_task="token_classify")
    with pytest.raises(ValueError, match="does not support \\['dimensions'\\]"):
        bert.encode("hi", PoolingParams(dimensions=3), pooling_task="token_classify")
    with pytest.raises(ValueError, match="cannot overwrite param.task"):
        bert.encode("hi", PoolingParams(task="classify"), pooling_task="token_classify")


def test_classify_task_on_converted_decoder(make_checkpoint):
    path = make_checkpoint("qwen3")
    llm = LLM(str(path), device="cpu", pooler_config=PoolerConfig(task="classify"))
    out = llm.encode(["Alice met Bob in Paris.", "hi"], pooling_task="classify")
    oracle = AutoModelForTokenClassification.from_pretrained(oracle_dir(path)).eval()
    for o in out:
        with torch.no_grad():
            ref = oracle(input_ids=torch.tensor([o.prompt_token_ids])).logits[0, -1].softmax(-1)
        torch.testing.assert_close(o.outputs.data, ref, atol=1e-5, rtol=1e-4)


def test_step_pooling_and_calibration(bert_path, hf_tokenizer):
    text = "Alice , Bob , Carol"
    comma = hf_tokenizer.convert_tokens_to_ids(",")
    base = LLM(str(bert_path), device="cpu").encode(text, RAW, pooling_task="token_classify")[0]
    step = LLM(str(bert_path), device="cpu", pooler_config=PoolerConfig(
        pooling_type="STEP", step_tag_id=comma, returned_token_ids=[1, 3]))
    out = step.encode(text, pooling_task="token_classify")[0].outputs.data
    rows = torch.tensor(base.prompt_token_ids) == comma
    assert out.shape == (int(rows.sum()), 2)
    torch.testing.assert_close(out, base.outputs.data[rows][:, [1, 3]].softmax(-1))
    calibrated = LLM(str(bert_path), device="cpu",
                     pooler_config={"logit_mean": 0.5, "logit_sigma": 2.0})
    got = calibrated.encode(text, RAW, pooling_task="token_classify")[0].outputs.data
    torch.testing.assert_close(got, (base.outputs.data - 0.5) / 2.0)


def test_hf_overrides_problem_type(bert_path):
    llm = LLM(str(bert_path), device="cpu",
              hf_overrides={"problem_type": "multi_label_classification"})
    raw = llm.encode("Alice", RAW, pooling_task="token_classify")[0].outputs.data
    out = llm.encode("Alice", pooling_task="token_classify")[0].outputs.data
    torch.testing.assert_close(out, raw.sigmoid())
    regression = LLM(str(bert_path), device="cpu", hf_overrides={"problem_type": "regression"})
    torch.testing.assert_close(
        regression.encode("Alice", pooling_task="token_classify")[0].outputs.data, raw)


def test_progress_bar_factory(bert):
    calls = []

    def factory(**kwargs):
        from tqdm import tqdm
        calls.append(kwargs)
        return tqdm(disable=True, **kwargs)

    bert.encode(sentences(70), pooling_task="token_classify", use_tqdm=factory)
    assert calls and calls[0]["total"] == 70


def test_tokenizer_matches_hf(bert, hf_tokenizer):
    tok = bert.get_tokenizer()
    text = "Zoë met 王伟 🙂"
    ids = hf_tokenizer(text)["input_ids"]
    assert tok(text)["input_ids"] == ids
    assert tok.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    assert set(tok.all_special_tokens) == set(hf_tokenizer.all_special_tokens)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
        ids, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["roberta", "xlmr"])
def test_truncated_ids_and_offsets_match_hf(family, make_checkpoint):
    """Content truncation keeps special tokens and the tokenizer's own offsets."""
    path = make_checkpoint(family)
    llm, hf = LLM(str(path), device="cpu"), AutoTokenizer.from_pretrained(path)
    text = " ".join(sentences(20, seed=2))
    for n in (3, 12, 40):
        out = llm.encode(text, pooling_task="token_classify",
                         tokenization_kwargs={"truncate_prompt_tokens": n})[0]
        ref = hf(text, truncation=True, max_length=n, return_offsets_mapping=True)
        assert out.prompt_token_ids == ref["input_ids"]
        assert [tuple(o) for o in out.offsets] == [tuple(o) for o in ref["offset_mapping"]]


def test_prompt_chunks_grow_and_cover_every_prompt():
    from tagserve.engine.offline import growing_chunks

    chunks = growing_chunks(5000, first=64, largest=2048)
    assert [len(c) for c in chunks] == [64, 128, 256, 512, 1024, 2048, 968]
    assert [i for c in chunks for i in c] == list(range(5000))
    assert growing_chunks(0) == [] and [len(c) for c in growing_chunks(10)] == [10]


def test_prompt_chunks_grow_on_gpus_and_are_large_on_cpus():
    from types import SimpleNamespace

    from tagserve.engine.offline import CPU_CHUNK, prompt_chunks

    gpu, cpu = (SimpleNamespace(runner=SimpleNamespace(pipelined=p)) for p in (True, False))
    assert [len(c) for c in prompt_chunks(gpu, 1000)] == [64, 128, 256, 512, 40]
    assert [len(c) for c in prompt_chunks(cpu, 5000)] == [CPU_CHUNK, CPU_CHUNK, 904]


@pytest.mark.parametrize("pipelined", [True, False])
def test_only_the_rust_tokenizer_runs_off_the_engine_thread(bert, monkeypatch, pipelined):
    """Python objects are made on the calling thread; the tokenizer thread only runs the Rust
    encode (a second thread running Python would hold the GIL against the engine's). Without
    a pipelined device (the CPU) the calling thread tokenizes too, each chunk when it is
    taken, so that no tokenizer competes with the model's threads for the cores."""
    import threading

    import tagserve.llm as llm_module

    monkeypatch.setattr(bert.llm_engine.runner, "pipelined", pipelined)

    threads: dict[str, set[str]] = {"encode": set(), "objects": set()}

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            threads[name].add(threading.current_thread().name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(llm_module, "encode_texts", recording("encode", llm_module.encode_texts))
    monkeypatch.setattr(llm_module, "tokenize_chunk",
                        recording("objects", llm_module.tokenize_chunk))
    ids = bert.get_tokenizer().encode(sentences()[0])
    prompts = [f"{sentences()[i % 4]} {i}" for i in range(300)] + [ids]
    outputs = bert.encode(prompts, pooling_task="token_classify", use_tqdm=False)
    assert len(outputs) == 301 and outputs[-1].prompt_token_ids == ids
    assert threads["objects"] == {threading.current_thread().name}
    if pipelined:
        assert threads["encode"] and all(t.startswith("tagserve-tokenize")
                                         for t in threads["encode"])
    else:
        assert threads["encode"] == {threading.current_thread().name}
