"""The contract between the engine (requests, sampling, scheduling) and a model backend (math).

A backend owns the weights and the per-sequence state (KV cache or recurrent state) for a fixed
number of *slots*; the engine decides which request lives in which slot and which of its tokens
are already in the cache (engine/cache.py). A backend never samples, never tokenizes.

Positions: a slot holds the state for tokens [0, n) of its sequence. `forward` appends tokens
starting at `start_pos`; for a KV cache any `start_pos <= n` is allowed (entries at and after
`start_pos` are overwritten: that is how rewind works). A recurrent backend
(`supports_rewind == False`) accepts only `start_pos == n` (extend) or `start_pos == 0` (reset).
"""
from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod

import numpy as np

from ..errors import InvalidParameterError, LMEngineWarning


class Backend(ABC):
    vocab_size: int          # logits width
    n_ctx: int               # positions per slot
    n_slots: int             # sequences held at once
    supports_rewind: bool = True

    @abstractmethod
    def forward(self, slot: int, token_ids: np.ndarray, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """Run `token_ids` (int32 [n]) through the model as positions start_pos .. start_pos+n-1 of
        the sequence in `slot`, writing its state. Returns float32 logits: [n, vocab] when
        `all_logits`, else [1, vocab] for the last position."""

    @abstractmethod
    def forward_batch(self, slots: np.ndarray, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step for b sequences at once: slot `slots[i]` gets token `token_ids[i]` at
        position `positions[i]`. All int32 [b]. Returns float32 logits [b, vocab]. Weights are read
        once for the whole batch."""

    @abstractmethod
    def copy_slot(self, src: int, dst: int, n_tokens: int) -> None:
        """Copy the first `n_tokens` positions of state from slot `src` to slot `dst`
        (prefix sharing, n > 1 samples, beam search). Recurrent backends copy the whole state and
        require `n_tokens` to equal the source length."""

    mixed_tokens: int = 0    # the most tokens one forward_mixed call takes (0: it has none)

    def forward_mixed(self, parts: list[tuple[int, np.ndarray, int, bool]]) -> list[np.ndarray | None]:
        """One scheduler step in one forward, for a backend whose forward takes the tokens of
        several sequences at once (`mixed_tokens` > 0): part i = (slot, token_ids, start_pos,
        wants_logits) appends token_ids to the sequence in `slot` at start_pos, as `forward`
        does; the slots are distinct, and at most `mixed_tokens` tokens in all. Returns per part
        the float32 [vocab] logits of its last token when it wants them, else None. Each part's
        results are the same as alone (batch invariance), and the weights are read once for the
        decode rows and the prompt chunks together. Other backends get each prompt through
        `forward` and the decode rows through one `forward_batch` (engine/scheduler.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no forward_mixed")

    n_threads: int | None = None
    max_threads: int | None = None   # the most threads this backend can run (None: no limit of its own)

    def set_threads(self, n_threads: int | None) -> None:
        """Threads used by the next forward calls: a positive int (above max_threads it is
        clamped to max_threads), or None for max_threads (or the runtime's default)."""
        self.n_threads = checked_thread_count(n_threads, self.max_threads)

    def warmup(self) -> None:
        """Load (or compile) whatever the first forward needs, before the first request. The
        default does nothing; a backend that warms up leaves no state the engine relies on."""

    def close(self) -> None:
        """Release memory maps and native resources."""


def forward_calls(token_ids, slot: int, start_pos: int, all_logits: bool, *, vocab_size: int,
                  n_slots: int, n_ctx: int, chunk: int):
    """Check `Backend.forward`'s arguments and split the prompt into compiled calls of at most
    `chunk` tokens: a list of (tokens, slots, positions, rows) int64 arrays, rows being the
    positions within the call whose logits are wanted (every one with all_logits, else only the
    last token of the last call)."""
    from ..errors import ContextLengthError
    from ..validation import check_token_ids
    token_ids = np.ascontiguousarray(check_token_ids(token_ids, vocab_size), dtype=np.int64)
    n = token_ids.shape[0]
    if n == 0:
        raise InvalidParameterError("forward needs at least one token")
    if not 0 <= slot < n_slots:
        raise InvalidParameterError(f"slot {slot} out of range [0, {n_slots})")
    if start_pos < 0 or start_pos + n > n_ctx:
        raise ContextLengthError(
            f"positions {start_pos}..{start_pos + n - 1} do not fit the context of {n_ctx} tokens")
    calls = []
    for begin in range(0, n, chunk):
        tokens = token_ids[begin: begin + chunk]
        m = tokens.shape[0]
        if all_logits:
            rows = np.arange(m, dtype=np.int64)
        elif begin + chunk >= n:
            rows = np.array([m - 1], dtype=np.int64)
        else:
            rows = np.zeros(0, dtype=np.int64)      # only the last call's last row is wanted
        positions = np.arange(start_pos + begin, start_pos + begin + m, dtype=np.int64)
        calls.append((tokens, np.full(m, slot, dtype=np.int64), positions, rows))
    return calls


def batch_call(slots, token_ids, positions, *, vocab_size: int, n_slots: int, n_ctx: int):
    """Check `Backend.forward_batch`'s arguments (one token per distinct slot): its one compiled
    call, (tokens, slots, positions, rows) int64 arrays, every row wanted."""
    from ..errors import ContextLengthError
    from ..validation import check_token_ids
    token_ids = np.ascontiguousarray(check_token_ids(token_ids, vocab_size), dtype=np.int64)
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    if not (slots.shape == positions.shape == token_ids.shape):
        raise InvalidParameterError("slots, token_ids and positions must have the same length")
    if slots.size and (slots.min() < 0 or slots.max() >= n_slots):
        raise InvalidParameterError(f"slot out of range [0, {n_slots})")
    if positions.size and (positions.min() < 0 or positions.max() >= n_ctx):
        raise ContextLengthError(f"a position is outside the context of {n_ctx} tokens")
    if len(set(slots.tolist())) != slots.size:
        raise InvalidParameterError("forward_batch takes one token per slot")
    return token_ids, slots, positions, np.arange(token_ids.shape[0], dtype=np.int64)


def mixed_call(parts, *, vocab_size: int, n_slots: int, n_ctx: int):
    """Check `Backend.forward_mixed`'s parts (each as `forward_calls` checks a prompt; slots
    distinct) and join them into one compiled call: (tokens, slots, positions, rows) int64
    arrays, rows being the last token of every part that wants logits, in part order."""
    calls, rows, seen, n = [], [], set(), 0
    for slot, token_ids, start_pos, wants in parts:
        if slot in seen:
            raise InvalidParameterError(f"forward_mixed: slot {slot} appears in two parts")
        seen.add(slot)
        [call] = forward_calls(token_ids, slot, start_pos, False, vocab_size=vocab_size, n_slots=n_slots,
                               n_ctx=n_ctx, chunk=max(len(token_ids), 1))
        calls.append(call)
        n += call[0].shape[0]
        if wants:
            rows.append(n - 1)
    tokens, slots, positions = (np.concatenate([call[i] for call in calls]) for i in range(3))
    return tokens, slots, positions, np.array(rows, dtype=np.int64)


def checked_thread_count(n_threads, max_threads: int | None) -> int | None:
    """n_threads validated (a positive int, not a bool) and clamped to max_threads; None ->
    max_threads."""
    if n_threads is None:
        return max_threads
    if not isinstance(n_threads, (int, np.integer)) or isinstance(n_threads, (bool, np.bool_)) or n_threads < 1:
        raise InvalidParameterError(f"n_threads must be a positive integer, got {n_threads!r}")
    _warn_if_oversubscribed(int(n_threads), max_threads)
    return int(n_threads) if max_threads is None else min(int(n_threads), max_threads)


_warned_threads = False


def _warn_if_oversubscribed(n_threads: int, max_threads: int | None) -> None:
    """Warn once per process when more threads are asked for than there are cores (or than the
    backend can run): threads beyond the cores only take turns, and it is usually a typo."""
    global _warned_threads
    n_cores = os.cpu_count() or 1
    limit = min(n_cores, max_threads) if max_threads is not None else n_cores
    if n_threads > limit and not _warned_threads:
        _warned_threads = True
        warnings.warn(f"n_threads={n_threads} is more than this machine's {n_cores} cores"
                      + (f" (this backend runs at most {max_threads})" if max_threads is not None else "")
                      + f"; using {min(n_threads, max_threads) if max_threads is not None else n_threads}",
                      LMEngineWarning, stacklevel=3)
