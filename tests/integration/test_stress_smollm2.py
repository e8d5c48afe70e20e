"""Concurrency and soak on the bundled SmolLM2 (issue #14): many threads mixing valid, invalid,
abandoned and never-iterated requests get the same greedy answers as one request at a time (the
batch-invariance contract: a row's result never depends on the batch around it), and 500
requests leave the process's memory where the warm-up left it.

Bounded: every thread joins within a time limit, every request has a few tokens."""
import gc
import random
import threading

import pytest

from lmengine import LLM, SamplingParams
from lmengine.errors import ContextLengthError, InvalidParameterError, TokenIdError

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colors:",
           "The quick brown fox", "Water boils at", "In 1969, the first", "My favourite food is"]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with LLM(smollm2_path, n_ctx=128, max_batch_size=8) as llm:
        yield llm


@pytest.fixture(scope="module")
def expected(llm):
    """Each prompt's greedy answer, one request at a time."""
    return {p: llm.generate(p, GREEDY).token_ids for p in PROMPTS}


def test_concurrency_stress(llm, expected):
    bad_bias = SamplingParams(temperature=0, max_tokens=4, logit_bias={llm.vocab_size + 1: 2.0})
    failures, done = [], []

    def worker(seed):
        rnd = random.Random(seed)
        kept = []
        for _ in range(6):
            prompt = rnd.choice(PROMPTS)
            kind = rnd.choice(["generate", "generate", "stream", "invalid", "abandon", "never"])
            try:
                if kind == "generate":
                    assert llm.generate(prompt, GREEDY).token_ids == expected[prompt]
                elif kind == "stream":
                    ids = [t for c in llm.stream(prompt, GREEDY) for t in c.token_ids]
                    assert ids == expected[prompt]
                elif kind == "invalid":
                    which = rnd.randrange(3)
                    if which == 0:
                        with pytest.raises(InvalidParameterError):
                            llm.generate(prompt, bad_bias)
                    elif which == 1:
                        with pytest.raises(ContextLengthError):
                            llm.generate(prompt * 40, GREEDY)
                    else:
                        with pytest.raises(TokenIdError):
                            llm.generate([True, False, 5], GREEDY)
                elif kind == "abandon":
                    stream = llm.stream(prompt, GREEDY)
                    next(stream)
                    if rnd.random() < 0.5:
                        stream.close()
                    else:
                        kept.append(stream)            # never read again
                else:
                    kept.append(llm.stream(prompt, GREEDY))   # never iterated
                done.append(kind)
            except BaseException as e:                 # noqa: BLE001 (reported below)
                failures.append((kind, prompt, repr(e)))
                return

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not failures, failures[:5]
    assert len(done) == 8 * 6
    gc.collect()
    llm.scheduler.run_until_done(list(llm.scheduler.running))   # the abandoned streams run out
    assert not any(llm.slots.busy) and not llm.scheduler.waiting


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_soak_500_requests_keep_memory_flat(llm, expected):
    """500 requests (batched generate calls, streams, n=2 samples, invalid ones) after a warm-up
    that has used every slot: resident memory grows by less than 5%. A leaked slot, KV cache,
    request or compiled specialisation per request would grow it, or hang the run."""
    rnd = random.Random(0)

    def run(n_requests):
        count = 0
        while count < n_requests:
            kind = rnd.randrange(4)
            if kind == 0:
                batch = [rnd.choice(PROMPTS) for _ in range(8)]
                outs = llm.generate(batch, GREEDY)
                assert [o.token_ids for o in outs] == [expected[p] for p in batch]
                count += 8
            elif kind == 1:
                p = rnd.choice(PROMPTS)
                assert [t for c in llm.stream(p, GREEDY) for t in c.token_ids] == expected[p]
                count += 1
            elif kind == 2:
                out = llm.generate(rnd.choice(PROMPTS), SamplingParams(n=2, temperature=0.8, seed=count,
                                                                       max_tokens=4))
                assert len(out.outputs) == 2
                count += 1
            else:
                with pytest.raises(InvalidParameterError):
                    llm.generate(rnd.choice(PROMPTS), SamplingParams(max_tokens=4, logit_bias={-1: 1.0}))
                count += 1

    run(100)                                           # warm-up: every slot, every code path
    gc.collect()
    before = rss_bytes()
    run(500)
    gc.collect()
    after = rss_bytes()
    assert after < before * 1.05, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"
    assert not any(llm.slots.busy) and not llm.scheduler.waiting and not llm.scheduler.running
