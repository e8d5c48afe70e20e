"""Pre-emption by priority (Scheduler._preempt_for): when no slot is free, a waiting request with a
lower SamplingParams.priority value takes the slot of the running request with the greatest one;
that request waits again, keeps its tokens, and later computes again what its slot lost.

On the fake model (fake_backend.py) every logit depends on the whole sequence the slot holds, so
a pre-empted request that resumed on a wrong or stale cache gives another answer than the
cache-free reference. On SmolLM2, a pre-empted request's tokens (greedy, and seeded sampling)
equal those of the same request run alone: exact equality, since the recomputed keys and values
come from the same kernels on the same rows (one token's result does not depend on the rest of
the forward: docs/CONTRACTS.md)."""
from fake_backend import expected_text, make_fake_llm
from lmengine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def submit(llm, text: str, priority: int):
    """A greedy request for `text` with that priority, submitted to llm's scheduler."""
    return llm.scheduler.submit(llm.tokenizer.encode(text), GREEDY.replace(priority=priority))


def assert_all_slots_free(llm):
    assert not any(llm.slots.busy), f"busy slots left: {llm.slots.busy}"


def test_an_urgent_request_preempts_a_running_one():
    """One sequence runs at a time (two slots: one for the batch). A running request of priority
    10 is pre-empted after 3 tokens by one of priority -100, which then runs to the end first;
    the pre-empted one resumes and both answers are the reference's."""
    llm = make_fake_llm(2)
    sched = llm.scheduler
    finished = []
    running = submit(llm, "runs first", 10)
    running.listener = lambda: finished.append("runs") if running.done else None
    for _ in range(3):
        sched.step()
    assert len(running.generator.generated) == 3
    urgent = submit(llm, "urgent", -100)
    urgent.listener = lambda: finished.append("urgent") if urgent.done else None
    sched.step()
    assert urgent in sched.running and running in sched.waiting
    assert running.generator.slot is None and sched.stats["preemptions"] == 1
    sched.run_until_done([running, urgent])
    assert finished == ["urgent", "runs"]
    assert urgent.generator.text == expected_text(llm, "urgent", 12)
    assert running.generator.text == expected_text(llm, "runs first", 12)
    assert "".join(c.text for c in running.chunks) == running.generator.text   # the stream has no gap
    assert sched.stats["preemptions"] == 1
    assert_all_slots_free(llm)


def test_preempted_request_recomputes_what_its_slot_lost():
    """The urgent prompt shares a prefix with the running request's, so it takes that request's
    slot (prefix reuse) and overwrites its tail; the pre-empted request resumes from the shared
    prefix and recomputes the rest (its prompt and the tokens it had generated)."""
    llm = make_fake_llm(2)
    sched = llm.scheduler
    victim = submit(llm, "the story goes", 1)
    for _ in range(4):
        sched.step()
    victim_slot = victim.generator.slot
    urgent = submit(llm, "the stone", 0)
    sched.step()
    assert urgent.generator.slot == victim_slot
    computed = sched.stats["prefill_tokens"]
    sched.run_until_done([victim, urgent])
    # resumed from "the sto": the rest of its prompt and its 4 generated tokens in one forward
    assert sched.stats["prefill_tokens"] - computed == len("ry goes") + 4
    assert victim.generator.text == expected_text(llm, "the story goes", 12)
    assert urgent.generator.text == expected_text(llm, "the stone", 12)
    assert_all_slots_free(llm)


def test_equal_or_lower_priority_never_preempts():
    llm = make_fake_llm(2)
    sched = llm.scheduler
    first = submit(llm, "first", 3)
    sched.step()
    same = submit(llm, "same", 3)
    later = submit(llm, "later", 7)
    sched.step()
    assert sched.running == [first] and sched.waiting == [same, later]
    sched.run_until_done([first, same, later])
    assert sched.stats["preemptions"] == 0
    for prompt, r in (("first", first), ("same", same), ("later", later)):
        assert r.generator.text == expected_text(llm, prompt, 12)
    assert_all_slots_free(llm)


def test_the_lowest_priority_latest_arrival_is_the_victim():
    """Three running (four slots, one kept back); the urgent request takes the slot of the one
    with the greatest priority value, the latest arrival among those."""
    llm = make_fake_llm(4)
    sched = llm.scheduler
    a = submit(llm, "aaa", 5)
    b = submit(llm, "bbb", 5)
    c = submit(llm, "ccc", 1)
    sched.step()
    assert set(sched.running) == {a, b, c}
    urgent = submit(llm, "now", 0)
    sched.step()
    assert b in sched.waiting and a in sched.running and c in sched.running and urgent in sched.running
    sched.run_until_done([a, b, c, urgent])
    for prompt, r in (("aaa", a), ("bbb", b), ("ccc", c), ("now", urgent)):
        assert r.generator.text == expected_text(llm, prompt, 12)
    assert_all_slots_free(llm)


def test_preemption_can_be_turned_off():
    llm = make_fake_llm(2)
    sched = llm.scheduler
    sched.preemption = False
    running = submit(llm, "runs", 10)
    sched.step()
    urgent = submit(llm, "urgent", -100)
    sched.step()
    assert running in sched.running and urgent in sched.waiting
    sched.run_until_done([running, urgent])
    assert sched.stats["preemptions"] == 0
    assert_all_slots_free(llm)


def test_cancelling_or_closing_while_preempted():
    llm = make_fake_llm(2)
    sched = llm.scheduler
    victim = submit(llm, "victim", 1)
    sched.step()
    urgent = submit(llm, "urgent", 0)
    sched.step()
    assert victim in sched.waiting and victim.generator.slot is None
    sched.cancel(victim)
    assert victim.done and victim not in sched.waiting
    sched.run_until_done([urgent])
    assert urgent.generator.text == expected_text(llm, "urgent", 12)
    assert_all_slots_free(llm)

    victim = submit(llm, "victim", 1)
    sched.step()
    urgent = submit(llm, "urgent", 0)
    sched.step()
    llm.close()
    assert victim.done and urgent.done and victim.error is not None


def test_real_model_preempted_request_equals_its_solo_run(smollm2_path):
    """SmolLM2, one running sequence at a time: a greedy and a seeded-sampling request, each
    pre-empted after 5 tokens by an urgent one and its cache then forgotten, so that its prompt
    and 5 generated tokens are computed again in one prompt forward, give the tokens of their
    solo runs."""
    llm = LLM(smollm2_path, n_ctx=256, max_batch_size=1)
    try:
        cases = [("The capital of France is", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)),
                 ("Once upon a time", SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16,
                                                     ignore_eos=True))]
        urgent_params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, priority=-1)
        for prompt, params in cases:
            want = llm.generate(prompt, params).token_ids
            want_urgent = llm.generate("Name three colours:", urgent_params).token_ids
            llm.slots.tokens = [[] for _ in llm.slots.tokens]      # nothing reused from the solo runs
            sched = llm.scheduler
            before = sched.stats["preemptions"]
            victim = sched.submit(llm.tokenizer.encode(prompt), params.replace(priority=1))
            while len(victim.chunks) < 5:
                sched.step()
            urgent = sched.submit(llm.tokenizer.encode("Name three colours:"), urgent_params)
            sched.step()                                 # pre-empts the victim
            for slot in range(llm.slots.n_slots):        # its cache is lost: all of it is recomputed
                if not llm.slots.busy[slot]:
                    llm.slots.invalidate(slot)
            computed = sched.stats["prefill_tokens"]
            sched.run_until_done([victim, urgent])
            assert sched.stats["prefill_tokens"] - computed == len(llm.tokenizer.encode(prompt)) + 5
            assert sched.stats["preemptions"] == before + 1
            assert victim.error is None and urgent.error is None
            assert victim.generator.generated == want
            assert urgent.generator.generated == want_urgent
        assert_all_slots_free(llm)
    finally:
        llm.close()
