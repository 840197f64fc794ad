"""Tiny random Hugging Face token-classification checkpoints used as parity oracles.

Every family gets a fast tokenizer trained locally with ``tokenizers`` on :func:`sentences` and a
small float32 model whose random weights are deliberately non-trivial (perturbed norm weights,
random biases, a wide classifier), written with ``save_pretrained`` so that a folder loads both
in tagserve and in ``transformers``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForTokenClassification,
    BertModel,
    BertTokenizer,
    ErnieConfig,
    ErnieForTokenClassification,
    LlamaConfig,
    LlamaForTokenClassification,
    LlamaModel,
    LlamaTokenizer,
    MistralConfig,
    MistralForTokenClassification,
    ModernBertConfig,
    ModernBertForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForTokenClassification,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForTokenClassification,
    RobertaConfig,
    RobertaForTokenClassification,
    RobertaTokenizer,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
    XLMRobertaTokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
MAX_LEN = 128  # tokenizer model_max_length; RoBERTa-style position tables get MAX_LEN + 2
VOCAB_SIZE = 800
MAX_CHARS = 200
SEED = 0
INIT_STD = 0.1  # initializer_range of every backbone
HEAD_STD = 0.3  # classifier / score weights, so logits are well spread
BIAS_STD = 0.1
NORM_STD = 0.2  # norm weights are drawn around 1.0

# fmt: off
_FIRST = (
    "Alice", "Bob", "José", "Zoë", "François", "Björn", "Łukasz", "Siobhán", "Dmitri", "Дмитрий",
    "Олена", "王伟", "李娜", "Akira", "Fatima", "Nguyễn", "Søren", "Ana-María", "Chloé", "Jürgen",
)
_LAST = (
    "Smith", "García", "Müller", "Dubois", "Nowak", "Иванов", "Tanaka", "Okafor", "O'Brien",
    "van der Berg", "Ó Súilleabháin", "Petrović",
)
_PLACES = (
    "Paris", "São Paulo", "München", "Zürich", "New York City", "Reykjavík", "Kraków", "Москва",
    "北京", "東京", "Île-de-France", "Cape Town", "Washington, D.C.", "Côte d'Ivoire", "Lagos",
    "Санкт-Петербург", "上海", "Montréal", "Düsseldorf", "Bogotá",
)
_WORDS = (
    "café", "naïve", "über", "résumé", "中文", "русский", "日本語", "español", "façade", "Straße",
    "crème brûlée", "piñata", "smörgåsbord", "jalapeño", "weather", "report", "meeting", "budget",
    "railway", "museum", "contract", "festival", "coffee", "software", "release", "language",
)
# fmt: on
_EMOJI = ("🙂", "🚀", "👍🏽", "🇫🇷", "❤️", "🎉", "😂", "🤖", "☕")
_TEMPLATES = (
    "{name} moved to {place} in {year}.",
    "Did {name} really pay {money} for the {word} in {place}?!",
    "On {date} at {time}, {name} and {name} met near {place} {emoji}",
    '"{word}" — said {name} (probably) … {emoji}{emoji}',
    "{name}: {num} km from {place}; {pct} of the tickets were sold.",
    "Flight #{int} from {place} to {place} departs at {time} ({date}).",
    "{name} wrote to {email}: «{word}» is the best {word}!",
    "Hmm... {word}? {word}!",
    "{place}",
    "{name}",
    "Zahl: {num}, Preis: {money}, Stadt: {place}.",
    "{name} говорит по-русски и живёт в городе {place}.",
    "{name}在{place}学习{word}。",
    "Call +1-555-{int} or visit https://example.com/{int}?q={word}&lang=en.",
    "The {word} {word} of {place} was cancelled by {name} {emoji}",
    "[{year}] {name} & {name} <{email}> — {pct} done; ETA {time}.",
    "i   think {name}'s   {word} is   fine\tbut {place} isn't.",
)


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    """Deterministic varied sentences: names, places, numbers, punctuation, non-ASCII, emoji.

    They run from one word to ``MAX_CHARS`` characters, which is under ``MAX_LEN`` tokens for
    every family.
    """
    rng = random.Random(seed)
    fillers: dict[str, Callable[[], str]] = {
        "name": lambda: " ".join([rng.choice(_FIRST)] + [rng.choice(_LAST)] * (rng.random() < 0.6)),
        "place": lambda: rng.choice(_PLACES),
        "word": lambda: rng.choice(_WORDS),
        "emoji": lambda: rng.choice(_EMOJI),
        "year": lambda: str(rng.randint(1850, 2030)),
        "int": lambda: str(rng.randint(0, 99999)),
        "num": lambda: rng.choice(("{:,.0f}", "{:.2f}", "{:.0f}")).format(rng.uniform(0, 2e4)),
        "money": lambda: rng.choice(("${:.2f}", "€{:.0f}", "{:.2f} ¥")).format(rng.uniform(0, 5e3)),
        "pct": lambda: f"{rng.randint(0, 100)}%",
        "date": lambda: (
            f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        ),
        "time": lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        "email": lambda: (
            rng.choice(("info", "j.doe", "team")) + "@example." + rng.choice(("com", "de"))
        ),
    }

    def clause() -> str:
        return re.sub(r"\{(\w+)\}", lambda m: fillers[m[1]](), rng.choice(_TEMPLATES))

    out = []
    for _ in range(n):
        text = clause()
        for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3, 6))):
            more = clause()
            if len(text) + len(more) >= MAX_CHARS:
                break
            text += " " + more
        out.append(text)
    return out


# --------------------------------------------------------------------------------- tokenizers
# Trained vocabularies are cached as immutable values; each build wraps them in a fresh tokenizer.
# Only BPE training is used: WordPieceTrainer and UnigramTrainer depend on hash-map iteration
# order, so their output changes from one process to the next.

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # XLM-R hardcodes <unk> = 3


@dataclass(frozen=True)
class _Bpe:
    pieces: tuple[str, ...]  # ordered by id
    merges: tuple[tuple[str, str], ...]

    def kwargs(self) -> dict[str, Any]:
        return {"vocab": {p: i for i, p in enumerate(self.pieces)}, "merges": list(self.merges)}


def _train_bpe(tokenizer: Tokenizer, vocab_size: int = VOCAB_SIZE, **trainer_kwargs: Any) -> _Bpe:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs)
    tokenizer.train_from_iterator(sentences(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = tuple(sorted(model["vocab"], key=model["vocab"].__getitem__))
    return _Bpe(pieces, tuple((a, b) for a, b in model["merges"]))


@functools.cache
def _wordpiece_vocab(lowercase: bool) -> tuple[str, ...]:
    """WordPiece vocab from a BPE over "▁"-marked words: "▁ab" -> "ab", "ab" -> "##ab"."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace()]
    )
    pieces = [p for p in _train_bpe(tok).pieces if p != "▁"]
    alphabet = [p for p in pieces if len(p) == 1]
    words = [p[1:] if p.startswith("▁") else "##" + p for p in pieces]
    return tuple(dict.fromkeys([*BERT_SPECIALS, *alphabet, *("##" + c for c in alphabet), *words]))


@functools.cache
def _byte_bpe(specials: tuple[str, ...], qwen: bool) -> _Bpe:
    tok = Tokenizer(models.BPE())
    if qwen:  # NFC + GPT-4 style regex split, then the byte mapping without its own regex
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return _train_bpe(
        tok, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )


@functools.cache
def _unigram_vocab() -> tuple[tuple[str, float], ...]:
    """Unigram pieces scored by their log frequency in the segmentation of a BPE trained alike."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
    )
    pieces = _train_bpe(tok).pieces
    counts = Counter(t for enc in tok.encode_batch(sentences()) for t in enc.tokens)
    total = sum(counts.values()) + len(pieces)
    scored = [
        (p, math.log((counts[p] + 1) / total))
        for p in sorted(pieces, key=lambda p: (-counts[p], p))
    ]
    return tuple([(s, 0.0) for s in ROBERTA_SPECIALS] + scored)


@functools.cache
def _metaspace_bpe() -> _Bpe:
    """Llama layout: <unk> <s> </s>, the 256 byte-fallback tokens, then the learned pieces."""
    tok = Tokenizer(models.BPE())
    # Train per word like sentencepiece; Llama's tokenizer then runs with split=False.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    bpe = _train_bpe(tok, VOCAB_SIZE - 256, special_tokens=["<unk>", "<s>", "</s>"])
    byte_tokens = tuple(f"<0x{b:02X}>" for b in range(256))
    return _Bpe(bpe.pieces[:3] + byte_tokens + bpe.pieces[3:], bpe.merges)


def _wordpiece_tokenizer(lowercase: bool) -> BertTokenizer:
    vocab = {piece: i for i, piece in enumerate(_wordpiece_vocab(lowercase))}
    return BertTokenizer(vocab=vocab, do_lower_case=lowercase, model_max_length=MAX_LEN)


def _roberta_tokenizer() -> RobertaTokenizer:
    return RobertaTokenizer(**_byte_bpe(ROBERTA_SPECIALS, False).kwargs(), model_max_length=MAX_LEN)


def _xlmr_tokenizer() -> XLMRobertaTokenizer:
    return XLMRobertaTokenizer(vocab=list(_unigram_vocab()), model_max_length=MAX_LEN)


def _modernbert_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(**_byte_bpe((), False).kwargs()))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Like ModernBERT, the special tokens are added tokens after the BPE vocab.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]")
        ]
        + [AddedToken("[MASK]", lstrip=True, special=True, normalized=False)]
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=MAX_LEN,
        model_input_names=["input_ids", "attention_mask"],
    )


def _qwen_tokenizer() -> Qwen2Tokenizer:
    # <|endoftext|> is not in the BPE vocab: Qwen2Tokenizer appends it as an added token.
    tok = Qwen2Tokenizer(
        **_byte_bpe((), True).kwargs(), model_max_length=MAX_LEN, padding_side="right"
    )
    # Qwen's own tokenizer.json ends with this no-op processor instead of an empty template.
    tok.backend_tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    return tok


def _llama_tokenizer() -> LlamaTokenizer:
    return LlamaTokenizer(
        **_metaspace_bpe().kwargs(),
        add_bos_token=True,
        add_eos_token=False,
        pad_token="<unk>",
        padding_side="right",
        model_max_length=MAX_LEN,
    )


# ------------------------------------------------------------------------------------- models


def _config(
    tok: PreTrainedTokenizerBase, overrides: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    """Shared small-model config kwargs; ``overrides`` win over family and shared defaults."""
    shared = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": MAX_LEN,
        "initializer_range": INIT_STD,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "id2label": dict(enumerate(LABELS)),
        "label2id": {label: i for i, label in enumerate(LABELS)},
        "dtype": "float32",
    }
    return {**shared, **kwargs, **overrides}


Built = tuple[PreTrainedModel, PreTrainedTokenizerBase]
_ROBERTA_KWARGS = {
    "max_position_embeddings": MAX_LEN + 2,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
}
_DECODER_KWARGS = {"num_key_value_heads": 2, "tie_word_embeddings": False}


def _bert(overrides: dict[str, Any]) -> Built:
    tok = _wordpiece_tokenizer(lowercase=False)
    return BertForTokenClassification(BertConfig(**_config(tok, overrides))), tok


def _roberta(overrides: dict[str, Any]) -> Built:
    tok = _roberta_tokenizer()
    config = RobertaConfig(**_config(tok, overrides, **_ROBERTA_KWARGS))
    return RobertaForTokenClassification(config), tok


def _xlmr(overrides: dict[str, Any]) -> Built:
    tok = _xlmr_tokenizer()
    config = XLMRobertaConfig(**_config(tok, overrides, **_ROBERTA_KWARGS))
    return XLMRobertaForTokenClassification(config), tok


def _ernie(overrides: dict[str, Any]) -> Built:
    tok = _wordpiece_tokenizer(lowercase=True)
    config = ErnieConfig(
        **_config(tok, overrides, use_task_id=True, task_type_vocab_size=3, type_vocab_size=4)
    )
    return ErnieForTokenClassification(config), tok


def _modernbert(overrides: dict[str, Any]) -> Built:
    tok = _modernbert_tokenizer()
    config = ModernBertConfig(
        **_config(
            tok,
            overrides,
            num_hidden_layers=3,
            intermediate_size=64,
            global_attn_every_n_layers=2,  # layer_types: full, sliding, full
            local_attention=16,  # sliding layers attend where |i - j| <= 16 // 2
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            cls_token_id=tok.cls_token_id,
            sep_token_id=tok.sep_token_id,
        )
    )
    return ModernBertForTokenClassification(config), tok


def _qwen2(overrides: dict[str, Any]) -> Built:
    tok = _qwen_tokenizer()
    config = Qwen2Config(**_config(tok, overrides, **_DECODER_KWARGS))
    return Qwen2ForTokenClassification(config), tok


def _qwen3(overrides: dict[str, Any]) -> Built:
    tok = _qwen_tokenizer()
    config = Qwen3Config(**_config(tok, overrides, **_DECODER_KWARGS, head_dim=16))
    return Qwen3ForTokenClassification(config), tok


def _llama(overrides: dict[str, Any]) -> Built:
    tok = _llama_tokenizer()
    config = LlamaConfig(**_config(tok, overrides, **{**_DECODER_KWARGS, "num_key_value_heads": 4}))
    return LlamaForTokenClassification(config), tok


def _mistral(overrides: dict[str, Any]) -> Built:
    tok = _llama_tokenizer()
    config = MistralConfig(
        **_config(tok, overrides, **_DECODER_KWARGS, head_dim=16, sliding_window=8)
    )
    return MistralForTokenClassification(config), tok


def _randomize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the random weights non-trivial and the argmax labels varied.

    Default init leaves norm weights at 1 and biases at 0, which hides implementation mistakes, so
    they are redrawn; the head bias is then shifted so that the mean logit over sample sentences
    is zero and every label wins on some tokens.
    """
    model.float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, BIAS_STD)
            elif param.ndim == 1:
                param.normal_(1.0, NORM_STD)
            elif name.split(".")[0] in ("classifier", "score"):
                param.normal_(0.0, HEAD_STD)
        head = model.score if hasattr(model, "score") else model.classifier
        if head.bias is not None:
            batch = tokenizer(sentences(64, seed=1), padding=True, return_tensors="pt")
            head.bias -= model(**batch).logits[batch["attention_mask"].bool()].mean(0)


# Exporters repackage an oracle token classifier under a headless architecture: the backbone
# keeps the layout its own class saves, and the head is attached as an extra top-level module.


def _bert_backbone(oracle: BertForTokenClassification) -> PreTrainedModel:
    backbone = BertModel(copy.deepcopy(oracle.config), add_pooling_layer=False)
    backbone.load_state_dict(oracle.bert.state_dict())
    backbone.classifier = oracle.classifier
    return backbone.eval()


def _qwen3_causal(oracle: Qwen3ForTokenClassification) -> PreTrainedModel:
    causal = Qwen3ForCausalLM(copy.deepcopy(oracle.config))  # lm_head keeps its random init
    causal.model.load_state_dict(oracle.model.state_dict())
    causal.score = oracle.score
    return causal.eval()


def _llama_backbone(oracle: LlamaForTokenClassification) -> PreTrainedModel:
    backbone = LlamaModel(copy.deepcopy(oracle.config))
    backbone.load_state_dict(oracle.model.state_dict())
    backbone.score = oracle.score
    return backbone.eval()


@dataclass(frozen=True)
class _Family:
    build: Callable[[dict[str, Any]], Built]
    export: Callable[[Any], PreTrainedModel] | None = None


_FAMILIES: dict[str, _Family] = {
    "bert": _Family(_bert),
    "roberta": _Family(_roberta),
    "xlmr": _Family(_xlmr),
    "ernie": _Family(_ernie),
    "modernbert": _Family(_modernbert),
    "qwen2": _Family(_qwen2),
    "qwen3": _Family(_qwen3),
    "llama": _Family(_llama),
    "mistral": _Family(_mistral),
    "bert_model": _Family(_bert, _bert_backbone),
    "qwen3_causal": _Family(_qwen3, _qwen3_causal),
    "llama_model": _Family(_llama, _llama_backbone),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _save(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, sharded: bool
) -> None:
    if sharded:  # a third of the weights per shard gives at least two shards
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=total // 3)
        if not (folder / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"save_pretrained wrote a single shard into {folder}")
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_checkpoint(
    family: str, root: Path, *, sharded: bool = False, **config_overrides: Any
) -> Path:
    """Build ``family`` under ``root`` and return its folder.

    The folder is ``root/family``, with ``_sharded`` and a hash of ``config_overrides`` appended
    when given. Families with a headless architecture also hold their token-classification
    oracle in ``oracle/`` (see :func:`oracle_dir`).
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    name = family + ("_sharded" if sharded else "")
    if config_overrides:
        name += "_" + hashlib.sha1(repr(sorted(config_overrides.items())).encode()).hexdigest()[:8]
    folder = Path(root) / name
    spec = _FAMILIES[family]
    torch.manual_seed(SEED)
    model, tokenizer = spec.build(config_overrides)
    _randomize(model, tokenizer)
    if spec.export is None:
        _save(model, tokenizer, folder, sharded)
    else:
        _save(model, tokenizer, folder / "oracle", sharded=False)
        _save(spec.export(model), tokenizer, folder, sharded)
    return folder


def oracle_dir(ckpt: Path) -> Path:
    """Folder holding the ``transformers`` token-classification oracle for checkpoint ``ckpt``."""
    oracle = Path(ckpt) / "oracle"
    return oracle if oracle.is_dir() else Path(ckpt)
