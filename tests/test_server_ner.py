"""In-process tests of `/v1/ner` and `/v1/redact`: every input form and option against the
offline `LLM.ner`, the response contract, the error contract, and batching across requests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tagserve import LLM
from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.factory import EngineArgs
from tagserve.engine.request import Request
from tagserve.postprocess.ner import jsonable
from tagserve.postprocess.redact import redact
from tagserve.server.app import build_app
from tagserve.server.ner_protocol import NerResponse, RedactResponse
from tagserve.server.settings import ServerSettings

from json_close import assert_json_close
from server_util import assert_error, error_of, make_client

TEXTS = ["Alice moved to Paris in 1999.", "Did Bob pay €20 for the café in Zürich?!", "Paris"]
WORDS = [["Alice", "moved", "to", "Paris"], ["Bob", "met", "Zoë", "in", "Zürich", "."]]
LONG_TEXT = "Alice moved to Paris and met Bob in Zürich. " * 30  # ~330 tokens, window 128


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> str:
    return str(make_checkpoint("bert"))


@pytest.fixture(scope="module")
def engine(ckpt):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=ckpt))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt)


@pytest.fixture(scope="module")
def client(engine):
    with make_client(engine) as client:
        yield client


def post(client: TestClient, route: str, **body: Any) -> Any:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def offline(llm: LLM, inputs: Any, **options: Any) -> Any:
    return jsonable(llm.ner(inputs, use_tqdm=False, **options))


def entities_of(body: dict) -> list[Any]:
    """`data` as `LLM.ner` returns a list of inputs: entities, or entities and tokens."""
    return [{"entities": d["entities"], "tokens": d["tokens"]} if "tokens" in d
            else d["entities"] for d in body["data"]]


def token_count(llm: LLM, texts: list[str]) -> int:
    return sum(len(llm.get_tokenizer().encode(t)) for t in texts)


# --------------------------------------------------------------------------- /v1/ner


def test_ner_input_forms_match_offline(client, llm):
    body = post(client, "/v1/ner", model="bert", input=TEXTS[0])
    assert_json_close(entities_of(body), [offline(llm, TEXTS[0])])
    tokens = token_count(llm, TEXTS[:1])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    body = post(client, "/v1/ner", input=TEXTS)
    assert_json_close(entities_of(body), offline(llm, TEXTS))
    assert body["usage"]["prompt_tokens"] == token_count(llm, TEXTS)
    body = post(client, "/v1/ner", input=WORDS)
    assert_json_close(entities_of(body), offline(llm, WORDS, is_split_into_words=True))
    dashed = post(client, "/v1/ner", input=WORDS, delimiter="-")
    assert_json_close(entities_of(dashed),
                      offline(llm, WORDS, is_split_into_words=True, delimiter="-"))
    assert_json_close(entities_of(post(client, "/v1/ner", input=[""])), [[]])


def test_ner_response_contract(client):
    response = client.post("/v1/ner", json={"input": TEXTS[:2]})
    body = response.json()
    NerResponse.model_validate(body)
    assert response.headers["content-type"] == "application/json"
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert body["id"].startswith("ner-") and len(body["id"]) == 4 + 32
    assert (body["object"], body["model"]) == ("list", "bert") and isinstance(body["created"], int)
    assert [list(d) for d in body["data"]] == [["index", "object", "entities"]] * 2
    assert [(d["index"], d["object"]) for d in body["data"]] == [(0, "entities"), (1, "entities")]
    entity = body["data"][0]["entities"][0]
    assert list(entity) == ["entity_group", "score", "word", "start", "end"]
    assert isinstance(entity["score"], float)
    assert post(client, "/v1/ner", input="x", request_id="abc")["id"] == "ner-abc"
    response = client.post("/v1/ner", json={"input": "x", "request_id": "abc"},
                           headers={"X-Request-Id": "from-header"})
    assert response.json()["id"] == "ner-from-header"
    tokens = post(client, "/v1/ner", input=TEXTS[0], return_tokens=True)["data"][0]
    assert list(tokens) == ["index", "object", "entities", "tokens"]
    assert list(tokens["tokens"][0]) == ["index", "token", "start", "end", "label", "score"]
    token = post(client, "/v1/ner", input=TEXTS[0], aggregation_strategy="none")
    assert list(token["data"][0]["entities"][0]) == ["entity", "score", "index", "word", "start",
                                                     "end"]


@pytest.mark.parametrize("options", [
    {"aggregation_strategy": "none"}, {"aggregation_strategy": "first"},
    {"aggregation_strategy": "average"}, {"aggregation_strategy": "max"},
    {"ignore_labels": []}, {"ignore_labels": ["O", "B-PER", "I-PER"]},
    {"threshold": 0.5, "labels": ["PER"]}, {"bio": "repair", "aggregation_strategy": "none"},
    {"bio": "viterbi", "return_tokens": True},
    {"aggregation_strategy": "none", "return_tokens": True},
])
def test_ner_options_match_offline(client, llm, options):
    body = post(client, "/v1/ner", input=TEXTS, **options)
    assert_json_close(entities_of(body), offline(llm, TEXTS, **options))


@pytest.mark.parametrize("options", [
    {}, {"stride": 16}, {"stride": 32, "aggregation_strategy": "first"},
    {"stride": 16, "window_merge": "probabilities", "return_tokens": True},
    {"stride": 0, "aggregation_strategy": "none", "window_merge": "probabilities"},
])
def test_ner_long_texts_match_offline(client, llm, options):
    body = post(client, "/v1/ner", input=[LONG_TEXT, TEXTS[0]], **options)
    assert_json_close(entities_of(body), offline(llm, [LONG_TEXT, TEXTS[0]], **options))
    if options:  # every window counted
        assert body["usage"]["prompt_tokens"] > token_count(llm, [LONG_TEXT, TEXTS[0]])


@pytest.mark.parametrize(("body", "status", "err_type", "param", "message"), [
    ({"input": "x", "model": "nope"}, 404, "NotFoundError", None,
     "The model `nope` does not exist."),
    ({"input": []}, 400, "BadRequestError", "input", "You must pass at least one input"),
    ({"input": "x", "aggregation_strategy": "best"}, 400, "Bad Request",
     "body.aggregation_strategy", "literal_error"),
    ({"input": "x", "window_merge": "tokens"}, 400, "Bad Request", "body.window_merge",
     "literal_error"),
    ({"input": "x", "bio": "strict"}, 400, "Bad Request", "body.bio", "literal_error"),
    ({"input": 5}, 400, "Bad Request", "body.input", "validation error"),
    ({"input": {"text": "x"}}, 400, "Bad Request", "body.input", "validation error"),
    ({"input": [["a"], "b"]}, 400, "Bad Request", "body.input", "validation error"),
    ({"input": [1, 2]}, 400, "Bad Request", "body.input", "validation error"),
    ({"input": "x", "threshold": 1.5}, 400, "Bad Request", "body.threshold", "less_than_equal"),
    ({"input": "x", "threshold": "high"}, 400, "Bad Request", "body.threshold", "float_parsing"),
    ({"input": "x", "stride": -1}, 400, "Bad Request", "body.stride", "greater_than_equal"),
    ({"input": "x", "stride": 1.5}, 400, "Bad Request", "body.stride", "int_from_float"),
    ({"input": "x", "stride": 128}, 400, "BadRequestError", "stride",
     "`stride` must be less than `tokenizer.model_max_length`"),
    ({"input": "x", "stride": 4, "aggregation_strategy": "none"}, 400, "BadRequestError",
     "stride", 'aggregation_strategy="none"'),
    ({"input": "x", "labels": "PER"}, 400, "Bad Request", "body.labels", "list_type"),
    ({"input": "x", "return_tokens": "maybe"}, 400, "Bad Request", "body.return_tokens",
     "bool_parsing"),
    ({"model": "bert"}, 400, "Bad Request", "body.input", "'type': 'missing'"),
])
def test_ner_error_paths(client, body, status, err_type, param, message):
    assert_error(client.post("/v1/ner", json=body), status, err_type, param, message)


def test_bad_input_is_never_a_500(client):
    bodies = [[1, 2], "x", 5, None, {"input": True}, {"input": [[[1]]]}, {"input": [None]},
              {"input": "x", "model": 5}, {"input": "x", "stride": 2**70},
              {"input": "x", "threshold": float("nan")}, {"input": "x", "delimiter": None},
              {"input": "x", "ignore_labels": [1]}, {"input": "\ud800"}, {"input": [["\ud800"]]},
              {"input": "x", "mode": "mask", "mask_char": ""}, {"input": "x", "hash_salt": 5}]
    for route in ("/v1/ner", "/v1/redact"):
        for body in bodies:
            response = client.post(route, content=json.dumps(body),
                                   headers={"content-type": "application/json"})
            assert response.status_code < 500, (route, body, response.text)
            if response.status_code != 200:
                error_of(response)
    response = client.post("/v1/ner", content="x", headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "application/json" in error_of(response)["message"]


def test_limits_are_413(engine):
    with make_client(engine, max_request_body_bytes=2000, max_inputs_per_request=2) as small:
        for route in ("/v1/ner", "/v1/redact"):
            response = small.post(route, json={"input": ["a", "b", "c"]})
            assert response.status_code == 413
            assert "--max-inputs-per-request" in error_of(response)["message"]
            response = small.post(route, json={"input": "x" * 3000})
            assert response.status_code == 413
            assert error_of(response)["type"] == "RequestTooLargeError"
            assert small.post(route, json={"input": ["a", "b"]}).status_code == 200


def test_metrics_count_entities_and_tokens(client):
    post(client, "/v1/ner", input=TEXTS)
    post(client, "/v1/redact", input=TEXTS)
    text = client.get("/metrics").text
    for needle in ('tagserve_http_requests_total{method="POST",route="/v1/ner",status="200"}',
                   'tagserve_entities_total{route="/v1/ner"}',
                   'tagserve_entities_total{route="/v1/redact"}', "tagserve_prompt_tokens_total"):
        assert needle in text, needle


# --------------------------------------------------------------------------- /v1/redact


def spans(llm: LLM, texts: list[str], **options: Any) -> list[list[dict]]:
    """What /v1/redact redacts: whole texts, windows merged by probabilities."""
    return offline(llm, texts, window_merge="probabilities", stride=32, **options)


def reconstructs(original: str, redacted: str, entities: list[dict]) -> bool:
    """`redacted` is `original` with each span replaced by its `replacement`."""
    out, cursor = [], 0
    for e in entities:
        out += [original[cursor:e["start"]], e["replacement"]]
        cursor = e["end"]
    return "".join(out + [original[cursor:]]) == redacted


def test_redact_replace_is_the_default(client, llm):
    body = post(client, "/v1/redact", model="bert", input=TEXTS)
    RedactResponse.model_validate(body)
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert body["id"].startswith("redact-") and body["usage"]["prompt_tokens"] == \
        token_count(llm, TEXTS)
    for text, data, expected in zip(TEXTS, body["data"], spans(llm, TEXTS), strict=True):
        assert list(data) == ["index", "object", "text", "entities"]
        assert data["object"] == "redaction"
        assert_json_close([{k: v for k, v in e.items() if k != "replacement"}
                           for e in data["entities"]], expected)
        assert all(e["replacement"] == f"[{e['entity_group']}]" for e in data["entities"])
        assert list(data["entities"][0]) == ["entity_group", "score", "word", "start", "end",
                                             "replacement"]
        assert reconstructs(text, data["text"], data["entities"])
    single = post(client, "/v1/redact", input=TEXTS[0])
    assert [d["text"] for d in single["data"]] == [body["data"][0]["text"]]


def test_redact_mask_and_hash(client):
    masked = post(client, "/v1/redact", input=TEXTS[1], mode="mask", mask_char="█")["data"][0]
    assert len(masked["text"]) == len(TEXTS[1]) and "█" in masked["text"]
    for e in masked["entities"]:
        assert e["replacement"] == "█" * (e["end"] - e["start"])
    for salt in ("", "pepper"):
        hashed = post(client, "/v1/redact", input=TEXTS[1], mode="hash",
                      **({"hash_salt": salt} if salt else {}))["data"][0]
        for e in hashed["entities"]:
            digest = hashlib.sha256((salt + TEXTS[1][e["start"]:e["end"]]).encode()).hexdigest()
            assert e["replacement"] == f"<{e['entity_group']}:{digest[:10]}>"
        assert reconstructs(TEXTS[1], hashed["text"], hashed["entities"])


def test_redact_modes_by_label_labels_and_threshold(client, llm):
    data = post(client, "/v1/redact", input=TEXTS, mode="hash",
                modes_by_label={"PER": "mask", "LOC": "replace"})["data"]
    for d in data:
        for e in d["entities"]:
            assert e["replacement"] == {"PER": "*" * (e["end"] - e["start"]),
                                        "LOC": f"[{e['entity_group']}]"}[e["entity_group"]]
    for options in ({"labels": ["PER"]}, {"threshold": 0.5}, {"aggregation_strategy": "max"}):
        data = post(client, "/v1/redact", input=TEXTS, **options)["data"]
        expected = spans(llm, TEXTS, **options)
        assert [[e["start"] for e in d["entities"]] for d in data] == \
            [[e["start"] for e in x] for x in expected]


def test_redact_covers_long_texts_whole(client, llm):
    data = post(client, "/v1/redact", input=LONG_TEXT)["data"][0]
    assert data["entities"][-1]["end"] > len(LONG_TEXT) - 50  # far past the first window
    expected = spans(llm, [LONG_TEXT])[0]
    assert [e["start"] for e in data["entities"]] == [e["start"] for e in expected]
    assert reconstructs(LONG_TEXT, data["text"], data["entities"])


def test_redact_error_paths(client):
    for body, param in [({"input": "x", "mode": "erase"}, "body.mode"),
                        ({"input": "x", "modes_by_label": {"PER": "x"}}, "body.modes_by_label"),
                        ({"input": "x", "mask_char": "**"}, "body.mask_char"),
                        ({"input": "x", "aggregation_strategy": "none"},
                         "body.aggregation_strategy"),
                        ({"input": [["a"]]}, "body.input")]:
        response = client.post("/v1/redact", json=body)
        assert response.status_code == 400 and error_of(response)["param"] == param, body
    response = client.post("/v1/redact", json={"input": "x", "model": "nope"})
    assert response.status_code == 404 and error_of(response)["type"] == "NotFoundError"


def test_redact_function_overlaps_and_unicode():
    text = "Zoë Müller lives in Zürich"
    entities = [{"entity_group": "LOC", "score": 0.9, "word": "Zürich", "start": 20, "end": 26},
                {"entity_group": "PER", "score": 0.8, "word": "Zoë Müller", "start": 0, "end": 10},
                {"entity_group": "PER", "score": 0.7, "word": "Müller", "start": 4, "end": 10},
                {"entity_group": "LOC", "score": 0.6, "word": "ller li", "start": 6, "end": 13}]
    out, redacted = redact(text, entities, "mask", {"LOC": "replace"}, mask_char="#")
    assert out == "##########[LOC]ves in [LOC]"
    assert [(e["start"], e["end"], e["replacement"]) for e in redacted] == [
        (0, 10, "#" * 10), (10, 13, "[LOC]"), (20, 26, "[LOC]")]
    assert redact(text, [], "hash") == (text, [])


# --------------------------------------------------------------------------- concurrency


class Gate:
    """Holds the first forward pass until `open` is set; records every batch's size."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        launch = engine.engine.runner.launch

        def gated_launch(requests: list[Request]) -> Any:
            self.batches.append(len(requests))
            self.entered.set()
            assert self.open.wait(30)
            return launch(requests)

        engine.engine.runner.launch = gated_launch


def test_concurrent_requests_share_batches_and_match_offline(ckpt, llm):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=ckpt))
    gate = Gate(engine)
    cases = [("/v1/ner", {"input": TEXTS}), ("/v1/ner", {"input": WORDS}),
             ("/v1/ner", {"input": [LONG_TEXT], "stride": 16}),
             ("/v1/ner", {"input": TEXTS[1], "aggregation_strategy": "first"}),
             ("/v1/ner", {"input": TEXTS, "aggregation_strategy": "none", "return_tokens": True}),
             ("/v1/redact", {"input": TEXTS, "mode": "mask"})]
    long_windows = len(llm.get_tokenizer().encode_windows([LONG_TEXT], 128, 16)[0])
    windows = len(TEXTS) * 3 + len(WORDS) + long_windows + 1

    async def scenario() -> list[httpx.Response]:
        app = build_app(engine, ServerSettings(served_model_names=["bert"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/ner", json={"input": "Paris"}))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            rest = [asyncio.create_task(client.post(route, json=body)) for route, body in cases]
            while engine.num_waiting < windows:  # everything queued behind the held pass
                await asyncio.sleep(0.005)
            gate.open.set()
            return [await first, *[await task for task in rest]]

    try:
        responses = asyncio.run(scenario())
    finally:
        gate.open.set()
        engine.shutdown()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    bodies = [r.json() for r in responses[1:]]
    assert_json_close(entities_of(bodies[0]), offline(llm, TEXTS))
    assert_json_close(entities_of(bodies[1]), offline(llm, WORDS, is_split_into_words=True))
    assert_json_close(entities_of(bodies[2]), offline(llm, [LONG_TEXT], stride=16))
    assert_json_close(entities_of(bodies[3]),
                      [offline(llm, TEXTS[1], aggregation_strategy="first")])
    assert_json_close(entities_of(bodies[4]),
                      offline(llm, TEXTS, aggregation_strategy="none", return_tokens=True))
    assert_json_close([d["entities"] for d in bodies[5]["data"]],
                      [redact(t, e, "mask")[1] for t, e in zip(TEXTS, spans(llm, TEXTS),
                                                               strict=True)])
    # The held pass, then one pass for all six requests' windows.
    assert gate.batches[0] == 1 and len(gate.batches) == 2
