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
is a TokenizerError naming it otherwise. The methods mirror engine.tokenizer.Tokenizer.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

from .errors import TokenIdError, TokenizerError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 2, 3, 4, 5
SPECIAL_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_UNUSED)   # dropped by skip_special_tokens
MATCHED_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL)                 # matched in text by parse_special
MODELS = ("char", "word")


class VocabTokenizer:
    """Shared part of the char and word tokenizers: the vocabulary, special tokens, ids."""

    model = ""

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int] | None = None, *,
                 bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, source: str = "<vocabulary>"):
        self.tokens = list(tokens)
        self.token_types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * len(self.tokens)
        self.source = source
        if len(self.token_types) != len(self.tokens):
            raise TokenizerError(f"{source}: {len(self.tokens)} tokens but {len(self.token_types)} token types")
        self._token_to_id = {}
        for i, t in enumerate(self.tokens):
            if not isinstance(t, str) or not t:
                raise TokenizerError(f"{source}: token {i} is {t!r}; tokens must be non-empty strings")
            self._token_to_id.setdefault(t, i)
        for name, value in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id), ("padding", pad_id)):
            if value is not None and not 0 <= value < len(self.tokens):
                raise TokenizerError(f"{source}: {name} token id {value} is outside the vocab [0, {len(self.tokens)})")
        self._bos_id, self._eos_id, self._unk_id, self._pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = bool(add_bos)
        if self.add_bos and bos_id is None:
            raise TokenizerError(f"{source}: add_bos_token is set but the vocab has no BOS token")
        self._eot_ids = frozenset([eos_id] if eos_id is not None else [])
        matched = sorted((t for t, k in zip(self.tokens, self.token_types) if k in MATCHED_TYPES),
                         key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, matched))) if matched else None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f) -> "VocabTokenizer":
        return cls.from_metadata(f.metadata, f.path)

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
        if types is not None and (not isinstance(types, list) or len(types) != len(tokens)):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type should list {len(tokens)} types")

        def token_id(key):
            value = meta.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TokenizerError(f"{source}: {key} should be an integer, found {value!r}")
            return value

        common = dict(bos_id=token_id("tokenizer.ggml.bos_token_id"), eos_id=token_id("tokenizer.ggml.eos_token_id"),
                      unk_id=token_id("tokenizer.ggml.unknown_token_id"),
                      pad_id=token_id("tokenizer.ggml.padding_token_id"),
                      add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), source=source)
        if model == "char":
            return CharTokenizer(tokens, types, **common)
        return WordTokenizer(tokens, types, lowercase=bool(meta.get("tokenizer.word.lowercase", False)),
                             pattern=meta.get("tokenizer.word.pattern", r"\S+"),
                             separator=meta.get("tokenizer.word.separator", " "), **common)

    # -- properties -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def eot_ids(self) -> frozenset:
        """Ids that end generation: the EOS token, when the vocabulary has one."""
        return self._eot_ids

    @property
    def bos_token(self) -> str:
        return self.tokens[self._bos_id] if self._bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.tokens[self._eos_id] if self._eos_id is not None else ""

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str:
        self._check_id(token_id)
        return self.tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        """Control, unknown and unused tokens: the ones `skip_special_tokens` drops."""
        self._check_id(token_id)
        return self.token_types[token_id] in SPECIAL_TYPES

    def _check_id(self, token_id) -> None:
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise TokenIdError(f"token id {token_id!r} is not an integer")
        if not 0 <= token_id < len(self.tokens):
            raise TokenIdError(f"token id {int(token_id)} is outside the vocab [0, {len(self.tokens)})")

    # -- encode ---------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the model (tokenizer.ggml.add_bos_token);
        `parse_special=True` turns special-token text such as "<eos>" into that token."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        ids = []
        pos = 0
        if parse_special and self._special_re is not None:
            for m in self._special_re.finditer(text):
                ids += self._encode_plain(text[pos:m.start()], pos)
                ids.append(self._token_to_id[m.group()])
                pos = m.end()
        ids += self._encode_plain(text[pos:], pos)
        if self.add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos requested but the vocab has no BOS token")
            ids.insert(0, self._bos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     parse_special: bool = True) -> list[list[int]]:
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
        return "".join([decoder.add(i) for i in ids]) + decoder.flush()

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
        tok = self._tokenizer
        tok._check_id(token_id)
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
