"""Request lifecycle under failure, cancellation, close and threads (issue #14), on the fake model
of fake_backend.py, whose answers depend on every cached token: a slot released twice, a cache
left dirty by a failed request or rows mixed up in a batch all show up as wrong answers.

The contract (engine/scheduler.py): a request owns its slot from admission to its end and the
slot is released exactly once, whatever ends it; a failure ends only the requests it concerns;
nothing waits on garbage collection; a closed LLM ends everything and refuses later calls.
"""
import gc
import random
import threading

import pytest

from fake_backend import PoisonTokenError, expected_text, make_fake_llm
from lmengine import SamplingParams
from lmengine.errors import (
    ContextLengthError,
    InvalidParameterError,
    LLMClosedError,
    LMEngineError,
    NonFiniteLogitsError,
)

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = ["hello world", "the quick brown fox", "a", "zzz", "jumps over the lazy dog", "what?"]


NAN_PREFIX = "q"          # no prompt of PROMPTS starts with it


def nan_llm(n_slots=4):
    """A model whose logits are NaN for every sequence starting with NAN_PREFIX (a corrupt weight)."""
    llm = make_fake_llm(n_slots)
    llm.backend.nan_prefix = tuple(llm.tokenizer.encode(NAN_PREFIX))
    return llm


def assert_clean(llm):
    """No slot busy, nothing waiting or running."""
    assert not any(llm.slots.busy), f"busy slots left: {llm.slots.busy}"
    assert not llm.scheduler.waiting and not llm.scheduler.running


def assert_right(llm, request, prompt):
    assert request.error is None, request.error
    assert request.generator.text == expected_text(llm, prompt, MAX_TOKENS)


@pytest.mark.parametrize("alone", [False, True])   # a one-token prompt joins the decode batch
def test_non_finite_logits_end_only_their_request(alone):
    llm = nan_llm(n_slots=4)
    bad_prompt = NAN_PREFIX if alone else NAN_PREFIX + "bad"
    good = [llm.scheduler.submit(llm.tokenizer.encode(p), GREEDY) for p in PROMPTS[:2]]
    bad = llm.scheduler.submit(llm.tokenizer.encode(bad_prompt), GREEDY)
    later = llm.scheduler.submit(llm.tokenizer.encode(PROMPTS[2]), GREEDY)
    llm.scheduler.run_until_done(good + [bad, later])
    assert isinstance(bad.error, NonFiniteLogitsError) and "non-finite" in str(bad.error)
    for r, p in zip(good + [later], PROMPTS[:3]):
        assert_right(llm, r, p)
    assert_clean(llm)
    # the failed request's slot forgot its tokens: no later request reuses that cache
    assert all(tokens[:1] != llm.tokenizer.encode(NAN_PREFIX) for tokens in llm.slots.tokens)


def test_non_finite_logits_raise_from_generate_stream_and_generator():
    llm = nan_llm()
    with pytest.raises(NonFiniteLogitsError):
        llm.generate(NAN_PREFIX + "oops", GREEDY)
    with pytest.raises(NonFiniteLogitsError):
        list(llm.stream(NAN_PREFIX + "oops", GREEDY))
    with llm.generator(NAN_PREFIX + "oops", GREEDY) as g, pytest.raises(NonFiniteLogitsError):
        g.step()
    with pytest.raises(NonFiniteLogitsError):
        llm.perplexity(NAN_PREFIX + "oops")
    assert_clean(llm)
    assert llm.generate(PROMPTS[0], GREEDY).text == expected_text(llm, PROMPTS[0], MAX_TOKENS)


def test_a_failing_decode_batch_fails_that_batch_and_the_waiting_go_on():
    """A one-token prompt runs in the decode batch, which then raises: the batch's requests end
    with the error; requests still waiting for a slot are served correctly."""
    llm = make_fake_llm(n_slots=3)
    llm.backend.poison_token = llm.tokenizer.token_to_id("!")
    first = [llm.scheduler.submit(llm.tokenizer.encode(p), GREEDY) for p in ("!", "a")]
    waiting = [llm.scheduler.submit(llm.tokenizer.encode(p), GREEDY) for p in PROMPTS[2:5]]
    llm.scheduler.run_until_done(first + waiting)
    assert all(isinstance(r.error, PoisonTokenError) for r in first)
    for r, p in zip(waiting, PROMPTS[2:5]):
        assert_right(llm, r, p)
    assert_clean(llm)


def test_an_interrupt_in_a_step_ends_that_step_and_leaves_the_waiting():
    llm = make_fake_llm(n_slots=2)                     # one request runs at a time
    running = llm.scheduler.submit(llm.tokenizer.encode(PROMPTS[0]), GREEDY)
    waiting = llm.scheduler.submit(llm.tokenizer.encode(PROMPTS[1]), GREEDY)
    llm.backend.interrupt_next_batch = True
    with pytest.raises(KeyboardInterrupt):
        llm.scheduler.run_until_done([running])
    assert running.done and isinstance(running.error, KeyboardInterrupt)
    assert not waiting.done
    llm.scheduler.run_until_done([waiting])
    assert_right(llm, waiting, PROMPTS[1])
    assert_clean(llm)


def test_generate_interrupted_cancels_its_own_requests():
    llm = make_fake_llm(n_slots=2)
    llm.backend.interrupt_next_batch = True
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:3], GREEDY)             # one runs, two wait: all three end
    assert_clean(llm)
    assert llm.generate(PROMPTS[3], GREEDY).text == expected_text(llm, PROMPTS[3], MAX_TOKENS)


def test_cancelling_a_running_request_frees_its_slot_at_once():
    llm = make_fake_llm(n_slots=2)
    request = llm.scheduler.submit(llm.tokenizer.encode(PROMPTS[0]), GREEDY)
    llm.scheduler.step()
    assert request.generator.slot is not None and any(llm.slots.busy)
    llm.scheduler.cancel(request)
    llm.scheduler.cancel(request)                     # twice: still one release
    assert request.done and request.cancelled
    assert_clean(llm)


def test_releasing_a_slot_twice_is_refused():
    llm = make_fake_llm()
    slot = llm.acquire_slot()
    llm.release_slot(slot)
    with pytest.raises(RuntimeError, match="released twice"):
        llm.release_slot(slot)


def test_a_generator_dropped_unclosed_gives_its_slot_back():
    llm = make_fake_llm(n_slots=2)
    for _ in range(5):                                # more than the slots: each comes back
        g = llm.generator(PROMPTS[0], GREEDY)
        g.step()
        del g
        gc.collect()
    with llm.generator(PROMPTS[1], GREEDY) as g:
        while not g.is_done():
            g.step()
        assert g.text == expected_text(llm, PROMPTS[1], MAX_TOKENS)
    assert g.slot is None
    assert_clean(llm)


def test_close_ends_everything_and_later_calls_raise():
    llm = make_fake_llm(n_slots=3)
    stream = llm.stream(PROMPTS[0], GREEDY)
    next(stream)                                      # its request runs
    waiting = [llm.scheduler.submit(llm.tokenizer.encode(p), GREEDY) for p in PROMPTS]
    llm.scheduler.step()                              # one of them runs too
    g = llm.generator(PROMPTS[1], GREEDY)
    llm.close()
    llm.close()                                       # idempotent
    assert all(r.done and isinstance(r.error, LLMClosedError) for r in waiting)
    with pytest.raises(LLMClosedError):
        list(stream)                                  # the text it had, then the error
    for call in (lambda: llm.generate("x", GREEDY), lambda: llm.stream("x", GREEDY),
                 lambda: llm.logits([1, 2]), lambda: llm.perplexity("abc"), lambda: llm.set_threads(1),
                 lambda: llm.generator("x"), g.step):
        with pytest.raises(LLMClosedError, match="closed"):
            call()
    g.close()
    assert not any(llm.slots.busy)


def test_the_with_block_closes():
    with make_fake_llm() as llm:
        assert llm.generate("hi", GREEDY).text == expected_text(llm, "hi", MAX_TOKENS)
    with pytest.raises(LLMClosedError):
        llm.generate("hi", GREEDY)


def test_concurrency_stress():
    """8 threads, each a random mix of valid requests (generate and fully read streams), invalid
    ones (a logit_bias key outside the vocabulary, a prompt longer than the context, NaN logits),
    abandoned streams and never-iterated streams. Every valid answer equals its single-threaded
    reference; every invalid one raises its own error; nothing is left behind."""
    llm = make_fake_llm(n_slots=5, n_ctx=64)
    llm.backend.nan_prefix = tuple(llm.tokenizer.encode(NAN_PREFIX))
    bad_bias = SamplingParams(temperature=0, max_tokens=4, logit_bias={llm.vocab_size + 3: 1.0})
    failures, checked = [], [0]

    def worker(seed):
        rnd = random.Random(seed)
        kept_streams = []
        for _ in range(25):
            prompt = rnd.choice(PROMPTS)
            kind = rnd.choice(["generate", "stream", "bad_bias", "too_long", "nan", "abandon", "never"])
            try:
                if kind == "generate":
                    assert llm.generate(prompt, GREEDY).text == expected_text(llm, prompt, MAX_TOKENS)
                elif kind == "stream":
                    text = "".join(c.text for c in llm.stream(prompt, GREEDY))
                    assert text == expected_text(llm, prompt, MAX_TOKENS)
                elif kind == "bad_bias":
                    with pytest.raises(InvalidParameterError):
                        llm.generate(prompt, bad_bias)
                elif kind == "too_long":
                    with pytest.raises(ContextLengthError):
                        llm.generate("x" * 80, GREEDY)
                elif kind == "nan":
                    with pytest.raises(NonFiniteLogitsError):
                        llm.generate(NAN_PREFIX + prompt, GREEDY)
                elif kind == "abandon":
                    stream = llm.stream(prompt, GREEDY)
                    next(stream)
                    if rnd.random() < 0.5:
                        stream.close()
                    else:
                        kept_streams.append(stream)   # kept, never read again: runs to its end
                else:
                    kept_streams.append(llm.stream(prompt, GREEDY))   # never iterated
                checked[0] += 1
            except BaseException as e:                # noqa: BLE001 (reported below)
                failures.append((kind, prompt, repr(e)))
                return

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not failures, failures[:5]
    assert checked[0] == 8 * 25
    gc.collect()
    llm.scheduler.run_until_done(list(llm.scheduler.running))   # the kept abandoned streams finish
    assert_clean(llm)
    assert isinstance(LLMClosedError("x"), LMEngineError)
