"""Chunked prefill (Scheduler.prefill_chunk): a long prompt is computed over several steps while
the other sequences keep decoding, and greedy outputs stay those of the unchunked engine.

The fake model (fake_backend.py) checks the positions of every forward against what the slot
holds and computes its logits from the whole sequence without a cache, so a chunk at a wrong
offset or a lost chunk changes the output. The real-model test compares SmolLM2's greedy tokens
with and without chunking (the same kernels at other offsets: identical tokens expected)."""
import pytest

from fake_backend import expected_text, greedy_reference, make_fake_llm, make_tokenizer
from lmengine import LLM, SamplingParams
from lmengine.errors import InvalidParameterError
from lmengine.scheduler import _chunk_length

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_chunk_length_never_leaves_a_single_token():
    assert _chunk_length(10, 16) == 10
    assert _chunk_length(10, 4) == 4
    assert _chunk_length(5, 4) == 3            # 4 would leave exactly one
    assert _chunk_length(2, 1) == 0            # waits for the next step's budget
    assert _chunk_length(3, 1) == 1


def long_prompt_beside_a_stream(llm, chunk: int) -> list[tuple]:
    """A 135-token prompt generated (greedy) at prefill_chunk `chunk` while a short request
    streams: both outputs must be the unchunked engine's. Returns the backend calls meanwhile."""
    short_prompt = "hi"
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 3      # 135 characters = tokens
    want_short = expected_text(llm, short_prompt, 40)
    want_long = greedy_reference(llm.tokenizer.encode(long_prompt), 10, llm.vocab_size)
    llm.scheduler.prefill_chunk = chunk
    short = llm.stream(short_prompt, temperature=0, max_tokens=40, ignore_eos=True)
    text = next(short).text                    # the short request is decoding
    calls_before = len(llm.backend.calls)
    out = llm.generate(long_prompt, GREEDY)    # drives steps for both requests
    text += "".join(c.text for c in short)
    assert out.token_ids == want_long
    assert text == want_short
    return llm.backend.calls[calls_before:]


def test_long_prompt_is_computed_in_chunks_between_decode_steps():
    llm = make_fake_llm(n_slots=4, n_ctx=200)
    calls = long_prompt_beside_a_stream(llm, 16)
    prompt_forwards = [c for c in calls if c[0] == "forward" and c[3] > 1]
    assert [c[3] for c in prompt_forwards] == [16] * 8 + [7]           # 135 = 8 x 16 + 7
    assert [c[2] for c in prompt_forwards] == list(range(0, 135, 16))  # consecutive offsets
    # between any two chunks, the decoding stream got a batched step
    idx = [calls.index(c) for c in prompt_forwards]
    for a, b in zip(idx, idx[1:]):
        assert any(c[0] == "forward_batch" for c in calls[a:b]), calls[a:b]
    assert not any(llm.slots.busy)


def test_paced_chunks_fit_the_measured_decode_step(monkeypatch):
    """prefill_pace: while a stream decodes, each chunk is as many prompt tokens as take pace x the
    decode step's time (moving averages fixed here, so the sizes are exact); the answers are the
    same as unchunked ones."""
    llm = make_fake_llm(n_slots=4, n_ctx=200)
    sched = llm.scheduler
    sched.prefill_chunk, sched.prefill_pace = 64, 1.5
    monkeypatch.setattr(sched, "_timed", lambda average, seconds, key=None: None)   # keep the averages below
    sched._token_s, sched._decode_step_s = 0.002, {1: 0.008}               # 1.5 x 8 ms / 2 ms = 6 tokens
    assert sched._prompt_budget(0) == 64 and sched._prompt_budget(1) == 6
    short_prompt = "hi"
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 3      # 135 tokens
    want_short = expected_text(llm, short_prompt, 40)
    want_long = greedy_reference(llm.tokenizer.encode(long_prompt), 10, llm.vocab_size)
    short = llm.stream(short_prompt, temperature=0, max_tokens=40, ignore_eos=True)
    text = next(short).text                    # the short request is decoding
    calls_before = len(llm.backend.calls)
    out = llm.generate(long_prompt, GREEDY)
    text += "".join(c.text for c in short)
    assert out.token_ids == want_long and text == want_short
    sizes = [c[3] for c in llm.backend.calls[calls_before:] if c[0] == "forward" and c[3] > 1]
    # 6 tokens per step while the short stream decodes (its 40 tokens last for 39 steps: 22 x 6
    # = 132 < 135), then the last 3 tokens in one forward
    assert sizes == [6] * 22 + [3], sizes
    # the budget's bounds: at least 2 tokens, at most prefill_chunk
    sched._decode_step_s = {1: 0.0001}
    assert sched._prompt_budget(1) == 2
    sched._decode_step_s = {1: 10.0}
    assert sched._prompt_budget(1) == 64
    for bad in (0, -1, True, "1", 1e9):
        with pytest.raises(InvalidParameterError, match="prefill_pace"):
            sched.prefill_pace = bad


def test_pace_follows_the_rows_decoding_and_a_burst_of_prompts():
    """The decode step's time is kept per number of rows: a row count never measured alone (in a
    burst every step carries prompt tokens) is estimated from the nearest measured one, a prompt
    token's time per row of difference; and when more requests compute prompts than decode, the
    budget grows by that ratio. Values fixed here: 1 row 27 ms, 8 rows 73 ms, 8 ms per token."""
    llm = make_fake_llm(n_slots=4, n_ctx=200)
    sched = llm.scheduler
    sched.prefill_chunk, sched.prefill_pace = 256, 1.0
    sched._token_s, sched._decode_step_s = 0.008, {1: 0.027}
    assert sched._decode_step_estimate(1) == 0.027
    assert sched._decode_step_estimate(7) == pytest.approx(0.027 + 6 * 0.008)     # 75 ms, not 27
    assert sched._prompt_budget(7) == 9                                          # 75 / 8
    assert sched._prompt_budget(1) == 3                                          # 27 / 8
    assert sched._prompt_budget(1, n_prompting=7) == 23                         # 27 / 8 x 7 / 1
    assert sched._prompt_budget(4, n_prompting=2) == sched._prompt_budget(4)     # fewer prompting: no change
    sched._decode_step_s = {1: 0.027, 8: 0.073}
    assert sched._decode_step_estimate(6) == pytest.approx(0.073 - 2 * 0.008)   # the nearer count: 8
    assert sched._decode_step_estimate(2) == pytest.approx(0.027 + 0.008)
    sched._decode_step_s = {8: 0.073}
    assert sched._decode_step_estimate(1) == pytest.approx(0.073 - 7 * 0.008)   # 17 ms
    sched._token_s = 0.02
    assert sched._decode_step_estimate(1) == 0.02                                # at least one token's time
    # a measured step lands in its own row count's average
    sched._decode_step_s = {}
    sched._time_step([(None, 5, [1], True), (None, 9, [2], True)], 0.05)
    sched._time_step([(None, 5, [1], True)], 0.03)
    sched._time_step([(None, 5, [1], True), (None, 9, [2, 3, 4], False)], 0.5)    # a prompt chunk: no decode time
    assert sched._decode_step_s == {2: 0.05, 1: 0.03}
    sched._time_step([(None, 5, [1], True)], 0.08)
    assert sched._decode_step_s[1] == pytest.approx(0.8 * 0.03 + 0.2 * 0.08)


def test_budget_is_shared_by_prompts_of_one_step():
    llm = make_fake_llm(n_slots=4, n_ctx=200)
    llm.scheduler.prefill_chunk = 20
    prompts = ["abcdefghijklmnopqrstuvwxyz" * 2, "zyxwvutsrqponmlkjihgfedcba" * 2]
    per_step = []
    step = llm.scheduler.step

    def counting_step():
        before = llm.scheduler.stats["prefill_tokens"]
        step()
        per_step.append(llm.scheduler.stats["prefill_tokens"] - before)

    llm.scheduler.step = counting_step
    outs = llm.generate(prompts, GREEDY)
    for p, out in zip(prompts, outs):
        assert out.token_ids == greedy_reference(llm.tokenizer.encode(p), 10, llm.vocab_size)
    assert max(per_step) <= 20 and sum(per_step) == 104     # two prompts of 52 tokens
    assert per_step[:3] == [20, 20, 20]


def test_cancel_in_the_middle_of_a_prompt_frees_the_slot():
    llm = make_fake_llm(n_slots=3, n_ctx=200)
    llm.scheduler.prefill_chunk = 8
    request = llm.scheduler.submit(llm.tokenizer.encode("a long prompt, longer than a chunk"), llm.resolve_params(GREEDY))
    llm.scheduler.step()                       # one chunk computed
    assert request.generator is not None and request.generator.logits is None
    llm.scheduler.cancel(request)
    assert request.done and not any(llm.slots.busy)
    assert llm.generate("hello", GREEDY).text == expected_text(llm, "hello", 10)


def test_prefill_chunk_is_validated():
    llm = make_fake_llm()
    for bad in (0, 1, -5, 2.5, True, "16"):
        with pytest.raises(InvalidParameterError, match="prefill_chunk"):
            llm.scheduler.prefill_chunk = bad
    llm.scheduler.prefill_chunk = None


def test_real_model_greedy_outputs_identical_with_chunks(smollm2_path):
    """SmolLM2: a 300-token prompt chunked by 64 while another stream decodes gives the same
    greedy tokens as unchunked. Exact equality: each chunk runs the same kernels over the same
    cached keys and values as the prompt-prefix reuse path does."""
    llm = LLM(smollm2_path, n_ctx=512, max_batch_size=2)
    try:
        prompt = ("Write a long story about a dragon and a knight who become friends. " * 20)
        ids = llm.tokenizer.encode(prompt)[:300]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        want = llm.generate(ids, params).token_ids
        want_other = llm.generate("Hello, my name is", params).token_ids
        llm.slots.tokens = [[] for _ in llm.slots.tokens]     # no prefix reuse from the run above
        llm.scheduler.prefill_chunk = 64
        other = llm.stream("Hello, my name is", params)
        first = next(other)
        got = llm.generate(ids, params).token_ids
        got_other = first.token_ids + [t for c in other for t in c.token_ids]
        assert got == want
        assert got_other == want_other
    finally:
        llm.close()


def test_joined_step_carries_chunks_and_decode_rows_in_one_forward():
    """A backend with forward_mixed gets each step's prompt chunk and decode row in one call;
    the outputs are those of the unchunked engine (the fake model recomputes every sequence
    without a cache, so a chunk at a wrong offset changes them)."""
    llm = make_fake_llm(n_slots=4, n_ctx=200, backend_options={"mixed_tokens": 64})
    calls = long_prompt_beside_a_stream(llm, 16)
    chunks = [dict(c[1])[1] for c in calls if c[0] == "forward_mixed" and 1 in dict(c[1])]
    assert chunks[:9] == [16] * 8 + [7]        # the long prompt (slot 1), beside the decode row
    assert not any(c[0] == "forward" for c in calls)   # (a step of one part: forward_batch)


def test_a_failing_joined_step_fails_only_its_request():
    """When the one call of a step raises, its parts run again one by one, so the error ends
    only the request that caused it; the other stream's tokens are unchanged."""
    poison = make_tokenizer().token_to_id("?")
    llm = make_fake_llm(n_slots=4, n_ctx=200, backend_options={"mixed_tokens": 64, "poison_token": poison})
    want = expected_text(llm, "hi", 20)
    short = llm.stream("hi", temperature=0, max_tokens=20, ignore_eos=True)
    text = next(short).text
    bad = llm.scheduler.submit(llm.tokenizer.encode("a prompt with a ?"), llm.resolve_params(GREEDY))
    text += "".join(c.text for c in short)
    assert text == want
    assert bad.done and type(bad.error).__name__ == "PoisonTokenError"
    assert not any(llm.slots.busy)


def test_joined_step_still_shares_a_prompt_between_samples():
    """n samples of one prompt in a joined step: the prompt is computed once, and the other
    samples copy its slot (copy_slot) before their parts join the step."""
    llm = make_fake_llm(n_slots=4, n_ctx=200, backend_options={"mixed_tokens": 64})
    prompt = "a shared system prompt, then a question?"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=3))
    assert [o.text for o in out.outputs] == [expected_text(llm, prompt, 6)] * 3
    copies = [c for c in llm.backend.calls if c[0] == "copy_slot"]
    assert len(copies) == 2 and all(c[3] == len(prompt) - 1 for c in copies)
    prompt_tokens = sum(n for c in llm.backend.calls if c[0] == "forward_mixed" for _, n in c[1] if n > 1)
    prompt_tokens += sum(c[3] for c in llm.backend.calls if c[0] == "forward" and c[3] > 1)
    assert prompt_tokens == len(prompt)        # computed once
