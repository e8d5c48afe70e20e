"""Beam search (params.beam_width > 1, greedy): keep the beam_width most likely continuations.

Each live beam owns a cache slot. A step runs all beams in one `forward_batch`, scores every
beam's top candidates by total log-probability, and keeps the best beam_width. A child keeps its
parent's slot when it is the parent's first child; other children take a free slot and copy the
parent's cached prefix into it first (`copy_slot`). A beam ends at EOS or a stop token; the
search ends when beam_width beams have ended or no live beam can still beat the best ended one
(log-probabilities only decrease). Ranking uses HF's length normalisation (sum of log-probs /
length). Stop strings are applied to the finished texts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidParameterError
from .generator import Completion
from .stops import TextStream


@dataclass
class _Beam:
    tokens: list[int]
    logprob: float
    slot: int

    def normalized(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def beam_search(llm, prompt_ids: list[int], params) -> Completion:
    width = params.beam_width
    if width > llm.slots.n_slots:
        raise InvalidParameterError(
            f"beam_width {width} needs {width} cache slots; the LLM has {llm.slots.n_slots} (raise max_batch_size)")
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(llm.eos_token_ids))
    max_tokens = params.max_tokens if params.max_tokens is not None else llm.n_ctx - len(prompt_ids)
    max_tokens = min(max_tokens, llm.n_ctx - len(prompt_ids))
    backend, slots = llm.backend, llm.slots

    with llm.scheduler.lock:
        owned = []
        try:
            for _ in range(width):
                slot = llm.acquire_slot(prompt_ids, or_raise=True)
                owned.append(slot)
            first = owned[0]
            start = slots.plan(first, prompt_ids)
            logits = backend.forward(first, np.asarray(prompt_ids[start:], dtype=np.int64), start)
            slots.commit(first, start, prompt_ids[start:])
            beams = [_Beam([], 0.0, first)]
            ended: list[_Beam] = []
            for _ in range(max_tokens):
                logprobs = _log_softmax(logits)                        # [n_beams, vocab]
                candidates = []
                for b, row in zip(beams, logprobs):
                    k = min(2 * width, row.size)   # candidates per beam (a vocabulary may be smaller)
                    top = np.argpartition(row, -k)[-k:]
                    candidates += [(b.logprob + row[t], b, int(t)) for t in top]
                candidates.sort(key=lambda c: -c[0])
                children, used_parents = [], {}
                for score, parent, token in candidates:
                    if token in stop_ids:
                        ended.append(_Beam(parent.tokens + [token], score, -1))
                        continue
                    children.append((score, parent, token))
                    if len(children) == width:
                        break
                best_ended = max((e.normalized() for e in ended), default=-np.inf)
                if len(ended) >= width or not children or \
                        max(s / (len(p.tokens) + 1) for s, p, _ in children) < best_ended and len(ended) >= params.n:
                    beams = []
                    break
                # slots: first child of a parent inherits its slot, the others copy the prefix
                free = [s for s in owned if s not in {p.slot for _, p, _ in children}]
                new_beams = []
                for score, parent, token in children:
                    if parent.slot not in used_parents:
                        slot = parent.slot
                    else:
                        slot = free.pop()
                        n_cached = len(prompt_ids) + len(parent.tokens)
                        backend.copy_slot(parent.slot, slot, n_cached)
                        slots.commit(slot, 0, prompt_ids + parent.tokens)
                    used_parents[parent.slot] = True
                    new_beams.append(_Beam(parent.tokens + [token], score, slot))
                beams = new_beams
                positions = np.array([len(prompt_ids) + len(b.tokens) - 1 for b in beams], dtype=np.int64)
                logits = backend.forward_batch(np.array([b.slot for b in beams], dtype=np.int64),
                                               np.array([b.tokens[-1] for b in beams], dtype=np.int64), positions)
                for b in beams:
                    slots.commit(b.slot, 0, prompt_ids + b.tokens)
        finally:
            for slot in owned:
                llm.release_slot(slot)

    finals = sorted(ended + beams, key=lambda b: -b.normalized())[:params.n]
    outputs = [_completion(llm, prompt_ids, b, params, stop_ids) for b in finals]
    first = outputs[0]
    return Completion(text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason,
                      prompt_token_ids=list(prompt_ids), stop_reason=first.stop_reason, outputs=outputs)


def _completion(llm, prompt_ids, beam: _Beam, params, stop_ids) -> Completion:
    tokens = beam.tokens
    stop_token = tokens[-1] if tokens and tokens[-1] in stop_ids else None
    text_tokens = tokens[:-1] if stop_token is not None else tokens
    stream = TextStream(params.stop, params.include_stop_str_in_output)
    decoder = llm.tokenizer.incremental_decoder(skip_special_tokens=params.skip_special_tokens,
                                                strip_leading_space=False)
    n_used = 0
    for t in text_tokens:
        stream.push(decoder.add(t))
        n_used += 1
        if stream.stopped:
            break
    if not stream.stopped:
        stream.push(decoder.flush(), allow_stop=True)
        stream.flush()
    if stream.stopped:
        reason, stop_reason, tokens = "stop", stream.stop_string, tokens[:n_used]
    elif stop_token is not None:
        reason, stop_reason = "stop", stop_token
    else:
        reason, stop_reason = "length", None
    return Completion(text=stream.text, token_ids=list(tokens), finish_reason=reason,
                      prompt_token_ids=list(prompt_ids), stop_reason=stop_reason)
