"""A checkpoint's HF `tokenizers` (Rust) tokenizer, with the HF-tokenizer methods users call.

`LLM.get_tokenizer()` returns this object; it answers `convert_ids_to_tokens`,
`all_special_tokens`, `decode`, `__call__` and `apply_chat_template` like a transformers fast
tokenizer, without importing transformers.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Encoding
from tokenizers import Tokenizer as RustTokenizer

from tagserve.errors import ModelLoadError, ValidationError

T = TypeVar("T")


def per_tokenizer(fn: Callable[[Tokenizer], T]) -> Callable[[Tokenizer], T]:
    """`fn(tokenizer)` computed once per tokenizer and kept while the tokenizer lives: for
    what post-processing derives from a tokenizer and every call would otherwise redo."""
    values: weakref.WeakKeyDictionary[Tokenizer, T] = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def cached(tokenizer: Tokenizer) -> T:
        if tokenizer not in values:
            values[tokenizer] = fn(tokenizer)
        return values[tokenizer]

    return cached


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(value: Any) -> str | None:
    """Special-token entries are either strings or AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, path: Path) -> None:
        file = path / "tokenizer.json"
        if not file.exists():
            raise ModelLoadError(f"{path} has no tokenizer.json; tagserve needs a fast (Rust) "
                                 "tokenizer saved by transformers or tokenizers.")
        self.path = path
        self.rust = RustTokenizer.from_file(str(file))
        self.rust.no_truncation()
        self.rust.no_padding()
        self.config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        self.truncation_side: str = self.config.get("truncation_side", "right")
        self.model_max_length: int = int(self.config.get("model_max_length") or 10**30)
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                    "cls_token", "mask_token"):
            text = _token_text(special_map.get(key)) or _token_text(self.config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        added = self.rust.get_added_tokens_decoder()
        extra = [t.content for t in added.values() if t.special]
        self.all_special_tokens = list(dict.fromkeys([*self.special_tokens.values(), *extra]))
        self.all_special_ids = [i for i in map(self.rust.token_to_id, self.all_special_tokens)
                                if i is not None]
        self.max_chars_per_token = max(
            (len(t) for t in self.rust.get_vocab(with_added_tokens=True)), default=1)
        self.chat_template = self._load_chat_template()
        self._windowing: dict[tuple[int, int], RustTokenizer] = {}
        self._windowing_lock = threading.Lock()

    def _load_chat_template(self) -> str | None:
        file = self.path / "chat_template.jinja"
        if file.exists():
            return file.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def __getattr__(self, name: str) -> Any:
        # bos_token, eos_token, ... and their *_id forms.
        specials = self.__dict__.get("special_tokens", {})
        if name in specials:
            return specials[name]
        if name.endswith("_id") and name[:-3] in specials:
            return self.rust.token_to_id(specials[name[:-3]])
        if name.endswith("_token") or name.endswith("_token_id"):
            return None
        raise AttributeError(name)

    @property
    def vocab_size(self) -> int:
        return self.rust.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def num_special_tokens_to_add(self) -> int:
        return self.rust.post_processor.num_special_tokens_to_add(False) \
            if self.rust.post_processor is not None else 0

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     offsets: bool = True) -> list[Encoding]:
        """`offsets=False` skips tracking character offsets (faster; they are all zeros)."""
        return _encode_batch(self.rust, texts, add_special_tokens, offsets)

    def _truncating(self, max_length: int, stride: int, side: str) -> RustTokenizer:
        """A cached copy of the tokenizer with truncation switched on (the shared one has none,
        so concurrent callers never see each other's settings)."""
        key = (max_length, stride, side)
        with self._windowing_lock:
            if key not in self._windowing:
                rust = RustTokenizer.from_str(self.rust.to_str())
                rust.enable_truncation(max_length, stride=stride, direction=side)
                self._windowing[key] = rust
            return self._windowing[key]

    def encode_batch_truncated(self, texts: list[str], max_tokens: int, side: str,
                               add_special_tokens: bool = True,
                               offsets: bool = True) -> list[Encoding]:
        """Content truncated so that each result holds at most `max_tokens` tokens, special
        tokens kept: transformers' `truncation=True, max_length=max_tokens`."""
        specials = self.num_special_tokens_to_add() if add_special_tokens else 0
        if max_tokens <= specials:  # no room for content: HF would fail; keep the first tokens
            return self.encode_batch(texts, add_special_tokens, offsets)
        return _encode_batch(self._truncating(max_tokens, 0, side), texts, add_special_tokens,
                             offsets)

    def encode_windows(self, inputs: list[str] | list[list[str]], max_length: int, stride: int,
                       is_pretokenized: bool = False) -> list[list[Encoding]]:
        """Each input cut into windows of at most `max_length` tokens (special tokens included)
        that overlap by `stride` tokens, as transformers' `return_overflowing_tokens=True`."""
        encodings = self._truncating(max_length, stride, "right").encode_batch(
            inputs, is_pretokenized=is_pretokenized, add_special_tokens=True)
        return [[e, *e.overflowing] for e in encodings]

    @functools.cached_property
    def vocab_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Token strings by id (an object array, `convert_ids_to_tokens` for many ids at once)
        and their lengths."""
        vocab = self.rust.get_vocab(with_added_tokens=True)
        table = np.full(max(vocab.values(), default=-1) + 1, "", dtype=object)
        table[list(vocab.values())] = list(vocab)
        return table, np.fromiter(map(len, table), dtype=np.int64, count=len(table))

    @property
    def continuing_subword_prefix(self) -> str | None:
        """The model's sub-word prefix (WordPiece "##"); None for BPE without one and Unigram."""
        return getattr(self.rust.model, "continuing_subword_prefix", None) or None

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join token strings with the tokenizer's decoder (transformers' fast-tokenizer rule)."""
        decoder = self.rust.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.rust.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 **_: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [e.ids for e in self.encode_batch(text, add_special_tokens)]}

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.rust.id_to_token(ids)
        return [self.rust.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.rust.token_to_id(tokens)
        return [self.rust.token_to_id(t) for t in tokens]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.rust.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """Render messages with the checkpoint's Jinja chat template (sandboxed)."""
        if continue_final_message and add_generation_prompt:
            raise ValidationError("Cannot set both `continue_final_message` and "
                                  "`add_generation_prompt` to True.")
        template = chat_template or self.chat_template
        if template is None:
            raise ValidationError("This model's tokenizer has no chat template; send `input` "
                                  "instead of `messages`.")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        rendered = env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **self.special_tokens, **kwargs)
        if continue_final_message and messages:
            final = messages[-1].get("content")
            if isinstance(final, str) and final.strip() and final.strip() in rendered:
                rendered = rendered[: rendered.rindex(final.strip()) + len(final.strip())]
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


def _encode_batch(rust: RustTokenizer, texts: list[str], add_special_tokens: bool,
                  offsets: bool) -> list[Encoding]:
    encode = rust.encode_batch if offsets else rust.encode_batch_fast
    return encode(texts, add_special_tokens=add_special_tokens)


def _raise_template_error(message: str) -> None:
    raise ValidationError(f"Chat template error: {message}")
