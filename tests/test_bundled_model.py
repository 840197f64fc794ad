"""The bundled PII model: loads in tagserve, matches transformers, tags obvious entities."""

from __future__ import annotations

import json

import pytest
import torch

from tagserve import LLM, PoolingParams
from tagserve.bundled import DEFAULT_MODEL

SENTENCES = [
    "Please email anna.schmidt@example.com or call +49 30 1234567 before Friday.",
    "John Smith moved to London on 3 March 2021.",
    "Thanks, see you tomorrow!",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(DEFAULT_MODEL), device="cpu")


def tagged(llm: LLM, text: str) -> list[tuple[str, str, str]]:
    """(token text, label) for each non-special token, with its character span text."""
    out = llm.encode([text], pooling_task="token_classify", use_tqdm=False)[0]
    id2label = llm.llm_engine.vllm_config.model_config.hf_config.id2label
    tokenizer = llm.get_tokenizer()
    enc = tokenizer.rust.encode(text)
    assert enc.ids == list(out.prompt_token_ids)
    labels = out.outputs.data.argmax(-1).tolist()
    rows = zip(enc.offsets, labels, enc.special_tokens_mask, strict=True)
    return [(text[s:e], id2label[label]) for (s, e), label, special in rows if not special]


def entity_text(pairs: list[tuple[str, str]], text: str, label: str) -> list[str]:
    """Tokens tagged B-/I-``label``, joined back into entity strings (B- starts a new one)."""
    found: list[list[str]] = []
    for piece, tag in pairs:
        if tag == f"B-{label}" or (tag == f"I-{label}" and not found):
            found.append([piece])
        elif tag == f"I-{label}":
            found[-1].append(piece)
    return ["".join(parts) for parts in found]


def test_checkpoint_layout() -> None:
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"]["0"] == "O" and "B-EMAIL" in config["label2id"]
    assert (config.get("dtype") or config.get("torch_dtype")) in ("float16", "bfloat16")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (DEFAULT_MODEL / name).is_file(), name
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 20_000_000  # "<= 20 MB"


def test_matches_transformers(llm: LLM) -> None:
    from transformers import AutoModelForTokenClassification

    hf = AutoModelForTokenClassification.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    hf.eval()
    outputs = llm.encode(SENTENCES, pooling_params=PoolingParams(use_activation=False),
                         pooling_task="token_classify", use_tqdm=False)
    for out in outputs:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([out.prompt_token_ids])).logits[0]
        err = (out.outputs.data - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, float(err)


def test_tags_obvious_entities(llm: LLM) -> None:
    text = SENTENCES[0]
    pairs = [(piece, tag) for piece, tag in tagged(llm, text)]
    assert entity_text(pairs, text, "EMAIL") == ["anna.schmidt@example.com"]
    assert [p.replace(" ", "") for p in entity_text(pairs, text, "PHONE")] == ["+49301234567"]
    assert all(tag == "O" for piece, tag in pairs if piece in ("Please", "or", "call", "Friday"))


def test_tags_person_place_and_date(llm: LLM) -> None:
    text = SENTENCES[1]
    pairs = tagged(llm, text)
    assert entity_text(pairs, text, "PERSON") == ["JohnSmith"]
    assert entity_text(pairs, text, "LOCATION") == ["London"]
    assert entity_text(pairs, text, "DATE") == ["3March2021"]


def test_no_entities_in_plain_text(llm: LLM) -> None:
    assert all(tag == "O" for _, tag in tagged(llm, SENTENCES[2]))


def test_readme_first_command(llm: LLM) -> None:
    """The README's first command: "Jane Doe" is one PERSON ("Doe" had lost its tag when "Do"
    became an everyday-word entry), plus the e-mail, phone and date."""
    text = "Email Jane Doe at jane.doe@example.com or call +1 415 555 0100 before 3 March 2025."
    pairs = tagged(llm, text)
    assert entity_text(pairs, text, "PERSON") == ["JaneDoe"]
    assert entity_text(pairs, text, "EMAIL") == ["jane.doe@example.com"]
    assert entity_text(pairs, text, "PHONE") == ["+14155550100"]
    assert entity_text(pairs, text, "DATE") == ["3March2025"]


def test_recommended_decoding_is_what_the_cli_shows(capsys) -> None:
    """config.json names the decoding the model is scored with (training/README.md): the
    default of `tagserve ner`, whose first README command shows these four entities."""
    from tagserve.cli import main

    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    decoding = config["tagserve_ner_decoding"]
    assert decoding == {"aggregation_strategy": "first", "bio": "viterbi",
                        "threshold": decoding["threshold"]}
    metrics = json.loads((DEFAULT_MODEL / "metrics.json").read_text())
    assert metrics["pipeline"]["decoding"] == decoding
    # The threshold is the validation set's best (train_pii.pick_threshold), not a guess.
    curve = metrics["pipeline"]["validation"]["f1_by_threshold"]
    assert curve[str(decoding["threshold"])] == max(curve.values())
    text = "Email Jane Doe at jane.doe@example.com or call +1 415 555 0100 before 3 March 2025."
    assert main(["ner", text]) == 0
    rows = [line.split(None, 3) for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(label, shown) for label, _, _, shown in rows] == [
        ("PERSON", "Jane Doe"), ("EMAIL", "jane.doe@example.com"), ("PHONE", "+1 415 555 0100"),
        ("DATE", "3 March 2025")]
