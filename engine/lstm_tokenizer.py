"""Character and word tokenizers of LSTM language models, from a GGUF's `tokenizer.ggml.*` metadata.

`tokenizer.ggml.model` says which (see converters/lstm_gguf.py, which writes them):
- "char": every token is one Unicode character, plus special tokens ("<eos>", ...). Text is
  encoded character by character; decoding concatenates the tokens.
- "word": tokens are words. Text is (optionally lowercased, `tokenizer.word.lowercase`) split into
  the matches of `tokenizer.word.pattern` (default \\S+: runs of non-space); decoding joins words
  with `tokenizer.word.separator` (default " "). Like SentencePiece's leading "▁", each word
  decodes as separator + word and `decode` drops the separator in front of the first word unless
  `strip_leading_space=False` (pass that when decoding a continuation of earlier text).

Special tokens (token types 2 unknown, 3 control) are matched in text when `parse_special=True`.
A character or word missing from the vocabulary becomes the unknown token when there is one, and
is a TokenizerError naming it otherwise. Text that is not a str, or holds a lone surrogate, is a
TokenizerError; so is a metadata value of the wrong type (naming the key). The methods mirror lmengine.tokenizer.Tokenizer; the
vocabulary lookups (vocab_size, bos_id, eot_ids, id_to_token, ...) are lmengine.vocab.Vocabulary's.
"""
from __future__ import annotations

import numbers
import re
from typing import Iterable, Mapping, Sequence

from .errors import TokenizerError
from .vocab import (  # noqa: F401  (the token types are part of this module's interface)
    SPECIAL_TYPES,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    Vocabulary,
    check_text,
    special_token_id,
)

MATCHED_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL)                 # matched in text by parse_special
MODELS = ("char", "word")


class VocabTokenizer(Vocabulary):
    """Shared part of the char and word tokenizers: special-token matching, unknown-token
    lookup, encode and decode over `_encode_plain` and `_piece`. EOS is the only end of turn."""

    model = ""

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int] | None = None, *,
                 bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, source: str = "<vocabulary>"):
        tokens = list(tokens)
        for i, t in enumerate(tokens):
            if not isinstance(t, str) or not t:
                raise TokenizerError(f"{source}: token {i} is {t!r}; tokens must be non-empty strings")
        super().__init__(tokens, token_types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
                         add_bos=add_bos, source=source)
        matched = sorted((t for t, k in zip(self.tokens, self.token_types) if k in MATCHED_TYPES),
                         key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, matched))) if matched else None

    # -- construction (from_gguf is Vocabulary's) ------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: Mapping, source: str = "<metadata>") -> "VocabTokenizer":
        """The char or word tokenizer that `tokenizer.ggml.model` names."""
        model = meta.get("tokenizer.ggml.model")
        if model not in MODELS:
            raise TokenizerError(f"{source}: tokenizer.ggml.model is {model!r}, not one of {MODELS}")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is missing or empty")
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None and (not isinstance(types, list) or len(types) != len(tokens)
                                  or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                             for t in types)):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type should list {len(tokens)} integer types")

        def token_id(name):
            return special_token_id(meta, f"tokenizer.ggml.{name}_token_id", len(tokens), source)

        def value(key, default, kind):
            v = meta.get(key, default)
            if kind is bool and isinstance(v, numbers.Integral) and v in (0, 1):
                return bool(v)
            if not isinstance(v, kind):
                raise TokenizerError(f"{source}: metadata key {key!r} should be a {kind.__name__}, found {v!r}")
            return v

        common = dict(bos_id=token_id("bos"), eos_id=token_id("eos"), unk_id=token_id("unknown"),
                      pad_id=token_id("padding"), add_bos=value("tokenizer.ggml.add_bos_token", False, bool),
                      source=source)
        if model == "char":
            return CharTokenizer(tokens, types, **common)
        return WordTokenizer(tokens, types, lowercase=value("tokenizer.word.lowercase", False, bool),
                             pattern=value("tokenizer.word.pattern", r"\S+", str),
                             separator=value("tokenizer.word.separator", " ", str), **common)

    # -- encode ---------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the model (tokenizer.ggml.add_bos_token);
        `parse_special=True` turns special-token text such as "<eos>" into that token."""
        check_text(text)
        ids = []
        pos = 0
        if parse_special and self._special_re is not None:
            for m in self._special_re.finditer(text):
                ids += self._encode_plain(text[pos:m.start()], pos)
                ids.append(self._token_to_id[m.group()])
                pos = m.end()
        ids += self._encode_plain(text[pos:], pos)
        return self.wrap(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     parse_special: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TokenizerError(f"encode_batch() takes a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            check_text(text, f"encode_batch() item {i}")
        return [self.encode(t, add_bos, parse_special) for t in texts]

    def _lookup(self, piece: str, where: int, what: str) -> int:
        token_id = self._token_to_id.get(piece)
        if token_id is not None and self.token_types[token_id] in (TOKEN_NORMAL, TOKEN_USER_DEFINED):
            return token_id
        if self._unk_id is not None:
            return self._unk_id
        raise TokenizerError(f"{what} {piece!r} at character {where} is not in the vocabulary of "
                             f"{len(self.tokens)} tokens, which has no unknown token")

    def _encode_plain(self, text: str, offset: int) -> list[int]:
        raise NotImplementedError

    # -- decode ---------------------------------------------------------------------------------
    def _piece(self, token_id: int, first: bool) -> str:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               strip_leading_space: bool | None = None) -> str:
        """Text of token ids (special tokens as written unless skip_special_tokens)."""
        decoder = self.incremental_decoder(skip_special_tokens, strip_leading_space)
        return "".join([decoder.add_checked(i) for i in self._check_ids(ids)]) + decoder.flush()

    def incremental_decoder(self, skip_special_tokens: bool = False,
                            strip_leading_space: bool | None = None) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens, strip_leading_space)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self._bos_id}, eos={self._eos_id}, "
                f"unk={self._unk_id})")


class CharTokenizer(VocabTokenizer):
    """One token per character (`tokenizer.ggml.model == "char"`)."""

    model = "char"

    def __init__(self, tokens, token_types=None, **kwargs):
        super().__init__(tokens, token_types, **kwargs)
        for i, (t, kind) in enumerate(zip(self.tokens, self.token_types)):
            if kind == TOKEN_NORMAL and len(t) != 1:
                raise TokenizerError(f"{self.source}: token {i} {t!r} of a char vocabulary is not one character "
                                     f"(only special tokens may be longer)")

    def _encode_plain(self, text, offset):
        return [self._lookup(ch, offset + k, "character") for k, ch in enumerate(text)]

    def _piece(self, token_id, first):
        return self.tokens[token_id]


class WordTokenizer(VocabTokenizer):
    """Whole words (`tokenizer.ggml.model == "word"`); see the module docstring."""

    model = "word"

    def __init__(self, tokens, token_types=None, *, lowercase: bool = False, pattern: str = r"\S+",
                 separator: str = " ", **kwargs):
        super().__init__(tokens, token_types, **kwargs)
        self.lowercase = bool(lowercase)
        self.separator = str(separator)
        try:
            self.pattern = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise TokenizerError(f"{self.source}: tokenizer.word.pattern {pattern!r} is not a valid regex: {e}") from None

    def _encode_plain(self, text, offset):
        if self.lowercase:
            text = text.lower()
        return [self._lookup(m.group(), offset + m.start(), "word") for m in self.pattern.finditer(text)]

    def _piece(self, token_id, first):
        return self.tokens[token_id] if first else self.separator + self.tokens[token_id]


class IncrementalDecoder:
    """Text of a stream of ids, one id at a time; `add` returns the text this id adds and the
    concatenation of all `add` results plus `flush()` equals `decode` with the same options."""

    def __init__(self, tokenizer: VocabTokenizer, skip_special_tokens: bool = False,
                 strip_leading_space: bool | None = None):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._first = strip_leading_space is None or bool(strip_leading_space)

    def add(self, token_id: int) -> str:
        return self.add_checked(self._tokenizer._check_id(token_id))

    def add_checked(self, token_id: int) -> str:
        """`add` for an id already checked against the vocabulary (an int in range)."""
        tok = self._tokenizer
        if self._skip_special and tok.token_types[token_id] in SPECIAL_TYPES:
            return ""
        text = tok._piece(token_id, self._first)
        self._first = False
        return text

    def flush(self) -> str:
        """Nothing is ever held back (tokens are whole characters or words)."""
        return ""


def tokenizer_from_gguf(f) -> VocabTokenizer:
    """The CharTokenizer or WordTokenizer of an LSTM GGUF (tokenizer.ggml.model "char" / "word")."""
    return VocabTokenizer.from_gguf(f)
