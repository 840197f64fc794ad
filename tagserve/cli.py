"""The `tagserve` command: `tagserve serve [MODEL] [flags]`, `tagserve ner [MODEL] TEXT`.

Flags use vLLM's names and map 1:1 onto `EngineArgs` (engine) and `ServerSettings` (front
door). A subcommand is an entry of `SUBCOMMANDS`: a function adding its flags and one running it.
MODEL defaults to the model bundled with tagserve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagserve import __version__
from tagserve.config import DTYPES, PoolerConfig
from tagserve.engine.factory import EngineArgs
from tagserve.errors import ModelLoadError, ValidationError
from tagserve.postprocess.entities import STRATEGIES
from tagserve.server.settings import (
    DEFAULT_MAX_INPUTS_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    ServerSettings,
)

if TYPE_CHECKING:
    from tagserve.config import HFConfig
    from tagserve.postprocess.ner import NerOptions

logger = logging.getLogger("tagserve")

API_KEY_ENV_VARS = ("TAGSERVE_API_KEY", "VLLM_API_KEY")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def bundled_model() -> Path:
    """The model used when MODEL is omitted."""
    try:
        from tagserve.bundled import DEFAULT_MODEL
    except ImportError as exc:
        raise ModelLoadError("No MODEL given and this tagserve has no bundled model; pass "
                             "MODEL.") from exc
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ModelLoadError(f"No MODEL given and the bundled model is not installed "
                             f"({DEFAULT_MODEL} has no config.json); pass MODEL.")
    return DEFAULT_MODEL


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a decimal integer of at least `minimum` ("a {what} integer")."""

    def parse(text: str) -> int:
        if not text.strip().lstrip("+").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text}")
        return int(text)

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _json_or_text(text: str) -> Any:
    """`--pooler-config.use_activation false` -> False, `--pooler-config.task embed` -> 'embed'."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ----------------------------------------------------------------------------- serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="Checkpoint folder or Hugging Face hub id (default: the bundled "
                             "model, served as its folder name).")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="Address to bind (default: %(default)s).")
    server.add_argument("--port", type=int, default=8000, help="Port (default: %(default)s).")
    server.add_argument("--served-model-name", nargs="+", metavar="NAME",
                        help="Name(s) clients use in `model`; the first is used in responses. "
                             "Default: MODEL as given.")
    server.add_argument("--api-key", action="append", metavar="KEY",
                        help="Require `Authorization: Bearer KEY` on every route except /health, "
                             "/ping and /metrics (vLLM guards only /v1/...). Repeat for several "
                             f"keys. Default: ${API_KEY_ENV_VARS[0]} or ${API_KEY_ENV_VARS[1]}.")
    server.add_argument("--max-request-body-bytes", type=int,
                        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                        help="Larger request bodies get 413 (default: %(default)s).")
    server.add_argument("--max-inputs-per-request", type=int,
                        default=DEFAULT_MAX_INPUTS_PER_REQUEST,
                        help="Requests with more inputs get 413 (default: %(default)s).")
    server.add_argument("--log-level", "--uvicorn-log-level", dest="log_level", default="info",
                        choices=LOG_LEVELS, help="Log level (default: %(default)s).")
    server.add_argument("--api-server-count", type=_positive_int, default=1, metavar="N",
                        help="API processes (HTTP, tokenization, response bodies) in front of "
                             "one engine process; 1 (default) serves from this process alone. "
                             "More pays when one process cannot feed the model (GPU).")
    server.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="No log line per HTTP request (it costs the event loop about "
                             "0.1 ms a request).")

    model = parser.add_argument_group("model")
    model.add_argument("--tokenizer", help="Tokenizer folder or hub id (default: MODEL).")
    model.add_argument("--revision", help="Hub revision of MODEL.")
    model.add_argument("--runner", default="auto", choices=("auto", "pooling"),
                       help="Only pooling models are served (default: %(default)s).")
    model.add_argument("--convert", default="auto", choices=("auto", "none", "classify", "embed"),
                       help="`classify` runs *ForCausalLM / *Model checkpoints with their "
                            "`score`/`classifier` head (default: %(default)s).")
    model.add_argument("--pooler-config", type=_json_object, metavar="JSON",
                       help='Pooler options as JSON, e.g. \'{"task": "token_classify"}\'.')
    for field in fields(PoolerConfig):
        model.add_argument(f"--pooler-config.{field.name}", dest=f"pooler_config.{field.name}",
                           type=_json_or_text, metavar="VALUE",
                           help=f"Sets PoolerConfig.{field.name} (wins over --pooler-config).")
    model.add_argument("--hf-overrides", type=_json_object, metavar="JSON",
                       help="JSON object written over the checkpoint's config.json.")
    model.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="Weights and activations; auto = float32 on CPU, the checkpoint's "
                            "dtype on GPU (float32 checkpoints in bfloat16).")
    model.add_argument("--max-model-len", type=int,
                       help="Longest prompt in tokens (default: from the model and tokenizer).")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="Allow checkpoints whose architecture is defined by remote code.")
    model.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "pt"),
                       help="`pt` allows pickle checkpoints, read with weights_only=True.")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    model.add_argument("--seed", type=int, default=0, help="Random seed (default: %(default)s).")
    model.add_argument("--precise-residuals", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="bf16 BERT-style encoders keep the residual stream more precise "
                            "than bf16 (CUDA: rounding remainders, CPU: float32): closer to "
                            "float32 (argmax W1 99.88%% -> 99.93%%, W4a 99.86%% -> 99.95%%) "
                            "for 1-4%% of throughput (default: on).")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=256,
                        help="Sequences per forward pass (default: %(default)s).")
    engine.add_argument("--max-num-batched-tokens", type=int,
                        help="Tokens per forward pass (default: 16384 on GPU, 8192 on CPU; never "
                             "below max-model-len).")
    engine.add_argument("--max-waiting-requests", type=int,
                        default=EngineArgs.max_waiting_requests,
                        help="Queued sequences beyond this get 503 (default: %(default)s).")


def engine_args(args: argparse.Namespace) -> EngineArgs:
    pooler = dict(args.pooler_config or {})
    for field in fields(PoolerConfig):
        value = getattr(args, f"pooler_config.{field.name}")
        if value is not None:
            pooler[field.name] = value
    return EngineArgs(
        model=args.model or str(bundled_model()), tokenizer=args.tokenizer,
        runner=args.runner, convert=args.convert, dtype=args.dtype,
        max_model_len=args.max_model_len, pooler_config=pooler or None,
        hf_overrides=args.hf_overrides, trust_remote_code=args.trust_remote_code,
        seed=args.seed, device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting_requests=args.max_waiting_requests, revision=args.revision,
        load_format=args.load_format, precise_residuals=args.precise_residuals)


def server_settings(args: argparse.Namespace) -> ServerSettings:
    keys = args.api_key or [os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)][:1]
    names = args.served_model_name or [args.model or bundled_model().name]
    return ServerSettings(served_model_names=names, api_keys=keys,
                          max_request_body_bytes=args.max_request_body_bytes,
                          max_inputs_per_request=args.max_inputs_per_request)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # the server extras are needed only here

    from tagserve.engine.async_engine import AsyncEngine
    from tagserve.server.app import build_app
    from tagserve.server.process_setup import freeze_heap

    logging.basicConfig(level=logging.DEBUG if args.log_level == "trace"
                        else args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = server_settings(args)
        if args.api_server_count > 1:
            from tagserve.server.multiproc import serve_multiprocess

            return serve_multiprocess(
                engine_args(args), settings, host=args.host, port=args.port,
                api_server_count=args.api_server_count, log_level=args.log_level,
                access_log=not args.disable_uvicorn_access_log)
        engine = AsyncEngine.from_engine_args(engine_args(args))
    except (ValidationError, ModelLoadError) as exc:
        logger.error("Cannot serve %s: %s", args.model or "the bundled model", exc)
        return 1
    try:
        app = build_app(engine, settings)
        freeze_heap()
        logger.info("Serving %s as %s on http://%s:%d (API key %s)", engine.model_config.model,
                    settings.served_model_names, args.host, args.port,
                    "required" if settings.api_keys else "not required")
        # uvicorn picks httptools and uvloop when they are installed (the serve extra has them).
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    access_log=not args.disable_uvicorn_access_log)
    finally:
        engine.shutdown()
    return 0


# ----------------------------------------------------------------------------- ner


def add_ner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="Checkpoint folder or hub id (default: the bundled model). With a "
                             "single positional argument and no --input, that argument is TEXT.")
    parser.add_argument("text", nargs="?", metavar="TEXT", help="One text to tag.")
    corpus = parser.add_argument_group("corpus")
    corpus.add_argument("--input", type=Path, metavar="IN.jsonl",
                        help='Tag a corpus: one {"id": ..., "text": ...} per line (id defaults '
                             "to the line number).")
    corpus.add_argument("--output", type=Path, metavar="OUT.jsonl",
                        help='With --input: {"id": ..., "entities": [...]} per line, appended; '
                             "ids already there are skipped (resume).")
    corpus.add_argument("--batch-size", type=_positive_int, default=256,
                        help="Texts per engine call (default: %(default)s).")
    corpus.add_argument("--workers", type=_non_negative_int, default=0, metavar="N",
                        help="Build entities and output lines in N worker processes beside "
                             "the engine (default: 0, in this process); the output is the "
                             "same. Worth it when the model is fast (GPU).")
    ner = parser.add_argument_group("entities")
    ner.add_argument("--aggregation-strategy", choices=STRATEGIES,
                     help="As transformers' pipeline (default: the model's recommended "
                          "decoding, config.json's \"tagserve_ner_decoding\" (the bundled "
                          "model: first), else simple).")
    ner.add_argument("--bio", choices=("none", "repair", "viterbi"),
                     help="BIO decoding of the token labels: none (argmax), repair (an I- "
                          "that opens an entity becomes B-) or viterbi (the best valid label "
                          "sequence); default: the model's recommended decoding (the bundled "
                          "model: viterbi), else none.")
    ner.add_argument("--threshold", type=float,
                     help="Drop entities scoring below it (default: the model's recommended "
                          "decoding's, else none; 0 keeps all).")
    ner.add_argument("--labels", nargs="+", metavar="LABEL", help="Keep only these labels.")
    ner.add_argument("--stride", type=int,
                     help="Tag long texts whole, in windows overlapping by this many tokens "
                          "(default: truncate them to one window).")
    model = parser.add_argument_group("model")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    model.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="Weights and activations (default: %(default)s).")


def entity_table(text: str, entities: list[dict[str, Any]]) -> str:
    """Entities as aligned columns: label, score, character span and the text there."""
    if not entities:
        return "(no entities)"
    rows = [("label", "score", "span", "text")] + [
        (e.get("entity_group", e.get("entity")), f"{e['score']:.3f}", f"{e['start']}-{e['end']}",
         " ".join(text[e["start"]:e["end"]].split())) for e in entities]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}"
                     for a, b, c, d in rows)


def ner_options(args: argparse.Namespace, hf_config: HFConfig) -> NerOptions:
    """`tagserve ner`'s options: the flags given, the model's recommended decoding
    (`recommended_decoding`) for the strategy, BIO decoding and threshold left out."""
    from tagserve.postprocess.ner import NerOptions, recommended_decoding

    decoding = recommended_decoding(hf_config)
    if args.aggregation_strategy is not None:
        decoding["aggregation_strategy"] = args.aggregation_strategy
    if args.bio is not None:
        decoding["bio"] = None if args.bio == "none" else args.bio
    if args.threshold is not None:
        decoding["threshold"] = args.threshold
    return NerOptions.create(**decoding, labels=args.labels, stride=args.stride)


def run_ner_command(args: argparse.Namespace) -> int:
    from tagserve.corpus import tag_corpus
    from tagserve.engine.async_engine import AsyncEngine
    from tagserve.postprocess.ner import jsonable, ner_async
    from tagserve.postprocess.ner_pool import NerPool

    model, text = args.model, args.text
    if args.input is None and text is None:  # one positional argument: the text
        model, text = None, model
    if (args.input is None) == (text is None) or (args.input is None) != (args.output is None):
        print("tagserve ner: give either TEXT, or --input IN.jsonl and --output OUT.jsonl",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = AsyncEngine.from_engine_args(EngineArgs(
            model=model or str(bundled_model()), device=args.device, dtype=args.dtype))
    except (ValidationError, ModelLoadError) as exc:
        logger.error("Cannot load %s: %s", model or "the bundled model", exc)
        return 1
    try:
        options = ner_options(args, engine.model_config.hf_config)
        if text is not None:
            print(entity_table(text, jsonable(asyncio.run(ner_async(engine, text, options)))))
        else:
            with (NerPool.for_model(args.workers, engine.model_config, engine.tokenizer)
                  if args.workers else contextlib.nullcontext()) as pool:
                stats = asyncio.run(tag_corpus(engine, options, args.input, args.output,
                                               args.batch_size, pool))
            print(stats.summary())
    except ValidationError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        engine.shutdown()
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand("Serve a model with vLLM's Pooling API (POST /pooling).",
                        add_serve_arguments, run_serve),
    "ner": Subcommand("Print the entities of a text, or tag a JSONL corpus.",
                      add_ner_arguments, run_ner_command),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tagserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
