"""AsyncLLM and the scheduler's background loop, on the fake model (fake_backend.py): the same
outputs as the offline API, concurrency, cancellation through task cancellation, and the
offline API still working while the loop thread runs."""
import asyncio
import time

import pytest

from fake_backend import expected_text, make_fake_llm
from lmengine import SamplingParams
from lmengine.async_llm import AsyncLLM
from lmengine.errors import InvalidParameterError, LLMClosedError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))      # bounded: a hang fails instead of blocking


def test_generate_and_stream_equal_the_offline_api():
    llm = make_fake_llm()
    offline = llm.generate("hello", GREEDY)
    assert offline.text == expected_text(llm, "hello", 12)

    async def main():
        allm = AsyncLLM(llm)
        try:
            out = await allm.generate("hello", GREEDY)
            chunks = [c async for c in allm.stream("hello", GREEDY)]
            batch = await allm.generate(["hello", "world"], GREEDY)
            return out, chunks, batch
        finally:
            await allm.close()

    out, chunks, batch = run(main())
    assert out.text == offline.text and out.token_ids == offline.token_ids
    assert out.finish_reason == "length"
    assert "".join(c.text for c in chunks) == offline.text
    assert [t for c in chunks for t in c.token_ids] == offline.token_ids
    assert all(c.text for c in chunks[:-1]) and chunks[-1].finish_reason == "length"
    assert [c.text for c in batch] == [offline.text, expected_text(llm, "world", 12)]
    assert not llm.scheduler.background                   # close() stopped the loop thread


def test_seeded_n_samples_and_logprobs_match_offline():
    llm = make_fake_llm()
    params = SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=8, ignore_eos=True, logprobs=2)
    offline = llm.generate("abc", params)

    async def main():
        allm = AsyncLLM(llm)
        try:
            out = await allm.generate("abc", params)
            chunks = [c async for c in allm.stream("abc", params)]
            return out, chunks
        finally:
            await allm.close()

    out, chunks = run(main())
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in offline.outputs]
    assert [o.logprobs for o in out.outputs] == [o.logprobs for o in offline.outputs]
    for i, want in enumerate(offline.outputs):
        mine = [c for c in chunks if c.index == i]
        assert "".join(c.text for c in mine) == want.text
        assert [lp for c in mine for lp in c.logprobs] == want.logprobs


def test_concurrent_streams_share_steps_and_offline_calls_keep_working():
    llm = make_fake_llm(n_slots=5)
    prompts = ["hello", "world", "abc", "xyz"]
    want = {p: expected_text(llm, p, 12) for p in prompts}

    async def one(allm, p):
        return p, "".join([c.text async for c in allm.stream(p, GREEDY)])

    async def main():
        allm = AsyncLLM(llm)
        try:
            # the offline API from another thread while the loop runs: it waits for the loop's steps
            offline = await asyncio.to_thread(llm.generate, "hello", GREEDY)
            results = await asyncio.gather(*(one(allm, p) for p in prompts * 3))
            return offline, results
        finally:
            await allm.close()

    offline, results = run(main())
    assert offline.text == want["hello"]
    assert all(text == want[p] for p, text in results)
    batches = [c for c in llm.backend.calls if c[0] == "forward_batch"]
    assert max(len(c[1]) for c in batches) > 1            # streams were decoded together
    assert all(not busy for busy in llm.slots.busy)       # every slot given back


def test_task_cancellation_cancels_the_request_and_frees_its_slot():
    llm = make_fake_llm()
    long = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)

    async def main():
        allm = AsyncLLM(llm)
        try:
            got_first = asyncio.Event()

            async def consume():
                async for _ in allm.stream("hello", long):
                    got_first.set()
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(consume())
            await got_first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):                           # ends at the loop's next step
                if not any(llm.slots.busy):
                    break
                await asyncio.sleep(0.01)
            assert not any(llm.slots.busy)
            # an early `break` out of the stream cancels as well
            gen = allm.stream("world", long)
            async for _ in gen:
                break
            await gen.aclose()
            for _ in range(200):
                if not any(llm.slots.busy):
                    break
                await asyncio.sleep(0.01)
            assert not any(llm.slots.busy)
            # and the engine goes on serving
            return await allm.generate("abc", GREEDY)
        finally:
            await allm.close()

    assert run(main()).text == expected_text(llm, "abc", 12)


def test_errors_reach_the_caller():
    llm = make_fake_llm()

    async def main():
        allm = AsyncLLM(llm)
        try:
            with pytest.raises(InvalidParameterError, match="max_tokens"):
                await allm.generate("hello", max_tokens=-1)
            with pytest.raises(InvalidParameterError, match="beam"):
                await allm.generate("hello", temperature=0, beam_width=2)
            with pytest.raises(InvalidParameterError, match="empty"):
                await allm.generate("")
        finally:
            await allm.close()

    run(main())


def test_close_ends_requests_in_progress_with_llm_closed_error():
    # 20 ms a step: the loop thread cannot finish the 80 tokens before the stream's first chunk
    # is read and the LLM closed (without a delay the fake model's steps take microseconds)
    llm = make_fake_llm(backend_options={"step_delay": 0.02})

    async def main():
        allm = AsyncLLM(llm, close_llm=True)
        stream = allm.stream("hello", temperature=0, max_tokens=80, ignore_eos=True)
        with pytest.raises(LLMClosedError):
            async for _ in stream:
                llm.close()            # in progress: the request ends with the error
        with pytest.raises(LLMClosedError):
            await allm.generate("hello", GREEDY)        # and later requests are refused
        await allm.close()

    run(main())
    assert not llm.scheduler.background


def test_background_loop_sleeps_when_idle():
    """No work: the loop thread waits on an event instead of spinning (no steps counted)."""
    llm = make_fake_llm()
    llm.scheduler.start()
    try:
        before = llm.scheduler.stats["steps"]
        time.sleep(0.3)
        assert llm.scheduler.stats["steps"] == before
        assert llm.generate("hello", GREEDY).text == expected_text(llm, "hello", 12)
    finally:
        llm.scheduler.stop()
    assert not llm.scheduler.background
    assert llm.generate("hello", GREEDY).text == expected_text(llm, "hello", 12)   # caller-driven again
