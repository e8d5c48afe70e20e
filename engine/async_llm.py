"""`AsyncLLM`: the asyncio face of an `LLM`, for FastAPI-style applications.

    from lmengine import LLM
    from lmengine.async_llm import AsyncLLM

    allm = AsyncLLM(LLM("smollm2"))          # starts the scheduler's background loop thread
    out = await allm.generate("Once upon a time", max_tokens=16, temperature=0)
    async for chunk in allm.stream("Hello", max_tokens=16):
        print(chunk.text, end="")
    await allm.close()                         # stops the loop thread (and closes the LLM if owned)

How it works: requests go to the LLM's Scheduler, whose loop thread (`Scheduler.start`) runs the
batched steps; each request carries a `listener` that wakes the asyncio task waiting for it
(`loop.call_soon_threadsafe`), so the event loop never blocks on a forward pass. Cancelling the
task that iterates a stream (or awaits `generate`), or leaving the `async for` early, cancels
the request: it ends, and frees its cache slot, at the scheduler's next step.

Semantics are those of `LLM.generate` / `LLM.stream`: the same parameters (a SamplingParams
and/or its fields as keywords), the same Completion and chunk texts, n > 1 samples, and the
same outputs for greedy or seeded requests. Beam search (beam_width > 1) is not available here.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidParameterError
from .generator import Completion, StreamChunk
from .params import SamplingParams
from .scheduler import Request


@dataclass
class AsyncChunk(StreamChunk):
    """A StreamChunk plus the logprobs of its tokens (lmengine.sampler.TokenLogprobs, one per
    token id) when the request asked for them (params.logprobs not None), else None."""

    logprobs: list | None = None


class ChunkReader:
    """Turns a request's raw per-token chunks into user-facing ones, as `LLM.stream` does: no
    chunk is empty (tokens whose text is held back ride with the next chunk that has text, or the
    last one), and each carries the logprobs of its tokens."""

    def __init__(self, request: Request):
        self.request = request
        self._held: list[int] = []
        self._n_read = 0              # tokens handed out so far (the index into generator.logprobs)

    def take(self) -> list[AsyncChunk]:
        out = []
        r = self.request
        while r.chunks:
            chunk = r.chunks.popleft()
            self._held.extend(chunk.token_ids)
            if chunk.text or chunk.finish_reason is not None:
                ids, self._held = self._held, []
                logprobs = None
                g = r.generator
                if g is not None and g.params.logprobs is not None:
                    logprobs = list(g.logprobs[self._n_read:self._n_read + len(ids)])
                self._n_read += len(ids)
                out.append(AsyncChunk(text=chunk.text, token_ids=ids, finish_reason=chunk.finish_reason,
                                      index=chunk.index, logprobs=logprobs))
        return out


class AsyncLLM:
    """An LLM driven by its scheduler's background loop, with an asyncio API.

    llm: a loaded `LLM`. close_llm: whether `close()` closes the LLM too (default False: the
    caller keeps it). The loop thread starts here; the offline API of the same LLM keeps
    working next to it (its calls then wait for the loop's steps instead of running them)."""

    def __init__(self, llm, *, close_llm: bool = False):
        self.llm = llm
        self.close_llm = close_llm
        llm.check_open()
        llm.scheduler.start()

    @property
    def scheduler(self):
        return self.llm.scheduler

    # -- the API -----------------------------------------------------------------------------------
    async def generate(self, prompts, params: SamplingParams | None = None,
                       **sampling: Any) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a list of prompts (-> list[Completion]), as
        `LLM.generate` does. Cancelling the awaiting task cancels the requests."""
        batch = self.llm._is_batch(prompts)
        prompt_list = list(prompts) if batch else [prompts]
        params = self._params(params, sampling)
        ids_list = [self.llm._prompt_ids(p) for p in prompt_list]
        results = await asyncio.gather(*(self._complete(ids, params) for ids in ids_list))
        return list(results) if batch else results[0]

    async def stream(self, prompt, params: SamplingParams | None = None,
                     **sampling: Any) -> AsyncIterator[AsyncChunk]:
        """Yield AsyncChunks (text deltas, with `index` naming which of the n samples) as tokens
        are generated; as `LLM.stream`. Leaving the loop early cancels the request."""
        params = self._params(params, sampling)
        ids = self.llm._prompt_ids(prompt)
        async for chunk in self.stream_ids(ids, params):
            yield chunk

    async def stream_ids(self, ids: list[int], params: SamplingParams,
                         on_requests: Callable[[list[Request]], None] | None = None) -> AsyncIterator[AsyncChunk]:
        """`stream` for prompt ids already checked (`LLM._prompt_ids`) and resolved params
        (`LLM.resolve_params`). on_requests, if given, receives the scheduler requests (the
        server reads their generators for usage and completions)."""
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def listener() -> None:
            loop.call_soon_threadsafe(wake.set)

        requests = [self.scheduler.submit(ids, params, i, listener=listener) for i in range(params.n)]
        if on_requests is not None:
            on_requests(requests)
        readers = [ChunkReader(r) for r in requests]
        try:
            while True:
                wake.clear()               # before looking: news arriving after sets it again
                progressed = False
                for reader in readers:
                    for chunk in reader.take():
                        progressed = True
                        yield chunk
                    if reader.request.error is not None and reader.request.done and not reader.request.chunks:
                        raise reader.request.error
                if all(r.done and not r.chunks for r in requests):
                    return
                if not progressed:
                    await wake.wait()
        finally:
            for r in requests:
                if not r.done:
                    self.scheduler.request_cancel(r)

    async def close(self) -> None:
        """Stop the loop thread (without blocking the event loop); close the LLM if close_llm."""
        await asyncio.to_thread(self.scheduler.stop)
        if self.close_llm:
            await asyncio.to_thread(self.llm.close)

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------------------
    def _params(self, params, sampling) -> SamplingParams:
        params = self.llm.resolve_params(params, sampling)
        if params.beam_width > 1:
            raise InvalidParameterError("beam search (beam_width > 1) is not available in AsyncLLM; "
                                        "use LLM.generate")
        return params

    async def _complete(self, ids: list[int], params: SamplingParams) -> Completion:
        requests: list[Request] = []
        async for _ in self.stream_ids(ids, params, on_requests=requests.extend):
            pass
        result = self.llm._collect(requests)
        if params.prompt_logprobs is not None:
            result.prompt_logprobs = await asyncio.to_thread(self.llm._prompt_logprobs, ids,
                                                             params.prompt_logprobs)
        return result
