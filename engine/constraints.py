"""Structured output: constrain a request's tokens to a JSON schema, a regex or a Lark grammar.

Built on llguidance (the constrained-decoding library vLLM and SGLang use): given a grammar and
the model's token byte table, its `LLMatcher` computes, at each step, which tokens can extend
the output so that it can still match the grammar (a bitmask, one bit per token, about 15-75 us
for a JSON schema over SmolLM2's 49,152 tokens). The sampler sets the logits of every other
token to -inf, so whatever the sampler then draws keeps the output valid. End-of-sequence tokens
are allowed exactly when the output so far is a complete match.

Three layers, each used by one caller:

- `grammar_for(field, value)` and `check_grammar(field, grammar)`: a SamplingParams constraint
  field -> llguidance grammar text, and its validation without any tokenizer (params.py calls
  these, so an invalid schema/regex/grammar fails when the SamplingParams is built).
- `ConstraintCompiler`: one per LLM. Builds the llguidance tokenizer from the model's
  vocabulary once (on the first constrained request: about 1.5 s for 49k tokens) and compiles a
  grammar into a `Constraint` (compiled grammars are cached, so n > 1 samples and repeated
  schemas cost a copy).
- `Constraint`: one per sequence (SamplerState holds it): `fill_mask` for the next step,
  `consume` for the sampled token, `reset` (rewind replays the kept tokens), deep copies.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import InvalidParameterError

# The four SamplingParams fields that set a constraint; at most one may be set.
CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar", "json_object")

# JSON-schema compile options: no free whitespace between JSON tokens (compact JSON, "," and ":"
# separators). With flexible whitespace a sampling model can emit whitespace forever, which is
# valid JSON-in-progress and never ends. A schema's "x-guidance" key can override this, e.g.
# {"x-guidance": {"whitespace_flexible": true}}.
JSON_DEFAULTS = {"whitespace_flexible": False}

# The grammar of `json_object=True`: any JSON object (OpenAI's response_format json_object).
ANY_JSON_OBJECT = {"type": "object"}

# llguidance marks special (control) tokens with this leading byte in the token table: they are
# never produced by the grammar's text, only EOS is allowed, at the end.
_SPECIAL_PREFIX = b"\xff"

_CACHE_SIZE = 32     # compiled grammars kept per LLM


def _llguidance():
    """The llguidance module (imported on first use: requests without constraints never load it)."""
    try:
        import llguidance
    except ImportError as e:   # an optional dependency: the `structured` (and `server`) extra
        raise InvalidParameterError(
            "structured output (json_schema, regex, grammar, json_object) needs the llguidance "
            f'package: pip install "lmengine[structured]" ({e})') from None
    return llguidance


# ---------------------------------------------------------------------------------------------
# Field value -> grammar text, validated without a tokenizer (used by SamplingParams)
# ---------------------------------------------------------------------------------------------

def normalize_json_schema(value: Any) -> str:
    """A json_schema field value (a dict, or its JSON text) as compact JSON text of an object;
    InvalidParameterError naming the field otherwise. Key order is kept (it is the order in
    which the model writes the properties)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidParameterError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise InvalidParameterError(
            f"json_schema must be a JSON schema object (a dict or its JSON text), got {type(value).__name__}")
    try:
        return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidParameterError(f"json_schema cannot be written as JSON: {e}") from None


def grammar_for(field: str, value: Any) -> str:
    """The llguidance grammar of a constraint field's (normalised) value."""
    llg = _llguidance()
    if field == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(value, defaults=JSON_DEFAULTS)
    if field == "json_object":
        return llg.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_DEFAULTS)
    if field == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    if field == "grammar":
        return llg.LLMatcher.grammar_from_lark(value)
    raise InvalidParameterError(f"not a constraint field: {field!r}")


@lru_cache(maxsize=256)
def check_grammar(field: str, grammar: str) -> None:
    """InvalidParameterError naming `field` and llguidance's message when `grammar` is invalid
    (a schema keyword it does not know, a regex that does not parse, a Lark rule that is not
    defined...). Cached: SamplingParams.replace re-validates its fields."""
    llg = _llguidance()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidParameterError(f"{field} is not valid: {messages[0].strip() if messages else 'unknown error'}")


# ---------------------------------------------------------------------------------------------
# The model's token table
# ---------------------------------------------------------------------------------------------

def token_byte_table(tokenizer, vocab_size: int) -> list[bytes]:
    """id -> the bytes the token adds to the output, for `vocab_size` ids (ids the tokenizer
    does not know: b"", never allowed). Special tokens (control, unknown, unused) carry
    llguidance's 0xFF marker. BPE tokenizers (`lmengine.tokenizer.Tokenizer`) and character
    vocabularies are supported; a word vocabulary, whose tokens' bytes depend on their position
    (a separator before all but the first), is not."""
    from .vocab import SPECIAL_TYPES
    pieces = getattr(tokenizer, "_pieces", None)       # Tokenizer: id -> decoded bytes
    if pieces is None:
        if getattr(tokenizer, "model", None) != "char":
            raise InvalidParameterError(
                f"structured output is not supported for this model's tokenizer ({type(tokenizer).__name__}, "
                f"model {getattr(tokenizer, 'model', None)!r}): its tokens have no fixed byte string")
        pieces = [t.encode("utf-8") for t in tokenizer.tokens]
    table = []
    for i in range(vocab_size):
        if i >= len(pieces):
            table.append(b"")
        elif tokenizer.token_types[i] in SPECIAL_TYPES:
            table.append(_SPECIAL_PREFIX + tokenizer.tokens[i].encode("utf-8"))
        else:
            table.append(bytes(pieces[i]))
    return table


class _TokenizerAdapter:
    """What llguidance's TokenizerWrapper reads: the token table, EOS/BOS ids, the special ids,
    and a call that tokenizes a str (used for the grammar's literal strings)."""

    def __init__(self, tokenizer, table: list[bytes], eos_id: int | None) -> None:
        from .vocab import SPECIAL_TYPES
        self._tokenizer = tokenizer
        self.tokens = table
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, k in enumerate(tokenizer.token_types[:len(table)]) if k in SPECIAL_TYPES]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):    # llguidance probes with bytes: say we take str only
            raise TypeError("str only")
        try:
            return [int(t) for t in self._tokenizer.encode(text, add_bos=False, parse_special=False)]
        except Exception:                # a character the vocabulary lacks: no canonical tokens
            return []


# ---------------------------------------------------------------------------------------------
# Per LLM: the llguidance tokenizer and compiled grammars
# ---------------------------------------------------------------------------------------------

class ConstraintCompiler:
    """Compiles constraints for one model. tokenizer: the LLM's tokenizer; vocab_size: logits
    width; eos_token_ids: the ids that end generation (allowed when the grammar is complete).
    The llguidance tokenizer is built on the first `compile` (about 1.5 s for a 49k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = sorted(int(t) for t in eos_token_ids)
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()    # grammar text -> compiled LLMatcher

    @property
    def ll_tokenizer(self):
        """The llguidance LLTokenizer of this model (built once, thread-safe)."""
        if self._ll_tokenizer is None:
            with self._lock:
                if self._ll_tokenizer is None:
                    llg = _llguidance()
                    if not self.eos_token_ids:
                        raise InvalidParameterError(
                            "structured output needs an end-of-sequence token; this model's tokenizer has none")
                    table = token_byte_table(self.tokenizer, self.vocab_size)
                    adapter = _TokenizerAdapter(self.tokenizer, table, self.eos_token_ids[0])
                    self._ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(adapter), n_vocab=self.vocab_size,
                                                         eos_token=self.eos_token_ids)
        return self._ll_tokenizer

    def compile(self, field: str, grammar: str) -> "Constraint":
        """A fresh Constraint (at the start of the output) for `grammar`, the text `grammar_for`
        made from SamplingParams field `field`. InvalidParameterError naming the field when
        llguidance rejects it for this vocabulary."""
        llg = _llguidance()
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
        if template is None:
            template = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            if template.is_error():
                raise InvalidParameterError(f"{field} is not valid for this model: {template.get_error().strip()}")
            with self._lock:
                self._cache[grammar] = template
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return Constraint(template.deep_copy(), field, self.vocab_size)


# ---------------------------------------------------------------------------------------------
# Per sequence
# ---------------------------------------------------------------------------------------------

class Constraint:
    """One sequence's position in a grammar (an llguidance LLMatcher) and its token mask.

    fill_mask(words): writes the allowed tokens of the next step as a bitmask, int32 [ceil(vocab/32)],
    bit t % 32 of word t // 32 set when token t is allowed. consume(t): advances over a sampled
    token. reset(): back to the start (rewind replays the kept tokens). Deep-copyable.
    """

    __slots__ = ("matcher", "field", "vocab_size", "error")

    def __init__(self, matcher, field: str, vocab_size: int) -> None:
        self.matcher = matcher
        self.field = field
        self.vocab_size = vocab_size
        self.error: str | None = None       # set when a token outside the grammar was consumed

    @property
    def n_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def fill_mask(self, words: np.ndarray) -> None:
        """Write the next step's bitmask into `words` (int32 [n_words], C-contiguous).
        InvalidParameterError when the sequence already left the grammar (a token was forced in
        that the grammar does not allow)."""
        if self.error is not None:
            raise InvalidParameterError(self.error)
        assert words.dtype == np.int32 and words.shape == (self.n_words,) and words.flags.c_contiguous
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self.matcher.is_error():
            raise InvalidParameterError(f"{self.field}: the constraint failed: {self.matcher.get_error().strip()}")

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens allowed at the next step (for tests and callers outside the sampler)."""
        words = np.empty(self.n_words, dtype=np.int32)
        self.fill_mask(words)
        return unpack_mask(words[None, :], self.vocab_size)[0]

    def consume(self, token_id: int) -> None:
        """Advance over a sampled token. A token the grammar does not allow (only possible when
        it did not come from a masked step) is remembered and fails the next `fill_mask`."""
        if self.error is None and not self.matcher.consume_token(int(token_id)):
            self.error = (f"{self.field}: token {int(token_id)} does not continue the constrained output "
                          f"({self.matcher.get_error().strip()})")

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete match of the grammar."""
        return bool(self.matcher.is_accepting())

    def reset(self) -> None:
        """Back to the start of the output."""
        self.matcher.reset()
        self.error = None

    def __deepcopy__(self, memo) -> "Constraint":
        twin = Constraint(self.matcher.deep_copy(), self.field, self.vocab_size)
        twin.error = self.error
        return twin


# byte value -> the 8 additive mask values of its bits (bit k set: 0.0, clear: -inf), float32 [256, 8]
_BYTE_TO_ADD = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
    np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


def apply_mask(logits: np.ndarray, words: np.ndarray) -> None:
    """In place: -inf for the tokens whose bit is clear in the bitmask `words` (int32 [n_words]);
    logits float32 [vocab]. Adds 0.0 to allowed tokens, which leaves them bit-identical. One
    table lookup per mask byte (about 30 us for 49k tokens, 10x a boolean-indexed write)."""
    add = np.take(_BYTE_TO_ADD, words.view(np.uint8), axis=0).reshape(-1)   # [n_words * 32]
    np.add(logits, add[:logits.shape[0]], out=logits)


def unpack_mask(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [b, vocab_size] of bitmasks int32 [b, n_words] (bit t % 32 of word t // 32; the
    bytes of a word are read in memory order, which is little-endian on every supported CPU)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].view(np.bool_)
