"""Stop strings on a stream of text: what may be shown now, and where the output ends.

The Generator decodes one token at a time into text deltas (complete characters) and pushes each
delta into a `TextStream`; `push` returns the text that is safe to show. Rules:

- A stop string ends the output at its first occurrence (the one that is complete first, i.e.
  ends earliest; of several ending at the same place, the longest). It may span any number of
  deltas. The output is cut just before it, or just after it with include_stop_str_in_output.
  Text received after it is dropped, and the stream reports finish_reason "stop".
- Text that could be the beginning of a stop string is held back until the next deltas decide:
  the stream never shows a character that later turns out to belong to a stop string. So what
  `push` returns, concatenated, is the same however the text was split into deltas.
- `flush()` at the end of generation (EOS, stop token, max_tokens) releases the held-back text.
- `push(delta, allow_stop=False)` (used while fewer than min_tokens tokens exist) takes text in
  which no stop string may *end*; an occurrence that ends in such text is never matched.

Work per push is bounded by len(delta) + the longest stop string, per stop string: the held-back
text is shorter than the longest stop string, and only occurrences ending in the new delta are
searched; nothing rescans the whole output.
"""
from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Incremental stop-string matching with holdback for one output sequence."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        self.stop: tuple[str, ...] = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_string: str | None = None     # the stop string that ended the output
        self._pending = ""                      # received, not yet shown: may start a stop string
        self._shown: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    @property
    def finish_reason(self) -> str | None:
        """"stop" once a stop string matched, else None (the Generator decides the rest)."""
        return "stop" if self.stopped else None

    @property
    def text(self) -> str:
        """Everything shown so far (the concatenation of what push/flush returned)."""
        return "".join(self._shown)

    @property
    def held_back(self) -> str:
        """Text received but not shown yet, because it may be the start of a stop string."""
        return self._pending

    def push(self, delta: str, allow_stop: bool = True) -> str:
        """Take the next piece of text; return the part that can be shown now ("" after a stop)."""
        if self.stopped:
            return ""
        if not self.stop:
            return self._show(delta)
        checked = len(self._pending)            # occurrences ending at or before here are settled
        text = self._pending + delta
        if allow_stop:
            match = self._first_match(text, checked)
            if match is not None:
                start, stop_string = match
                self.stop_string = stop_string
                self._pending = ""
                end = start + len(stop_string) if self.include_stop_str_in_output else start
                return self._show(text[:end])
        hold = self._holdback_length(text)
        self._pending = text[len(text) - hold:]
        return self._show(text[:len(text) - hold])

    def flush(self) -> str:
        """End of the stream: release the held-back text (nothing after a stop)."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else self._show(pending)

    def _show(self, piece: str) -> str:
        if piece:
            self._shown.append(piece)
        return piece

    def _first_match(self, text: str, checked: int) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence ending earliest after position `checked`
        (longest first on a tie), or None."""
        best: tuple[int, int, str] | None = None      # (end, -length, stop string)
        for s in self.stop:
            start = text.find(s, max(0, checked - len(s) + 1))
            if start >= 0:
                candidate = (start + len(s), -len(s), s)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, neg_len, s = best
        return end + neg_len, s

    def _holdback_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        hold = 0
        for s in self.stop:
            for length in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:length]):
                    hold = length
                    break
        return hold
