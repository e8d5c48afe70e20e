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
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .cache import common_prefix
from .generator import Generator, StreamChunk

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


class Scheduler:
    def __init__(self, llm):
        self.llm = llm
        self.lock = threading.RLock()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def submit(self, prompt_ids: list[int], params, sample_index: int = 0) -> Request:
        request = Request(list(prompt_ids), params, sample_index)
        with self.lock:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        with self.lock:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
                request.done = True

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
        except BaseException as e:  # fail the requests of this step, keep the scheduler usable
            for r in self.running:
                r.error, r.done = e, True
                r.generator.close()
            self.running = []
            raise

    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            slot = self.llm.acquire_slot(request.prompt_ids, or_raise=False)
            if slot is None:
                return
            self.waiting.popleft()
            try:
                request.generator = Generator(self.llm, request.params, request.prompt_ids,
                                              sample_index=request.sample_index, slot=slot)
            except BaseException as e:
                self.llm.release_slot(slot)
                request.error, request.done = e, True
                continue
            self.running.append(request)

    def _retire(self) -> None:
        keep = []
        for r in self.running:
            if r.cancelled or r.generator.is_done():
                r.generator.close()
                r.done = True
            else:
                keep.append(r)
        self.running = keep

    def _forward_and_sample(self) -> None:
        backend = self.llm.backend
        gens = [r.generator for r in self.running]
        decode = []
        for g in gens:
            if g.logits is not None:
                continue
            self._share_prefix(g)
            start, new = g.uncached()
            if len(new) == 1:
                decode.append((g, start, new[0]))
            else:
                logits = backend.forward(g.slot, np.asarray(new, dtype=np.int64), start)
                g.set_logits(logits[-1], start)
        if decode:
            slots = np.array([g.slot for g, _, _ in decode], dtype=np.int64)
            tokens = np.array([t for _, _, t in decode], dtype=np.int64)
            positions = np.array([s for _, s, _ in decode], dtype=np.int64)
            logits = backend.forward_batch(slots, tokens, positions)
            for i, (g, start, _) in enumerate(decode):
                g.set_logits(logits[i], start)

        batch_logits = np.stack([g.logits for g in gens])  # [b, vocab], a copy the sampler may edit
        result = self.llm.sampler.sample(batch_logits, [g.sampler_state for g in gens])
        for i, r in enumerate(self.running):
            g = r.generator
            token_id = int(result.token_ids[i])
            g.accept(token_id, result.logprobs[i])
            r.chunks.append(StreamChunk(text=g.take_text(), token_ids=[token_id],
                                        finish_reason=g.finish_reason, index=r.sample_index))
            if g.is_done():
                g.close()
                r.done = True
        self.running = [r for r in self.running if not r.done]

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
