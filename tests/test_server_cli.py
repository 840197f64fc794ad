"""`tagserve serve` flags: vLLM's names, mapped 1:1 onto EngineArgs and ServerSettings."""

from __future__ import annotations

import pytest
import uvicorn

from tagserve.cli import build_parser, engine_args, main, server_settings

FLAGS = ("--host", "--port", "--served-model-name", "--runner", "--convert", "--pooler-config",
         "--pooler-config.task", "--hf-overrides", "--dtype", "--max-model-len", "--max-num-seqs",
         "--max-num-batched-tokens", "--api-key", "--device", "--tokenizer",
         "--trust-remote-code", "--log-level", "--max-waiting-requests",
         "--max-request-body-bytes", "--max-inputs-per-request", "--disable-uvicorn-access-log",
         "--precise-residuals")


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag


def test_flags_map_onto_engine_args():
    args = parse("models/bert", "--runner", "pooling", "--convert", "classify",
                 "--pooler-config", '{"task": "classify", "use_activation": true}',
                 "--pooler-config.task", "token_classify", "--pooler-config.use_activation",
                 "false", "--hf-overrides", '{"num_labels": 3}', "--dtype", "bfloat16",
                 "--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens",
                 "1024", "--max-waiting-requests", "10", "--device", "cpu", "--tokenizer",
                 "tok", "--trust-remote-code", "--seed", "3", "--no-precise-residuals")
    engine = engine_args(args)
    assert engine.model == "models/bert" and engine.tokenizer == "tok"
    assert (engine.runner, engine.convert, engine.dtype) == ("pooling", "classify", "bfloat16")
    assert engine.pooler_config == {"task": "token_classify", "use_activation": False}
    assert engine.hf_overrides == {"num_labels": 3}
    assert (engine.max_model_len, engine.max_num_seqs, engine.max_num_batched_tokens,
            engine.max_waiting_requests) == (64, 8, 1024, 10)
    assert engine.trust_remote_code and engine.device == "cpu" and engine.seed == 3
    assert not engine.precise_residuals and engine_args(parse("m")).precise_residuals
    assert engine_args(parse("m")).pooler_config is None


def test_server_settings_and_api_key_sources(monkeypatch):
    monkeypatch.delenv("TAGSERVE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    settings = server_settings(parse("models/bert"))
    assert settings.served_model_names == ["models/bert"] and settings.api_keys == []
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert server_settings(parse("m")).api_keys == ["from-vllm"]
    monkeypatch.setenv("TAGSERVE_API_KEY", "from-tagserve")
    assert server_settings(parse("m")).api_keys == ["from-tagserve"]
    settings = server_settings(parse("m", "--api-key", "a", "--api-key", "b",
                                     "--served-model-name", "x", "y",
                                     "--max-request-body-bytes", "100",
                                     "--max-inputs-per-request", "4"))
    assert settings.api_keys == ["a", "b"] and settings.served_model_names == ["x", "y"]
    assert (settings.max_request_body_bytes, settings.max_inputs_per_request) == (100, 4)


@pytest.mark.parametrize("argv", [["--hf-overrides", "{bad"], ["--pooler-config", "[1]"],
                                  ["--dtype", "float64"], ["--runner", "generate"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("m", *argv)
    assert exit_info.value.code == 2


def test_unloadable_model_exits_with_a_message(tmp_path, caplog):
    assert main(["serve", str(tmp_path)]) == 1
    assert "has no config.json" in caplog.text


@pytest.mark.parametrize(("argv", "access_log"), [([], True),
                                                  (["--disable-uvicorn-access-log"], False)])
def test_uvicorn_access_log_flag(make_checkpoint, monkeypatch, argv, access_log):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    assert main(["serve", str(make_checkpoint("bert")), "--port", "1", *argv]) == 0
    assert calls[0]["access_log"] is access_log and calls[0]["port"] == 1
