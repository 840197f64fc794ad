"""A model's recommended entity decoding (config.json's "tagserve_ner_decoding"): the default
of `tagserve ner` and of the page (`GET /v1/ner/decoding`), never of `LLM.ner` or `/v1/ner`."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tagserve import LLM
from tagserve.cli import build_parser, main, ner_options
from tagserve.config import HFConfig
from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.factory import EngineArgs
from tagserve.postprocess.ner import DECODING_KEY, recommended_decoding
from tagserve.server.app import build_app
from tagserve.server.settings import ServerSettings

TEXT = "Alice moved to Paris in 1999 and met Bob Smith in Zürich."
DECODING = {"aggregation_strategy": "average", "bio": "viterbi", "threshold": 0.4}


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> str:
    return str(make_checkpoint("bert", **{DECODING_KEY: DECODING}))


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt)


@pytest.mark.parametrize(("entry", "expected"), [
    (None, {"aggregation_strategy": "simple", "bio": None, "threshold": None}),
    ({"aggregation_strategy": "first", "bio": "viterbi"},
     {"aggregation_strategy": "first", "bio": "viterbi", "threshold": None}),
    ({"aggregation_strategy": "max"}, {"aggregation_strategy": "max", "bio": None,
                                       "threshold": None}),
    ({"bio": "repair", "threshold": 1}, {"aggregation_strategy": "simple", "bio": "repair",
                                         "threshold": 1.0}),
    ({"aggregation_strategy": "first", "threshold": 0.55},
     {"aggregation_strategy": "first", "bio": None, "threshold": 0.55}),
])
def test_recommended_decoding(entry, expected):
    data: dict[str, Any] = {"id2label": {"0": "O"}}
    if entry is not None:
        data[DECODING_KEY] = entry
    assert recommended_decoding(HFConfig(data)) == expected


@pytest.mark.parametrize("entry", [
    {"aggregation_strategy": "firsts", "bio": "viterbi"},
    {"aggregation_strategy": "first", "bio": "crf"},
    {"aggregation_strategy": "first", "threshold": 1.5},
    {"aggregation_strategy": "first", "threshold": "0.5"},
    {"aggregation_strategy": "first", "threshold": True},
    "first",
])
def test_malformed_entries_are_ignored_whole(entry, caplog):
    with caplog.at_level(logging.WARNING):
        assert recommended_decoding(HFConfig({DECODING_KEY: entry})) == {
            "aggregation_strategy": "simple", "bio": None, "threshold": None}
    assert DECODING_KEY in caplog.text


@pytest.mark.parametrize(("flags", "strategy", "bio", "threshold"), [
    ([], "average", "viterbi", 0.4),
    (["--aggregation-strategy", "first"], "first", "viterbi", 0.4),
    (["--bio", "none"], "average", None, 0.4),
    (["--bio", "repair", "--aggregation-strategy", "simple"], "simple", "repair", 0.4),
    (["--threshold", "0"], "average", "viterbi", 0.0),
    (["--threshold", "0.9"], "average", "viterbi", 0.9),
])
def test_cli_flags_override_the_models_decoding(flags, strategy, bio, threshold):
    args = build_parser().parse_args(["ner", "TEXT", *flags])
    options = ner_options(args, HFConfig({DECODING_KEY: DECODING}))
    assert (options.aggregation_strategy, options.bio, options.threshold) == (
        strategy, bio, threshold)
    plain = ner_options(args, HFConfig({}))
    assert plain.aggregation_strategy == (strategy if "--aggregation-strategy" in flags
                                          else "simple")
    assert plain.threshold == (threshold if "--threshold" in flags else None)


def test_cli_uses_the_models_decoding_by_default(ckpt, llm, capsys):
    assert main(["ner", ckpt, TEXT]) == 0
    default = capsys.readouterr().out
    recommended = llm.ner(TEXT, use_tqdm=False, **DECODING)
    plain = llm.ner(TEXT, use_tqdm=False)  # LLM.ner keeps the pipeline's "simple"
    assert recommended != plain  # else this test could not tell them apart
    assert len(default.splitlines()) == len(recommended) + 1
    for line, entity in zip(default.splitlines()[1:], recommended, strict=True):
        assert line.split()[2] == f"{entity['start']}-{entity['end']}"
        assert line.split()[0] == entity["entity_group"]
    assert len(recommended) < len(llm.ner(TEXT, use_tqdm=False, **{**DECODING,
                                                                    "threshold": None}))
    assert main(["ner", ckpt, TEXT, "--aggregation-strategy", "simple", "--bio", "none",
                 "--threshold", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(plain) + 1


@pytest.fixture(scope="module")
def client(ckpt):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=ckpt))
    app = build_app(engine, ServerSettings(served_model_names=["m"], api_keys=["k"]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    engine.shutdown()


def test_server_tells_the_page_the_models_decoding(client, llm, make_checkpoint):
    auth = {"Authorization": "Bearer k"}
    assert client.get("/v1/ner/decoding").status_code == 401
    answer = client.get("/v1/ner/decoding", headers=auth)
    assert answer.status_code == 200
    assert answer.json() == {"model": "m", **DECODING}
    # /v1/ner itself keeps transformers' default; /v1/redact takes `bio` like /v1/ner.
    plain = client.post("/v1/ner", json={"input": TEXT}, headers=auth).json()
    assert [e["start"] for e in plain["data"][0]["entities"]] == [
        e["start"] for e in llm.ner(TEXT, use_tqdm=False)]
    redacted = client.post("/v1/redact", json={"input": TEXT, **DECODING}, headers=auth).json()
    assert [(e["start"], e["end"]) for e in redacted["data"][0]["entities"]] == [
        (e["start"], e["end"]) for e in llm.ner(TEXT, use_tqdm=False, **DECODING)]


def test_models_without_a_decoding_get_the_pipelines(make_checkpoint):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(make_checkpoint("bert"))))
    try:
        app = build_app(engine, ServerSettings(served_model_names=["plain"]))
        with TestClient(app) as client:
            assert client.get("/v1/ner/decoding").json() == {
                "model": "plain", "aggregation_strategy": "simple", "bio": None,
                "threshold": None}
    finally:
        engine.shutdown()
