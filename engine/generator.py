"""One request's decoding loop: tokens in, sampled tokens out, text with stop handling.

`Generator(llm, params)` is the low-level API that `LLM.generate`, `LLM.stream` and `LLM.chat`
are thin wrappers over:

    g = Generator(llm, SamplingParams(temperature=0, max_tokens=20))
    g.append_tokens(llm.tokenizer.encode("Once upon a time"))
    while not g.is_done():
        g.step()
        print(g.take_text(), end="")

A Generator owns a cache slot of the backend from construction to `close()` (or the end of a
`with` block), which gives it back exactly once. Close it: the engine's own paths always do. A
Generator a user drops without closing is a leak the engine repairs rather than a hang: a
finalizer hands its slot to the LLM, which frees it at its next slot request. Which
tokens are already in that slot is the LLM's `SlotTable`'s business: `append_tokens` only
records tokens, and the forward runs when the next logits are needed, over the tokens the slot
does not hold yet (so a shared prefix with the previous request, or a rewind, costs nothing).

Finishing: EOS (unless ignore_eos) or a token of stop_token_ids -> "stop" (the token is not part
of the text); a stop string -> "stop" (text cut there); max_tokens or a full context -> "length".
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextLengthError, InvalidParameterError, NonFiniteLogitsError
from .stops import TextStream


@dataclass
class Completion:
    """The result of one sequence. `text` never contains a stop string (unless
    include_stop_str_in_output) nor half a character."""

    text: str
    token_ids: list[int]                # generated tokens (the stop token included when one ended it)
    finish_reason: str | None           # "stop" | "length" | None while running
    prompt_token_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list | None = None        # per generated token: lmengine.sampler.TokenLogprobs
    prompt_logprobs: list | None = None  # per prompt token (the first is None)
    outputs: list["Completion"] = field(default_factory=list)  # all n samples of the request

    @property
    def n_prompt_tokens(self) -> int:
        """len(prompt_token_ids)."""
        return len(self.prompt_token_ids)

    @property
    def n_completion_tokens(self) -> int:
        """len(token_ids): the generated tokens."""
        return len(self.token_ids)


@dataclass
class StreamChunk:
    """One piece of a streamed completion."""

    text: str                           # new text since the previous chunk
    token_ids: list[int]                # tokens generated since the previous chunk
    finish_reason: str | None = None    # set on the last chunk
    index: int = 0                      # which of the n samples this chunk belongs to


class Generator:
    """One sequence's decoding loop over a cache slot of `llm` (see the module docstring).

    llm: the LLM whose model, tokenizer and slots it uses. params: SamplingParams (None =
    defaults). prompt: token ids to start with (or append them later). sample_index: which of a
    request's n random streams it draws from. slot: a slot the caller already holds (the
    scheduler's); None takes a free one (InvalidParameterError when all are busy).

    Members: `tokens` (the whole sequence), `generated`, `text`, `finish_reason`,
    `stop_reason`, `logprobs`; methods `append_tokens`, `step`, `is_done`, `take_text`,
    `rewind_to`, `completion`, `close`. Use it in a `with` block, or call `close()`.
    """

    def __init__(self, llm, params=None, prompt=None, *, sample_index: int = 0, slot: int | None = None):
        self.llm = llm
        self.slot: int | None = None
        self.params = llm.resolve_params(params)
        self.tokens: list[int] = []          # the whole sequence: prompt, then generated
        self.n_prompt = 0                    # tokens appended before the first step
        self.generated: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.sampler_state = llm.sampler.new_state(self.params, (), sample_index)  # penalties, rng, ...
        self._logits: np.ndarray | None = None   # float32 [vocab]: next-token logits, when computed
        self._new_text: list[str] = []
        self._reset_text()
        if prompt is not None:
            self.append_tokens(prompt)
        # The slot is taken last, once everything above validated: a Generator that fails to
        # construct holds no slot (a slot handed in stays the caller's to release).
        self.slot = slot if slot is not None else llm.acquire_slot(or_raise=True)
        self._finalizer = weakref.finalize(self, llm.orphaned_slots.append, self.slot)

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- feeding -----------------------------------------------------------------------------------
    def append_tokens(self, token_ids) -> None:
        """Add tokens to the sequence (the prompt, or a later turn of a conversation). Each must be
        an integer (not a bool) in [0, vocab_size): TokenIdError otherwise."""
        token_ids = self.llm.check_token_ids(token_ids)      # list[int]; checked once, here
        if len(self.tokens) + len(token_ids) > self.llm.n_ctx:
            raise ContextLengthError(
                f"{len(self.tokens) + len(token_ids)} tokens do not fit the context of {self.llm.n_ctx} "
                f"(the sequence has {len(self.tokens)}, {len(token_ids)} more were given)")
        if not token_ids:
            return
        self.tokens.extend(token_ids)
        if not self.generated:
            self.n_prompt = len(self.tokens)
        self.sampler_state.extend_prompt(token_ids, checked=True)
        self._logits = None
        self.finish_reason, self.stop_reason = None, None  # more input: the sequence goes on

    # -- the cache ---------------------------------------------------------------------------------
    @property
    def logits(self) -> np.ndarray | None:
        """float32 [vocab]: the next-token logits if they are computed already, else None (the
        scheduler computes them for many generators in one batched forward)."""
        return self._logits

    def uncached(self) -> tuple[int, list[int]]:
        """(start_pos, tokens) that must run through the model before the next logits exist."""
        start = self.llm.slots.plan(self.slot, self.tokens)
        return start, self.tokens[start:]

    def set_logits(self, logits: np.ndarray, start_pos: int) -> None:
        """Called after the forward ran over `uncached()`: the slot now holds all tokens."""
        self.llm.slots.commit(self.slot, start_pos, self.tokens[start_pos:])
        self._logits = logits

    def next_logits(self) -> np.ndarray:
        """float32 [vocab]: the model's logits for the token after `tokens` (computed if needed)."""
        if not self.tokens:
            raise InvalidParameterError("the generator has no tokens: append a prompt first")
        if self.slot is None:
            raise InvalidParameterError("the generator is closed")
        self.llm.check_open()
        if self._logits is None:
            start, new = self.uncached()
            try:
                logits = self.llm.backend.forward(self.slot, np.asarray(new, dtype=np.int64), start)
                check_finite_logits(logits[-1])
            except Exception:
                self.llm.slots.invalidate(self.slot)   # what the forward left in the slot is not trusted
                raise
            self.set_logits(logits[-1], start)
        return self._logits

    # -- stepping ----------------------------------------------------------------------------------
    def step(self) -> int:
        """Sample one token, append it, update text and finish state. Returns the token id."""
        if self.is_done():
            raise InvalidParameterError(f"the generator is done (finish_reason={self.finish_reason!r})")
        logits = self.next_logits()[None, :].copy()
        result = self.llm.sampler.sample(logits, [self.sampler_state])
        self.accept(int(result.token_ids[0]), result.logprobs[0])
        return self.generated[-1]

    def accept(self, token_id: int, logprob=None) -> None:
        """Append a sampled token (the scheduler samples a whole batch and calls this per row)."""
        p = self.params
        self.tokens.append(token_id)
        self.generated.append(token_id)
        if p.logprobs is not None:
            self.logprobs.append(logprob)
        self._logits = None
        n_generated = len(self.generated)
        eos = token_id in self.llm.eos_token_ids and not p.ignore_eos
        if eos or token_id in p.stop_token_ids:
            self._finish("stop", token_id)
            return
        delta = self._decoder.add(token_id)
        shown = self._text.push(delta, allow_stop=n_generated >= p.min_tokens)
        self._new_text.append(shown)
        if self._text.stopped:
            self._finish("stop", self._text.stop_string)
        elif p.max_tokens is not None and n_generated >= p.max_tokens:
            self._finish("length", None)
        elif len(self.tokens) >= self.llm.n_ctx:
            self._finish("length", None)

    def is_done(self) -> bool:
        """Whether the sequence has finished (`finish_reason` is set)."""
        return self.finish_reason is not None

    def take_text(self) -> str:
        """Text that became final since the previous call."""
        text = "".join(self._new_text)
        self._new_text.clear()
        return text

    @property
    def text(self) -> str:
        """The output text so far (final pieces only)."""
        return self._text.text

    def rewind_to(self, n_tokens: int) -> None:
        """Keep the first n_tokens of the sequence (prompt included); generation can go on from
        there. The cache keeps what it holds for those tokens."""
        if not 0 <= n_tokens <= len(self.tokens):
            raise InvalidParameterError(f"rewind_to({n_tokens}): the sequence has {len(self.tokens)} tokens")
        n_generated = max(0, n_tokens - self.n_prompt)
        self.tokens = self.tokens[:n_tokens]
        self.n_prompt = min(self.n_prompt, n_tokens)
        self.generated = self.generated[:n_generated]
        self.logprobs = self.logprobs[:n_generated]
        self.sampler_state.rewind_to(n_generated)
        self._logits = None
        self.finish_reason, self.stop_reason = None, None
        self._reset_text()
        for token_id in self.generated:  # rebuild the text state of the kept tokens
            self._text.push(self._decoder.add(token_id))
        self._new_text.clear()

    def completion(self) -> Completion:
        """The sequence so far as a Completion (text, generated ids, finish reason, logprobs)."""
        return Completion(text=self.text, token_ids=list(self.generated),
                          finish_reason=self.finish_reason,
                          prompt_token_ids=list(self.tokens[:self.n_prompt]), stop_reason=self.stop_reason,
                          logprobs=list(self.logprobs) if self.params.logprobs is not None else None)

    def close(self) -> None:
        """Give the cache slot back (its contents stay for prefix reuse by the next request).
        Idempotent: the slot is released once."""
        if self.slot is not None:
            self._finalizer.detach()
            slot, self.slot = self.slot, None
            self.llm.release_slot(slot)

    def detach_slot(self) -> None:
        """Give the cache slot back but keep the sequence (pre-emption: the scheduler lends the
        slot to a more urgent request). The next `attach_slot` goes on from here; the tokens the
        new slot does not hold are computed again (`uncached`), with the same results, since one
        token's computation does not depend on what else is in the forward."""
        self.close()
        self._logits = None

    def attach_slot(self, slot: int) -> None:
        """Take `slot` (held by the caller, from LLM.acquire_slot) after `detach_slot`."""
        if self.slot is not None:
            raise InvalidParameterError("the generator holds a slot already")
        self.slot = slot
        self._finalizer = weakref.finalize(self, self.llm.orphaned_slots.append, slot)

    # -- internals ---------------------------------------------------------------------------------
    def _reset_text(self) -> None:
        p = self.params
        # strip_leading_space=False: the output continues the prompt, so a SentencePiece model's
        # leading space is real text
        self._decoder = self.llm.tokenizer.incremental_decoder(skip_special_tokens=p.skip_special_tokens,
                                                                strip_leading_space=False)
        self._text = TextStream(p.stop, p.include_stop_str_in_output)

    def _finish(self, reason: str, stop_reason) -> None:
        tail = self._decoder.flush()
        if reason != "stop" or isinstance(stop_reason, int):
            # ended by length or a stop token: release held-back text
            self._new_text.append(self._text.push(tail, allow_stop=False) if tail else "")
            self._new_text.append(self._text.flush())
        self.finish_reason = reason
        self.stop_reason = stop_reason


def check_finite_logits(logits: np.ndarray) -> None:
    """NonFiniteLogitsError unless every value of a logits row is finite: NaN or inf logits come
    from a corrupt weight or an overflow, and no token sampled from them means anything."""
    if not np.isfinite(logits).all():
        n_bad = int((~np.isfinite(logits)).sum())
        raise NonFiniteLogitsError(
            f"the model produced {n_bad} non-finite logits (NaN or inf) of {logits.size}: a corrupt "
            f"weight or a numeric overflow; this request ends, others go on")
