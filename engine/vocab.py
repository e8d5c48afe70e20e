"""The part of a tokenizer that is only the vocabulary: shared by both tokenizer families.

`Vocabulary` is the base class of `lmengine.tokenizer.Tokenizer` (BPE vocabularies, from GGUF or
a HF tokenizer.json) and `lmengine.lstm_tokenizer.VocabTokenizer` (the character and word
vocabularies of LSTM models). It holds what they have in common:

- `tokens` (id -> text as stored) and `token_types` (id -> one of the TOKEN_* types below);
- the special ids (BOS, EOS, unknown, padding), whether encode adds BOS / EOS, and the ids that
  end a turn (`eot_ids`: EOS plus whatever the subclass adds);
- the lookups: vocab_size, token_to_id, id_to_token, is_special, bos_token, eos_token.

Token ids given to it are checked by `lmengine.validation` (`_check_id`, `_check_ids`). Subclasses add encoding and decoding.

Token types (llama.cpp's llama_token_type, GGUF `tokenizer.ggml.token_type`): 1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.

Text to encode is checked by `check_text`: a str that can be written as UTF-8 (a lone surrogate
such as "\ud800", which `surrogateescape` decoding produces from invalid bytes, cannot).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

from .errors import TokenIdError, TokenizerError
from .validation import check_token_id, check_token_ids

TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6
SPECIAL_TYPES = (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_UNUSED)  # dropped by skip_special_tokens
PARSED_SPECIAL_TYPES = (TOKEN_CONTROL, TOKEN_UNKNOWN)        # matched in text only with parse_special


def all_of_type(values: Iterable, kind: type, exclude: type | tuple = ()) -> bool:
    """Every value is an instance of `kind` (an ABC such as numbers.Integral too) and of none of
    `exclude`. Tested on the set of the values' types: a 49k-entry GGUF array is checked at each
    load in ~2 ms, against 20-300 ms for an isinstance per value."""
    return all(issubclass(t, kind) and not issubclass(t, exclude) for t in set(map(type, values)))


def not_normal_ids(token_types: Sequence[int]) -> list[int]:
    """The ids whose type is not TOKEN_NORMAL: the few special, byte and user-defined tokens,
    which per-type tables visit instead of the whole vocabulary."""
    return [i for i, kind in enumerate(token_types) if kind != TOKEN_NORMAL]


_NO_TOKEN = 0xFFFFFFFF   # llama.cpp writes -1 as a u32 for "no such token"
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text, what: str = "encode()") -> str:
    """text, when it is a str that can be encoded as UTF-8; TokenizerError saying what is wrong
    (not a str; a lone surrogate, with its position) otherwise."""
    if not isinstance(text, str):
        raise TokenizerError(f"{what} takes a str, got {type(text).__name__}")
    if not text.isascii():
        bad = _SURROGATE.search(text)
        if bad is not None:
            raise TokenizerError(
                f"{what}: the text holds a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}, "
                f"which is not a Unicode character and cannot be encoded as UTF-8 (text decoded with "
                f"errors='surrogateescape' carries these for invalid bytes: decode with errors='replace')")
    return text


def special_token_id(meta: Mapping, key: str, n_vocab: int, source: str) -> int | None:
    """The special token id under GGUF metadata `key` (e.g. "tokenizer.ggml.bos_token_id"):
    None when the key is absent, negative or 0xFFFFFFFF (llama.cpp's "none"); a TokenizerError
    naming the file and the key when it is not an integer or outside the vocabulary."""
    value = meta.get(key)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None or (is_int and (value < 0 or value == _NO_TOKEN)):
        return None
    try:
        return check_token_id(value, n_vocab, what=key)
    except TokenIdError as e:
        raise TokenizerError(f"{source}: {e}") from None


class Vocabulary:
    """Token texts and types, special ids and the lookups over them (see the module docstring).

    tokens: id -> text. token_types: id -> TOKEN_* (None: all normal). bos_id / eos_id / unk_id /
    pad_id: special ids or None. add_bos / add_eos: whether `encode` adds them by default.
    extra_eot_ids: ids besides EOS that end a turn. source: names the vocabulary in messages.
    token_to_id: `{text: id for id, text in enumerate(tokens)}` when the caller has built it
    already (the tokenizer's BPE vocab), so it is built once.
    """

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int] | None = None, *,
                 bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 extra_eot_ids: Iterable[int] = (), source: str = "<vocabulary>",
                 token_to_id: dict[str, int] | None = None):
        self.tokens = list(tokens)
        n = len(self.tokens)
        self.token_types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * n
        self.source = source
        if len(self.token_types) != n:
            raise TokenizerError(f"{source}: {n} tokens but {len(self.token_types)} token types")
        self._bos_id, self._eos_id, self._unk_id, self._pad_id = (
            self._checked_special(name, value) for name, value in
            (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id), ("padding", pad_id)))
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        for flag, name, value in ((self.add_bos, "bos", self._bos_id), (self.add_eos, "eos", self._eos_id)):
            if flag and value is None:
                raise TokenizerError(f"{source}: add_{name}_token is set but the vocab has no {name.upper()} token")
        # a repeated text: its last id (a subclass may pass the same dict, built once)
        self._token_to_id = token_to_id if token_to_id is not None else {t: i for i, t in enumerate(self.tokens)}
        eot = {self._checked_special("end-of-turn", i) for i in extra_eot_ids if i is not None}
        self._eot_ids = frozenset(eot | ({self._eos_id} if self._eos_id is not None else set()))

    def _checked_special(self, name: str, value) -> int | None:
        if value is None:
            return None
        try:
            return self._check_id(value, f"{name} token id")
        except TokenIdError as e:
            raise TokenizerError(f"{self.source}: {e}") from None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f):
        """The tokenizer of an open `lmengine.converters.gguf_file.GGUFFile`."""
        return cls.from_metadata(f.metadata, source=getattr(f, "path", "<gguf>"))

    @classmethod
    def from_metadata(cls, meta: Mapping, source: str = "<metadata>"):
        raise NotImplementedError

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
        """Ids that end a turn: EOS, plus the end-of-turn tokens the tokenizer knows of."""
        return self._eot_ids

    @property
    def bos_token(self) -> str:
        return self.tokens[self._bos_id] if self._bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.tokens[self._eos_id] if self._eos_id is not None else ""

    # -- lookups --------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        """The id of a vocab entry (exact text as stored, e.g. "Ġthe" or "▁the"); None if absent."""
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocab entry of an id, as stored."""
        return self.tokens[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        """Control, unknown and unused tokens: the ones `skip_special_tokens` drops."""
        return self.token_types[self._check_id(token_id)] in SPECIAL_TYPES

    def _check_id(self, token_id, what: str = "token id") -> int:
        """token_id as an int, checked against this vocabulary (TokenIdError otherwise)."""
        return check_token_id(token_id, len(self.tokens), what)

    def _check_ids(self, token_ids: Iterable[int]) -> list[int]:
        """token_ids as a list of ints, checked against this vocabulary (TokenIdError otherwise)."""
        return check_token_ids(token_ids, len(self.tokens)).tolist()

    # -- encoding helpers -----------------------------------------------------------------------
    def wrap(self, ids: list[int], add_bos: bool | None = None) -> list[int]:
        """ids with BOS in front (add_bos, or the vocabulary's default when None) and EOS at the
        end when the vocabulary adds it: what `encode` does around the ids of the text."""
        if self.add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos requested but the vocab has no BOS token")
            ids = [self._bos_id] + ids
        if self.add_eos:
            ids = ids + [self._eos_id]
        return ids
