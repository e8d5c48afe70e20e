"""Continuous batching: many requests, one forward per step.

Requests wait in a queue until a cache slot is free (the backend has `n_slots` of them, the
memory budget), then join the running set between steps; finished or cancelled ones leave and
free their slot. One `step()`:

  1. admits waiting requests into free slots (a request whose prompt shares a prefix with what a
     slot already holds gets that slot, so the prefix is not computed again);
  2. runs every running sequence that has more than one uncached token (a new prompt) through
     `backend.forward`, and all sequences that have exactly one (decoding) through ONE
     `backend.forward_batch` call, so weights are read once for the whole batch;
  3. samples the next token of every sequence in ONE `Sampler.sample` call.

Threads: there is no background thread. Whoever wants progress (a `generate` call, or the
consumer of a `stream` iterator in any thread) takes the lock and runs steps for everybody until
its own request has news, so concurrent streams from several threads share the batched steps.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .cache import common_prefix
from .errors import LLMClosedError, NonFiniteLogitsError
from .generator import Generator, StreamChunk, check_finite_logits

# A prompt prefix at least this long, already computed in another slot, is copied from there
# instead of being recomputed (copying costs a memcpy of its KV entries).
MIN_SHARED_PREFIX = 8


@dataclass
class Request:
    prompt_ids: list[int]
    params: object
    sample_index: int = 0
    generator: Generator | None = None
    chunks: deque = field(default_factory=deque)
    done: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    t_first: float | None = None        # time.perf_counter() when its first token was sampled


class Scheduler:
    """Owns the request lifecycle. A request is *waiting* (no slot), then *running* (its Generator
    holds a slot), then *done* (slot released exactly once, by `_end`). Every path ends there:
    finished, failed validation at admission, failed in a step, cancelled, or the LLM closed.

    A failure in a step ends only the requests it concerns, each with the error: a prompt's
    forward fails that request; a batched decode forward fails the requests of that batch; a row
    of non-finite logits or a sampling error fails that row's request. `step()` never raises for
    them (KeyboardInterrupt and the like are re-raised after the step's requests are failed), so
    the caller driving the step is never handed another caller's error and no waiting request is
    stranded: every caller drives steps until its own requests are done."""

    def __init__(self, llm):
        self.llm = llm
        self.lock = threading.RLock()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.closed = False

    def submit(self, prompt_ids: list[int], params, sample_index: int = 0) -> Request:
        request = Request(list(prompt_ids), params, sample_index)
        with self.lock:
            if self.closed:
                raise LLMClosedError("the LLM is closed")
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End a request now: its slot (if it has one) is free when this returns."""
        with self.lock:
            if request.done:
                return
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            elif request in self.running:
                self.running.remove(request)
            self._end(request)

    def close(self) -> None:
        """End every waiting and running request with LLMClosedError; later submits raise it."""
        with self.lock:
            self.closed = True
            for r in list(self.waiting) + self.running:
                self._end(r, LLMClosedError("the LLM was closed while this request was in progress"))
            self.waiting.clear()
            self.running = []

    def wait_for_news(self, request: Request) -> None:
        """Run steps until `request` has a chunk to read or is done."""
        while True:
            with self.lock:
                if request.chunks or request.done:
                    return
                self.step()

    def run_until_done(self, requests: list[Request]) -> None:
        with self.lock:
            while not all(r.done for r in requests):
                self.step()

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        self._retire()
        self._admit()
        if not self.running:
            return
        try:
            self._forward_and_sample()
        except BaseException as e:  # not a request's fault (KeyboardInterrupt...): fail the step's requests
            for r in self.running:
                self._end(r, e)
            self.running = []
            raise
        self.running = [r for r in self.running if not r.done]

    def _end(self, request: Request, error: BaseException | None = None) -> None:
        """The one place a request ends: record the error, give the slot back (its cached tokens
        forgotten after a failure), mark it done. Idempotent."""
        if request.done:
            return
        g = request.generator
        if error is not None:
            request.error = error
            if g is not None and g.slot is not None:
                self.llm.slots.invalidate(g.slot)
        if g is not None:
            g.close()
        request.done = True

    def _admit(self) -> None:
        # at most max_batch_size running: the LLM keeps one slot for logits()/perplexity()
        while self.waiting and len(self.running) < self.llm.max_batch_size:
            request = self.waiting[0]
            slot = self.llm.acquire_slot(request.prompt_ids, or_raise=False)
            if slot is None:
                return
            self.waiting.popleft()
            try:
                request.generator = Generator(self.llm, request.params, request.prompt_ids,
                                              sample_index=request.sample_index, slot=slot)
            except Exception as e:        # invalid params for this model: the slot was never the generator's
                self.llm.release_slot(slot)
                self._end(request, e)
                continue
            self.running.append(request)

    def _retire(self) -> None:
        keep = []
        for r in self.running:
            if r.cancelled or r.generator.is_done():
                self._end(r)
            else:
                keep.append(r)
        self.running = keep

    def _forward_and_sample(self) -> None:
        """Logits for every running request (prompts one by one, decodes in one batch), then one
        sampling call over the rows that are finite. Failures end only their requests."""
        backend = self.llm.backend
        decode = []
        for r in self.running:
            g = r.generator
            if g.logits is not None:
                continue
            self._share_prefix(g)
            start, new = g.uncached()
            if len(new) == 1:
                decode.append((r, start, new[0]))
                continue
            try:
                logits = backend.forward(g.slot, np.asarray(new, dtype=np.int64), start)
            except Exception as e:
                self._end(r, e)
                continue
            self._take_logits(r, logits[-1], start)
        if decode:
            slots = np.array([r.generator.slot for r, _, _ in decode], dtype=np.int64)
            tokens = np.array([t for _, _, t in decode], dtype=np.int64)
            positions = np.array([s for _, s, _ in decode], dtype=np.int64)
            try:
                logits = backend.forward_batch(slots, tokens, positions)
            except Exception as e:
                for r, _, _ in decode:
                    self._end(r, e)
            else:
                for i, (r, start, _) in enumerate(decode):
                    self._take_logits(r, logits[i], start)

        ready = [r for r in self.running if not r.done]
        if ready:
            self._sample(ready)

    def _take_logits(self, r: Request, logits: np.ndarray, start: int) -> None:
        try:
            check_finite_logits(logits)
        except NonFiniteLogitsError as e:
            self._end(r, e)
            return
        r.generator.set_logits(logits, start)

    def _sample(self, ready: list[Request]) -> None:
        """One Sampler call for all rows; if it raises, each row again on its own, so the error
        ends only the requests it concerns (a failed call draws and records nothing)."""
        gens = [r.generator for r in ready]
        batch_logits = np.stack([g.logits for g in gens])  # [b, vocab], a copy the sampler may edit
        try:
            results = [self.llm.sampler.sample(batch_logits, [g.sampler_state for g in gens])]
            rows = [(r, results[0], i) for i, r in enumerate(ready)]
        except Exception:
            rows = []
            for r in ready:
                g = r.generator
                try:
                    rows.append((r, self.llm.sampler.sample(g.logits[None, :].copy(), [g.sampler_state]), 0))
                except Exception as e:
                    self._end(r, e)
        for r, result, i in rows:
            g = r.generator
            token_id = int(result.token_ids[i])
            g.accept(token_id, result.logprobs[i])
            if r.t_first is None:
                r.t_first = time.perf_counter()
            r.chunks.append(StreamChunk(text=g.take_text(), token_ids=[token_id],
                                        finish_reason=g.finish_reason, index=r.sample_index))
            if g.is_done():
                self._end(r)

    def _share_prefix(self, g: Generator) -> None:
        """If another slot holds a longer prefix of g's tokens than g's own slot, copy it over
        (n samples of one prompt, or requests with a common system prompt)."""
        slots = self.llm.slots
        if not self.llm.backend.supports_rewind:
            return
        own = slots.plan(g.slot, g.tokens)
        best_slot, best = None, own
        for slot in range(slots.n_slots):
            if slot == g.slot:
                continue
            shared = min(common_prefix(slots.tokens[slot], g.tokens), len(g.tokens) - 1)
            if shared > best:
                best_slot, best = slot, shared
        if best_slot is not None and best - own >= MIN_SHARED_PREFIX:
            self.llm.backend.copy_slot(best_slot, g.slot, best)
            slots.commit(g.slot, 0, g.tokens[:best])
