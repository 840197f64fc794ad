"""In-process tests of the HTTP API: every endpoint, input form, encoding and error path, and
vLLM's golden responses (keys, types, status codes, error type/param)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tagserve import LLM, PoolingParams
from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.factory import EngineArgs
from tagserve.server.app import build_app
from tagserve.server.encoding import EMBED_DTYPES, float_json
from tagserve.server.routes.pooling import FastPoolingMiddleware
from tagserve.server.settings import ServerSettings

from server_util import assert_error, error_of, make_client

GOLDEN = Path(__file__).parents[2] / "shared" / "golden"
MAX_MODEL_LEN = 512
TEXTS = ["Alice moved to Paris in 1999.", "Did Bob pay €20 for the café in Zürich?!", "Paris"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def ckpt(make_checkpoint, tmp_path_factory) -> Path:
    """The tiny BERT checkpoint with vLLM's golden-file limit (max_model_len 512) and a chat
    template for the chat forms."""
    folder = tmp_path_factory.mktemp("server") / "bert"
    shutil.copytree(make_checkpoint("bert", max_position_embeddings=MAX_MODEL_LEN), folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_max_length": MAX_MODEL_LEN}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def engine(ckpt):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(ckpt)))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(str(ckpt))


@pytest.fixture(scope="module")
def client(engine):
    with make_client(engine) as client:
        yield client


def pool(client: TestClient, **body: Any) -> Any:
    response = client.post("/pooling", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def offline(llm: LLM, prompts: Any, **kwargs: Any) -> list[torch.Tensor]:
    outputs = llm.encode(prompts, pooling_task="token_classify", use_tqdm=False, **kwargs)
    return [o.outputs.data for o in outputs]


def assert_rows(items: list[dict], expected: list[torch.Tensor]) -> None:
    assert [item["index"] for item in items] == list(range(len(expected)))
    for item, reference in zip(items, expected, strict=True):
        torch.testing.assert_close(torch.tensor(item["data"]), reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- input forms


def test_input_forms_match_offline_encode(client, llm):
    ids = [llm.get_tokenizer().encode(t) for t in TEXTS]
    cases = [(TEXTS[0], [TEXTS[0]]), (TEXTS, TEXTS), (ids[1], [{"prompt_token_ids": ids[1]}]),
             (ids, [{"prompt_token_ids": i} for i in ids])]
    for request_input, prompts in cases:
        body = pool(client, model="bert", input=request_input)
        expected = offline(llm, prompts)
        assert_rows(body["data"], expected)
        tokens = sum(len(t) for t in expected)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens,
                                 "completion_tokens": 0, "prompt_tokens_details": None,
                                 "completion_tokens_details": None}


def test_response_envelope_and_request_ids(client):
    body = pool(client, input="Paris")
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert body["id"].startswith("pooling-") and body["object"] == "list"
    assert body["model"] == "bert" and isinstance(body["created"], int)
    assert body["data"][0]["object"] == "pooling"
    assert pool(client, input="Paris", request_id="abc")["id"] == "pooling-abc"
    response = client.post("/pooling", json={"input": "Paris", "request_id": "abc"},
                           headers={"X-Request-Id": "from-header"})
    assert response.json()["id"] == "pooling-from-header"


def test_options_match_offline_encode(client, llm):
    text = TEXTS[1]
    raw = pool(client, input=text, use_activation=False)["data"]
    assert_rows(raw, offline(llm, [text], pooling_params=PoolingParams(use_activation=False)))
    for kwargs in ({"truncate_prompt_tokens": 5}, {"truncate_prompt_tokens": 5,
                                                   "truncation_side": "left"},
                   {"truncate_prompt_tokens": -1}, {"add_special_tokens": False}):
        data = pool(client, input=text, **kwargs)["data"]
        assert_rows(data, offline(llm, [text], tokenization_kwargs=kwargs))
    assert len(pool(client, input=text, truncate_prompt_tokens=5)["data"][0]["data"]) == 5


def test_unknown_fields_are_ignored_and_task_defaults_to_served(client, llm):
    body = pool(client, input="Paris", task="token_classify", foo={"bar": 1}, user="me",
                priority=0, cache_salt="salt", mm_processor_kwargs=None)
    assert_rows(body["data"], offline(llm, ["Paris"]))


def test_invocations_equals_pooling(client):
    a = client.post("/invocations", json={"input": TEXTS}).json()
    b = pool(client, input=TEXTS)
    assert a["data"] == b["data"] and a["usage"] == b["usage"]


# --------------------------------------------------------------------------- chat form


def test_chat_form_renders_the_template(client, llm):
    messages = [{"role": "user", "content": "Alice moved to Paris."},
                {"role": "assistant", "content": "Nice"}]
    for flags in ({}, {"add_generation_prompt": True}, {"continue_final_message": True}):
        rendered = llm.get_tokenizer().apply_chat_template(messages, **flags)
        body = pool(client, messages=messages, **flags)
        assert_rows(body["data"], offline(llm, [rendered],
                                          tokenization_kwargs={"add_special_tokens": False}))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Alice moved to Paris."}]}]
    assert pool(client, messages=parts)["data"] == pool(client, messages=messages[:1])["data"]
    with_specials = pool(client, messages=messages[:1], add_special_tokens=True)
    assert with_specials["usage"]["prompt_tokens"] == \
        pool(client, messages=messages[:1])["usage"]["prompt_tokens"] + 2


@pytest.mark.parametrize(("body", "message"), [
    ({"add_generation_prompt": True, "continue_final_message": True}, "Cannot set both"),
    ({"chat_template": "{{ messages }}"}, "--trust-request-chat-template is not set"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "Only text content parts"),
])
def test_chat_form_errors(client, body, message):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    response = client.post("/pooling", json=body)
    assert response.status_code == 400
    assert message in error_of(response)["message"]


# --------------------------------------------------------------------------- encodings


def decode(raw: bytes, shape: list[int], embed_dtype: str, endianness: str) -> torch.Tensor:
    """Independent of the server's code path: numpy reads the bytes, torch reinterprets them."""
    dtype, view = EMBED_DTYPES[embed_dtype]
    np_view = torch.empty(0, dtype=view).numpy().dtype
    order = {"native": "=", "big": ">", "little": "<"}[endianness]
    array = np.frombuffer(raw, dtype=np_view.newbyteorder(order)).astype(np_view)
    return torch.from_numpy(array.copy()).view(dtype).reshape(shape).float()


@pytest.mark.parametrize("endianness", ["native", "big", "little"])
@pytest.mark.parametrize("embed_dtype", list(EMBED_DTYPES))
def test_binary_encodings_round_trip(client, embed_dtype, endianness):
    floats = [torch.tensor(item["data"]) for item in pool(client, input=TEXTS)["data"]]
    expected = [t.to(EMBED_DTYPES[embed_dtype][0]).float() for t in floats]
    options = {"embed_dtype": embed_dtype, "endianness": endianness}

    body = pool(client, input=TEXTS, encoding_format="base64", **options)
    for item, reference in zip(body["data"], expected, strict=True):
        decoded = decode(base64.b64decode(item["data"]), list(reference.shape), **options)
        torch.testing.assert_close(decoded, reference, atol=0, rtol=0)

    response = client.post("/pooling", json={"input": TEXTS, "encoding_format": "bytes",
                                             **options})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    metadata = json.loads(response.headers["metadata"])
    assert set(metadata) == {"id", "created", "model", "data", "usage"}
    assert metadata["usage"]["prompt_tokens"] == sum(len(t) for t in floats)
    for item, reference in zip(metadata["data"], expected, strict=True):
        assert item["embed_dtype"] == embed_dtype and item["endianness"] == endianness
        decoded = decode(response.content[item["start"]:item["end"]], item["shape"], **options)
        torch.testing.assert_close(decoded, reference, atol=0, rtol=0)

    only = client.post("/pooling", json={"input": TEXTS, "encoding_format": "bytes_only",
                                         **options})
    assert only.content == response.content and "metadata" not in only.headers


def test_float_json_is_exact_for_every_float32():
    bits = np.random.default_rng(0).integers(0, 2**32, size=(20_000, 7), dtype=np.uint64)
    values = bits.astype(np.uint32).view(np.float32)
    values = values[np.isfinite(values).all(axis=1)]
    values[0, :4] = [0.0, -0.0, 1e-45, 3.4028235e38]
    [text] = float_json([torch.from_numpy(values)])
    parsed = np.array(json.loads(text), dtype=np.float32)
    assert (parsed.view(np.uint32) == values.view(np.uint32)).all()


def test_float_json_shapes_and_fallbacks():
    tensors = [torch.rand(3, 4), torch.rand(0, 4), torch.rand(1, 4), torch.rand(4)]
    for tensor, text in zip(tensors, float_json(tensors), strict=True):
        assert torch.equal(torch.tensor(json.loads(text)).reshape(tensor.shape), tensor)
    mixed = [torch.rand(2, 3), torch.rand(2, 4)]  # different widths: plain json per output
    assert [json.loads(t) for t in float_json(mixed)] == [t.tolist() for t in mixed]
    assert json.loads(float_json([torch.tensor([[1.0, float("nan")]])])[0])[0][0] == 1.0


# --------------------------------------------------------------------------- errors

LONG_TEXT = "Alice moved to Paris. " * 150


ERROR_CASES = [
    ({"input": "x", "model": "nope"}, 404, "NotFoundError", None,
     "The model `nope` does not exist."),
    ({"input": []}, 400, "BadRequestError", None, "You must pass at least one prompt"),
    ({"input": "x", "task": "classify"}, 400, "BadRequestError", "task",
     "Unsupported task: 'classify' Supported tasks: ['token_classify']"),
    ({"input": "x", "task": "token_embed"}, 400, "BadRequestError", "task", "Unsupported task"),
    ({"input": "x", "task": "plugin"}, 400, "BadRequestError", "task",
     "No IOProcessor plugin installed."),
    ({"input": "x", "task": "score"}, 400, "BadRequestError", "task",
     "`score` task was removed; use `classify` instead."),
    ({"input": "x", "task": "encode"}, 400, "BadRequestError", "task",
     "`encode` task was removed"),
    ({"input": "x", "normalize": True}, 400, "BadRequestError", "normalize",
     "Parameter `normalize` was removed; use `use_activation` instead."),
    ({"input": "x", "task": "ner"}, 400, "Bad Request", "body.task", "'input': 'ner'"),
    ({"input": "x", "dimensions": 4}, 400, "BadRequestError", "dimensions",
     "dimensions is currently not supported"),
    ({"input": "x", "priority": 1}, 400, "BadRequestError", "priority", "Priority scheduling"),
    ({"input": "x", "cache_salt": ""}, 400, "BadRequestError", "cache_salt", "cache_salt"),
    ({"input": "x", "encoding_format": "npy"}, 400, "Bad Request", "body.encoding_format",
     "literal_error"),
    ({"input": "x", "embed_dtype": "float64"}, 400, "Bad Request", "body.embed_dtype",
     "'input': 'float64'"),
    ({"input": "x", "endianness": "middle"}, 400, "Bad Request", "body.endianness",
     "'input': 'middle'"),
    ({"input": "x", "truncation_side": "middle"}, 400, "Bad Request", "body.truncation_side",
     "literal_error"),
    ({"input": "x", "truncate_prompt_tokens": -2}, 400, "Bad Request",
     "body.truncate_prompt_tokens", "greater_than_equal"),
    ({"input": "x", "truncate_prompt_tokens": 10_000}, 400, "BadRequestError",
     "truncate_prompt_tokens", "truncate_prompt_tokens value is greater than max_model_len"),
    ({"input": [LONG_TEXT]}, 400, "BadRequestError", "input_tokens",
     "This model's maximum context length is 512 tokens. However, your prompt contains at "
     "least 513 input tokens"),
    ({"input": [5] * 600}, 400, "BadRequestError", "input_tokens",
     "your prompt contains 600 input tokens"),
    ({"input": "x" * 100_000}, 400, "BadRequestError", "input_text", "characters"),
    ({"input": [[5, 6], []]}, 400, "BadRequestError", None, "The decoder prompt cannot be empty"),
    ({"input": [5, 10**6]}, 400, "BadRequestError", "input", "Token id 1000000 is out of vocab"),
    ({"input": [[5, -1]]}, 400, "BadRequestError", "input", "Token id -1 is out of vocabulary"),
    ({"input": {"text": "x"}}, 400, "Bad Request", "body.input", "list_type"),
    ({"input": [[5, 6], "x"]}, 400, "Bad Request", "body.input.0", "validation error"),
    ({"input": None}, 400, "Bad Request", "body.input", "validation error"),
    ({"input": "x", "use_activation": "maybe"}, 400, "Bad Request", "body.use_activation",
     "bool_parsing"),
    ({"model": "bert"}, 400, "Bad Request", "body.input", "'type': 'missing'"),
]


@pytest.mark.parametrize(("body", "status", "err_type", "param", "message"), ERROR_CASES)
def test_error_paths(client, body, status, err_type, param, message):
    assert_error(client.post("/pooling", json=body), status, err_type, param, message)


def test_bad_input_is_never_a_500(client):
    bodies = [[1, 2], "x", 5, None, {"input": True}, {"input": [True, False]},
              {"input": [[[1]]]}, {"input": [1.5]}, {"input": "x", "model": 5},
              {"input": [2**70]}, {"messages": "hi"}, {"messages": [{"content": "no role"}]},
              {"messages": []}, {"input": "x", "truncate_prompt_tokens": 2**70},
              {"input": "x", "request_id": 5}, {"input": "\ud800"}]
    for body in bodies:
        response = client.post("/pooling", content=json.dumps(body),
                               headers={"content-type": "application/json"})
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:  # [True, False] is [1, 0] to pydantic, as in vLLM
            error_of(response)


def test_body_and_input_count_limits(engine):
    with make_client(engine, max_request_body_bytes=2000, max_inputs_per_request=3) as small:
        big = json.dumps({"input": "x" * 3000})
        for content in (big, iter([big[:1000].encode(), big[1000:].encode()])):  # sized, chunked
            response = small.post("/pooling", content=content,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert error_of(response)["type"] == "RequestTooLargeError"
        response = small.post("/pooling", json={"input": ["a", "b", "c", "d"]})
        assert response.status_code == 413 and "--max-inputs-per-request" in \
            error_of(response)["message"]
        assert small.post("/pooling", json={"input": ["a", "b", "c"]}).status_code == 200


def test_api_key_guards_every_route_but_health_ping_metrics(engine):
    with make_client(engine, api_keys=["sekret"]) as guarded:
        for method, path in [("post", "/pooling"), ("post", "/invocations"),
                             ("post", "/tokenize"), ("post", "/detokenize"),
                             ("get", "/v1/models"), ("get", "/version"), ("get", "/docs")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                response = guarded.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (path, headers)
                assert response.json() == {"error": "Unauthorized"}
        for path in ("/health", "/ping", "/metrics"):
            assert guarded.get(path).status_code == 200
        ok = guarded.post("/pooling", json={"input": "x"},
                          headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


# --------------------------------------------------------------------------- side endpoints


def test_tokenize_and_detokenize(client, llm):
    tokenizer = llm.get_tokenizer()
    text = TEXTS[1]
    body = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    ids = tokenizer.encode(text)
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    assert [text[a:b] for a, b in body["offsets"]][1] == text[slice(*body["offsets"][1])]
    assert len(pool(client, input=text)["data"][0]["data"]) == body["count"]
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == ids[1:-1] and plain["token_strs"] is None

    messages = [{"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)

    assert client.post("/detokenize", json={"tokens": ids}).json() == \
        {"prompt": tokenizer.decode(ids)}
    bad = client.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and error_of(bad)["param"] == "input"
    assert client.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
    wrong_type = client.post("/tokenize", content="{}", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 400


def test_health_version_models_docs(client, ckpt):
    for response in (client.get("/health"), client.get("/ping"), client.post("/ping")):
        assert response.status_code == 200 and response.content == b""
    assert client.get("/version").json()["version"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["bert"]
    assert models["data"][0]["root"] == str(ckpt)
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/pooling", "/invocations", "/tokenize", "/detokenize", "/v1/models"} <= set(paths)
    assert client.get("/no-such-route").status_code == 404


def test_metrics(client):
    pool(client, input=TEXTS)
    client.post("/pooling", json={"input": []})
    text = client.get("/metrics").text
    for needle in ('tagserve_http_requests_total{method="POST",route="/pooling",status="200"}',
                   'tagserve_http_requests_total{method="POST",route="/pooling",status="400"}',
                   "tagserve_http_request_duration_seconds_bucket", "tagserve_prompt_tokens_total",
                   "tagserve_queue_depth", "tagserve_batch_tokens_bucket",
                   "tagserve_batch_sequences_bucket"):
        assert needle in text, needle


# --------------------------------------------------------------------------- fast path

FAST_PATH_BODIES = [
    {"input": TEXTS}, {"input": "Paris"}, {"input": [5, 6, 7]}, {"input": [[5, 6, 7], [8, 9]]},
    {"input": TEXTS, "use_activation": False}, {"input": TEXTS, "truncate_prompt_tokens": 4},
    {"input": TEXTS, "truncate_prompt_tokens": 4, "truncation_side": "left"},
    {"input": TEXTS, "add_special_tokens": False}, {"input": TEXTS, "encoding_format": "base64"},
    {"input": TEXTS, "encoding_format": "bytes", "embed_dtype": "bfloat16",
     "endianness": "big"},
    {"input": TEXTS, "encoding_format": "bytes_only"}, {"input": TEXTS, "unknown_field": 1},
    {"messages": [{"role": "user", "content": "Alice moved to Paris."}]},
    *[case[0] for case in ERROR_CASES],
]


def _comparable(response: Any) -> tuple[int, str | None, bytes, str | None]:
    """Status, content type, body and metadata header, with the `created` time taken out."""
    def created(text: bytes) -> bytes:
        return re.sub(rb'"created": ?\d+', b'"created":0', text)
    metadata = response.headers.get("metadata")
    return (response.status_code, response.headers.get("content-type"),
            created(response.content), metadata and created(metadata.encode()).decode())


def test_fast_path_answers_exactly_as_the_route(engine):
    """Every body, valid or not, gets the same bytes with and without `FastPoolingMiddleware`
    (the route alone is the reference: it is what FastAPI would answer)."""
    route_app = build_app(engine, ServerSettings(served_model_names=["bert"]))
    route_app.user_middleware = [m for m in route_app.user_middleware
                                 if m.cls is not FastPoolingMiddleware]
    headers = {"content-type": "application/json", "x-request-id": "fixed"}
    with make_client(engine) as fast, TestClient(route_app) as route:
        for body in FAST_PATH_BODIES:
            content = json.dumps(body)
            answers = [_comparable(client.post(path, content=content, headers=headers))
                       for client in (fast, route) for path in ("/pooling", "/invocations")]
            assert answers[0] == answers[1] == answers[2] == answers[3], body
        for content, content_type in (('{"input": [', "application/json"),
                                      ('{"input": "x"}', "text/plain"), ("", "application/json")):
            answers = [_comparable(client.post("/pooling", content=content,
                                               headers={"content-type": content_type}))
                       for client in (fast, route)]
            assert answers[0] == answers[1] and answers[0][0] == 400, content


def test_fast_path_request_id_precedence(client):
    body = {"input": "x", "request_id": "from-body"}
    assert pool(client, **body)["id"] == "pooling-from-body"
    response = client.post("/pooling", json=body, headers={"X-Request-Id": "from-header"})
    assert response.json()["id"] == "pooling-from-header"


# --------------------------------------------------------------------------- other models


def test_converted_decoder_task_errors_and_classify(make_checkpoint):
    qwen3 = str(make_checkpoint("qwen3"))
    engine = AsyncEngine.from_engine_args(EngineArgs(model=qwen3))
    try:
        with make_client(engine) as client:
            response = client.post("/pooling", json={"input": "x", "task": "classify"})
            error = error_of(response)
            assert (response.status_code, error["param"]) == (400, "task")
            assert error["message"].startswith("Try switching the model's pooling_task via "
                                               "--pooler-config.task classify.")
            embed = error_of(client.post("/pooling", json={"input": "x", "task": "embed"}))
            assert embed["message"].startswith(
                "Unsupported task: 'embed' Supported tasks: ['token_classify', 'classify']")
    finally:
        engine.shutdown()
    engine = AsyncEngine.from_engine_args(EngineArgs(model=qwen3,
                                                     pooler_config={"task": "classify"}))
    try:
        with make_client(engine) as client:
            data = pool(client, input=TEXTS[:2])["data"]
            assert [len(item["data"]) for item in data] == [5, 5]  # one row of labels each
            assert isinstance(data[0]["data"][0], float)
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------- golden files


def _golden_cases() -> list[str]:
    if not GOLDEN.is_dir():
        return []
    return sorted(p.name.removesuffix(".meta.json") for p in GOLDEN.glob("bert__*.meta.json"))


def _same_shape(ours: Any, gold: Any, where: str = "body") -> None:
    """Same keys and JSON types; list lengths may differ (other tokenizer, other labels)."""
    if isinstance(gold, dict):
        assert isinstance(ours, dict) and set(ours) == set(gold), (where, ours, gold)
        for key in gold:
            _same_shape(ours[key], gold[key], f"{where}.{key}")
    elif isinstance(gold, list):
        assert isinstance(ours, list), where
        if gold and ours:
            _same_shape(ours[0], gold[0], f"{where}[0]")
    else:
        assert type(ours) is type(gold), (where, ours, gold)


@pytest.mark.skipif(not _golden_cases(), reason="golden files not found")
@pytest.mark.parametrize("case", _golden_cases())
def test_matches_vllm_golden(client, case):
    meta = json.loads((GOLDEN / f"{case}.meta.json").read_text())
    headers = {"content-type": meta["request_content_type"]} \
        if meta["request_content_type"] else {}
    response = client.request(meta["method"], meta["path"], headers=headers,
                              content=meta["request_body"])
    assert response.status_code == meta["status"], response.text
    gold_text = (GOLDEN / f"{case}.json").read_text()
    if not gold_text.strip():
        assert response.content == b""
        return
    gold, ours = json.loads(gold_text), response.json()
    _same_shape(ours, gold)
    if "error" in gold:
        for key in ("type", "param", "code"):
            assert ours["error"][key] == gold["error"][key], key
        message, gold_message = ours["error"]["message"], gold["error"]["message"]
        if gold["error"]["type"] == "Bad Request":  # schema errors: same pydantic error types
            for error_type in ("literal_error", "list_type", "json_invalid", "Unsupported"):
                assert (error_type in message) == (error_type in gold_message), error_type
        else:  # the same text up to numbers (token counts)
            assert re.sub(r"\d+", "N", message) == re.sub(r"\d+", "N", gold_message)
    if "usage" in gold:
        rows = [len(item["data"]) for item in ours["data"]]
        assert ours["usage"]["prompt_tokens"] == sum(rows)
        assert all(len(row) == 5 for item in ours["data"] for row in item["data"])
