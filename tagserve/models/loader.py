"""Find a checkpoint, build its model and fill it from safetensors, checking every tensor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from tagserve.config import ModelConfig
from tagserve.errors import ModelLoadError
from tagserve.layers.fused import fusion_supported
from tagserve.models.base import WeightTarget
from tagserve.models.heads import TokenClassifier
from tagserve.models.registry import Family

HEAD_NAMES = ("classifier", "score")
PICKLE_HINT = ("Unpickling can run arbitrary code, so tagserve refuses it by default. Convert the "
               "checkpoint to safetensors, or pass load_format='pt' (--load-format pt) to load it "
               "with torch.load(weights_only=True).")


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id resolved by `huggingface_hub` (and its cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"Model path {model!r} is not a directory holding a checkpoint.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            model, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "cannot find this model"
        raise ModelLoadError(
            f"Invalid repository ID or local directory specified: {model!r}. It is not a local "
            f"folder and could not be fetched from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}).") from exc


def weight_files(path: Path, load_format: str = "auto") -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise ModelLoadError(f"Shards listed in {index.name} are missing: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files and load_format in ("auto", "safetensors"):
        return files
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if pickles:
        if load_format != "pt":
            raise ModelLoadError(f"{path} holds only pickle weights ({pickles[0].name}). "
                                 + PICKLE_HINT)
        return pickles
    raise ModelLoadError(f"No weight files (*.safetensors) found in {path}.")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        if file.suffix in (".bin", ".pt"):
            yield from torch.load(file, map_location="cpu", weights_only=True).items()
            continue
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    yield name, f.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise ModelLoadError(f"Cannot read weights from {file}: {exc}") from exc


def tensor_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for file in files:
        if file.suffix in (".bin", ".pt"):
            names += list(torch.load(file, map_location="cpu", weights_only=True))
            continue
        try:
            with safe_open(file, framework="pt") as f:
                names += list(f.keys())
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"Cannot read weights from {file}: {exc}") from exc
    return names


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(model_config: ModelConfig, family: Family) -> TokenClassifier:
    """Construct the model of `family` (see `models.registry`) on the target device in the
    target dtype and load its weights."""
    cfg = model_config.hf_config
    files = weight_files(model_config.model_path, model_config.load_format)
    names = tensor_names(files)
    head_name = next((h for h in HEAD_NAMES if f"{h}.weight" in names), None)
    if head_name is None:
        raise ModelLoadError(
            f"Missing weights: the checkpoint has no token-classification head "
            f"({' or '.join(h + '.weight' for h in HEAD_NAMES)}); a bare backbone cannot be "
            "run as a token classifier.")
    with torch.device("meta"), _default_dtype(model_config.dtype):
        backbone = family.backbone(cfg)
        pre_head = family.pre_head(cfg) if family.pre_head else None
        model = TokenClassifier(backbone, cfg.num_labels, head_name, f"{head_name}.bias" in names,
                                model_config.head_dtype, pre_head)
    model.to_empty(device=model_config.device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    load_weights(model, iter_tensors(files))
    fused = not model_config.enforce_eager \
        and fusion_supported(model_config.device, model_config.dtype)
    model.enable_fusion(fused)
    model.enable_precise_residuals(model_config.precise_residuals and fused
                                   and model_config.dtype == torch.bfloat16)
    return model.eval().requires_grad_(False)


def _target(model: TokenClassifier, name: str) -> WeightTarget | None:
    """Route a checkpoint name to the head, the pre-head or the backbone (None = not needed)."""
    backbone = model.backbone
    if name.startswith(f"{model.head_name}."):
        return WeightTarget("head." + name.split(".", 1)[1])
    if name.startswith(HEAD_NAMES):
        return None
    if name.startswith("head.") and model.pre_head is not None:
        return WeightTarget("pre_head." + name[len("head."):])
    for prefix in backbone.prefixes:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith(backbone.ignored) or name.startswith("drop"):
        return None
    target = backbone.map_weight(name)
    if target is None:
        return None
    return WeightTarget("backbone." + target.param, target.start, target.size)


def load_weights(model: TokenClassifier, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into parameters; every parameter must be filled exactly once."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    unexpected: list[str] = []
    for name, tensor in tensors:
        target = _target(model, name)
        if target is None:
            continue
        if target.param not in params:
            unexpected.append(name)
            continue
        param = params[target.param]
        dest = param.data if target.start is None else param.data[target.start:
                                                                  target.start + target.size]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"Weight {name!r} has shape {list(tensor.shape)} but the model built from "
                f"config.json expects {list(dest.shape)} for {target.param!r}; the checkpoint "
                "and its config.json disagree.")
        dest.copy_(tensor)
        filled[target.param] = filled.get(target.param, 0) + dest.shape[0] if dest.dim() else 1
    if unexpected:
        raise ModelLoadError(f"Checkpoint tensors with no place in the model: {unexpected[:10]}")
    missing = [n for n, p in params.items() if filled.get(n, 0) != (p.shape[0] if p.dim() else 1)]
    if missing:
        raise ModelLoadError(f"Missing weights in the checkpoint: {missing[:10]}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
