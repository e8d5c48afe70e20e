"""The request machinery on a fake model (fake_backend.py): scheduler admission and batching,
prefix reuse, cancellation, failing requests, abandoned streams, stops, Generator, beam search.

Every expected output comes from `greedy_reference`, which runs the fake model over whole token
lists without a cache, so a cache or batching mistake anywhere shows up as a different answer.
Each test runs in milliseconds (no compiled kernels, no model file).
"""
import itertools
import threading

import numpy as np
import pytest

from fake_backend import FakeBackend, PoisonTokenError, greedy_reference, make_fake_llm, make_tokenizer, reference_logits
from fake_backend import expected_text as fake_expected_text
from lmengine import LLM, Generator, SamplingParams
from lmengine.errors import InvalidParameterError, TokenIdError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make_llm(n_slots=4, poison_token=None, **kwargs) -> LLM:
    return make_fake_llm(n_slots, backend_options={"poison_token": poison_token}, **kwargs)


def expected_text(llm, prompt: str, params=GREEDY) -> str:
    return fake_expected_text(llm, prompt, params.max_tokens)


def assert_all_slots_free(llm):
    assert not any(llm.slots.busy), f"busy slots left: {llm.slots.busy}"


PROMPTS = ["hello world", "the quick brown fox", "a", "zzz", "jumps over the lazy dog", "what?"]


def test_one_request_matches_the_reference():
    llm = make_llm()
    out = llm.generate("hello world", GREEDY)
    assert out.token_ids == greedy_reference(llm.tokenizer.encode("hello world"), 12, llm.vocab_size)
    assert out.finish_reason == "length" and out.text == expected_text(llm, "hello world")
    assert_all_slots_free(llm)


def test_admission_queues_past_the_slots_and_batches_decode():
    """Six prompts, four slots (three for the batch): the rest wait, join as slots free up, and every answer is right.
    Decode steps run as one forward_batch over all running sequences."""
    llm = make_llm(n_slots=4)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.text for o in outs] == [expected_text(llm, p) for p in PROMPTS]
    batches = [c[1] for c in llm.backend.calls if c[0] == "forward_batch"]
    assert max(len(b) for b in batches) == llm.max_batch_size  # never more rows (one slot stays spare)
    # one row per decoded token; a one-token prompt ("a") joins the decode batch for its prefill too
    assert sum(len(b) for b in batches) == len(PROMPTS) * (12 - 1) + sum(len(p) == 1 for p in PROMPTS)
    assert_all_slots_free(llm)


def test_batched_output_equals_one_by_one():
    llm = make_llm()
    together = [o.token_ids for o in llm.generate(PROMPTS[:4], GREEDY)]
    alone = [llm.generate(p, GREEDY).token_ids for p in PROMPTS[:4]]
    assert together == alone


def test_prefix_reuse_computes_only_the_new_tokens():
    llm = make_llm()
    first = "the quick brown fox jumps"
    llm.generate(first, GREEDY)
    llm.backend.calls.clear()
    out = llm.generate(first + " over", GREEDY)
    assert out.text == expected_text(llm, first + " over")
    prefill = [c for c in llm.backend.calls if c[0] == "forward"]
    assert prefill == [("forward", prefill[0][1], len(first), len(" over"))]   # (slot, start, n)


def test_n_samples_share_the_prompt_through_copy_slot():
    llm = make_llm()
    prompt = "a shared system prompt, then a question?"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=3))
    assert [o.text for o in out.outputs] == [expected_text(llm, prompt, SamplingParams(temperature=0, max_tokens=6))] * 3
    copies = [c for c in llm.backend.calls if c[0] == "copy_slot"]
    assert copies and all(c[3] == len(prompt) - 1 for c in copies)


def test_sampling_is_reproducible_with_a_seed():
    llm = make_llm()
    params = SamplingParams(temperature=1.0, top_k=5, max_tokens=10, seed=7, ignore_eos=True)
    assert llm.generate("hello", params).token_ids == llm.generate("hello", params).token_ids


def test_a_request_that_fails_validation_leaves_the_others_correct():
    """A logit_bias key outside the vocabulary fails when its Generator is made, after its slot
    was taken: that request raises, its slot is free again exactly once, and other requests in
    the same scheduler, before and after, get the right answers."""
    llm = make_llm(n_slots=3)
    bad = SamplingParams(temperature=0, max_tokens=4, logit_bias={llm.vocab_size + 5: 1.0})
    ok_requests = [llm.scheduler.submit(llm.tokenizer.encode(p), GREEDY) for p in PROMPTS[:2]]
    bad_request = llm.scheduler.submit(llm.tokenizer.encode("bad"), bad)
    later = llm.scheduler.submit(llm.tokenizer.encode(PROMPTS[2]), GREEDY)
    llm.scheduler.run_until_done(ok_requests + [bad_request, later])
    assert isinstance(bad_request.error, (InvalidParameterError, TokenIdError))
    for r, p in zip(ok_requests + [later], PROMPTS[:3]):
        assert r.error is None and r.generator.text == expected_text(llm, p)
    assert_all_slots_free(llm)
    # every slot can be taken again, once each
    assert sorted(llm.acquire_slot() for _ in range(3)) == [0, 1, 2]
    assert llm.acquire_slot() is None


def test_a_failing_step_fails_its_requests_and_the_scheduler_goes_on():
    llm = make_llm(poison_token=make_tokenizer().token_to_id("!"))
    with pytest.raises(PoisonTokenError):
        llm.generate("boom!", GREEDY)
    assert_all_slots_free(llm)
    assert llm.generate("hello", GREEDY).text == expected_text(llm, "hello")


def test_priority_orders_admission():
    """One sequence runs at a time (two slots: one for the batch). Requests submitted together
    start in the order of SamplingParams.priority (lower first), arrival order within a
    priority; each answer is still the reference's. (A more urgent request arriving while
    another runs pre-empts it: tests/engine/test_preemption.py.)"""
    llm = make_llm(n_slots=2)
    order = []
    submitted = []
    for prompt, priority in (("a late", 5), ("b first", -3), ("c mid", 0), ("d mid too", 0), ("e first too", -3)):
        params = GREEDY.replace(priority=priority) if priority else GREEDY
        request = llm.scheduler.submit(llm.tokenizer.encode(prompt), params)
        request.listener = (lambda p=prompt: order.append(p) if p not in order else None)
        submitted.append((prompt, request))
    llm.scheduler.run_until_done([r for _, r in submitted])
    assert order == ["b first", "e first too", "c mid", "d mid too", "a late"]
    for prompt, request in submitted:
        assert request.generator.text == expected_text(llm, prompt)
    assert llm.scheduler.stats["preemptions"] == 0
    assert_all_slots_free(llm)


@pytest.mark.parametrize("bad", [1.5, "1", 2 ** 31, -2 ** 31 - 1, None])
def test_priority_is_checked(bad):
    with pytest.raises(InvalidParameterError, match="priority"):
        SamplingParams(priority=bad)


def test_cancelling_a_waiting_request():
    llm = make_llm()
    request = llm.scheduler.submit(llm.tokenizer.encode("never runs"), GREEDY)
    llm.scheduler.cancel(request)
    assert request.done and request.generator is None and not llm.scheduler.waiting


def test_stream_equals_generate_and_frees_its_slot():
    llm = make_llm()
    chunks = list(llm.stream("hello world", GREEDY))
    assert "".join(c.text for c in chunks) == expected_text(llm, "hello world")
    assert chunks[-1].finish_reason == "length"
    assert_all_slots_free(llm)


def test_stream_abandoned_during_iteration_is_cancelled():
    llm = make_llm(n_slots=2)
    stream = llm.stream("hello", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()                       # the consumer stops reading
    assert llm.generate("world", GREEDY).text == expected_text(llm, "world")
    assert_all_slots_free(llm)
    assert not llm.scheduler.running and not llm.scheduler.waiting


def test_stream_never_iterated_holds_nothing():
    llm = make_llm(n_slots=2)
    streams = [llm.stream(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)) for p in PROMPTS]
    assert not llm.scheduler.waiting                      # nothing was submitted
    llm.backend.calls.clear()
    assert llm.generate("world", GREEDY).text == expected_text(llm, "world")
    # only the one request ran: its prefill and 11 single-row decode steps
    assert [c[0] for c in llm.backend.calls] == ["forward"] + ["forward_batch"] * 11
    del streams
    assert_all_slots_free(llm)


def test_streams_from_threads_share_steps():
    llm = make_llm(n_slots=4)
    results = {}

    def consume(p):
        results[p] = "".join(c.text for c in llm.stream(p, GREEDY))

    threads = [threading.Thread(target=consume, args=(p,)) for p in PROMPTS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {p: expected_text(llm, p) for p in PROMPTS[:4]}
    assert_all_slots_free(llm)


def test_stop_strings_and_tokens():
    llm = make_llm()
    prompt = "hello world"
    full = expected_text(llm, prompt, SamplingParams(temperature=0, max_tokens=40))
    stop = full[5:7]                                   # a stop string that occurs in the output
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    streamed = "".join(c.text for c in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                                           ignore_eos=True, stop=[stop])))
    assert streamed == out.text
    stop_id = greedy_reference(llm.tokenizer.encode(prompt), 40, llm.vocab_size)[3]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id]))
    ids = greedy_reference(llm.tokenizer.encode(prompt), 40, llm.vocab_size, stop_ids=(stop_id,))
    assert out.finish_reason == "stop" and out.token_ids == ids and out.stop_reason == stop_id


def test_generator_steps_rewinds_and_continues():
    llm = make_llm()
    prompt = llm.tokenizer.encode("rewind me")
    g = Generator(llm, GREEDY, prompt)
    while not g.is_done():
        g.step()
    assert g.generated == greedy_reference(prompt, 12, llm.vocab_size)
    g.rewind_to(len(prompt) + 3)                       # keep three generated tokens
    llm.backend.calls.clear()
    g.step()
    assert g.generated == greedy_reference(prompt, 4, llm.vocab_size)
    assert llm.backend.calls == [("forward", g.slot, len(prompt) + 2, 1)]   # only the kept tail's last token
    g.append_tokens(llm.tokenizer.encode(" more"))
    g.step()
    assert g.tokens[-1] == int(np.argmax(reference_logits(g.tokens[:-1], llm.vocab_size)))
    g.close()
    assert_all_slots_free(llm)


def test_generator_rejects_bad_token_ids_and_holds_no_slot():
    llm = make_llm(n_slots=2)
    with pytest.raises(TokenIdError):
        Generator(llm, GREEDY, [0, llm.vocab_size])
    assert_all_slots_free(llm)


def test_beam_search_finds_the_best_sequence():
    """With beam_width >= vocab, two steps of beam search are exhaustive: the result is the
    two-token continuation with the highest total log-probability."""
    tokenizer = make_tokenizer("abcdefg")               # 7 chars + EOS: vocab 8
    backend = FakeBackend(tokenizer.vocab_size, n_ctx=32, n_slots=10)
    llm = LLM.from_backend(backend, tokenizer)
    prompt = tokenizer.encode("abc")

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max() - np.log(np.exp(x - x.max()).sum())

    def score(seq):
        return sum(log_softmax(reference_logits(prompt + list(seq[:i]), 8))[seq[i]] for i in range(len(seq)))

    best = max(itertools.product(range(8), repeat=2), key=score)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, beam_width=8))
    assert tuple(out.token_ids) == best
    assert_all_slots_free(llm)
