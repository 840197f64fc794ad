"""`EngineArgs` (the flags of `LLM(...)` and `tagserve serve`) -> a ready `LLMEngine`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tagserve.config import (
    HFConfig,
    HFOverrides,
    ModelConfig,
    PoolerConfig,
    SchedulerConfig,
    TagserveConfig,
    apply_hf_overrides,
    resolve_device,
    resolve_dtype,
)
from tagserve.engine.cuda_graphs import CudaGraphs
from tagserve.engine.engine import LLMEngine
from tagserve.engine.runner import ModelRunner
from tagserve.engine.tokenizer import Tokenizer
from tagserve.errors import ModelLoadError, ValidationError
from tagserve.layers.attention import varlen_supported
from tagserve.models.bert import BertModel, max_positions
from tagserve.models.loader import build_model, resolve_model_path
from tagserve.models.registry import (
    ResolvedArchitecture,
    default_pooling_task,
    resolve_architecture,
)
from tagserve.pooling import Pooler

logger = logging.getLogger(__name__)

# Model/tokenizer limits beyond this are placeholders ("no limit"), not real lengths.
_NO_LIMIT = 10**8


@dataclass
class EngineArgs:
    model: str
    tokenizer: str | None = None
    runner: str = "auto"
    convert: str = "auto"
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    pooler_config: PoolerConfig | dict[str, Any] | None = None
    hf_overrides: HFOverrides = None
    trust_remote_code: bool = False
    seed: int = 0
    device: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_waiting_requests: int = 100_000
    revision: str | None = None
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    precise_residuals: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def derive_max_model_len(cfg: HFConfig, resolved: ResolvedArchitecture,
                         tokenizer: Tokenizer | None, requested: int | None) -> int:
    """The longest prompt the model takes; absolute-position encoders also honour the tokenizer."""
    derived = max_positions(cfg) if resolved.family.backbone is BertModel \
        else cfg.max_position_embeddings
    if not resolved.family.causal and tokenizer is not None \
            and tokenizer.model_max_length < _NO_LIMIT:
        derived = min(derived, tokenizer.model_max_length)
    if requested is None:
        return derived
    if requested > derived:
        raise ValidationError(
            f"User-specified max_model_len ({requested}) is greater than the derived "
            f"max_model_len ({derived}) from the model's config and tokenizer.",
            parameter="max_model_len")
    if requested < 1:
        raise ValidationError("max_model_len must be positive", parameter="max_model_len")
    return requested


def _served_task(resolved: ResolvedArchitecture, pooler: PoolerConfig, archs: list[str]) -> str:
    if pooler.task is None:
        return default_pooling_task(resolved, archs)
    if pooler.task not in resolved.supported_tasks:
        raise ValidationError(f"Unsupported task: {pooler.task} Supported tasks: "
                              f"{resolved.supported_tasks}")
    return pooler.task


def create_engine(args: EngineArgs) -> LLMEngine:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model_path = resolve_model_path(args.model, args.revision)
    config_file = model_path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{model_path} has no config.json; is it a transformers checkpoint?")
    hf_config = apply_hf_overrides(HFConfig.from_file(config_file), args.hf_overrides)
    resolved = resolve_architecture(hf_config, args.runner, args.convert, args.trust_remote_code)
    pooler = args.pooler_config
    if isinstance(pooler, dict):
        pooler = PoolerConfig.from_dict(pooler)
    pooler = pooler or PoolerConfig()
    if pooler.pooling_type is None:
        pooler.pooling_type = "ALL"
    if pooler.pooling_type not in ("ALL", "STEP"):
        raise ValidationError(f"pooling_type {pooler.pooling_type!r} is not a token pooling type;"
                              " tagserve supports 'ALL' and 'STEP'", parameter="pooling_type")
    tokenizer_path = resolve_model_path(args.tokenizer, args.revision) if args.tokenizer \
        else model_path
    tokenizer = None if args.skip_tokenizer_init else Tokenizer(tokenizer_path)
    device = resolve_device(args.device)
    model_config = ModelConfig(
        model=args.model, model_path=model_path, tokenizer_path=tokenizer_path,
        hf_config=hf_config, architecture=resolved.name, convert=args.convert,
        dtype=resolve_dtype(args.dtype, hf_config, device), device=device,
        max_model_len=derive_max_model_len(hf_config, resolved, tokenizer, args.max_model_len),
        supported_tasks=resolved.supported_tasks,
        pooling_task=_served_task(resolved, pooler, hf_config.get("architectures") or []),
        pooler_config=pooler, trust_remote_code=args.trust_remote_code,
        load_format=args.load_format,
        enforce_eager=args.enforce_eager, precise_residuals=args.precise_residuals)
    default_tokens = 16384 if device.type == "cuda" else 8192
    scheduler_config = SchedulerConfig(
        max_num_batched_tokens=max(args.max_num_batched_tokens or default_tokens,
                                   model_config.max_model_len),
        max_num_seqs=args.max_num_seqs, max_waiting_requests=args.max_waiting_requests)
    model = build_model(model_config, resolved.family)
    graphs = None
    if varlen_supported(device, model_config.dtype) and not args.enforce_eager:
        graphs = CudaGraphs(model, device, scheduler_config.max_num_batched_tokens,
                            scheduler_config.max_num_seqs, model_config.max_model_len)
        graphs.capture()
    runner = ModelRunner(model, Pooler(hf_config, pooler, model_config.pooling_task), device,
                         model_config.dtype, graphs)
    logger.info("Loaded %s (%s, %s on %s, task %s, max_model_len %d) in %.1fs", args.model,
                resolved.name, model_config.dtype, device, model_config.pooling_task,
                model_config.max_model_len, time.perf_counter() - start)
    return LLMEngine(TagserveConfig(model_config, scheduler_config, args.extra), tokenizer, runner)
