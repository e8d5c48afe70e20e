"""Logits -> token ids for a batch of requests, each with its own `SamplingParams`.

`Sampler.sample(logits, states)` takes float32 logits [b, vocab] (one row per request) and one
`SamplerState` per row, and applies, in this one order (vLLM/HF semantics for each step):

  0. logprobs     if the request asked for them: log-softmax statistics of the *raw* model logits,
                  before any step below (vLLM's default "raw_logprobs": what the model thinks,
                  not what the sampler did to it). The chosen token's logprob and rank and the
                  top-n alternatives all come from this distribution.
  1. penalties    repetition_penalty over every token of the prompt and the output so far
                  (x / p if x > 0 else x * p), then frequency_penalty * count and presence_penalty
                  over the generated tokens.
  2. logit_bias   added to the listed tokens' logits.
  3. allowed_token_ids   every other token gets -inf.
  4. bans         -inf for: the last token of a bad word whose other tokens end the output so
                  far; EOS and stop_token_ids while fewer than min_tokens tokens were generated.
  4a. logits_processors   the request's own callables f(generated_ids, logits_row), in order,
                  on a read-only int32 view of its generated ids and its float32 logits row.
  4b. constraint  structured output (json_schema / regex / grammar / json_object): -inf for
                  every token that cannot continue a valid output (engine/constraints.py).
                  Last of the edits, so nothing before can re-allow a token the grammar forbids.
                  Rows without a constraint do no mask work at all.
  5. temperature -> top-k -> top-p -> typical-p -> min-p   (kernels/sampling.py); greedy rows
                  (temperature 0 or top_k 1) take the argmax of the logits after steps 1-4.
  6. draw         with one uniform number from the request's own generator.

Randomness: every request owns a NumPy Generator(PCG64) seeded from `params.seed` (fresh entropy
when None), and each call to `sample` takes exactly one draw per row, greedy rows included. So a
seeded request produces the same tokens whatever else is in the batch, and the generator's
position always equals the number of generated tokens, which makes `rewind_to` exact.

`sample` records the chosen token in each state (penalty counts, bad-word history, min_tokens).
The logits array is used as scratch: steps 1-4 overwrite it in place.

Failures (a logits processor that raises, a constraint that leaves no token) raise before any
draw, so a failed call draws and records nothing; the scheduler then samples each row on its own
to end only the failing request (other rows' processors run again for that step).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lmengine.constraints import Constraint, ConstraintCompiler, apply_mask
from lmengine.errors import InvalidParameterError
from lmengine.params import SamplingParams
from lmengine.kernels import sampling as K
from lmengine.validation import check_token_ids


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one generated token under the raw model distribution."""

    token_id: int
    logprob: float                     # log p(token_id)
    rank: int                          # 1 = the model's most likely token
    top_token_ids: tuple[int, ...]     # the params.logprobs most likely tokens, most likely first
    top_logprobs: tuple[float, ...]    # their log-probabilities


@dataclass(frozen=True)
class SampleResult:
    token_ids: np.ndarray                    # int32 [b]: the chosen token of each row
    logprobs: list[TokenLogprobs | None]     # per row; None where params.logprobs is None


def bad_words_token_ids(bad_words: Iterable[str], encode: Callable[[str], Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Token sequences to ban for `bad_words`, given `encode` (text -> ids, no special tokens).

    A word is tokenized as written and with one leading space, since BPE vocabularies spell a word
    differently at the start of the text and after a space; both sequences are banned.
    """
    sequences: list[tuple[int, ...]] = []
    for word in bad_words:
        for variant in (word, " " + word.lstrip()):
            ids = tuple(int(t) for t in encode(variant))
            if ids and ids not in sequences:
                sequences.append(ids)
    return tuple(sequences)


class _GrowableInt32:
    """An int32 array with amortised O(1) append (the flat lists handed to the kernels)."""

    def __init__(self) -> None:
        self.data = np.empty(16, dtype=np.int32)
        self.n = 0

    def append(self, value: int) -> None:
        if self.n == self.data.shape[0]:
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.n] = value
        self.n += 1

    def view(self) -> np.ndarray:
        return self.data[: self.n]


class SamplerState:
    """One request's sampling state: its params, its random generator and the tokens it has seen.

    Build it with `Sampler.new_state`. Tokens that enter the sequence without being sampled
    (a prompt extension) go through `extend_prompt`; `rewind_to(n)` forgets all but the first n
    generated tokens and puts the generator back where it was after n draws.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, eos_token_ids: Sequence[int],
                 prompt_token_ids: Sequence[int], bad_words_ids: Sequence[Sequence[int]],
                 sample_index: int = 0, constraint: Constraint | None = None) -> None:
        self.params = params
        self.constraint = constraint                   # structured output: advanced in record()
        self.processors = params.logits_processors
        self._generated_ids = _GrowableInt32()         # int32 copy of generated_token_ids (processors' view)
        self.vocab_size = vocab_size
        # The ids the kernels will index the logits with are checked here, once: SamplingParams
        # knows no vocabulary; eos_token_ids were checked by the Sampler.
        self.bias_ids = check_token_ids(list(params.logit_bias), vocab_size, "logit_bias token id").astype(np.int32)
        self.allowed_ids = check_token_ids(params.allowed_token_ids or (), vocab_size,
                                           "allowed_token_ids token id").astype(np.int32)
        stop_ids = check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids token id").tolist()
        self.bad_words_ids = tuple(tuple(check_token_ids(seq, vocab_size, "bad_words token id").tolist())
                                   for seq in bad_words_ids if len(seq) > 0)
        if params.logprobs is not None and params.logprobs > vocab_size:
            raise InvalidParameterError(f"logprobs must be <= vocab size {vocab_size}, got {params.logprobs}")

        # Per-row values handed to the kernels, fixed for the request's life.
        greedy = params.is_greedy
        self.temperature = 0.0 if greedy else params.temperature
        self.top_k = 0 if greedy else params.top_k
        self.bias_values = np.fromiter(params.logit_bias.values(), dtype=np.float32, count=len(params.logit_bias))
        self.min_tokens_bans = np.asarray(sorted(set(eos_token_ids) | set(stop_ids)), dtype=np.int32)
        self.has_penalties = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                              or params.frequency_penalty != 0.0)

        # Random stream: sample i of a request with n > 1 gets child stream i of the seed.
        self.seed = params.seed if params.seed is not None else np.random.SeedSequence().entropy
        self.sample_index = sample_index
        self._reset_rng(0)

        self.prompt_token_ids: list[int] = []
        self.generated_token_ids: list[int] = []
        self._seen_position: dict[int, int] = {}     # token id -> index in the two arrays below
        self._seen_ids = _GrowableInt32()            # every distinct token of prompt + output
        self._output_counts = _GrowableInt32()       # times each was generated
        self.extend_prompt(prompt_token_ids)

    # ------------------------------------------------------------------ history

    @property
    def n_generated(self) -> int:
        return len(self.generated_token_ids)

    def extend_prompt(self, token_ids: Iterable[int], *, checked: bool = False) -> None:
        """Tokens that are part of the context but were not sampled (count for repetition only).
        checked=True: token_ids is a list of ints its caller already checked against this
        vocabulary (`Generator.append_tokens` does), so they are not checked again."""
        if not checked:
            token_ids = check_token_ids(token_ids, self.vocab_size, "prompt token id").tolist()
        self.prompt_token_ids.extend(token_ids)
        if self.has_penalties:
            for t in token_ids:
                self._see(t, generated=False)

    def record(self, token_id: int) -> None:
        """Add a generated token (called by `Sampler.sample` for the token it chose)."""
        self.generated_token_ids.append(int(token_id))
        if self.has_penalties:
            self._see(int(token_id), generated=True)
        if self.processors:
            self._generated_ids.append(token_id)
        if self.constraint is not None:
            self.constraint.consume(token_id)

    def rewind_to(self, n_generated: int) -> None:
        """Keep the first n_generated generated tokens; the generator restarts after n draws."""
        if not 0 <= n_generated <= self.n_generated:
            raise InvalidParameterError(
                f"rewind_to needs 0 <= n <= {self.n_generated} generated tokens, got {n_generated}")
        kept = self.generated_token_ids[:n_generated]
        prompt = self.prompt_token_ids
        self.prompt_token_ids, self.generated_token_ids = [], []
        self._seen_position, self._seen_ids, self._output_counts = {}, _GrowableInt32(), _GrowableInt32()
        self._generated_ids = _GrowableInt32()
        if self.constraint is not None:
            self.constraint.reset()                   # record() below replays the kept tokens
        self.extend_prompt(prompt, checked=True)
        for t in kept:
            self.record(t)
        self._reset_rng(n_generated)

    def copy(self) -> SamplerState:
        """An independent copy: same history and same random-stream position (beam search and
        other forks continue from here without sharing state). The params (and the logits
        processors in them) are shared, not copied; the constraint's matcher is copied."""
        shared = (self.params, self.processors)
        return copy.deepcopy(self, {id(x): x for x in shared})

    def generated_ids_view(self) -> np.ndarray:
        """Read-only int32 [n_generated] view of the generated tokens (what processors get)."""
        view = self._generated_ids.view()
        view.flags.writeable = False
        return view

    def _see(self, token_id: int, generated: bool) -> None:
        position = self._seen_position.get(token_id)
        if position is None:
            self._seen_position[token_id] = self._seen_ids.n
            self._seen_ids.append(token_id)
            self._output_counts.append(1 if generated else 0)
        elif generated:
            self._output_counts.data[position] += 1

    # ------------------------------------------------------------------ randomness

    def _reset_rng(self, n_draws: int) -> None:
        seed_seq = (np.random.SeedSequence(self.seed) if self.sample_index == 0 else
                    np.random.SeedSequence(self.seed, spawn_key=(self.sample_index,)))
        bit_generator = np.random.PCG64(seed_seq)
        if n_draws:
            bit_generator.advance(n_draws)         # one 64-bit output per Generator.random()
        self.rng = np.random.Generator(bit_generator)

    # ------------------------------------------------------------------ per-step inputs

    def penalty_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct token ids seen, times each was generated), int32, for apply_penalties."""
        return self._seen_ids.view(), self._output_counts.view()

    def banned_ids(self) -> list[int]:
        """Tokens that must not be sampled at this step: EOS/stop ids under min_tokens, and the
        last token of every bad word whose other tokens end the generated output."""
        banned: list[int] = []
        if self.n_generated < self.params.min_tokens:
            banned.extend(self.min_tokens_bans.tolist())
        generated = self.generated_token_ids
        for seq in self.bad_words_ids:
            prefix_len = len(seq) - 1
            if prefix_len == 0 or (len(generated) >= prefix_len and tuple(generated[-prefix_len:]) == seq[:-1]):
                banned.append(seq[-1])
        return banned


class Sampler:
    """Samples the next token of a batch of requests (see the module docstring for the order).

    vocab_size: logits width. eos_token_ids: the model's end-of-sequence ids (banned under
    min_tokens). encode: text -> token ids without special tokens, used to tokenize bad_words
    (required only by requests that set bad_words). constraints: compiles structured-output
    constraints for this vocabulary (required only by requests that set one).
    """

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int] = (),
                 encode: Callable[[str], Sequence[int]] | None = None,
                 constraints: ConstraintCompiler | None = None) -> None:
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = tuple(
            check_token_ids(list(eos_token_ids), self.vocab_size, "eos_token_ids token id").tolist())
        self.encode = encode
        self.constraints = constraints

    def new_state(self, params: SamplingParams, prompt_token_ids: Sequence[int] = (),
                  sample_index: int = 0) -> SamplerState:
        """State for one sequence of a request; sample_index i in [0, n) picks the i-th of the
        request's n independent random streams (0 is the stream of `seed` itself)."""
        if params.bad_words and self.encode is None:
            raise InvalidParameterError("bad_words needs a tokenizer: build the Sampler with encode=")
        bad_ids = bad_words_token_ids(params.bad_words, self.encode) if params.bad_words else ()
        constraint = None
        spec = params.constraint
        if spec is not None:
            if self.constraints is None:
                raise InvalidParameterError(
                    f"{spec[0]} needs the model's vocabulary: build the Sampler with constraints=")
            constraint = self.constraints.compile(*spec)
        return SamplerState(params, self.vocab_size, self.eos_token_ids, prompt_token_ids, bad_ids,
                            sample_index, constraint)

    def sample(self, logits: np.ndarray, states: Sequence[SamplerState]) -> SampleResult:
        """One token per row of logits (float32 [b, vocab], overwritten) for states[row]."""
        logits = self._check_logits(logits, states)

        # 0. raw logprobs, before anything edits the logits
        lp_rows = [r for r, s in enumerate(states) if s.params.logprobs is not None]
        if lp_rows:
            raw = logits[lp_rows]                                     # copy: [m, vocab]
            n_top = max(states[r].params.logprobs for r in lp_rows)
            lse, top_ids, top_lps = K.top_logprobs(raw, n_top)

        # 1-4. token edits; 5-6. filters and draw
        self._edit_logits(logits, states)
        uniforms = np.array([s.rng.random() for s in states], dtype=np.float64)
        chosen = K.sample_rows(logits, *_filter_arrays(states), uniforms)
        if (chosen < 0).any():
            for s in states:
                s._reset_rng(s.n_generated)                            # undo this step's draws
            _raise_nothing_left(int(np.flatnonzero(chosen < 0)[0]))
        for s, token_id in zip(states, chosen.tolist()):
            s.record(token_id)

        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        if lp_rows:
            chosen_lp, ranks = K.token_logprobs(raw, lse, chosen[lp_rows])
            for i, r in enumerate(lp_rows):
                n_top = states[r].params.logprobs
                logprobs[r] = TokenLogprobs(
                    token_id=int(chosen[r]), logprob=float(chosen_lp[i]), rank=int(ranks[i]),
                    top_token_ids=tuple(top_ids[i, :n_top].tolist()),
                    top_logprobs=tuple(top_lps[i, :n_top].tolist()))
        return SampleResult(token_ids=chosen, logprobs=logprobs)

    def probabilities(self, logits: np.ndarray, states: Sequence[SamplerState]) -> np.ndarray:
        """The distribution `sample` would draw from at this step: float64 [b, vocab] (steps 1-5;
        greedy rows are one-hot). Overwrites logits like `sample`; draws nothing, records nothing."""
        logits = self._check_logits(logits, states)
        self._edit_logits(logits, states)
        probs = K.filtered_probs(logits, *_filter_arrays(states))
        empty = probs.sum(axis=1) == 0
        if empty.any():
            _raise_nothing_left(int(np.flatnonzero(empty)[0]))
        return probs

    def _check_logits(self, logits: np.ndarray, states: Sequence[SamplerState]) -> np.ndarray:
        n_rows = len(states)
        if logits.ndim != 2 or logits.shape != (n_rows, self.vocab_size):
            raise InvalidParameterError(
                f"logits must have shape [{n_rows}, {self.vocab_size}] (one row per state), got {list(logits.shape)}")
        if logits.dtype != np.float32 or not logits.flags.c_contiguous:
            logits = np.ascontiguousarray(logits, dtype=np.float32)
        return logits

    @staticmethod
    def _edit_logits(logits: np.ndarray, states: Sequence[SamplerState]) -> None:
        """Steps 1-4, in place: penalties, logit bias, allowed tokens, bans."""
        if any(s.has_penalties for s in states):
            entries = [s.penalty_entries() if s.has_penalties else (_EMPTY, _EMPTY) for s in states]
            row_ptr, ids = _csr([e[0] for e in entries])
            counts = np.concatenate([e[1] for e in entries])
            K.apply_penalties(logits, row_ptr, ids, counts,
                              _per_row(states, lambda s: s.params.repetition_penalty),
                              _per_row(states, lambda s: s.params.presence_penalty),
                              _per_row(states, lambda s: s.params.frequency_penalty))
        if any(s.bias_ids.size for s in states):
            row_ptr, ids = _csr([s.bias_ids for s in states])
            K.add_logit_bias(logits, row_ptr, ids, np.concatenate([s.bias_values for s in states]))
        if any(s.allowed_ids.size for s in states):
            row_ptr, ids = _csr([s.allowed_ids for s in states])
            K.keep_only_tokens(logits, row_ptr, ids)
        banned = [s.banned_ids() for s in states]
        if any(banned):
            row_ptr, ids = _csr([np.asarray(b, dtype=np.int32) for b in banned])
            K.ban_tokens(logits, row_ptr, ids)
        for row, s in enumerate(states):
            for i, processor in enumerate(s.processors):
                try:
                    processor(s.generated_ids_view(), logits[row])
                except Exception as e:
                    raise InvalidParameterError(
                        f"logits_processors[{i}] ({getattr(processor, '__name__', type(processor).__name__)}) "
                        f"raised {type(e).__name__}: {e}") from e
        constrained = [row for row, s in enumerate(states) if s.constraint is not None]
        if constrained:
            _apply_constraints(logits, states, constrained)


def _apply_constraints(logits: np.ndarray, states: Sequence[SamplerState], rows: list[int]) -> None:
    """Step 4b: -inf for the tokens each constrained row's grammar does not allow next."""
    vocab = logits.shape[1]
    words = np.empty((len(rows), (vocab + 31) // 32), dtype=np.int32)   # one bitmask per row
    for i, row in enumerate(rows):
        states[row].constraint.fill_mask(words[i])
    for i, row in enumerate(rows):
        apply_mask(logits[row], words[i])


def _filter_arrays(states: Sequence[SamplerState]) -> tuple[np.ndarray, ...]:
    """Per-row temperature, top_k, top_p, typical_p, min_p arrays for the filter kernels."""
    return (np.array([s.temperature for s in states], dtype=np.float64),
            np.array([s.top_k for s in states], dtype=np.int32),
            np.array([s.params.top_p for s in states], dtype=np.float64),
            np.array([s.params.typical_p for s in states], dtype=np.float64),
            np.array([s.params.min_p for s in states], dtype=np.float64))


def _raise_nothing_left(row: int) -> None:
    raise InvalidParameterError(
        f"no token left to sample for batch row {row}: allowed_token_ids, bad_words, "
        f"logit_bias, min_tokens, logits_processors and the structured-output constraint together "
        f"exclude every token")


_EMPTY = np.empty(0, dtype=np.int32)


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(row_ptr int64 [b+1], flat int32 ids) of per-row id arrays."""
    row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([r.shape[0] for r in rows], out=row_ptr[1:])
    flat = np.concatenate(rows).astype(np.int32, copy=False) if rows else _EMPTY
    return row_ptr, flat


def _per_row(states: Sequence[SamplerState], value: Callable[[SamplerState], float]) -> np.ndarray:
    """float32 [b] of one value per state (penalty factors: float32 like the logits they scale)."""
    return np.array([value(s) for s in states], dtype=np.float32)
