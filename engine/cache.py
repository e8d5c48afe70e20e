"""Which tokens each cache slot of a backend holds: prefix reuse, rewind, slot assignment.

The backend holds the state (KV arrays or LSTM states) for `n_slots` sequences; this table
remembers, per slot, the token ids whose state is in it. Before a prompt runs, `plan` finds how
much of it is already cached (the longest common prefix with what the slot holds), so only the
rest is computed. A KV cache can keep any prefix (rewind = forget the tail); a recurrent state
can only be extended or reset.
"""
from __future__ import annotations

from .errors import InvalidParameterError


class SlotTable:
    def __init__(self, n_slots: int, n_ctx: int, supports_rewind: bool = True):
        self.n_ctx = n_ctx
        self.supports_rewind = supports_rewind
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.busy = [False] * n_slots
        self._last_used = [0] * n_slots
        self._clock = 0

    @property
    def n_slots(self) -> int:
        return len(self.tokens)

    def acquire(self, prompt: list[int] | None = None) -> int | None:
        """A free slot, preferring the one whose cached tokens share the longest prefix with
        `prompt`, then the least recently used. None when every slot is busy."""
        best, best_key = None, None
        for slot in range(self.n_slots):
            if self.busy[slot]:
                continue
            shared = common_prefix(self.tokens[slot], prompt) if prompt else 0
            if not self.supports_rewind and shared < len(self.tokens[slot]):
                shared = 0
            key = (shared, -self._last_used[slot])
            if best_key is None or key > best_key:
                best, best_key = slot, key
        if best is not None:
            self.busy[best] = True
            self._clock += 1
            self._last_used[best] = self._clock
        return best

    def release(self, slot: int) -> None:
        """Free a busy slot. Releasing a free slot is a bug of the caller (a second release could
        free a slot that another request owns by now): RuntimeError, nothing changes."""
        if not self.busy[slot]:
            raise RuntimeError(f"cache slot {slot} released twice")
        self.busy[slot] = False

    def invalidate(self, slot: int) -> None:
        """Forget what the slot holds (after a failed forward its state is not trustworthy)."""
        self.tokens[slot] = []

    def plan(self, slot: int, sequence: list[int]) -> int:
        """How many leading tokens of `sequence` can be kept from the slot's cache (start_pos for
        the forward). At least one token is always recomputed, to produce the next logits."""
        cached = self.tokens[slot]
        shared = common_prefix(cached, sequence)
        if not self.supports_rewind and shared < len(cached):
            shared = 0  # a recurrent state cannot forget its tail
        return min(shared, len(sequence) - 1)

    def commit(self, slot: int, start_pos: int, new_tokens: list[int]) -> None:
        """Record that positions start_pos.. of the slot now hold `new_tokens`."""
        self.tokens[slot] = self.tokens[slot][:start_pos] + list(new_tokens)

    def rewind_to(self, slot: int, n: int) -> None:
        if not 0 <= n <= len(self.tokens[slot]):
            raise InvalidParameterError(f"cannot rewind to {n}: the sequence has {len(self.tokens[slot])} tokens")
        if not self.supports_rewind and n != len(self.tokens[slot]):
            self.tokens[slot] = []  # forces a recompute from the start
        else:
            self.tokens[slot] = self.tokens[slot][:n]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists. Slices are compared by list
    equality (C speed): the whole prefix first, which is the usual answer (a decoding sequence
    against its own slot), else a binary search for the first difference, so the Python work is
    O(log n) steps, not a step per token: the scheduler asks this for every running sequence and
    slot at every step."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n              # a[:same] == b[:same] and a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[same:mid] == b[same:mid]:
            same = mid
        else:
            differs = mid
    return same
