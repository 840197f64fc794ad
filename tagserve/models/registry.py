"""Which HF architecture names tagserve runs, how, and which pooling tasks they support.

Resolution follows vLLM: the architecture suffix picks the default runner and conversion;
`*ForTokenClassification` classes tagserve implements natively serve `token_classify`; decoder
classifiers and backbones converted with `convert="classify"` support `token_classify` and
`classify` through a `score`/`classifier` head read from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tagserve.config import HFConfig
from tagserve.errors import ModelLoadError, ValidationError
from tagserve.models.base import Backbone
from tagserve.models.bert import BertModel
from tagserve.models.decoder import DecoderModel
from tagserve.models.modernbert import ModernBertModel, ModernBertPredictionHead


@dataclass(frozen=True)
class Family:
    backbone: type[Backbone]
    causal: bool
    pre_head: type[nn.Module] | None = None


BERT = Family(BertModel, causal=False)
MODERNBERT = Family(ModernBertModel, causal=False, pre_head=ModernBertPredictionHead)
DECODER = Family(DecoderModel, causal=True)

# Model-name prefixes (the part before the suffix) and their families.
FAMILIES: dict[str, Family] = {
    "Bert": BERT, "Roberta": BERT, "XLMRoberta": BERT, "Ernie": BERT,
    "ModernBert": MODERNBERT,
    "Qwen2": DECODER, "Qwen3": DECODER, "Llama": DECODER, "Mistral": DECODER,
}
NATIVE_TOKEN_CLASSIFIERS = ("Bert", "Roberta", "XLMRoberta", "Ernie", "ModernBert")
# Suffix -> (default runner, default convert), first match wins (vLLM's `_SUFFIX_TO_DEFAULTS`).
SUFFIX_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("ForCausalLM", "generate", "none"),
    ("ForTokenClassification", "pooling", "classify"),
    ("Model", "pooling", "embed"),
)


@dataclass(frozen=True)
class ResolvedArchitecture:
    name: str
    family: Family
    converted: bool
    supported_tasks: tuple[str, ...]


def supported_architectures() -> list[str]:
    names = [f"{p}ForTokenClassification" for p in FAMILIES]
    names += [f"{p}{s} (convert='classify')" for p in FAMILIES for s in ("Model", "ForCausalLM")
              if not (p == "ModernBert" and s == "ForCausalLM")]
    return names


def _split(arch: str) -> tuple[str, str, str, str] | None:
    for suffix, runner, convert in SUFFIX_DEFAULTS:
        if arch.endswith(suffix) and arch[: -len(suffix)] in FAMILIES:
            return arch[: -len(suffix)], suffix, runner, convert
    return None


def resolve_architecture(config: HFConfig, runner: str = "auto", convert: str = "auto",
                         trust_remote_code: bool = False) -> ResolvedArchitecture:
    """Pick the implementation for the first supported name in `config.architectures`."""
    archs = config.get("architectures") or []
    for arch in archs:
        parts = _split(arch)
        if parts is None:
            continue
        prefix, suffix, default_runner, default_convert = parts
        if runner not in ("auto", "pooling"):
            raise ValidationError(f"tagserve runs pooling models only; got runner={runner!r}. "
                                  "Use runner='pooling' or runner='auto'.", parameter="runner")
        convert_used = default_convert if convert == "auto" else convert
        if default_runner == "generate" and convert == "auto" and runner == "auto":
            convert_used = "none"
        native = suffix == "ForTokenClassification" and prefix in NATIVE_TOKEN_CLASSIFIERS
        if convert_used == "embed":
            raise ValidationError(
                f"{arch} would be converted into an embedding model, which tagserve does not "
                "serve. Embedding API is not supported by this model. Pass convert='classify' "
                "(--convert classify) to use the `classifier`/`score` head stored in the "
                "checkpoint as a token classifier.", parameter="convert")
        if convert_used == "none" and not native:
            raise ValidationError(
                "This model does not support `--runner pooling`. You can pass `--convert "
                f"<embed|classify> to adapt it into a pooling model. ({arch}: pass "
                "convert='classify' to run it as a token classifier.)", parameter="convert")
        tasks = ("token_classify",) if native else ("token_classify", "classify")
        return ResolvedArchitecture(arch, FAMILIES[prefix], not native, tasks)
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"Architecture(s) {archs} are defined by remote code in the checkpoint (auto_map). "
            "Remote code is never run unless you pass trust_remote_code=True "
            "(--trust-remote-code).")
    raise ModelLoadError(
        f"Model architectures {archs} are not supported for now. Supported architectures: "
        f"{supported_architectures()}")


def default_pooling_task(resolved: ResolvedArchitecture, archs: list[str]) -> str:
    """vLLM's rule: token classifiers by name serve token_classify, else the priority order."""
    if any("ForTokenClassification" in a for a in archs):
        return "token_classify"
    return "classify" if "classify" in resolved.supported_tasks else "token_classify"
