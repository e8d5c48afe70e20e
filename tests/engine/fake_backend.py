"""A small deterministic model behind the Backend contract, for fast tests of the engine's
request machinery (scheduler, slots, Generator, stops, beam search) without a real model.

The "model": the logits after a sequence are a pseudo-random float32 vector seeded by a hash of
the *whole* sequence. So the answer depends on every cached token: a slot that holds another
request's tokens, a prefix copied wrongly, or batch rows mixed up all change the output. The
reference (`reference_logits`, `greedy_reference`) computes the same function on the full token
list, with no cache at all, so it is independent of everything under test.

The backend also checks the contract on every call (positions continue what the slot holds,
slots in a batch are distinct) and logs each call, so tests can assert what was computed.
"""
from __future__ import annotations

import time
import zlib

import numpy as np

from lmengine.backends.base import Backend
from lmengine.lstm_tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"
EOS = "<eos>"


def make_tokenizer(chars: str = CHARS) -> CharTokenizer:
    """One token per character, plus an EOS control token as the last id."""
    tokens = list(chars) + [EOS]
    types = [TOKEN_NORMAL] * len(chars) + [TOKEN_CONTROL]
    return CharTokenizer(tokens, types, eos_id=len(chars))


def reference_logits(tokens, vocab_size: int) -> np.ndarray:
    """float32 [vocab]: the model's next-token logits after `tokens` (any prefix)."""
    seed = zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())
    return np.random.default_rng(seed).normal(0.0, 3.0, vocab_size).astype(np.float32)


def greedy_reference(prompt, n_tokens: int, vocab_size: int, stop_ids=()) -> list[int]:
    """Greedy continuation of `prompt` by the model, computed without any cache: at most
    n_tokens, ending early (and inclusive) at a token of stop_ids."""
    seq, out = list(prompt), []
    for _ in range(n_tokens):
        t = int(np.argmax(reference_logits(seq, vocab_size)))
        seq.append(t)
        out.append(t)
        if t in stop_ids:
            break
    return out


class PoisonTokenError(RuntimeError):
    """Raised by FakeBackend when it is fed its `poison_token` (a stand-in for a failing kernel)."""


class FakeBackend(Backend):
    def __init__(self, vocab_size: int, n_ctx: int = 128, n_slots: int = 4, poison_token: int | None = None,
                 nan_prefix: tuple = (), step_delay: float = 0.0, mixed_tokens: int = 0):
        self.vocab_size, self.n_ctx, self.n_slots = vocab_size, n_ctx, n_slots
        self.mixed_tokens = mixed_tokens   # > 0: a forward_mixed of at most this many tokens
        self.cache: list[list[int]] = [[] for _ in range(n_slots)]   # the tokens each slot holds
        self.calls: list[tuple] = []
        self.poison_token = poison_token   # feeding it raises PoisonTokenError (a failing kernel)
        self.nan_prefix = tuple(nan_prefix)  # a sequence starting with these ids gets NaN logits
        self.interrupt_next_batch = False  # the next forward_batch raises KeyboardInterrupt
        # seconds each forward_batch sleeps: a real model's step time, for tests in which a
        # scheduler loop thread must not finish a request before another thread reacts to it
        self.step_delay = step_delay

    def _logits(self, seq) -> np.ndarray:
        logits = reference_logits(seq, self.vocab_size)
        if self.nan_prefix and tuple(seq[:len(self.nan_prefix)]) == self.nan_prefix:
            logits[::2] = np.nan          # (a corrupt weight)
        return logits

    def _check_slot(self, slot: int) -> None:
        assert 0 <= slot < self.n_slots, f"slot {slot} out of range"

    def _feed(self, slot: int, token_ids, start_pos: int) -> None:
        self._check_slot(slot)
        held = self.cache[slot]
        assert 0 <= start_pos <= len(held), f"slot {slot} holds {len(held)} tokens; start_pos {start_pos}"
        assert start_pos + len(token_ids) <= self.n_ctx, "past the context"
        if self.poison_token is not None and self.poison_token in token_ids:
            raise PoisonTokenError(f"token {self.poison_token} fed to slot {slot}")
        self.cache[slot] = held[:start_pos] + [int(t) for t in token_ids]

    def forward(self, slot, token_ids, start_pos, all_logits=False):
        token_ids = [int(t) for t in token_ids]
        self.calls.append(("forward", int(slot), int(start_pos), len(token_ids)))
        self._feed(int(slot), token_ids, int(start_pos))
        seq = self.cache[int(slot)]
        ends = range(start_pos + 1, len(seq) + 1) if all_logits else [len(seq)]
        return np.stack([self._logits(seq[:end]) for end in ends])

    def forward_batch(self, slots, token_ids, positions):
        slots = [int(s) for s in slots]
        assert len(set(slots)) == len(slots), f"a slot twice in one batch: {slots}"
        self.calls.append(("forward_batch", tuple(slots)))
        if self.interrupt_next_batch:
            self.interrupt_next_batch = False
            raise KeyboardInterrupt
        if self.step_delay:
            time.sleep(self.step_delay)
        rows = []
        for slot, token, position in zip(slots, token_ids, positions):
            self._feed(slot, [int(token)], int(position))
            rows.append(self._logits(self.cache[slot]))
        return np.stack(rows)

    def forward_mixed(self, parts):
        """With mixed_tokens > 0 (a backend_options entry): every part fed in turn, as one call."""
        assert self.mixed_tokens > 0, "the scheduler called forward_mixed on a backend without it"
        slots = [int(slot) for slot, _, _, _ in parts]
        assert len(set(slots)) == len(slots), f"a slot twice in one step: {slots}"
        assert sum(len(ids) for _, ids, _, _ in parts) <= self.mixed_tokens
        self.calls.append(("forward_mixed", tuple((int(slot), len(ids)) for slot, ids, _, _ in parts)))
        if self.step_delay:
            time.sleep(self.step_delay)
        out = []
        for slot, ids, start, wants in parts:
            self._feed(int(slot), [int(t) for t in ids], int(start))
            out.append(self._logits(self.cache[int(slot)]) if wants else None)
        return out

    def copy_slot(self, src, dst, n_tokens):
        self._check_slot(src)
        self._check_slot(dst)
        assert n_tokens <= len(self.cache[src])
        self.calls.append(("copy_slot", int(src), int(dst), int(n_tokens)))
        self.cache[dst] = list(self.cache[src][:n_tokens])


def make_fake_llm(n_slots: int = 4, n_ctx: int = 96, backend_options: dict | None = None, **llm_kwargs):
    """An LLM over a FakeBackend and the character tokenizer (max_batch_size n_slots - 1)."""
    from lmengine import LLM
    tokenizer = make_tokenizer()
    backend = FakeBackend(tokenizer.vocab_size, n_ctx=n_ctx, n_slots=n_slots, **(backend_options or {}))
    return LLM.from_backend(backend, tokenizer, **llm_kwargs)


def expected_text(llm, prompt: str, max_tokens: int) -> str:
    """The greedy completion of `prompt` (ignore_eos) by the fake model, computed without a cache."""
    ids = greedy_reference(llm.tokenizer.encode(prompt), max_tokens, llm.vocab_size)
    return llm.tokenizer.decode(ids, skip_special_tokens=True)
