"""`LLM`: the facade users program against. Orchestration only; the math is in the backend.

    from lmengine import LLM, SamplingParams
    llm = LLM("smollm2", n_ctx=2048)
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=32))
    print(out.text, out.finish_reason)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from lmengine.converters.gguf_file import GGUFFile

from .cache import SlotTable
from .config import config_from_gguf
from .constraints import ConstraintCompiler
from .errors import ContextLengthError, InvalidParameterError, LLMClosedError, NonFiniteLogitsError
from .generator import Completion, Generator, StreamChunk
from .models.registry import resolve_model
from .params import DEFAULTS as SAMPLING_FIELDS
from .params import SamplingParams
from .sampler import Sampler
from .scheduler import Scheduler
from .validation import check_token_ids

if TYPE_CHECKING:
    from .chat import ChatTemplate

BACKENDS = ("numba", "onnxruntime")


class LLM:
    """A loaded model with its tokenizer, chat template, cache slots and scheduler.

    model: a .gguf path, an ONNX export directory, a bundled name ("smollm2"; None = default), or
        "hf:OWNER/REPO[:GLOB]" for a Hugging Face Hub file (see `from_pretrained`).
    n_ctx: context window per sequence (prompt + generated tokens). None (default): 2048, or the
        model's training context when that is shorter. A value beyond the training context
        (`{arch}.context_length`; the model's answers degrade past it) raises ContextLengthError
        unless allow_long_context=True; one whose KV cache cannot fit this machine's memory
        raises InvalidParameterError before anything is allocated.
    n_threads: compute threads (None = all cores).
    seed: default seed for requests whose SamplingParams set none (None = fresh entropy).
    backend: "numba" (default) or "onnxruntime" (needs an ONNX export; see `lmengine convert`).
    max_batch_size: sequences decoded together; more concurrent requests queue. Each holds a KV
        slot of n_ctx positions (memory is only touched for positions in use).
    activations: arithmetic of the quantized matrix products (integer dot products on activations
        quantized per 32-value block): "mixed" (default: two int8 terms per block for the k and v
        projections, one elsewhere; half llama.cpp's divergence from float32, as fast),
        "int8x2" (two terms everywhere: float32 accuracy), "int8" (one term, llama.cpp's
        arithmetic), "f32" (float32 activations, the exact path).
    kv_cache_dtype: element type of the KV cache: "f16" (half the memory, and faster attention over
        long or many sequences; llama.cpp's default too), "f32", or "auto" (default): "f32" with
        activations="f32", "f16" otherwise. Llama-family GGUF models only (the ONNX and LSTM
        backends keep their own state).
    providers: onnxruntime execution providers (backend="onnxruntime" only).
    warmup: run one token at load time, so compiled kernels are loaded (or, on the very first
        run, compiled: about a minute, then cached on disk) before the first request.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, n_ctx: int | None = None,
                 n_threads: int | None = None, seed: int | None = None, backend: str = "numba",
                 max_batch_size: int = 8, activations: str = "mixed", kv_cache_dtype: str = "auto",
                 providers: Sequence[str] | None = None, verbose: bool = False, warmup: bool = True,
                 allow_long_context: bool = False):
        self._closed = True     # until loaded (_attach opens it)
        if n_ctx is not None:
            _check_positive_int("n_ctx", n_ctx)
        _check_positive_int("max_batch_size", max_batch_size)
        if n_threads is not None:
            _check_positive_int("n_threads", n_threads)
        if backend not in BACKENDS:
            raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if kv_cache_dtype not in ("auto", "f16", "f32"):
            raise InvalidParameterError(f"kv_cache_dtype must be 'auto', 'f16' or 'f32', got {kv_cache_dtype!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise InvalidParameterError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.seed = seed
        self.verbose = verbose
        _limit_openmp_spin()
        self.path = resolve_model(model)
        t0 = time.perf_counter()
        n_slots = max_batch_size + 1  # one more for logits()/perplexity() next to a full batch

        def load():
            if backend == "onnxruntime" or os.path.isdir(self.path) or self.path.endswith(".onnx"):
                self._load_onnx(n_ctx, n_slots, n_threads, providers)
            else:
                self._load_gguf(n_ctx, n_slots, n_threads, activations, kv_cache_dtype, allow_long_context)
            self._attach(max_batch_size, warmup)
        _in_own_thread(load)
        self.load_seconds = time.perf_counter() - t0
        if verbose:
            self._log_load(warmup)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str = "*.gguf", *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        **kwargs: Any) -> "LLM":
        """An LLM for the one file of a Hugging Face Hub repository that matches the glob
        `filename` (e.g. "*Q4_K_M.gguf"), downloaded once into the hub cache (huggingface_hub:
        revisions, token, HF_HUB_OFFLINE=1 for cache-only). Other arguments as for `LLM(...)`.
        Needs `pip install "lmengine[hub]"`."""
        from .models.hub import hub_model_path
        return cls(hub_model_path(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir), **kwargs)

    @classmethod
    def from_backend(cls, backend, tokenizer, *, chat_template=None, metadata=None, max_batch_size: int | None = None,
                     seed: int | None = None, warmup: bool = True) -> "LLM":
        """An LLM over a backend object that is already built (any `lmengine.backends.base.Backend`
        with `n_slots` slots) and a tokenizer: requests, sampling and scheduling as for a loaded file.
        One slot is kept beside the batch for logits()/perplexity(), so max_batch_size defaults to
        n_slots - 1."""
        self = cls.__new__(cls)
        self.seed, self.verbose = seed, False
        self.path, self.gguf, self.config = None, None, getattr(backend, "config", None)
        self.metadata = dict(metadata or {})
        self.backend, self.tokenizer, self.chat_template = backend, tokenizer, chat_template
        if max_batch_size is None:
            max_batch_size = max(1, backend.n_slots - 1)
        _check_positive_int("max_batch_size", max_batch_size)
        t0 = time.perf_counter()
        _in_own_thread(lambda: self._attach(max_batch_size, warmup))
        self.load_seconds = time.perf_counter() - t0
        return self

    def _attach(self, max_batch_size: int, warmup: bool) -> None:
        """Slots, sampler and scheduler around self.backend and self.tokenizer."""
        self.n_ctx = self.backend.n_ctx
        self.vocab_size = self.backend.vocab_size
        self.max_batch_size = max_batch_size
        self.slots = SlotTable(self.backend.n_slots, self.n_ctx, self.backend.supports_rewind)
        self._slot_lock = threading.Lock()
        self.orphaned_slots: deque[int] = deque()   # slots of Generators dropped unclosed (generator.py)
        self._closed = False
        self.eos_token_ids = frozenset(self.tokenizer.eot_ids)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids,
                               encode=lambda s: self.tokenizer.encode(s, add_bos=False, parse_special=False),
                               constraints=ConstraintCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids))
        self.scheduler = Scheduler(self)
        if warmup:
            self.backend.warmup()
            self.sampler.sample(np.zeros((1, self.vocab_size), dtype=np.float32),
                                [self.sampler.new_state(SamplingParams(temperature=0))])

    def _log_load(self, warmup: bool) -> None:
        from lmengine.kernels import native
        cfg = self.config
        what = f"{cfg.arch}, {cfg.n_layers} layers, vocab {self.vocab_size}" if cfg is not None else "onnx"
        _log(f"loaded {self.path} ({what}) on {type(self.backend).__name__}: n_ctx={self.n_ctx}, "
             f"max_batch_size={self.max_batch_size}, threads={getattr(self.backend, 'n_threads', None)}")
        _log(f"load time = {self.load_seconds * 1e3:.1f} ms"
             + (" (includes loading, or on a first run compiling, the kernels: warmup=True)" if warmup else ""))
        _log(native.kernels_in_use())

    # -- loading -----------------------------------------------------------------------------------
    _chat_template = None
    _chat_template_pending = False

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (engine/chat.py), or None when it has none. A GGUF's template
        (ChatML when the file has none) is compiled at first use, not at load: importing jinja2
        and compiling take about 0.07 s of a start that may never chat. A template that does not
        compile raises its ChatTemplateError here, at every use."""
        if self._chat_template_pending:
            from .chat import ChatTemplate
            self._chat_template = ChatTemplate.from_gguf(self.gguf)
            self._chat_template_pending = False
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: ChatTemplate | None) -> None:
        self._chat_template, self._chat_template_pending = template, False

    def _load_gguf(self, n_ctx, n_slots, n_threads, activations, kv_cache_dtype, allow_long_context):
        self.gguf = GGUFFile(self.path)
        self.config = config_from_gguf(self.gguf)
        self.metadata = self.gguf.metadata
        if self.config.arch == "lstm":
            n_ctx = n_ctx or DEFAULT_N_CTX      # a recurrent state has no context limit of its own
            from .backends.lstm_backend import LSTMBackend
            from .lstm_tokenizer import tokenizer_from_gguf
            self.tokenizer = tokenizer_from_gguf(self.gguf)
            self.chat_template = None
            self.backend = LSTMBackend(self.gguf, self.config, n_ctx, n_slots, n_threads)
            return
        if self.config.arch in ("bert", "gpt2"):   # engine/backends/encoder_backend.py
            from .backends.encoder_backend import load_backend
            n_ctx = _context_size(n_ctx, self.config.n_ctx_train, False, self.path)   # learned positions
            self.tokenizer, self.chat_template, self.backend = load_backend(self.gguf, self.config, n_ctx, n_slots,
                                                                            n_threads)
            return
        from .backends.numba_backend import NumbaLlamaBackend
        from .tokenizer import Tokenizer
        n_ctx = _context_size(n_ctx, self.config.n_ctx_train, allow_long_context, self.path)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self._chat_template_pending = True      # compiled at first use: see the chat_template property
        self.backend = NumbaLlamaBackend(self.gguf, self.config, n_ctx, n_slots, n_threads, activations=activations,
                                         kv_cache_dtype=kv_cache_dtype)

    def _load_onnx(self, n_ctx, n_slots, n_threads, providers):
        from .chat import ChatTemplate
        model_dir = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        self.gguf = None
        self.metadata = {}
        if os.path.exists(os.path.join(model_dir, "genai_config.json")):   # a transformer export
            from .backends.ort_backend import OrtBackend
            from .tokenizer import Tokenizer
            self.backend = OrtBackend(model_dir, providers=providers, n_ctx=n_ctx, n_slots=n_slots,
                                      n_threads=n_threads)
            self.config = None
            self.tokenizer = Tokenizer.from_pretrained_dir(model_dir)
            self.chat_template = ChatTemplate.for_tokenizer(self.tokenizer)
            return
        from lmengine.converters.onnx_lstm import read_lstm_onnx_metadata  # an LSTM export (config in metadata)

        from .backends.lstm_backend import OrtLSTMBackend
        from .lstm_tokenizer import VocabTokenizer
        try:
            config, tokenizer_meta = read_lstm_onnx_metadata(model_dir)
        except Exception as e:
            from .errors import BackendError
            raise BackendError(f"{model_dir}: not an ONNX export of lmengine (no genai_config.json, "
                               f"no LSTM metadata): {e}") from e
        self.backend = OrtLSTMBackend(model_dir, n_ctx=n_ctx or DEFAULT_N_CTX, n_slots=n_slots, n_threads=n_threads,
                                      providers=providers)
        self.config = config
        self.tokenizer = VocabTokenizer.from_metadata(tokenizer_meta)
        self.chat_template = None

    # -- slots (used by Generator and Scheduler) ---------------------------------------------------
    def acquire_slot(self, prompt_ids=None, or_raise: bool = False) -> int | None:
        """A free cache slot (preferring one that holds a prefix of prompt_ids); when all are
        busy: None, or InvalidParameterError with or_raise=True."""
        self.check_open()
        with self._slot_lock:
            while self.orphaned_slots:
                self.slots.release(self.orphaned_slots.popleft())
            slot = self.slots.acquire(prompt_ids)
        if slot is None and not or_raise:
            return None
        if slot is None:
            raise InvalidParameterError(
                f"all {self.slots.n_slots} cache slots are in use (max_batch_size); close a Generator first")
        return slot

    def release_slot(self, slot: int) -> None:
        """Give back a slot from `acquire_slot` (exactly once: a second release is a RuntimeError)."""
        with self._slot_lock:
            self.slots.release(slot)

    def generator(self, prompt=None, params: SamplingParams | None = None) -> Generator:
        """A low-level Generator holding its own cache slot (see engine/generator.py)."""
        ids = self._prompt_ids(prompt) if prompt is not None else None
        return Generator(self, params, ids)

    # -- parameters and input checks ---------------------------------------------------------------
    def resolve_params(self, params: SamplingParams | None, overrides: dict | None = None) -> SamplingParams:
        """The request's parameters: params (None = defaults) with `overrides` (SamplingParams
        field -> value) applied, then the model's recommended values for fields nobody set."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params must be a SamplingParams, got {type(params).__name__}")
        if overrides:
            params = params.replace(**overrides)
        params = params.with_model_defaults(self.metadata)
        if params.seed is None and self.seed is not None:
            params = params.replace(seed=self.seed)
        return params

    def check_token_ids(self, token_ids: Sequence[int], what: str = "token id") -> list[int]:
        """token_ids as a list of ints, each checked to be an integer (not a bool) in
        [0, vocab_size); TokenIdError naming `what`, the first bad id and the range otherwise.
        Ids entering the engine (prompts, Generator.append_tokens) go through here."""
        return check_token_ids(token_ids, self.vocab_size, what).tolist()

    def _prompt_ids(self, prompt) -> list[int]:
        self.check_open()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)   # checked below: a tokenizer may know more ids than the model
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, np.ndarray) and prompt.ndim == 1):
            ids = prompt
        else:
            raise InvalidParameterError(
                f"a prompt is a str or a list of token ids, got {type(prompt).__name__}")
        ids = self.check_token_ids(ids, "prompt token id")
        if not ids:
            raise InvalidParameterError("the prompt is empty (no tokens)")
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx} "
                f"(at least one position must remain for the answer)")
        return ids

    @staticmethod
    def _is_batch(prompts) -> bool:
        return isinstance(prompts, (list, tuple)) and len(prompts) > 0 and \
            not all(isinstance(t, (int, np.integer)) for t in prompts)

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | None = None,
                 **sampling: Any) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a list of prompts (-> list[Completion], batched).

        A prompt is a str or a list of token ids. Sampling: a SamplingParams, and/or its fields as
        keyword arguments (`generate("Hi", max_tokens=4, temperature=0)`; keywords override
        params). With n > 1 each Completion's `outputs` holds the n samples (its own fields mirror
        the first)."""
        t0 = time.perf_counter()
        batch = self._is_batch(prompts)
        prompt_list = list(prompts) if batch else [prompts]
        params = self.resolve_params(params, sampling)
        ids_list = [self._prompt_ids(p) for p in prompt_list]
        if params.beam_width > 1:
            from .beam import beam_search
            results = [beam_search(self, ids, params) for ids in ids_list]
        else:
            requests = [[self.scheduler.submit(ids, params, i) for i in range(params.n)] for ids in ids_list]
            flat = [r for group in requests for r in group]
            try:
                self.scheduler.run_until_done(flat)
            finally:            # interrupted (KeyboardInterrupt...): this call's requests end here
                for r in flat:
                    self.scheduler.cancel(r)
            results = [self._collect(group) for group in requests]
            if self.verbose:
                self._log_timings(flat, t0)
        if params.prompt_logprobs is not None:
            for ids, result in zip(ids_list, results):
                result.prompt_logprobs = self._prompt_logprobs(ids, params.prompt_logprobs)
        return results if batch else results[0]

    def _collect(self, group) -> Completion:
        for r in group:
            if r.error is not None:
                raise r.error
        outputs = [r.generator.completion() for r in group]
        first = outputs[0]
        return Completion(text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason,
                          prompt_token_ids=first.prompt_token_ids, stop_reason=first.stop_reason,
                          logprobs=first.logprobs, outputs=outputs)

    def stream(self, prompt, params: SamplingParams | None = None, **sampling: Any) -> Iterator[StreamChunk]:
        """Yield StreamChunks (text deltas) as tokens are generated. The concatenated text equals
        `generate(prompt, params).text`; no chunk is empty (tokens whose text is held back, e.g.
        as a possible start of a stop string, come with the next chunk that has text, or the last
        one). Closing the iterator cancels the request. Streams from several threads are batched
        together. Sampling as in `generate`."""
        params = self.resolve_params(params, sampling)
        ids = self._prompt_ids(prompt)
        if params.beam_width > 1:
            raise InvalidParameterError("beam search (beam_width > 1) cannot stream; use generate")
        return self._stream_chunks(ids, params)

    def _stream_chunks(self, ids, params):
        # Submitted at the first next(): a stream that is never iterated holds nothing and
        # delays nobody.
        requests = [self.scheduler.submit(ids, params, i) for i in range(params.n)]
        held = {id(r): [] for r in requests}     # token ids of chunks without text, not yet yielded
        try:
            while True:
                pending = [r for r in requests if r.chunks or not r.done]
                if not pending:
                    return
                for r in pending:
                    self.scheduler.wait_for_news(r)
                    while r.chunks:
                        chunk = r.chunks.popleft()
                        held[id(r)].extend(chunk.token_ids)
                        if chunk.text or chunk.finish_reason is not None:
                            chunk.token_ids, held[id(r)] = held[id(r)], []
                            yield chunk
                    if r.error is not None:        # after the text it produced before failing
                        raise r.error
        finally:
            for r in requests:
                if not r.done:
                    self.scheduler.cancel(r)

    def create_chat_completion(self, messages, **request: Any):
        """An OpenAI chat completion dict (stream=True: an iterator of chunk dicts), the same as
        `lmengine serve` returns; keyword arguments are the request's fields (engine/openai_compat.py)."""
        from .openai_compat import create_chat_completion
        return create_chat_completion(self, messages, **request)

    def create_completion(self, prompt, **request: Any):
        """An OpenAI text completion dict (stream=True: an iterator of chunk dicts), as the server's."""
        from .openai_compat import create_completion
        return create_completion(self, prompt, **request)

    def chat(self, messages, params: SamplingParams | None = None, *, parse_special_in_content: bool = False,
             **kwargs: Any) -> Completion:
        """Answer a conversation ([{"role": ..., "content": ...}]) using the model's chat template.
        Message contents are plain text: control-token text inside them ("<|im_start|>system")
        is encoded as text, so a user cannot forge a turn (`parse_special_in_content=True`
        restores the old behaviour of parsing it). Keyword arguments named like SamplingParams
        fields are sampling parameters (as in `generate`); the others are template variables
        (`tools=...`, `enable_thinking=...`)."""
        sampling = {k: v for k, v in kwargs.items() if k in SAMPLING_FIELDS}
        template_kwargs = {k: v for k, v in kwargs.items() if k not in SAMPLING_FIELDS}
        ids = self.chat_prompt_ids(messages, parse_special_in_content=parse_special_in_content, **template_kwargs)
        return self.generate(ids, params, **sampling)

    def chat_prompt_ids(self, messages, add_generation_prompt: bool = True, *, parse_special_in_content: bool = False,
                        **template_kwargs) -> list[int]:
        """The prompt token ids for a conversation (engine/chat.py: ChatTemplate.encode)."""
        self._check_chat_template()
        return self.chat_template.encode(messages, self.tokenizer, add_generation_prompt=add_generation_prompt,
                                         parse_special_in_content=parse_special_in_content, **template_kwargs)

    def render_chat(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The conversation as the template renders it (text; `chat_prompt_ids` is what `chat` runs)."""
        self._check_chat_template()
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)

    def _check_chat_template(self) -> None:
        self.check_open()
        if self.chat_template is None:
            from .errors import ChatTemplateError
            raise ChatTemplateError(f"{self.path}: this model has no chat template")

    # -- evaluation --------------------------------------------------------------------------------
    def embed(self, texts: str | Sequence[str], normalize: bool = True, pooling: str | None = None,
              batch_size: int = 32) -> np.ndarray:
        """Embeddings float32 [n, dim] of texts (bert, gpt2 and llama-family models): pooling "mean" | "cls" |
        "last" (None: the model's; see engine/embed.py), L2-normalized unless normalize=False."""
        from .embed import embed_texts
        return embed_texts(self, texts, normalize=normalize, pooling=pooling, batch_size=batch_size)

    def logits(self, token_ids) -> np.ndarray:
        """float32 [n_tokens, vocab]: the next-token logits at every position of token_ids."""
        ids = self._prompt_ids(list(token_ids) if not isinstance(token_ids, str) else token_ids)
        with self.scheduler.lock:
            slot = self.acquire_slot(ids, or_raise=True)
            try:
                # logits at every position: the whole sequence runs (no prefix reuse)
                out = self.backend.forward(slot, np.asarray(ids, dtype=np.int64), 0, all_logits=True)
                self.slots.commit(slot, 0, ids)
            finally:
                self.release_slot(slot)
        return out

    def perplexity(self, text: str | Sequence[int], window: int | None = None) -> float:
        """exp(mean negative log-likelihood) of the text's tokens 1..n-1, each predicted from the
        tokens before it. Texts longer than the context are scored in windows of `window` tokens
        (default n_ctx) overlapping by half, each token scored once with the longest context its
        window gives."""
        self.check_open()
        ids = self.tokenizer.encode(text) if isinstance(text, str) else self.check_token_ids(text)
        if len(ids) < 2:
            raise InvalidParameterError("perplexity needs at least 2 tokens")
        if window is not None:
            _check_positive_int("window", window)
            if window < 2:
                raise InvalidParameterError(f"window must be at least 2 tokens (one scored after one "
                                            f"of context), got {window}")
        window = min(window or self.n_ctx, self.n_ctx - 1)
        nll, count, scored_until = 0.0, 0, 1  # next position to score
        start = 0
        while scored_until < len(ids):
            chunk = ids[start: start + window]
            logits = self.logits(chunk).astype(np.float64)  # [len(chunk), vocab]
            if not np.isfinite(logits).all():
                raise NonFiniteLogitsError("the model produced non-finite logits (NaN or inf) while "
                                           "scoring the text: a corrupt weight or a numeric overflow")
            for j in range(max(scored_until - start, 1), len(chunk)):
                row = logits[j - 1]
                m = row.max()
                lse = m + math.log(np.exp(row - m).sum())
                nll += lse - row[chunk[j]]
                count += 1
            scored_until = start + len(chunk)
            start += max(window // 2, 1)
        return math.exp(nll / count)

    def _prompt_logprobs(self, ids, n_top) -> list:
        """[None, TokenLogprobs of ids[1] given ids[:1], ...] under the raw model distribution."""
        from lmengine.kernels.sampling import token_logprobs, top_logprobs

        from .sampler import TokenLogprobs
        logits = self.logits(ids)[:-1]                       # row j predicts ids[j + 1]
        targets = np.asarray(ids[1:], dtype=np.int32)
        lse, top_ids, top_lps = top_logprobs(logits, n_top)
        chosen, ranks = token_logprobs(logits, lse, targets)
        out = [None]
        for j in range(len(targets)):
            out.append(TokenLogprobs(token_id=int(targets[j]), logprob=float(chosen[j]), rank=int(ranks[j]),
                                     top_token_ids=tuple(top_ids[j].tolist()),
                                     top_logprobs=tuple(top_lps[j].tolist())))
        return out

    # -- misc --------------------------------------------------------------------------------------
    def _log_timings(self, requests, t0: float) -> None:
        """verbose=True: one generate call's timings, as llama.cpp prints its own (stderr)."""
        n_prompt = sum(len(r.prompt_ids) for r in requests)
        n_gen = sum(len(r.generator.generated) for r in requests if r.generator is not None)
        firsts = [r.t_first for r in requests if r.t_first is not None]
        t_first = min(firsts) if firsts else time.perf_counter()
        t_end = time.perf_counter()
        prompt_s, gen_s = t_first - t0, t_end - t_first
        _log(f"prompt eval: {n_prompt} tokens in {prompt_s * 1e3:.1f} ms "
             f"({n_prompt / max(prompt_s, 1e-9):.1f} tok/s, to the first token)")
        _log(f"eval:        {n_gen} tokens in {gen_s * 1e3:.1f} ms ({n_gen / max(gen_s, 1e-9):.1f} tok/s, "
             f"{len(requests)} sequence(s))")
        _log(f"total:       {(t_end - t0) * 1e3:.1f} ms")

    def set_threads(self, n_threads: int) -> None:
        """Compute threads for the next forward passes (above the cores: clamped, with one warning)."""
        self.check_open()
        _check_positive_int("n_threads", n_threads)
        self.backend.set_threads(n_threads)

    def close(self) -> None:
        """End every waiting and running request (each gets LLMClosedError), then release the
        model's memory. Idempotent; any later call on this LLM raises LLMClosedError."""
        if self._closed:
            return
        self.scheduler.begin_close()      # a running loop thread lets go of the lock now
        with self.scheduler.lock:
            self._closed = True
            self.scheduler.close()
            self.backend.close()

    def check_open(self) -> None:
        """LLMClosedError if this LLM was closed (every public call starts with this check)."""
        if self._closed:
            raise LLMClosedError(f"this LLM ({self.path}) is closed")

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.path!r}, n_ctx={self.n_ctx}, backend={type(self.backend).__name__})"


DEFAULT_N_CTX = 2048


OPENMP_SPIN_COUNT = "30000"    # libgomp's default: 300,000


def _limit_openmp_spin() -> None:
    """Load libgomp (Numba's OpenMP threading layer) with GOMP_SPINCOUNT=30000 unless the user set
    it or it is loaded already; the variable is taken out of the environment again, so child
    processes (and a llama.cpp peer in a benchmark) keep libgomp's default.

    After each parallel region libgomp's workers spin before they sleep, by default 300,000 times
    (several ms here), taking the CPUs from OpenBLAS's threads: MiniLM's embedding (OpenBLAS GEMMs
    between Numba passes) ran 971 ms per 32 x 128 tokens with the default against 805 with 30,000
    (2 cores, Zen 3, 2026-12-06), while SmolLM2's decode, whose parallel regions follow each other
    within microseconds, ran 5.9-7.1 ms per token with either value, the machine's noise (10,000
    slowed it to 6.9)."""
    if "GOMP_SPINCOUNT" in os.environ or _gomp_loaded():
        return
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    try:
        ctypes.CDLL(ctypes.util.find_library("gomp") or "libgomp.so.1")   # reads its environment now
    except OSError:
        pass                                  # no system libgomp: Numba brings its own, or none
    finally:
        del os.environ["GOMP_SPINCOUNT"]


def _gomp_loaded() -> bool:
    """Whether the shared libgomp (libgomp.so.*, the one Numba's OpenMP layer links) is mapped
    into this process already (Linux; False elsewhere). Copies bundled under other names, such
    as torch's libgomp-<hash>.so, do not count: they are separate runtimes."""
    try:
        with open("/proc/self/maps") as maps:
            return any("/libgomp.so" in line for line in maps)
    except OSError:
        return False


def _in_own_thread(fn):
    """fn() run in a short-lived thread of its own: its result, or its exception raised here.

    The load runs compiled parallel code (the weights' NaN/inf scan, the warmup token). Under
    Numba's OpenMP threading layer, a thread that has run parallel code keeps a team of worker
    threads until it exits, and as soon as more such workers exist than CPUs, libgomp cuts their
    spin-waiting to almost nothing, so every parallel region then waits on a futex. A team left on
    the thread that loads (usually the main thread) would do that to a scheduler loop thread's
    forwards (the server, AsyncLLM): SmolLM2 decode on 2 cores took 12.2 ms per token there
    instead of 7.0 (2026-12-06). Loaded here, the load's team ends with this thread, and the
    thread that runs the forwards (the caller's own, or the loop) holds the only team."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:        # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="lmengine-load", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)                  # a short timeout keeps the wait interruptible (Ctrl-C)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _log(message: str) -> None:
    print(f"lmengine: {message}", file=sys.stderr, flush=True)


def _context_size(n_ctx: int | None, n_ctx_train: int, allow_long_context: bool, path) -> int:
    """n_ctx for a transformer trained on n_ctx_train positions: None -> min(2048, n_ctx_train);
    beyond n_ctx_train only with allow_long_context (positions it never saw: the answers degrade)."""
    if n_ctx is None:
        return min(DEFAULT_N_CTX, n_ctx_train)
    if n_ctx > n_ctx_train and not allow_long_context:
        raise ContextLengthError(
            f"n_ctx={n_ctx} is beyond the training context of {path} ({n_ctx_train} positions, "
            f"its context_length): pass allow_long_context=True to use it anyway, or a smaller n_ctx")
    return n_ctx


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
