"""Batched decode: aggregate tok/s of B sequences decoding together (one forward per step for all
of them), ours against CTranslate2's `generate_batch` and transformers' batched `generate`, on the
same prompts."""
from __future__ import annotations

import os
import time

from .measure import peak_rss_mb, spread
from .peers import ct2_generator, ct2_tokens

BATCH_PROMPT = "Story {i}: once upon a time in a land far away,"


def worker_batch(model, threads, batch_sizes, gen_tokens, backend="numba", activations="mixed", repeats=1,
                 kv_cache_dtype="auto"):
    """Aggregate decode tok/s of B concurrent sequences (one forward per step for all); the
    median of `repeats` runs per B."""
    import numpy as np

    from lmengine.llm import LLM
    llm = LLM(model, n_ctx=64 + gen_tokens, n_threads=threads, backend=backend, max_batch_size=max(batch_sizes),
              activations=activations, kv_cache_dtype=kv_cache_dtype)
    results = {}
    prompts = [llm.tokenizer.encode(BATCH_PROMPT.format(i=i)) for i in range(max(batch_sizes))]
    def run(b):
        tokens = []
        for s in range(b):
            logits = llm.backend.forward(s, np.asarray(prompts[s], dtype=np.int64), 0)
            tokens.append(int(np.argmax(logits[-1])))
        positions = np.array([len(p) for p in prompts[:b]], dtype=np.int64)
        slots = np.arange(b, dtype=np.int64)
        toks = np.array(tokens, dtype=np.int64)
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = llm.backend.forward_batch(slots, toks, positions)
            toks = logits.argmax(axis=1).astype(np.int64)
            positions = positions + 1
        return b * gen_tokens / (time.perf_counter() - t0)

    spreads = {}
    for b in batch_sizes:
        spreads[str(b)] = spread(run(b) for _ in range(repeats))
        results[str(b)] = spreads[str(b)][1]
    return {"batch_decode_tok_s": results, "batch_decode_tok_s_spread": spreads, "peak_rss_mb": peak_rss_mb()}


def worker_ctranslate2_batch(model, threads, batch_sizes, gen_tokens, ct2_dir=None, repeats=1):
    """CTranslate2's generate_batch on the same prompts as `worker_batch`: aggregate decode tok/s
    (time for gen_tokens + 1 tokens minus the time for 1, i.e. without the prompts)."""
    from lmengine.converters.gguf_file import GGUFFile

    from lmengine.models.registry import resolve_model
    from lmengine.tokenizer import Tokenizer
    generator = ct2_generator(model, threads, ct2_dir)
    tok = Tokenizer.from_gguf(GGUFFile(resolve_model(model)))
    prompts = ct2_tokens(model, [tok.encode(BATCH_PROMPT.format(i=i))
                                  for i in range(max(batch_sizes))])
    results, spreads = {}, {}
    for b in batch_sizes:
        def run(n_new):
            t0 = time.perf_counter()
            generator.generate_batch(prompts[:b], max_length=n_new, min_length=n_new, sampling_topk=1,
                                     include_prompt_in_result=False, max_batch_size=b)
            return time.perf_counter() - t0
        run(2)  # warm-up
        spreads[str(b)] = spread(b * gen_tokens / max(run(gen_tokens + 1) - run(1), 1e-9) for _ in range(repeats))
        results[str(b)] = spreads[str(b)][1]
    return {"batch_decode_tok_s": results, "batch_decode_tok_s_spread": spreads, "peak_rss_mb": peak_rss_mb()}


def worker_transformers_batch(model, threads, batch_sizes, gen_tokens):
    """HF transformers' batched greedy generate on the same prompts: aggregate decode tok/s."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmengine.converters.gguf_file import GGUFFile

    from lmengine.models.registry import resolve_model
    from lmengine.tokenizer import Tokenizer
    torch.set_num_threads(threads)
    path = resolve_model(model)
    tok = Tokenizer.from_gguf(GGUFFile(path))
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    prompts = [tok.encode(BATCH_PROMPT.format(i=i)) for i in range(max(batch_sizes))]
    results = {}
    with torch.no_grad():
        for b in batch_sizes:
            width = max(len(p) for p in prompts[:b])
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts[:b]])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts[:b]])
            hf.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=gen_tokens + 1, min_new_tokens=gen_tokens + 1,
                        do_sample=False, pad_token_id=0)
            results[str(b)] = b * gen_tokens / max(time.perf_counter() - t0 - t_prefill, 1e-9)
    return {"batch_decode_tok_s": results, "peak_rss_mb": peak_rss_mb()}
