"""`SamplingParams`: how one request is sampled and when it stops.

Names and neutral defaults follow vLLM, so code written for vLLM reads the same here:

    SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, stop=["\\n\\n"], seed=1)

The object is frozen and hashable: sequences are stored as tuples and `logit_bias` as a read-only
mapping. Invalid values raise `lmengine.errors.InvalidParameterError` (a ValueError) whose message
names the field and the value, e.g. "top_p must be in (0, 1], got 1.5".

Which fields did the caller set? A model file may carry recommended sampling values (GGUF
`general.sampling.*`); they must fill in only what the user left alone, and a user who passes the
neutral value on purpose (temperature=1.0) has still chosen it. So every field's default is the
sentinel `UNSET`; `__post_init__` records the names of the fields given a real value in
`fields_set` and then replaces each `UNSET` with the neutral default (`DEFAULTS`). Readers always
see plain values. `with_model_defaults(metadata)` returns a copy with the model's values for the
fields not in `fields_set`, and `replace(**changes)` is the copy-with-changes that keeps
`fields_set` right. (`dataclasses.replace` passes every field to the constructor, so its result
counts every field as set.)
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from lmengine.errors import InvalidParameterError
from lmengine.validation import check_token_ids

# The fields that set a structured-output constraint (at most one; see engine/constraints.py).
CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar", "json_object")


class _Unset:
    """Type of the `UNSET` sentinel: the default of every `SamplingParams` field."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


class FrozenMap(Mapping):
    """A read-only, hashable dict (the stored form of `logit_bias`). Compares equal to a dict
    with the same items."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


# The neutral value of every field: what a field the caller did not set holds.
DEFAULTS: dict[str, Any] = dict(
    n=1,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    typical_p=1.0,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    logit_bias=FrozenMap(),
    allowed_token_ids=None,
    bad_words=(),
    seed=None,
    stop=(),
    stop_token_ids=(),
    ignore_eos=False,
    max_tokens=16,
    min_tokens=0,
    logprobs=None,
    prompt_logprobs=None,
    skip_special_tokens=True,
    include_stop_str_in_output=False,
    beam_width=1,
    json_schema=None,
    regex=None,
    grammar=None,
    json_object=False,
    logits_processors=(),
    priority=0,
)

# GGUF metadata key (llama.cpp's recommended-sampler keys, gguf.Keys.General.SAMPLING_*) -> field.
# Not mapped, because this engine has no such knob: general.sampling.sequence (the sampler order
# is fixed, see engine/sampler.py), penalty_last_n (the repetition penalty covers the whole
# context, as in HF and vLLM), xtc_probability / xtc_threshold, mirostat / mirostat_tau / _eta.
GGUF_SAMPLING_KEYS: dict[str, str] = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping parameters of one request (vLLM names; neutral defaults in `DEFAULTS`).

    Attributes:
        n: number of independent completions to return for the prompt (>= 1).
        temperature: divides the logits before sampling; 0 means greedy (argmax). >= 0.
        top_k: keep only the k most likely tokens (ties with the k-th kept); 0 = off. -1 is
            accepted as "off" too (vLLM's old spelling) and stored as 0. top_k=1 is greedy.
        top_p: nucleus sampling: keep the most likely tokens until their mass reaches top_p.
            In (0, 1]; 1 = off.
        min_p: keep tokens whose probability is >= min_p * the top token's. In [0, 1]; 0 = off.
        typical_p: locally typical sampling mass. In (0, 1]; 1 = off.
        repetition_penalty: for every token in the prompt or the output so far, a positive logit
            is divided by it and a negative one multiplied (HF/CTRL). > 0; 1 = off.
        presence_penalty: subtracted once from the logit of every token generated so far
            (OpenAI/vLLM). In [-2, 2]; 0 = off.
        frequency_penalty: subtracted from a token's logit once per time it was generated so far.
            In [-2, 2]; 0 = off.
        logit_bias: token id -> value added to its logit (before the filters). Stored read-only.
        allowed_token_ids: if given, only these token ids can be sampled (non-empty).
        bad_words: strings that must not be generated. The sampler bans the last token of a bad
            word's token sequence whenever the tokens generated so far end with the rest of it
            (the caller tokenizes them: `lmengine.sampler.bad_words_token_ids`).
        seed: seeds this request's own random generator (int >= 0): the same seed gives the
            same tokens whatever else is batched with the request. None = fresh entropy.
        stop: strings that end generation when the output text contains them; the output is cut
            before the stop string (see include_stop_str_in_output). A str or a sequence of str;
            stored as a tuple.
        stop_token_ids: token ids that end generation (besides the model's EOS); the stop token
            is not part of the output text.
        ignore_eos: keep generating after the EOS token (until max_tokens or a stop).
        max_tokens: most tokens to generate (>= 1); None = until the context is full.
        min_tokens: EOS and stop_token_ids are banned, and stop strings are not matched, until
            this many tokens have been generated. 0 <= min_tokens <= max_tokens.
        logprobs: if an int n >= 0, return for every generated token its log-probability and the
            n most likely alternatives (computed on the model's raw logits, see engine/sampler.py).
        prompt_logprobs: the same for every prompt token (n >= 0), or None.
        skip_special_tokens: leave special tokens (BOS, EOS, chat markers) out of the output text.
        include_stop_str_in_output: keep the matched stop string at the end of the output text.
        beam_width: > 1 runs beam search with this many beams instead of sampling; it is
            deterministic, so it requires temperature=0, and returns the n <= beam_width best.
        json_schema: structured output: the generated text is JSON valid under this JSON schema
            (a dict, or its JSON text; stored as compact JSON text). Written without whitespace
            between JSON tokens unless the schema says {"x-guidance": {"whitespace_flexible": true}}.
        regex: structured output: the generated text fully matches this regular expression
            (Rust `regex` syntax, as llguidance takes it; no look-around or backreferences).
        grammar: structured output: the generated text is a sentence of this Lark grammar
            (llguidance's Lark dialect, start rule `start`).
        json_object: structured output: the generated text is one JSON object (any keys).
            At most one of json_schema, regex, grammar, json_object may be set. The constraint
            is a token mask in the sampler (see engine/constraints.py and docs/STRUCTURED.md):
            EOS is allowed exactly when the text is complete, so a generation that ends with
            finish_reason "stop" is valid; one cut by max_tokens ("length") or a stop string
            may be an unfinished prefix. Invalid values raise InvalidParameterError here.
        logits_processors: callables f(generated_ids, logits) -> None, called for this request
            at every step, in order, after penalties/logit_bias/bans and before the constraint
            mask and the filters. generated_ids: read-only int32 [n_generated]; logits: the
            float32 [vocab] row of this request, to edit in place (both are views, valid
            during the call only: copy what you keep). An exception fails only this request.
            Stored as a tuple.
        priority: scheduling, not sampling (vLLM's convention): among requests waiting for a
            batch slot, a lower value is admitted first; equal values keep their arrival order.
            When no slot is free, a waiting request pre-empts the running request with the
            greatest value, if that value is greater than its own (equal values never pre-empt):
            that request waits again and later resumes where it was, with the same output (its
            lost cache is computed again). An int in [-2**31, 2**31).
        fields_set: (read-only, not an argument) names of the fields the caller passed.
    """

    n: int = UNSET
    temperature: float = UNSET
    top_k: int = UNSET
    top_p: float = UNSET
    min_p: float = UNSET
    typical_p: float = UNSET
    repetition_penalty: float = UNSET
    presence_penalty: float = UNSET
    frequency_penalty: float = UNSET
    logit_bias: Mapping[int, float] = UNSET
    allowed_token_ids: tuple[int, ...] | None = UNSET
    bad_words: tuple[str, ...] = UNSET
    seed: int | None = UNSET
    stop: tuple[str, ...] = UNSET
    stop_token_ids: tuple[int, ...] = UNSET
    ignore_eos: bool = UNSET
    max_tokens: int | None = UNSET
    min_tokens: int = UNSET
    logprobs: int | None = UNSET
    prompt_logprobs: int | None = UNSET
    skip_special_tokens: bool = UNSET
    include_stop_str_in_output: bool = UNSET
    beam_width: int = UNSET
    json_schema: str | None = UNSET
    regex: str | None = UNSET
    grammar: str | None = UNSET
    json_object: bool = UNSET
    logits_processors: tuple[Callable[[np.ndarray, np.ndarray], None], ...] = UNSET
    priority: int = UNSET
    fields_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = frozenset(name for name in DEFAULTS if getattr(self, name) is not UNSET)
        object.__setattr__(self, "fields_set", given)
        for name, default in DEFAULTS.items():
            if name not in given:
                object.__setattr__(self, name, default)
        for name in given:
            object.__setattr__(self, name, _VALIDATORS[name](name, getattr(self, name)))
        self._check_relations()

    def _check_relations(self) -> None:
        """Checks that involve two fields."""
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}")
        if self.beam_width > 1:
            if self.temperature != 0:
                raise InvalidParameterError(
                    f"beam_width > 1 (beam search) requires temperature=0, got "
                    f"beam_width={self.beam_width} and temperature={self.temperature}")
            if self.n > self.beam_width:
                raise InvalidParameterError(
                    f"n must be <= beam_width with beam search, got n={self.n} and "
                    f"beam_width={self.beam_width}")
        constraints = [name for name in CONSTRAINT_FIELDS if getattr(self, name) not in (None, False)]
        if len(constraints) > 1:
            raise InvalidParameterError(
                f"at most one of json_schema, regex, grammar, json_object may be set, got {', '.join(constraints)}")
        if constraints or self.logits_processors:
            what = constraints[0] if constraints else "logits_processors"
            if self.beam_width > 1:
                raise InvalidParameterError(f"{what} cannot be combined with beam search (beam_width > 1)")
            if constraints and self.ignore_eos:
                raise InvalidParameterError(
                    f"{what} cannot be combined with ignore_eos=True: a constrained output ends at EOS "
                    f"once it is complete")

    # ------------------------------------------------------------------ derived views

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field name, llguidance grammar text) of the structured-output constraint, or None."""
        for name in CONSTRAINT_FIELDS:
            value = getattr(self, name)
            if value not in (None, False):
                from lmengine.constraints import grammar_for
                return name, grammar_for(name, value)
        return None

    # ------------------------------------------------------------------ copies

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied; the copy's `fields_set` is this one's plus the changed
        names (unlike `dataclasses.replace`, which marks every field as set)."""
        unknown = set(changes) - set(DEFAULTS)
        if unknown:
            raise InvalidParameterError(f"unknown SamplingParams field(s): {sorted(unknown)}")
        kwargs = {name: getattr(self, name) for name in self.fields_set}
        kwargs.update(changes)
        return SamplingParams(**kwargs)

    def with_model_defaults(self, metadata: Mapping[str, Any]) -> SamplingParams:
        """A copy in which every field the caller did not set takes the model's recommended value,
        read from GGUF metadata keys `general.sampling.*` (see `GGUF_SAMPLING_KEYS`; other keys in
        `metadata` are ignored). Fields the caller set are kept. The copy counts the model's
        values as set. A model value that is not valid raises InvalidParameterError naming the
        metadata key."""
        from_model = {}
        for key, name in GGUF_SAMPLING_KEYS.items():
            if key in metadata and name not in self.fields_set:
                value = metadata[key]
                try:
                    SamplingParams(**{name: value})            # validate alone, to name the key
                except InvalidParameterError as e:
                    raise InvalidParameterError(f"model metadata {key}: {e}") from None
                from_model[name] = value
        if not from_model:
            return self
        return self.replace(**from_model)


# ---------------------------------------------------------------------------------------------
# Field validators: (name, value) -> normalised value, or InvalidParameterError naming both
# ---------------------------------------------------------------------------------------------

def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)            # int and NumPy integers, not floats
    except TypeError:
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidParameterError(f"{name} must be finite, got {value!r}")
    return number


def _in_range(name: str, value: float, lo: float | None, hi: float | None,
              lo_open: bool = False, hi_open: bool = False) -> None:
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        if hi is None:
            rule = f"> {lo:g}" if lo_open else f">= {lo:g}"
        else:
            rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise InvalidParameterError(f"{name} must be {rule}, got {value!r}")


def _float_field(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(name, value):
        number = _as_float(name, value)
        _in_range(name, number, lo, hi, lo_open, hi_open)
        return number
    return check


def _int_field(lo: int, allow_none: bool = False):
    def check(name, value):
        if value is None and allow_none:
            return None
        number = _as_int(name, value)
        if number < lo:
            raise InvalidParameterError(f"{name} must be >= {lo}{' or None' if allow_none else ''}, got {value!r}")
        return number
    return check


def _bool_field(name, value):
    if not isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be True or False, got {value!r}")
    return value


def _top_k(name, value):
    number = _as_int(name, value)
    if number < -1:
        raise InvalidParameterError(f"{name} must be 0 or -1 (off) or >= 1, got {value!r}")
    return 0 if number == -1 else number


def _token_id_tuple(name, value, allow_empty=True):
    """Distinct token ids in their first order. Ids are checked for type and sign here (a
    TokenIdError, which is an InvalidParameterError); against the vocabulary by the sampler."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidParameterError(f"{name} must be a sequence of token ids, got {value!r}")
    ids = list(dict.fromkeys(check_token_ids(value, None, f"{name} token id").tolist()))
    if not ids and not allow_empty:
        raise InvalidParameterError(f"{name} must not be empty (use None for no restriction), got {value!r}")
    return tuple(ids)


def _allowed_token_ids(name, value):
    if value is None:
        return None
    return _token_id_tuple(name, value, allow_empty=False)


def _string_tuple(name, value):
    if isinstance(value, str):
        value = (value,)
    if not hasattr(value, "__iter__"):
        raise InvalidParameterError(f"{name} must be a str or a sequence of str, got {value!r}")
    strings = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise InvalidParameterError(f"{name} must hold non-empty strings, got {item!r}")
        if item not in strings:
            strings.append(item)
    return tuple(strings)


def _logit_bias(name, value):
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"{name} must be a mapping of token id -> float, got {value!r}")
    token_ids = check_token_ids(list(value.keys()), None, f"{name} token id").tolist()   # type and sign
    return FrozenMap({token_id: _as_float(f"{name}[{token_id}]", amount)
                      for token_id, amount in zip(token_ids, value.values())})


def _seed(name, value):
    if value is None:
        return None
    number = _as_int(name, value)
    if number < 0:
        raise InvalidParameterError(f"{name} must be an int >= 0 or None, got {value!r}")
    return number


def _constraint_field(kind: str):
    """Validator of json_schema / regex / grammar: None, or a value llguidance compiles (checked
    here, without a tokenizer, so an invalid one fails when the SamplingParams is built)."""
    def check(name, value):
        if value is None:
            return None
        from lmengine.constraints import check_grammar, grammar_for, normalize_json_schema
        if kind == "json":
            value = normalize_json_schema(value)
        elif not isinstance(value, str):
            raise InvalidParameterError(f"{name} must be a str or None, got {type(value).__name__}")
        check_grammar(name, grammar_for(name, value))
        return value
    return check


def _priority(name, value):
    number = _as_int(name, value)
    if not -2 ** 31 <= number < 2 ** 31:
        raise InvalidParameterError(f"{name} must be an int in [-2**31, 2**31), got {value!r}")
    return number


def _logits_processors(name, value):
    if callable(value) or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidParameterError(f"{name} must be a sequence of callables f(generated_ids, logits), got {value!r}")
    processors = tuple(value)
    for i, f in enumerate(processors):
        if not callable(f):
            raise InvalidParameterError(f"{name}[{i}] must be callable f(generated_ids, logits), got {f!r}")
    return processors


_VALIDATORS = dict(
    n=_int_field(1),
    temperature=_float_field(lo=0.0),
    top_k=_top_k,
    top_p=_float_field(0.0, 1.0, lo_open=True),
    min_p=_float_field(0.0, 1.0),
    typical_p=_float_field(0.0, 1.0, lo_open=True),
    repetition_penalty=_float_field(lo=0.0, lo_open=True),
    presence_penalty=_float_field(-2.0, 2.0),
    frequency_penalty=_float_field(-2.0, 2.0),
    logit_bias=_logit_bias,
    allowed_token_ids=_allowed_token_ids,
    bad_words=_string_tuple,
    seed=_seed,
    stop=_string_tuple,
    stop_token_ids=_token_id_tuple,
    ignore_eos=_bool_field,
    max_tokens=_int_field(1, allow_none=True),
    min_tokens=_int_field(0),
    logprobs=_int_field(0, allow_none=True),
    prompt_logprobs=_int_field(0, allow_none=True),
    skip_special_tokens=_bool_field,
    include_stop_str_in_output=_bool_field,
    beam_width=_int_field(1),
    json_schema=_constraint_field("json"),
    regex=_constraint_field("regex"),
    grammar=_constraint_field("grammar"),
    json_object=_bool_field,
    logits_processors=_logits_processors,
    priority=_priority,
)
assert set(_VALIDATORS) == set(DEFAULTS) == {f.name for f in fields(SamplingParams)} - {"fields_set"}
