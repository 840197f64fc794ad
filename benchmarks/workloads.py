"""Benchmark workloads: model shapes, synthetic text, tokenizers trained on the spot, checkpoints.

Everything is deterministic (fixed seeds) and needs no network: the synthetic vocabulary below is
sampled into sentences, a tokenizer is trained on them with `tokenizers`, and a randomly
initialised transformers model is saved with `save_pretrained` next to it. Checkpoints are cached
under a directory keyed by workload name and a hash of the spec, so repeated runs reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForTokenClassification,
    BertTokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForTokenClassification,
)

# Bump when the way checkpoints are built changes: cached folders are then rebuilt.
BUILD_VERSION = 2
LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")
# Qwen2's split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS_SEED = 1234
TRAIN_SEED = 42
TRAIN_TEXTS = 20_000
TRAIN_WORDS = 24  # words per tokenizer-training sentence
HEAD_SAMPLE_TEXTS = 400  # sentences whose hidden states fit the classifier head
HEAD_MARGIN = 8.0  # logit gap between a token's label and the others, as fitted
HEAD_RIDGE = 100.0


# ------------------------------------------------------------------------------ workload specs


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of one benchmark model; `family` is "bert" (bidirectional) or "qwen3" (causal)."""

    name: str
    family: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_len: int = 512
    kv_heads: int | None = None
    head_dim: int | None = None
    save_dtype: str = "float32"
    description: str = ""

    @property
    def causal(self) -> bool:
        return self.family == "qwen3"

    @property
    def attn_width(self) -> int:
        """Query width (heads x head dim): the `d` of attention's 4 * d * seq_len FLOPs a token."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def key(self) -> str:
        """Cache folder name: the workload name plus a hash of everything that shapes it."""
        blob = json.dumps({**asdict(self), "version": BUILD_VERSION}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


WORKLOADS: dict[str, WorkloadSpec] = {
    "W1": WorkloadSpec("W1", "bert", 12, 768, 12, 3072, 30522,
                       description="BERT-base-shaped tagger (BertForTokenClassification)"),
    "W2": WorkloadSpec("W2", "qwen3", 28, 1024, 16, 3072, 32000, max_len=512, kv_heads=8,
                       head_dim=128, save_dtype="bfloat16",
                       description="Qwen3-0.6B-shaped tagger (Qwen3ForTokenClassification)"),
    "W4a": WorkloadSpec("W4a", "bert", 4, 512, 8, 2048, 30522,
                        description="BERT-small-shaped tagger (CPU)"),
    "W4b": WorkloadSpec("W4b", "bert", 12, 768, 12, 3072, 30522,
                        description="BERT-base-shaped tagger (CPU)"),
}


def smoke_spec(spec: WorkloadSpec) -> WorkloadSpec:
    """The same family at a tiny shape (2 layers, hidden 64, texts up to 128 tokens) for CI."""
    extra: dict[str, Any] = {"kv_heads": 2, "head_dim": 16} if spec.family == "qwen3" else {}
    return replace(spec, name=f"{spec.name}-smoke", layers=2, hidden=64, heads=4,
                   intermediate=128, max_len=128, description=f"{spec.description}, smoke shape",
                   **extra)


# --------------------------------------------------------------------------- synthetic words

def _split(text: str) -> list[str]:
    return text.split()


_COMMON = _split("""
the of and to a in is that for it as was with be by on not he I this are or his from at which
but have an they you were her she there been one all we their has would when if so no will can
more other what out up time about into than its only some could them new these two may first
then do any like my now over such our man me even most made after also did many before must
through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being
under never day same another know while last might us great old year off come since against go
came right used take three states house himself few use during without again place american
around however home small found thought went say part once general high upon school every does
group number report market company government city public business service system program
question night point water money month week data order plan price level story team meeting
budget contract office policy bank health family result interest country project court leader
member center value power police morning evening change music game history process party room
table office paper record study student teacher problem field series movement energy building
county river island street road bridge station airport hospital university museum festival
weather release software network account customer product agreement election minister council
committee director president manager officer agent analyst engineer doctor lawyer artist writer
signed announced reported said told visited joined opened closed moved started finished called
approved rejected expected planned delivered increased decreased reached launched acquired sold
bought paid received offered returned continued remained became included provided quickly slowly
recently today yesterday tomorrow early late nearly almost really often always north south east
west central local national international federal private public digital
""")
_FIRST = _split("""
James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard
Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty
Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua
Michelle Kenneth Carol Kevin Amanda Brian Melissa George Deborah Timothy Stephanie Ronald
Rebecca Jason Sharon Edward Laura Jeffrey Cynthia Ryan Kathleen Jacob Amy Gary Angela Nicholas
Shirley Eric Anna Jonathan Brenda Stephen Pamela Larry Emma Justin Nicole Scott Helen Brandon
Samantha Benjamin Katherine Samuel Christine Gregory Debra Alexander Rachel Frank Carolyn
Patrick Janet Raymond Catherine Jack Maria Dennis Heather Jerry Diane Tyler Ruth Aaron Julie
Jose Olivia Adam Joyce Henry Virginia Nathan Victoria Douglas Kelly Zachary Lauren Peter
Christina Kyle Joan Ahmed Fatima Wei Yuki Hiroshi Priya Rahul Olga Ivan Sven Ingrid Pierre
Claire Hans Greta Marco Giulia Pablo Lucia
""")
_LAST = _split("""
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris
Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill
Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips
Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers
Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson
Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders
Patel Myers Long Ross Foster Mueller Schmidt Schneider Fischer Weber Rossi Russo Bianchi Dubois
Moreau Laurent Tanaka Suzuki Watanabe Chen Wang Zhang Liu Singh Kumar Ivanov Petrov Novak
Kowalski Nielsen Hansen Larsen
""")
_PLACES = _split("""
London Paris Berlin Madrid Rome Vienna Prague Warsaw Budapest Lisbon Dublin Amsterdam Brussels
Copenhagen Stockholm Oslo Helsinki Athens Istanbul Moscow Kyiv Cairo Lagos Nairobi Johannesburg
Tokyo Osaka Seoul Beijing Shanghai Singapore Bangkok Jakarta Manila Mumbai Delhi Karachi Dubai
Riyadh Tehran Sydney Melbourne Auckland Toronto Montreal Vancouver Chicago Boston Seattle
Houston Dallas Denver Phoenix Atlanta Miami Detroit Philadelphia Washington California Texas
Florida Ohio Georgia Virginia Michigan Oregon Nevada Arizona Colorado Bavaria Scotland Wales
Ireland England France Germany Spain Italy Portugal Poland Austria Switzerland Norway Sweden
Finland Denmark Greece Turkey Egypt Nigeria Kenya Japan China Korea India Pakistan Brazil Mexico
Canada Australia Argentina Chile Peru Colombia Venezuela Europe Asia Africa America
""")
_ORGS = _split("""
Microsoft Google Apple Amazon Facebook Intel IBM Oracle Samsung Sony Toyota Honda Siemens Bosch
Nestle Unilever Pfizer Novartis Boeing Airbus Reuters Bloomberg NASA UNESCO NATO FIFA UEFA
Harvard Stanford Oxford Cambridge Yale Princeton Tesla Netflix Spotify Uber Visa Mastercard
Walmart Target Costco Shell Chevron Exxon Volkswagen BMW Mercedes Ferrari Nokia Ericsson
""")
_PUNCT = [",", ".", ",", ".", ",", ";", ":", "!", "?", "(", ")", '"', "-", "'s"]
_SYLLABLES = _split("""
ka ri to mo ne sa vi lu de ar en or el an is us on ber gen stad ville ham ton ski wicz son sen
berg feld mann ova ini etti ez os ia ur ak ol im ex zy qua pho tri
""")

# Share of each word class in running text.
_CLASS_WEIGHTS = {"common": 0.60, "first": 0.05, "last": 0.05, "place": 0.06, "org": 0.03,
                  "number": 0.07, "punct": 0.10, "rare": 0.04}


@dataclass
class SyntheticVocab:
    """Word forms with sampling probabilities; `glued` forms attach to the previous word."""

    words: list[str]
    probs: np.ndarray
    glued: np.ndarray  # bool: punctuation written without a leading space

    @property
    def pieces(self) -> np.ndarray:
        """Each word as written after another word: " word", or "," for glued punctuation."""
        return np.array([w if g else " " + w for w, g in zip(self.words, self.glued, strict=True)],
                        dtype=object)


def _numbers(rng: np.random.Generator, n: int) -> list[str]:
    """Years, counts, decimals, money, percentages, times and dates, as people write them."""
    out = []
    for kind in rng.integers(0, 8, size=n):
        a, b, c = (int(x) for x in rng.integers(0, 10_000, size=3))
        forms = (str(1900 + a % 131), f"{a:,}", f"{a % 1000}.{b % 100:02d}",
                 f"${a % 500}.{b % 100:02d}", f"{a % 100}%", f"{a % 24:02d}:{b % 60:02d}",
                 f"{1990 + a % 40}-{1 + b % 12:02d}-{1 + c % 28:02d}", str(a % 100))
        out.append(forms[kind])
    return out


def _rare_words(rng: np.random.Generator, n: int) -> list[str]:
    """Pseudo-words from syllables: rare surnames and places the tokenizer mostly splits."""
    syllables = np.array(_SYLLABLES, dtype=object)
    words: set[str] = set()
    while len(words) < n:
        counts = rng.integers(2, 5, size=n)
        parts = rng.choice(syllables, size=(n, 4))
        upper = rng.random(n) < 0.6
        for row, k, cap in zip(parts, counts, upper, strict=True):
            word = "".join(row[:k])
            words.add(word.capitalize() if cap else word)
    return sorted(words)[:n]


@functools.cache
def build_vocab(seed: int = CORPUS_SEED) -> SyntheticVocab:
    """The synthetic vocabulary: Zipf-weighted common words, names, places, numbers, punctuation."""
    rng = np.random.default_rng(seed)
    common = _COMMON + [w.capitalize() for w in _COMMON[:120]]
    classes: dict[str, list[str]] = {
        "common": common, "first": _FIRST, "last": _LAST, "place": _PLACES, "org": _ORGS,
        "number": _numbers(rng, 4000), "punct": _PUNCT, "rare": _rare_words(rng, 20_000),
    }
    words: list[str] = []
    probs: list[np.ndarray] = []
    for name, members in classes.items():
        zipf = 1.0 / np.arange(1, len(members) + 1) ** (1.0 if name == "common" else 0.5)
        probs.append(_CLASS_WEIGHTS[name] * zipf / zipf.sum())
        words.extend(members)
    glued = np.array([w in _PUNCT and w not in ("(", '"', "-") for w in words])
    p = np.concatenate(probs)
    return SyntheticVocab(words, p / p.sum(), glued)


def sample_text(vocab: SyntheticVocab, pieces: np.ndarray, idx: np.ndarray) -> str:
    return "".join(pieces[idx]).lstrip()


def training_texts(vocab: SyntheticVocab, n: int = TRAIN_TEXTS,
                   seed: int = TRAIN_SEED) -> list[str]:
    """Sentences for tokenizer training (a sample, so rare words stay partly unseen and split)."""
    rng = np.random.default_rng(seed)
    pieces = vocab.pieces
    idx = rng.choice(len(vocab.words), size=(n, TRAIN_WORDS), p=vocab.probs)
    return [sample_text(vocab, pieces, row) for row in idx]


# ---------------------------------------------------------------------------------- tokenizers


def train_wordpiece(texts: list[str], vocab_size: int, max_len: int) -> BertTokenizerFast:
    """Cased BERT WordPiece trained on `texts`, padded with [unusedN] entries to `vocab_size`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    for i in range(vocab_size - len(vocab)):  # as BERT's own vocab: filler entries, never produced
        vocab[f"[unused{i}]"] = len(vocab)
    return BertTokenizerFast(vocab=vocab, do_lower_case=False, model_max_length=max_len)


def train_byte_bpe(texts: list[str], vocab_size: int, max_len: int) -> Qwen2Tokenizer:
    """Qwen2-style byte-level BPE (NFC, GPT-4 split regex) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1,  # room for <|endoftext|>
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_len,
                          padding_side="right")


def train_tokenizer(spec: WorkloadSpec, vocab: SyntheticVocab) -> PreTrainedTokenizerBase:
    texts = training_texts(vocab)
    if spec.family == "bert":
        return train_wordpiece(texts, spec.vocab, spec.max_len)
    return train_byte_bpe(texts, spec.vocab, spec.max_len)


# -------------------------------------------------------------------------------------- models


def _config(spec: WorkloadSpec, tokenizer: PreTrainedTokenizerBase) -> BertConfig | Qwen3Config:
    common: dict[str, Any] = {
        "vocab_size": spec.vocab, "hidden_size": spec.hidden, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "intermediate_size": spec.intermediate,
        "id2label": dict(enumerate(LABELS)), "label2id": {k: i for i, k in enumerate(LABELS)},
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.family == "bert":
        return BertConfig(**common, max_position_embeddings=spec.max_len)
    return Qwen3Config(**common, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                       max_position_embeddings=max(spec.max_len, 4096), tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id)


def _head_features(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   vocab: SyntheticVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """What the classifier reads (its input rows) and the token ids, over sample sentences."""
    head = model.score if hasattr(model, "score") else model.classifier
    texts = training_texts(vocab, HEAD_SAMPLE_TEXTS, seed=TRAIN_SEED + 1)
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(head.weight.device)
    mask = batch["attention_mask"].bool()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        hook.remove()
    return captured[0][mask].float().cpu(), batch["input_ids"][mask].cpu()


def _probe_head(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                vocab: SyntheticVocab) -> None:
    """Replace the random classifier by a decisive one, as a trained tagger would be.

    A default-initialised head reads random directions of random features: its labels are
    near-ties that bf16 and fp32 resolve differently on a few per cent of tokens, which says
    nothing about an engine. Here every token id gets a label (80% "O", the rest spread over the
    entity labels) and the head is the ridge-regression probe from the final hidden states to
    those labels at a logit margin of HEAD_MARGIN; most tokens then have a clear winner.
    """
    head = model.score if hasattr(model, "score") else model.classifier
    hidden, ids = _head_features(model, tokenizer, vocab)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    size = model.config.vocab_size
    labels = torch.where(torch.rand(size, generator=gen) < 0.8, 0,
                         torch.randint(1, len(LABELS), (size,), generator=gen))
    target = torch.full((len(ids), len(LABELS)), -HEAD_MARGIN / 2)
    target[torch.arange(len(ids)), labels[ids]] = HEAD_MARGIN / 2
    features = torch.cat([hidden, torch.ones(len(hidden), 1)], 1)
    gram = features.T @ features + HEAD_RIDGE * torch.eye(features.shape[1])
    solution = torch.linalg.solve(gram, features.T @ target)
    with torch.no_grad():
        head.weight.copy_(solution[:-1].T.to(head.weight.device))
        if head.bias is not None:
            head.bias.copy_(solution[-1].to(head.bias.device))


def build_model(spec: WorkloadSpec, tokenizer: PreTrainedTokenizerBase,
                vocab: SyntheticVocab) -> PreTrainedModel:
    torch.manual_seed(TRAIN_SEED)
    config = _config(spec, tokenizer)
    cls = BertForTokenClassification if spec.family == "bert" else Qwen3ForTokenClassification
    model = cls(config).float().eval()
    if torch.cuda.is_available():  # the probe's forward pass: fast on a GPU
        model.cuda()
    _probe_head(model, tokenizer, vocab)
    return model.cpu().to(getattr(torch, spec.save_dtype))


def build_checkpoint(spec: WorkloadSpec, cache_dir: Path, log: Any = print) -> Path:
    """The checkpoint folder for `spec`, built once and reused (written to a temp dir, renamed)."""
    path = cache_dir / spec.key()
    if (path / "config.json").exists():
        return path
    start = time.perf_counter()
    vocab = build_vocab()
    tokenizer = train_tokenizer(spec, vocab)
    model = build_model(spec, tokenizer, vocab)
    tmp = cache_dir / f".{spec.key()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "workload.json").write_text(json.dumps(asdict(spec), indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log(f"built {spec.name} checkpoint in {time.perf_counter() - start:.1f}s -> {path}")
    return path


# ------------------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """Texts with their token ids (special tokens included) under the workload's tokenizer."""

    name: str
    texts: list[str]
    token_ids: list[list[int]]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.token_ids), dtype=np.int64,
                           count=len(self.token_ids))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> Corpus:
        return Corpus(name or self.name, [self.texts[i] for i in indices],
                      [self.token_ids[i] for i in indices])

    def stats(self) -> dict[str, float]:
        lengths = self.lengths
        return {"texts": len(lengths), "tokens": int(lengths.sum()),
                "mean": float(lengths.mean()), "min": int(lengths.min()),
                "p50": float(np.percentile(lengths, 50)), "p90": float(np.percentile(lengths, 90)),
                "max": int(lengths.max())}


def _word_costs(vocab: SyntheticVocab, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Tokens each vocabulary piece adds when written after another word."""
    encoded = tokenizer(list(vocab.pieces), add_special_tokens=False)["input_ids"]
    return np.array([max(1, len(ids)) for ids in encoded], dtype=np.int64)


def _targets(kind: str, n: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "mixed":
        return rng.integers(16, max_len + 1, size=n)
    if kind == "short50":
        return np.full(n, 50)
    raise ValueError(f"unknown corpus {kind!r}; expected 'mixed' or 'short50'")


class CorpusMaker:
    """Builds corpora for one tokenizer: texts whose token counts (special tokens included) hit
    per-text targets, uniform over 16..max_len for "mixed" and 50 for "short50".

    Words are drawn until their token cost reaches the target, then one-token words top it up;
    texts that still overshoot `max_len` after tokenization lose words from the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.vocab = build_vocab()
        self.pieces = self.vocab.pieces
        self.costs = _word_costs(self.vocab, tokenizer)
        self.cdf = np.cumsum(self.vocab.probs)
        self.fillers = np.flatnonzero((self.costs == 1) & ~self.vocab.glued)
        self.specials = len(tokenizer("", add_special_tokens=True)["input_ids"])

    def _words(self, target: int, rng: np.random.Generator) -> np.ndarray:
        body = max(1, target - self.specials)
        idx = np.searchsorted(self.cdf, rng.random(body) * self.cdf[-1], side="right")
        idx = np.minimum(idx, len(self.cdf) - 1)
        cost = np.cumsum(self.costs[idx])
        keep = int(np.searchsorted(cost, body, side="right"))
        missing = body - (int(cost[keep - 1]) if keep else 0)
        return np.concatenate([idx[:keep], rng.choice(self.fillers, size=missing)])

    def make(self, kind: str, n: int, seed: int = CORPUS_SEED) -> Corpus:
        rng = np.random.default_rng(seed + (0 if kind == "mixed" else 1))
        word_ids = [self._words(int(t), rng) for t in _targets(kind, n, self.max_len, rng)]
        texts = [sample_text(self.vocab, self.pieces, idx) for idx in word_ids]
        token_ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(token_ids):
            while len(ids) > self.max_len:  # rare: pieces cost more in context than alone
                word_ids[i] = word_ids[i][:-max(1, (len(ids) - self.max_len) // 2)]
                texts[i] = sample_text(self.vocab, self.pieces, word_ids[i])
                ids = self.tokenizer(texts[i])["input_ids"]
            token_ids[i] = ids
        return Corpus(kind, texts, token_ids)


def make_corpus(kind: str, n: int, tokenizer: PreTrainedTokenizerBase, max_len: int,
                seed: int = CORPUS_SEED) -> Corpus:
    """One corpus (see `CorpusMaker`; use it directly to build several for one tokenizer)."""
    return CorpusMaker(tokenizer, max_len).make(kind, n, seed)
