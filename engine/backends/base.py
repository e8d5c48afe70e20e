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
