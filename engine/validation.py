"""Token ids are checked where they enter the engine: one rule, one message.

A token id is an integer (a Python int, a NumPy integer, or anything with `__index__`) in
[0, vocab_size). Booleans are not token ids, although Python counts True as 1: a stray True in a
prompt is a bug to report, not token 1.

Every place where ids come in calls `check_token_ids` (or `check_token_id`, its one-id form):
prompts given to `LLM`, `Generator.append_tokens`, the tokenizers' `decode` / `id_to_token` /
`is_special` and their incremental decoders, `SamplingParams` (ids it can check without the vocabulary: type and sign),
the sampler's logit_bias / allowed_token_ids / stop_token_ids / bad words, and each backend's
public `forward` / `forward_batch` (which keeps compiled code from reading outside its arrays).
Code past those points takes the ids as checked. A bad id is a `TokenIdError` such as:

    prompt token id 49152 is outside the vocabulary [0, 49152)
    token id True is a bool, not an integer in the vocabulary [0, 49152)
    token id 'a' is not an integer in the vocabulary [0, 49152)
"""
from __future__ import annotations

import operator
from typing import Iterable

import numpy as np

from .errors import TokenIdError

_NO_VOCABULARY = 2**63   # the bound when vocab_size is None: ids must still fit int64


def check_token_ids(token_ids, vocab_size: int | None, what: str = "token id") -> np.ndarray:
    """`token_ids` as a new int64 [n] array, once every one is an integer in [0, vocab_size).

    token_ids: a list, tuple, other iterable, or NumPy array (any shape; it is flattened).
    vocab_size: the vocabulary size; None checks only the type and the sign (SamplingParams,
        made before any model is known).
    what: names the ids in the message ("prompt token id", "logit_bias token id", ...).
    Raises TokenIdError naming `what`, the first bad id and the range.
    """
    limit = vocab_size if vocab_size is not None else _NO_VOCABULARY
    if isinstance(token_ids, np.ndarray) and token_ids.dtype != object:
        return _checked_array(token_ids.reshape(-1), limit, vocab_size, what)
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise TokenIdError(f"expected a sequence of {what}s, got {token_ids!r}")
    items = token_ids if isinstance(token_ids, (list, tuple)) else list(token_ids)
    if not all(_plain_int_type(kind) for kind in set(map(type, items))):   # one pass in C
        items = _indexed(items, limit, vocab_size, what)
    if items and (min(items) < 0 or max(items) >= limit):
        raise _error(what, next(t for t in items if not 0 <= t < limit), vocab_size)
    return np.array(items, dtype=np.int64)


def check_token_id(token_id, vocab_size: int | None, what: str = "token id") -> int:
    """`check_token_ids` for one id, returned as an int: the same rule and message without NumPy
    work (decoders call it once per token)."""
    limit = vocab_size if vocab_size is not None else _NO_VOCABULARY
    return _indexed((token_id,), limit, vocab_size, what)[0]


def _checked_array(ids: np.ndarray, limit: int, vocab_size: int | None, what: str) -> np.ndarray:
    """check_token_ids of a flat NumPy array of a plain dtype."""
    if ids.size == 0:                  # np.array([]) is float64: an empty list of ids is still one
        return np.zeros(0, dtype=np.int64)
    if ids.dtype.kind not in "iu":     # bool, float, str... arrays
        raise _error(what, ids[0].item(), vocab_size)
    bad = (ids < 0) | (ids >= limit)
    if bad.any():
        raise _error(what, ids[np.argmax(bad)].item(), vocab_size)
    return ids.astype(np.int64)        # a copy: callers may keep it


def _indexed(items, limit: int, vocab_size: int | None, what: str) -> list[int]:
    """The `operator.index` values of items that are not all plain ints: TokenIdError at the
    first that is a bool, not an integer, or outside [0, limit)."""
    out = []
    for item in items:
        value = None
        if not isinstance(item, (bool, np.bool_)):
            try:
                value = operator.index(item)
            except TypeError:
                pass
        if value is None or isinstance(value, bool):
            raise _error(what, item, vocab_size)
        if not 0 <= value < limit:
            raise _error(what, value, vocab_size)
        out.append(value)
    return out


def _plain_int_type(kind: type) -> bool:
    """int and the NumPy integers, not bool."""
    return issubclass(kind, (int, np.integer)) and not issubclass(kind, bool)


def _error(what: str, value, vocab_size: int | None) -> TokenIdError:
    """The one message: what, the value, the problem, the range."""
    span = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab_size)"
    if isinstance(value, (bool, np.bool_)):
        return TokenIdError(f"{what} {bool(value)} is a bool, not an integer in the vocabulary {span}")
    if isinstance(value, (int, np.integer)):
        return TokenIdError(f"{what} {int(value)} is outside the vocabulary {span}")
    return TokenIdError(f"{what} {value!r} is not an integer in the vocabulary {span}")
