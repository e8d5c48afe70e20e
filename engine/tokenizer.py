"""The tokenizer, built from a GGUF file's `tokenizer.ggml.*` metadata (or a HF tokenizer.json).

Encoding runs in HF `tokenizers` (Rust): we build its pipeline directly from the GGUF vocab, with
the pre-tokenizer regexes llama.cpp uses for the file's `tokenizer.ggml.pre`, so encodings equal
llama.cpp's. Decoding is ours: every token id maps to the bytes it stands for (a byte-level BPE
token's characters mapped back through the GPT-2 byte table, a SentencePiece piece with "▁" as a
space, a `<0xNN>` byte token as that byte), and text is the UTF-8 decoding of their concatenation
with invalid bytes replaced by U+FFFD, as llama.cpp's detokenizer yields bytes. The same table
drives `IncrementalDecoder`, so streamed text always concatenates to `decode()`.

Three vocab families (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE with ranked `tokenizer.ggml.merges` (GPT-2, SmolLM, Llama 3, Qwen2...).
- "llama": SentencePiece-style (Llama 2, TinyLlama, Mistral): pieces with "▁" for spaces, a "▁"
  put before the text and after each special token (`add_space_prefix`, as llama.cpp does; HF's
  newer Metaspace pipeline skips it when the text already starts with a space), `<0xNN>` byte
  tokens for characters missing from the vocab, and scores.
  llama.cpp repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece;
  we express that as ranked BPE merges (every split of a piece into two pieces, ranked by the
  piece's score), which is how HF converts SentencePiece models too.

- "bert": WordPiece (BERT encoders), stored in llama.cpp's phantom-space form ("▁word" starts a
  word, "piece" continues one); rebuilt as HF's WordPiece with BERT's normalizer (`_wordpiece`).

Token types (`tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control and unknown tokens are matched in text only with `parse_special=True`
(as llama.cpp's `special` flag); user-defined tokens are always matched. `find_special_tokens`
says where a text holds control-token text (lmengine.chat uses it to keep message contents
plain text).

Text to encode must be a str that UTF-8 can write (no lone surrogates): TokenizerError otherwise,
naming the position. Metadata values of the wrong type are a TokenizerError naming the key.
"""
from __future__ import annotations

import codecs
import json
import numbers
import os
import re
import threading
from typing import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .errors import TokenizerError
from .vocab import (  # noqa: F401  (the token types are part of this module's interface)
    PARSED_SPECIAL_TYPES,
    SPECIAL_TYPES,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    Vocabulary,
    all_of_type,
    check_text,
    not_normal_ids,
    special_token_id,
)

SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's visible space

# -- pre-tokenizer regexes, per `tokenizer.ggml.pre` (as llama.cpp's llama-vocab.cpp lists them) ---
# Each regex splits every piece the previous one produced; matches and the text between them both
# become pieces (HF `Split(..., "isolated")`), then BPE runs on each piece separately.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "default": _DEFAULT,
    "gpt2": [_GPT2], "gpt-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2], "exaone": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "dbrx": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2],
}
# llama.cpp matches its Llama 3 pre-tokenizer pieces against the vocab before merging.
_IGNORE_MERGES_PRE = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")

# Control tokens that end a turn in common chat formats (llama.cpp's end-of-generation list).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
                      "<end_of_turn>", "<|end_of_text|>", "<EOT>", "<|return|>")

_BYTE_TOKEN_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabs.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) are moved to U+0100 onwards in byte order, so "Ġ" (U+0120) is the space byte.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, n_moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n_moved)
            n_moved += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_to_char()
# str.translate table: byte-level character -> the Latin-1 character of its byte.
_CHAR_TO_LATIN1 = {ord(c): chr(b) for b, c in _BYTE_TO_CHAR.items()}
# The same as a table over code points 0 .. 0x143 (the highest byte-level character) and one past
# it: the byte a character stands for; a Latin-1 character outside the table stands for its own
# byte (as str.translate + encode("latin-1") treat it); -1 for a character with no byte.
_LATIN1_OF_POINT = np.array([ord(_CHAR_TO_LATIN1.get(p, chr(p))) if p < 256 or p in _CHAR_TO_LATIN1 else -1
                             for p in range(max(_CHAR_TO_LATIN1) + 2)], dtype=np.int16)


class Tokenizer(Vocabulary):
    """Text <-> token ids for one model. Build with `from_gguf`, `from_metadata` or `from_pretrained_dir`.
    The vocabulary lookups (vocab_size, bos_id, eot_ids, id_to_token, ...) are `Vocabulary`'s."""

    def __init__(self, hf: HFTokenizer, *, tokens: Sequence[str], token_types: Sequence[int],
                 model: str, pre: str | None, bos_id: int | None, eos_id: int | None,
                 unk_id: int | None = None, pad_id: int | None = None, add_bos: bool = False,
                 add_eos: bool = False, add_space_prefix: bool = False,
                 extra_eot_ids: Iterable[int] = (), chat_template: str | None = None,
                 source: str = "<tokenizer>", token_to_id: dict[str, int] | None = None):
        super().__init__(tokens, token_types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
                         add_bos=add_bos, add_eos=add_eos, extra_eot_ids=extra_eot_ids, source=source,
                         token_to_id=token_to_id)
        # A turn also ends at the chat formats' end-of-turn control tokens (<|im_end|>, <|eot_id|>...).
        self._eot_ids |= {i for i in map(self.token_to_id, END_OF_TURN_TOKENS)
                          if i is not None and self.token_types[i] == TOKEN_CONTROL}
        self._hf = hf
        self._hf_literal = None           # clone that treats control tokens as text (parse_special=False)
        self._literal_lock = threading.Lock()
        self.model = model                # "gpt2" (byte-level BPE) | "llama" (SentencePiece-style)
        self.pre = pre                    # tokenizer.ggml.pre, when known
        self.add_space_prefix = bool(add_space_prefix)
        self.chat_template = chat_template
        unusual = not_normal_ids(self.token_types)
        self._pieces = self._piece_bytes(unusual)                # id -> bytes it decodes to
        self._pieces_no_special = list(self._pieces)
        for i in unusual:
            if self.token_types[i] in SPECIAL_TYPES:
                self._pieces_no_special[i] = b""
        # first characters of the texts parse_special matches: a text without any holds none
        self._special_first_chars = frozenset(
            self.tokens[i][0] for i in unusual if self.token_types[i] in PARSED_SPECIAL_TYPES and self.tokens[i])

    # -- construction (from_gguf is Vocabulary's) ------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: Mapping, source: str = "<metadata>") -> "Tokenizer":
        """The tokenizer described by GGUF `tokenizer.ggml.*` keys in `meta` (key -> value)."""
        def need(key, types):
            if key not in meta:
                raise TokenizerError(f"{source}: metadata key {key!r} is missing; it is needed to build the tokenizer")
            value = meta[key]
            if not isinstance(value, types):
                raise TokenizerError(f"{source}: metadata key {key!r} should be {types}, found {type(value).__name__}")
            return value

        model = need("tokenizer.ggml.model", str)
        if model not in ("gpt2", "llama", "bert"):
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2', 'llama', 'bert')")
        tokens = list(need("tokenizer.ggml.tokens", (list, tuple)))
        n_vocab = len(tokens)
        if n_vocab == 0:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is empty")
        if not all_of_type(tokens, str):
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens must hold strings")
        if "tokenizer.ggml.token_type" in meta:
            types = need("tokenizer.ggml.token_type", (list, tuple))
            if not all_of_type(types, numbers.Integral, exclude=bool):
                raise TokenizerError(f"{source}: metadata key 'tokenizer.ggml.token_type' should hold integers")
            types = list(types) if all_of_type(types, int) else [int(t) for t in types]
            if len(types) != n_vocab:
                raise TokenizerError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries "
                                     f"but tokenizer.ggml.tokens has {n_vocab}")
        elif model == "llama":  # no types: recognise the <0xNN> byte tokens by their text
            types = [TOKEN_BYTE if _BYTE_TOKEN_RE.match(t) else TOKEN_NORMAL for t in tokens]
        else:
            types = [TOKEN_NORMAL] * n_vocab

        def token_id(name):
            return special_token_id(meta, f"tokenizer.ggml.{name}_token_id", n_vocab, source)

        bos_id, eos_id, unk_id, pad_id = (token_id(name) for name in ("bos", "eos", "unknown", "padding"))
        extra_eot = [token_id("eot"), token_id("eom")]
        def flag(key, default):
            value = meta.get(key, default)
            if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
                return bool(value)
            raise TokenizerError(f"{source}: metadata key {key!r} should be a bool, found {value!r}")

        default_bos = model in ("llama", "bert")  # llama.cpp's defaults when the file does not say
        add_bos = flag("tokenizer.ggml.add_bos_token", default_bos)
        add_eos = flag("tokenizer.ggml.add_eos_token", model == "bert")   # bert: [CLS] text [SEP]
        if model == "bert":   # llama.cpp's bert files may name [CLS]/[SEP] only as cls/seperator ids
            bos_id = bos_id if bos_id is not None else token_id("cls")
            eos_id = eos_id if eos_id is not None else token_id("seperator")
        add_space_prefix = flag("tokenizer.ggml.add_space_prefix", model == "llama")
        chat_template = meta.get("tokenizer.chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"{source}: metadata key 'tokenizer.chat_template' should be a string, "
                                 f"found {type(chat_template).__name__}")

        pre = None
        token_to_id = {t: i for i, t in enumerate(tokens)}     # a repeated text: its last id
        if model == "gpt2":
            pre = meta.get("tokenizer.ggml.pre", "default")
            if not isinstance(pre, str):
                raise TokenizerError(f"{source}: metadata key 'tokenizer.ggml.pre' should be a string, "
                                     f"found {type(pre).__name__}")
            merges = need("tokenizer.ggml.merges", (list, tuple))
            hf = _byte_level_bpe(token_to_id, merges, pre, source)
        elif model == "bert":
            hf = _wordpiece(tokens, types, unk_id, source)
        else:
            scores = need("tokenizer.ggml.scores", (list, tuple))
            if len(scores) != n_vocab:
                raise TokenizerError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries "
                                     f"but tokenizer.ggml.tokens has {n_vocab}")
            if not all_of_type(scores, numbers.Real, exclude=bool):
                raise TokenizerError(f"{source}: metadata key 'tokenizer.ggml.scores' should hold numbers")
            hf = _sentencepiece_bpe(tokens, token_to_id, types, scores, unk_id, add_space_prefix, source)
        _add_special_tokens(hf, tokens, types)
        _set_post_processor(hf, tokens, bos_id if add_bos else None, eos_id if add_eos else None)
        return cls(hf, tokens=tokens, token_types=types, model=model, pre=pre, bos_id=bos_id,
                   eos_id=eos_id, unk_id=unk_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos,
                   add_space_prefix=add_space_prefix, extra_eot_ids=extra_eot,
                   chat_template=chat_template, source=source, token_to_id=token_to_id)

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load what `save_pretrained` wrote (a HF tokenizer.json + tokenizer_config.json)."""
        path = os.fspath(path)
        json_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(json_path):
            raise TokenizerError(f"{path}: no tokenizer.json in this directory")
        try:
            with open(json_path, encoding="utf-8") as fh:
                spec = json.load(fh)
            hf = HFTokenizer.from_file(json_path)
        except Exception as e:  # OSError, JSON errors, and tokenizers' own (plain Exception)
            raise TokenizerError(f"{json_path}: cannot be read as a HF tokenizer: {e}") from e
        config = {}
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as fh:
                    config = json.load(fh)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{config_path}: not valid JSON: {e}") from e

        model_spec = spec.get("model") or {}
        if model_spec.get("type") != "BPE":
            raise TokenizerError(f"{json_path}: model type {model_spec.get('type')!r} is not supported (only BPE)")
        byte_fallback = bool(model_spec.get("byte_fallback"))
        normalizer_json = json.dumps(spec.get("normalizer"), ensure_ascii=False)
        pre_json = json.dumps(spec.get("pre_tokenizer"), ensure_ascii=False)
        spiece = byte_fallback or "Metaspace" in pre_json or SPIECE_SPACE in normalizer_json
        model = "llama" if spiece else "gpt2"

        id_of = hf.get_vocab(with_added_tokens=True)
        n_vocab = max(id_of.values()) + 1
        tokens = [None] * n_vocab
        for text, i in id_of.items():
            tokens[i] = text
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            raise TokenizerError(f"{json_path}: the vocab has no token for ids {missing[:5]} (size {n_vocab})")
        unk_text = _config_token(config.get("unk_token")) or model_spec.get("unk_token")
        types = [TOKEN_NORMAL] * n_vocab
        if byte_fallback:
            for i, t in enumerate(tokens):
                if _BYTE_TOKEN_RE.match(t):
                    types[i] = TOKEN_BYTE
        for added in spec.get("added_tokens", []):
            i = added["id"]
            if added.get("special"):
                is_unk = model == "llama" and added["content"] == unk_text
                types[i] = TOKEN_UNKNOWN if is_unk else TOKEN_CONTROL
            else:
                types[i] = TOKEN_USER_DEFINED

        def config_id(key):
            text = _config_token(config.get(key))
            return id_of.get(text) if text is not None else None

        bos_id, eos_id = config_id("bos_token"), config_id("eos_token")
        add_bos = config.get("add_bos_token")
        add_eos = config.get("add_eos_token")
        post = json.dumps(spec.get("post_processor"))
        if add_bos is None:
            add_bos = bos_id is not None and post.find(json.dumps(tokens[bos_id])) >= 0
        if add_eos is None:
            add_eos = False
        add_space_prefix = model == "llama" and (
            '"Prepend"' in normalizer_json or ("Metaspace" in pre_json and '"prepend_scheme": "never"' not in pre_json))
        return cls(hf, tokens=tokens, token_types=types, model=model, pre=config.get("gguf_pre"),
                   bos_id=bos_id, eos_id=eos_id, unk_id=id_of.get(unk_text) if unk_text else None,
                   pad_id=config_id("pad_token"), add_bos=bool(add_bos), add_eos=bool(add_eos),
                   add_space_prefix=add_space_prefix, chat_template=_config_template(config, config_path),
                   source=path)

    def save_pretrained(self, path: str | os.PathLike, tokenizer_class: str = "PreTrainedTokenizerFast") -> None:
        """Write tokenizer.json and tokenizer_config.json (HF format) into directory `path`.

        `tokenizer_class` goes into tokenizer_config.json. The default makes transformers run
        tokenizer.json as written; transformers 5 rebuilds e.g. "GPT2Tokenizer" with its own
        pre-tokenizer, which loses SmolLM's one-digit-per-token split.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._hf.save(os.path.join(path, "tokenizer.json"))
        def name(token_id):
            return self.tokens[token_id] if token_id is not None else None

        config = {
            "tokenizer_class": tokenizer_class,
            "bos_token": name(self._bos_id),
            "eos_token": name(self._eos_id),
            "unk_token": name(self._unk_id),
            "pad_token": name(self._pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
            "gguf_pre": self.pre,
            "added_tokens_decoder": {
                str(i): {"content": self.tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": self.token_types[i] != TOKEN_USER_DEFINED}
                for i, t in enumerate(self.token_types)
                if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)},
        }
        config = {k: v for k, v in config.items() if v is not None}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, ensure_ascii=False, indent=2)

    # -- encode ---------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the model (tokenizer.ggml.add_bos_token);
        `parse_special=True` turns control-token text such as "<|im_start|>" into that token."""
        check_text(text)
        hf = self._hf if parse_special else self._literal_hf()
        ids = hf.encode(text, add_special_tokens=False).ids
        return self.wrap(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     parse_special: bool = True) -> list[list[int]]:
        """`encode` over many texts (tokenizers runs them in parallel)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TokenizerError(f"encode_batch() takes a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            check_text(text, f"encode_batch() item {i}")
        hf = self._hf if parse_special else self._literal_hf()
        return [self.wrap(e.ids, add_bos) for e in hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str, parse_special: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, offsets) of `text` without BOS/EOS: offsets[i] = (start, end), the characters of
        `text` token i came from (tokens of one multi-byte character share its span)."""
        check_text(text, "encode_with_offsets()")
        hf = self._hf if parse_special else self._literal_hf()
        encoding = hf.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def find_special_tokens(self, text: str) -> list[tuple[int, int, int]]:
        """[(start, end, id)...]: where `text` holds the text of a control (or unknown) token, the
        text `parse_special=True` turns into that token. [] when it holds none."""
        check_text(text, "find_special_tokens()")
        if not any(c in text for c in self._special_first_chars):
            return []
        encoding = self._hf.encode(text, add_special_tokens=False)
        return [(start, end, i) for i, (start, end) in zip(encoding.ids, encoding.offsets)
                if self.token_types[i] in PARSED_SPECIAL_TYPES and text[start:end] == self.tokens[i]]

    def _literal_hf(self) -> HFTokenizer:
        """A copy of the pipeline that leaves control tokens' text as text (built on first use)."""
        if self._hf_literal is None:
            with self._literal_lock:
                if self._hf_literal is None:
                    clone = HFTokenizer.from_str(self._hf.to_str())
                    clone.encode_special_tokens = True  # special added tokens are not split out
                    self._hf_literal = clone
        return self._hf_literal

    # -- decode ---------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               strip_leading_space: bool | None = None) -> str:
        """Text of token ids. Invalid UTF-8 (e.g. half a character) becomes U+FFFD.

        `strip_leading_space=None` follows the model: SentencePiece vocabs that prepend "▁" when
        encoding drop one leading space (as HF does). Pass False when decoding a continuation.
        """
        pieces = self._pieces_no_special if skip_special_tokens else self._pieces
        data = b"".join([pieces[i] for i in self._check_ids(ids)])
        text = data.decode("utf-8", errors="replace")
        if self._strips(strip_leading_space) and text.startswith(" "):
            text = text[1:]
        return text

    def incremental_decoder(self, skip_special_tokens: bool = False,
                            strip_leading_space: bool | None = None) -> "IncrementalDecoder":
        """A decoder for a stream of token ids; see `IncrementalDecoder`."""
        return IncrementalDecoder(self, skip_special_tokens, strip_leading_space)

    def _strips(self, strip_leading_space: bool | None) -> bool:
        if strip_leading_space is None:
            return (self.model == "llama" and self.add_space_prefix) or self.model == "bert"
        return bool(strip_leading_space)

    def _piece_bytes(self, unusual: list[int]) -> list[bytes]:
        """id -> the bytes the token stands for (unusual: `not_normal_ids(self.token_types)`)."""
        if self.model == "gpt2":
            pieces = _byte_level_bytes(self.tokens)
        else:
            pieces = [text.replace(SPIECE_SPACE, " ").encode("utf-8") for text in self.tokens]
        for i in unusual:
            text, kind = self.tokens[i], self.token_types[i]
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_UNUSED, TOKEN_USER_DEFINED):
                pieces[i] = text.encode("utf-8")                # shown as written
            elif kind == TOKEN_BYTE and (m := _BYTE_TOKEN_RE.match(text)):
                pieces[i] = bytes([int(m.group(1), 16)])       # <0xNN>
        return pieces

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos={self._bos_id}, eos={self._eos_id}, add_bos={self.add_bos})")


class IncrementalDecoder:
    """Turns a stream of token ids into text, one id at a time.

    `add(id)` returns only complete characters: bytes of a character split across tokens are
    held until the character is whole (invalid bytes become U+FFFD, exactly as `decode` does).
    `flush()` returns what is held at the end. The concatenation of every `add` and the final
    `flush` equals `tokenizer.decode(ids)` with the same options. O(1) work per token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 strip_leading_space: bool | None = None):
        self._tokenizer = tokenizer
        self._pieces = tokenizer._pieces_no_special if skip_special_tokens else tokenizer._pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = tokenizer._strips(strip_leading_space)

    def add(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""
        piece = self._pieces[self._tokenizer._check_id(token_id)]
        return self._emit(self._utf8.decode(piece, final=False))

    def flush(self) -> str:
        """Text still held (an incomplete character at the end becomes U+FFFD); resets the state."""
        text = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return text

    def _emit(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text


def _byte_level_bytes(tokens: list[str]) -> list[bytes]:
    """The bytes of byte-level BPE tokens (each character stands for one byte: GPT-2's table); a
    token that is not one keeps its UTF-8 text. Done on the code points of all tokens at once, in
    NumPy (49k tokens: ~15 ms, against ~45 ms one token at a time)."""
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    points = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.uint32)
    values = _LATIN1_OF_POINT[np.minimum(points, len(_LATIN1_OF_POINT) - 1)]
    bad_before = np.concatenate(([0], np.cumsum(values < 0)))        # characters with no byte
    data = values.astype(np.uint8).tobytes()
    pieces = [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
    for i in np.flatnonzero(bad_before[ends] > bad_before[starts]).tolist():
        pieces[i] = tokens[i].encode("utf-8")
    return pieces


# -- building the HF pipelines ------------------------------------------------------------------
def _byte_level_bpe(vocab: dict[str, int], merges: Sequence[str], pre: str, source: str) -> HFTokenizer:
    if pre not in PRE_TOKENIZER_REGEXES:
        raise TokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZER_REGEXES))})")
    pairs = []
    for n, merge in enumerate(merges):
        left, sep, right = merge.partition(" ") if isinstance(merge, str) else ("", "", "")
        if not sep or not left or not right:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.merges[{n}] = {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES_PRE)
    except Exception as e:  # a merge naming a token that is not in the vocab
        raise TokenizerError(f"{source}: tokenizer.ggml.merges do not fit the vocab: {e}") from e
    hf = HFTokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _wordpiece(tokens: list[str], types: list[int], unk_id: int | None, source: str) -> HFTokenizer:
    """BERT's WordPiece from a GGUF vocab in llama.cpp's phantom-space form (a word-initial piece
    is "▁piece", a continuation is "piece"; converters/hf_encoder.py writes it): back to HF's
    "piece" / "##piece" form, with BERT's normalizer and pre-tokenizer. The GGUF does not say
    whether the model lowercases: a vocab without upper-case letters in its normal pieces is
    taken as uncased (lowercase, strip accents: bert-base-uncased, all-MiniLM), else as cased."""
    vocab: dict[str, int] = {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) or not text:
            piece = text
        elif text.startswith(SPIECE_SPACE):
            piece = text[len(SPIECE_SPACE):]
        else:
            piece = "##" + text
        vocab.setdefault(piece, i)
    unk = tokens[unk_id] if unk_id is not None else "[UNK]"
    if unk not in vocab:
        raise TokenizerError(f"{source}: a bert vocab needs an unknown token (tokenizer.ggml.unknown_token_id)")
    uncased = not any(t != t.lower() for t, k in zip(tokens, types) if k == TOKEN_NORMAL)
    try:
        hf = HFTokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    except Exception as e:
        raise TokenizerError(f"{source}: cannot build the WordPiece vocab: {e}") from e
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                               lowercase=uncased)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    return hf


def _sentencepiece_bpe(tokens: list[str], vocab: dict[str, int], types: list[int], scores: Sequence[float],
                       unk_id: int | None, add_space_prefix: bool, source: str) -> HFTokenizer:
    merges = _merges_from_scores(tokens, types, scores)
    unk = tokens[unk_id] if unk_id is not None else None
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise TokenizerError(f"{source}: cannot build the SentencePiece vocab: {e}") from e
    hf = HFTokenizer(bpe)
    # Spaces become "▁" and, as llama.cpp does, a "▁" goes before the text and again after each
    # special token (normalizers run on each stretch of text between added tokens). The whole
    # stretch is one BPE word: SentencePiece does not pre-split.
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    hf.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(steps)
    return hf


def _merges_from_scores(tokens: list[str], types: list[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Ranked BPE merges equivalent to SentencePiece's score-driven merging.

    Every way of writing a normal piece as two normal pieces is a merge; merges of higher-scoring
    pieces come first (ties: the lower piece id, then the shorter left part).
    """
    normal = {t: i for i, t in enumerate(tokens) if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[i]), i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special added tokens (matched in text when parse_special),
    user-defined ones plain added tokens (always matched, as llama.cpp does)."""
    unusual = not_normal_ids(types)
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in unusual if types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN) and tokens[i]]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in unusual if types[i] == TOKEN_USER_DEFINED and tokens[i]]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)


def _set_post_processor(hf: HFTokenizer, tokens: list[str], bos_id: int | None, eos_id: int | None) -> None:
    """BOS/EOS as HF tools (transformers, onnxruntime-genai) add them when reading tokenizer.json.
    Our own `encode` adds them itself and calls HF with add_special_tokens=False."""
    if bos_id is None and eos_id is None:
        return
    def template(type_id: int) -> str:
        bos = f"{tokens[bos_id]}:{type_id} " if bos_id is not None else ""
        eos = f" {tokens[eos_id]}:{type_id}" if eos_id is not None else ""
        return f"{bos}${'AB'[type_id]}:{type_id}{eos}"
    specials = [(tokens[i], i) for i in sorted({bos_id, eos_id} - {None})]
    hf.post_processor = processors.TemplateProcessing(
        single=template(0), pair=f"{template(0)} {template(1)}",
        special_tokens=specials)


def _config_template(config: dict, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the
    one named "default" is used)."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{where}: chat_template should be a string, found {type(value).__name__}")
    return value


def _config_token(value) -> str | None:
    """A token in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
