"""Continuous batching: many requests, one forward per step.

Requests wait in a queue until a cache slot is free (the backend has `n_slots` of them, the
memory budget), then join the running set between steps; finished or cancelled ones leave and
free their slot. One `step()`:

  1. admits waiting requests into free slots, lowest `SamplingParams.priority` first and in
     arrival order within a priority (a request whose prompt shares a prefix with what a slot
     already holds gets that slot, so the prefix is not computed again); when no slot is free
     and a running request has a greater priority value than the first waiting one, that
     request is pre-empted (`_preempt_for`: it waits again, keeping its tokens, and later
     recomputes what its slot lost, with the same results);
  2. runs every running sequence's uncached tokens, the decode rows (one token each) and the
     prompt chunks together, through ONE `backend.forward_mixed` call, so that weights are read
     once for the whole step (a backend that cannot join them runs each prompt through
     `forward` and the decode rows through one `forward_batch`);
  3. samples the next token of every sequence in ONE `Sampler.sample` call.

Threads, two modes:
  - caller-driven (the default, the offline API): there is no background thread. Whoever wants
    progress (a `generate` call, or the consumer of a `stream` iterator in any thread) takes the
    lock and runs steps for everybody until its own request has news, so concurrent streams from
    several threads share the batched steps.
  - background loop (`start()`, what a server uses): one daemon thread runs steps while there is
    work and sleeps when there is none; waiters only wait (`wait_for_news`), and a request's
    `listener` callback (if set) is called from the loop thread whenever the request has news, so
    an asyncio event loop can be woken (engine/async_llm.py). `stop()` returns to caller-driven.

`submit` never waits for a step: new requests go to an inbox (a deque, whose append is atomic)
that the next step moves into the queue, so an event loop that submits is never blocked by a
forward pass. `request_cancel` likewise only flags the request; the next step ends it.

Chunked prefill (`prefill_chunk`, None = off): a prompt longer than the per-step prompt-token
budget is computed over several steps, `prefill_chunk` tokens per step for all prompts together,
and every step still runs the batched decode of the other sequences, so their tokens keep coming
while a long prompt is computed. The cache already records partially computed prompts
(engine/cache.py: `plan` starts where the slot's tokens end), so a chunk is a forward at an
offset, exactly like a prompt whose prefix was cached.

Paced chunks (`prefill_pace`, None = off; the server sets 1.0): while sequences are decoding, a
step's prompt budget shrinks to the number of prompt tokens that take about `prefill_pace` times
the decode step's own time, from moving averages of the measured seconds per token of steps of
TIMED_STEP_TOKENS tokens or more (where the products, not the weight reads, set the time) and of
decode-only steps, kept per number of rows (at least 2 tokens, at most `prefill_chunk`). When more
requests are computing prompts than are decoding (a burst of arrivals), the budget grows by that
ratio, so that the first stream to get in does not hold the others' prompts to its pace. The chunk rides in the decode
step's forward, so with few rows decoding (a step bound by reading the weights) it costs less
than that. So a long prompt arriving slows
the ongoing streams' inter-token latency by about (1 + prefill_pace)x, on any machine, instead of
by a fixed chunk's cost, which is 28x the decode step where prompt tokens cost about as much as
decode rows (the 2-core AVX2 machine, docs/SERVER.md); the long prompt's first token comes later
in exchange. With nothing decoding, a step takes the whole `prefill_chunk`.
"""
from __future__ import annotations

import bisect
import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .cache import common_prefix
from .errors import InvalidParameterError, LLMClosedError, NonFiniteLogitsError
from .generator import Generator, StreamChunk, check_finite_logits

# A prompt prefix at least this long, already computed in another slot, is copied from there
# instead of being recomputed (copying costs a memcpy of its KV entries).
MIN_SHARED_PREFIX = 8
TIMED_STEP_TOKENS = 16     # steps of at least this many tokens time the seconds per token (pace)


@dataclass(eq=False)     # a request is itself: `in` / `remove` on the queues compare identity
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
    order: tuple = ()                   # (priority, arrival number): its place among waiting requests
    listener: Callable[[], None] | None = None  # called (from the stepping thread) on news

    def notify(self) -> None:
        """Tell the listener (if any) that chunks were added or the request ended. A listener
        that fails (an event loop that is closed already) is dropped: the request goes on."""
        if self.listener is not None:
            try:
                self.listener()
            except Exception:
                self.listener = None


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

    def __init__(self, llm, prefill_chunk: int | None = None):
        self.llm = llm
        self.lock = threading.RLock()
        self.news = threading.Condition(self.lock)   # notified after every step of the loop thread
        self.inbox: deque[Request] = deque()         # submitted, not yet seen by a step
        self.waiting: list[Request] = []             # by (params.priority, arrival): see _take_inbox
        self._arrivals = itertools.count()           # arrival numbers, for the order within a priority
        self.running: list[Request] = []
        self.closed = False
        self.prefill_chunk = prefill_chunk
        self.prefill_pace = None
        self._token_s: float | None = None           # moving average: seconds per token of a large step
        self._decode_step_s: dict[int, float] = {}   # moving averages: seconds of a decode-only step, by its rows
        self.stats = {"steps": 0, "decode_rows": 0, "prefill_tokens": 0, "preemptions": 0}   # totals, for /metrics
        self.preemption = True                       # a more urgent waiting request may take a running one's slot
        self._logits_buffer: np.ndarray | None = None   # _rows_copy's, reused from step to step
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._work = threading.Event()               # set when the loop thread may have work

    @property
    def prefill_chunk(self) -> int | None:
        """Prompt tokens computed per step, all prompts together (None: whole prompts at once)."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise InvalidParameterError(f"prefill_chunk must be an integer >= 2 or None, got {value!r}")
        self._prefill_chunk = value

    @property
    def prefill_pace(self) -> float | None:
        """While sequences decode, a step's prompt chunk takes about this many times the decode
        step's time (None: the fixed prefill_chunk). See the module docstring."""
        return self._prefill_pace

    @prefill_pace.setter
    def prefill_pace(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value <= 1000):
            raise InvalidParameterError(f"prefill_pace must be a number in (0, 1000] or None, got {value!r}")
        self._prefill_pace = None if value is None else float(value)

    def _prompt_budget(self, n_decoding: int, n_prompting: int = 0) -> int | None:
        """Prompt tokens this step may compute (None: no limit): prefill_chunk, or with
        prefill_pace set and rows decoding, as many as fit in prefill_pace times the time of a
        decode step of n_decoding rows, times n_prompting / n_decoding when more requests are
        computing their prompts than are decoding (a burst of arrivals is not held to the pace of
        the few streams that got in first)."""
        chunk = self.prefill_chunk
        if (chunk is None or self.prefill_pace is None or n_decoding == 0
                or self._token_s is None or not self._decode_step_s):
            return chunk
        fit = self.prefill_pace * self._decode_step_estimate(n_decoding) / self._token_s
        fit *= max(1.0, n_prompting / n_decoding)
        return max(2, min(chunk, int(fit)))

    def _decode_step_estimate(self, n_rows: int) -> float:
        """Seconds of a decode-only step of n_rows rows: its moving average when steps of n_rows
        rows were measured, else the nearest measured row count's, plus (or minus) a prompt
        token's seconds per row of difference (a decode row costs about a prompt token in the
        products; at least one token's time). Steps with prompt chunks are not decode-only, so in
        a burst the rows change without a measurement: an average over all row counts would keep
        the time of an earlier, smaller batch (measured: one row's 27 ms while 7 rows and 3 prompt
        tokens took 92 ms, docs/SERVER.md)."""
        measured = self._decode_step_s
        if n_rows in measured:
            return measured[n_rows]
        nearest = min(measured, key=lambda k: (abs(k - n_rows), k > n_rows))   # ties: the smaller count
        return max(self._token_s, measured[nearest] + (n_rows - nearest) * self._token_s)

    def _timed(self, average: str, seconds: float, key: int | None = None) -> None:
        """Fold one measurement into the moving average named `average` (weight 0.2); with key,
        into the average of that key of the dict named `average`."""
        if key is None:
            old = getattr(self, average)
            setattr(self, average, seconds if old is None else 0.8 * old + 0.2 * seconds)
            return
        averages = getattr(self, average)
        old = averages.get(key)
        averages[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def submit(self, prompt_ids: list[int], params, sample_index: int = 0,
               listener: Callable[[], None] | None = None) -> Request:
        """Queue a request (never waits for a step). LLMClosedError once the LLM is closed."""
        request = Request(list(prompt_ids), params, sample_index, listener=listener)
        if self.closed:
            raise LLMClosedError("the LLM is closed")
        self.inbox.append(request)
        if self.closed:                  # closed while we appended: make sure it ends too
            self.close()
        self._work.set()
        return request

    def request_cancel(self, request: Request) -> None:
        """Ask for a request to end at the next step, without waiting for the lock (an event
        loop's task that was cancelled, a client that disconnected). `cancel` ends it now."""
        request.cancelled = True
        self._work.set()

    def cancel(self, request: Request) -> None:
        """End a request now: its slot (if it has one) is free when this returns."""
        with self.lock:
            if request.done:
                return
            request.cancelled = True
            self._take_inbox()
            if request in self.waiting:
                self.waiting.remove(request)
            elif request in self.running:
                self.running.remove(request)
            self._end(request)

    def begin_close(self) -> None:
        """Tell the loop thread (if any) to exit before its next step, without the lock: a busy
        loop takes the lock again right after each step, so a thread waiting for it to close
        could otherwise wait until every running request had finished. `close` follows."""
        self._stopping = True
        self._work.set()

    def close(self) -> None:
        """End every waiting and running request with LLMClosedError; later submits raise it."""
        self.begin_close()                   # the loop thread exits; nothing to join here
        with self.lock:
            self.closed = True
            self._take_inbox()
            for r in list(self.waiting) + self.running:
                self._end(r, LLMClosedError("the LLM was closed while this request was in progress"))
            self.waiting.clear()
            self.running = []
            self.news.notify_all()

    # -- the background loop -----------------------------------------------------------------------
    @property
    def background(self) -> bool:
        """Whether a loop thread runs the steps (`start`)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run steps in a daemon thread from now on (idempotent)."""
        with self.lock:
            if self.closed:
                raise LLMClosedError("the LLM is closed")
            if self.background:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lmengine-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop thread after its current step; callers drive the steps again. Requests in
        progress are kept (their waiters go on driving them)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._work.set()
        if thread is not threading.current_thread():
            thread.join(timeout)
        with self.lock:
            self._thread = None
            self.news.notify_all()

    def _loop(self) -> None:
        while not self._stopping:
            self._work.clear()               # cleared before looking: a later submit sets it again
            with self.lock:
                if self._stopping or self.closed:
                    break
                self._take_inbox()
                busy = bool(self.waiting or self.running)
                if busy:
                    try:
                        self.step()
                    except BaseException as e:   # the step failed its requests already; go on
                        print(f"lmengine: scheduler step failed: {type(e).__name__}: {e}", file=sys.stderr)
                    self.news.notify_all()
                stalled = busy and not self.running    # waiting for a slot held outside the scheduler
            if not busy:
                self._work.wait()
            elif stalled:
                self._work.wait(0.01)

    # -- waiting -----------------------------------------------------------------------------------
    def wait_for_news(self, request: Request) -> None:
        """Until `request` has a chunk to read or is done: run steps (caller-driven mode) or wait
        for the loop thread's."""
        while True:
            with self.lock:
                if request.chunks or request.done:
                    return
                if self.background:
                    self.news.wait(0.5)
                else:
                    self.step()

    def run_until_done(self, requests: list[Request]) -> None:
        with self.lock:
            while not all(r.done for r in requests):
                if self.background:
                    self.news.wait(0.5)
                else:
                    self.step()

    def queue_depth(self) -> int:
        """Requests submitted and not yet running (no slot yet)."""
        return len(self.inbox) + len(self.waiting)

    # -- one step --------------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        """Move submitted requests to `waiting`, kept sorted by (priority, arrival): admission
        takes waiting[0], so a lower priority value goes first, and FIFO within a priority."""
        while self.inbox:
            request = self.inbox.popleft()
            request.order = (getattr(request.params, "priority", 0), next(self._arrivals))
            bisect.insort(self.waiting, request, key=lambda r: r.order)

    def step(self) -> None:
        self.stats["steps"] += 1
        self._take_inbox()
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
        request.notify()

    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.pop(0)
                self._end(request)
                continue
            g = request.generator            # set when the request was pre-empted: it goes on
            slot = None
            # at most max_batch_size running: the LLM keeps one slot for logits()/perplexity()
            if len(self.running) < self.llm.max_batch_size:
                slot = self.llm.acquire_slot(g.tokens if g else request.prompt_ids, or_raise=False)
            if slot is None:
                if self.preemption and self._preempt_for(request):
                    continue
                return
            self.waiting.pop(0)
            if g is not None:
                g.attach_slot(slot)
                self.running.append(request)
                continue
            try:
                request.generator = Generator(self.llm, request.params, request.prompt_ids,
                                              sample_index=request.sample_index, slot=slot)
            except Exception as e:        # invalid params for this model: the slot was never the generator's
                self.llm.release_slot(slot)
                self._end(request, e)
                continue
            self.running.append(request)

    def _preempt_for(self, request: Request) -> bool:
        """Free a slot for `request` by pre-empting the running request of the lowest priority
        (the latest arrival among equals), if its priority value is greater than request's: the
        victim gives its slot back, keeps its sequence, and waits in its old place in the queue;
        re-admitted, it computes again what its new slot does not hold (the same logits: one
        token's computation does not depend on the rest of the forward). Equal priorities never
        pre-empt each other, so without priorities nothing is ever pre-empted."""
        if not self.running:
            return False
        victim = max(self.running, key=lambda r: r.order)
        if victim.order[0] <= request.order[0]:
            return False
        self.running.remove(victim)
        victim.generator.detach_slot()
        bisect.insort(self.waiting, victim, key=lambda r: r.order)
        self.stats["preemptions"] += 1
        return True

    def _retire(self) -> None:
        keep = []
        for r in self.running:
            if r.cancelled or r.generator.is_done():
                self._end(r)
            else:
                keep.append(r)
        self.running = keep

    def _forward_and_sample(self) -> None:
        """Logits for every running request from one forward over the step's tokens (decode rows
        and prompt chunks), then one sampling call over the rows that are finite. Failures end
        only their requests."""
        # rows past their prompt (they decode this step) set the pace of prompt chunks
        n_decoding = sum(1 for r in self.running if r.generator.logits is None and r.generator.generated)
        n_prompting = sum(1 for r in self.running if r.generator.logits is None and not r.generator.generated)
        budget = self._prompt_budget(n_decoding, n_prompting)   # prompt tokens left for this step (None: no limit)
        parts: list[tuple[Request, int, list[int], bool]] = []   # (request, start, tokens, completes it)
        for r in self.running:
            g = r.generator
            if g.logits is not None:
                continue
            if parts and self._shares_pending_prefix(g, parts):
                self._run_parts(parts)       # first the prompt it shares, then a copy of its prefix
                parts = []
            self._share_prefix(g)
            start, new = g.uncached()
            take = len(new)
            if take > 1 and budget is not None:
                take = _chunk_length(len(new), budget)
                if take == 0:
                    continue                 # this step's budget is spent: the next step goes on
                budget -= take
            parts.append((r, start, new[:take], take == len(new)))
        if parts:
            self._run_parts(parts)
        ready = [r for r in self.running if not r.done and r.generator.logits is not None]
        if ready:
            self._sample(ready)

    def _run_parts(self, parts: list[tuple[Request, int, list[int], bool]]) -> None:
        """The parts' forward: one `forward_mixed` call where the backend has it and the tokens
        fit; else, or if that call raises, each prompt part through `forward` and the decode rows
        through one `forward_batch`, so that an error ends only the requests it concerns (a KV
        cache's positions are simply written again)."""
        backend = self.llm.backend
        n_tokens = sum(len(tokens) for _, _, tokens, _ in parts)
        if len(parts) > 1 and n_tokens <= backend.mixed_tokens:
            calls = [(r.generator.slot, np.asarray(tokens, dtype=np.int64), start, complete)
                     for r, start, tokens, complete in parts]
            try:
                t0 = time.perf_counter()
                outputs = backend.forward_mixed(calls)
            except Exception:
                pass                          # again part by part: the error ends its own request
            else:
                self._time_step(parts, time.perf_counter() - t0)
                for (r, start, tokens, complete), logits in zip(parts, outputs):
                    self._took(r, start, tokens, complete, logits)
                return
        rows, prompts = [], []                # decode rows (a prompt's last token too): one batch
        for part in parts:
            (rows if len(part[2]) == 1 and part[3] else prompts).append(part)
        for part in prompts:
            r, start, tokens, complete = part
            try:
                t0 = time.perf_counter()
                logits = backend.forward(r.generator.slot, np.asarray(tokens, dtype=np.int64), start)
            except Exception as e:
                self._end(r, e)
                continue
            self._time_step([part], time.perf_counter() - t0)
            self._took(r, start, tokens, complete, logits[-1])
        if rows:
            try:
                t0 = time.perf_counter()
                logits = backend.forward_batch(np.array([r.generator.slot for r, _, _, _ in rows], dtype=np.int64),
                                               np.array([tokens[0] for _, _, tokens, _ in rows], dtype=np.int64),
                                               np.array([start for _, start, _, _ in rows], dtype=np.int64))
            except Exception as e:
                for r, _, _, _ in rows:
                    self._end(r, e)
                return
            self._time_step(rows, time.perf_counter() - t0)
            for i, (r, start, tokens, complete) in enumerate(rows):
                self._took(r, start, tokens, complete, logits[i])

    def _time_step(self, parts, seconds: float) -> None:
        """Fold one forward's time into the pace's moving averages and count its tokens."""
        n_tokens = sum(len(tokens) for _, _, tokens, _ in parts)
        n_rows = sum(1 for _, _, tokens, complete in parts if len(tokens) == 1 and complete)   # decode rows
        if n_rows == len(parts):
            self._timed("_decode_step_s", seconds, key=n_rows)
        if n_tokens >= TIMED_STEP_TOKENS:
            self._timed("_token_s", seconds / n_tokens)
        self.stats["decode_rows"] += n_rows
        self.stats["prefill_tokens"] += n_tokens - n_rows

    def _took(self, r: Request, start: int, tokens: list[int], complete: bool, logits) -> None:
        """A part's result: the logits of a completed prompt or decode row, or a chunk's commit."""
        if complete:
            self._take_logits(r, logits, start)
        else:                                 # a prompt's chunk: more of it follows
            self.llm.slots.commit(r.generator.slot, start, tokens)

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
        batch_logits = self._rows_copy([g.logits for g in gens])  # [b, vocab], a copy the sampler may edit
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
            else:
                r.notify()

    def _rows_copy(self, rows: list[np.ndarray]) -> np.ndarray:
        """float32 [len(rows), vocab]: a copy of the logits rows, in a buffer kept from step to
        step (valid until the next step). A fresh array each step pays its page faults: 3.2 ms
        of a 51 ms step at 16 rows of a 49k vocabulary on 2 cores, against 0.2 ms here."""
        b, width = len(rows), rows[0].shape[0]
        buf = self._logits_buffer
        if buf is None or buf.shape[0] < b or buf.shape[1] != width:
            buf = self._logits_buffer = np.empty((max(b, 8), width), dtype=np.float32)
        return np.stack(rows, out=buf[:b])

    def _shares_pending_prefix(self, g: Generator, parts) -> bool:
        """Whether g's prompt starts with MIN_SHARED_PREFIX or more uncached tokens that a prompt
        part of this step computes (n samples of one prompt, a common system prompt): those parts
        then run first, and g copies the prefix from their slot instead of computing it again."""
        if not self.llm.backend.supports_rewind:
            return False
        own = self.llm.slots.plan(g.slot, g.tokens)
        if own >= len(g.tokens) - 1:          # decoding, or nothing left to share
            return False
        return any(len(tokens) > 1
                   and min(common_prefix(r.generator.tokens, g.tokens), start + len(tokens)) - own >= MIN_SHARED_PREFIX
                   for r, start, tokens, _ in parts)

    def _share_prefix(self, g: Generator) -> None:
        """If another slot holds a longer prefix of g's tokens than g's own slot, copy it over
        (n samples of one prompt, or requests with a common system prompt)."""
        slots = self.llm.slots
        if not self.llm.backend.supports_rewind:
            return
        own = slots.plan(g.slot, g.tokens)
        if own >= len(g.tokens) - 1:          # all but the last token cached (decoding): nothing to gain
            return
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


def _chunk_length(n_new: int, budget: int) -> int:
    """How many of a prompt's n_new uncached tokens to compute in a step with `budget` prompt
    tokens left: all of them if they fit, else as many as fit, but never leaving exactly one
    behind (a lone last prompt token would take the batched decode path instead of the prompt
    forward that computes a prompt's last token unchunked)."""
    if n_new <= budget:
        return n_new
    take = budget
    if n_new - take == 1:
        take -= 1
    return take if take >= 1 else 0
