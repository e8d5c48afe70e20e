"""Peer engines measured on the same GGUF and prompt as ours, one function per engine. Each runs
in its own worker process (worker.py) and returns `measure.time_engine`'s figures.

Peers (each measured when its package imports; install them yourself):
    llama_cpp          pip install llama-cpp-python      (builds llama.cpp: several minutes)
    onnxruntime_genai  pip install onnxruntime-genai     (runs our own ONNX int4 export)
    ctranslate2        pip install ctranslate2 torch transformers
                       (int8; the GGUF is loaded by transformers, saved as an HF checkpoint and
                       converted by ct2's converter once, into --ct2-dir or ~/.cache/lmengine/ct2)
    transformers       pip install torch transformers    (loads the GGUF, de-quantized to fp32)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from .measure import prompt_ids, time_engine


def peer_prompt(model, prompt_tokens):
    """(GGUF path, prompt ids) for a peer engine that loads the same file."""
    from lmengine.converters.gguf_file import GGUFFile

    from lmengine.models.registry import resolve_model
    from lmengine.tokenizer import Tokenizer
    path = resolve_model(model)
    return path, prompt_ids(Tokenizer.from_gguf(GGUFFile(path)), prompt_tokens)


def worker_llama_cpp(model, threads, prompt_tokens, gen_tokens, repeats, t_process_start):
    from llama_cpp import Llama
    path, ids = peer_prompt(model, prompt_tokens)
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=prompt_tokens, verbose=False)
    load_s = time.perf_counter() - t0

    def prefill():
        llm.reset()
        llm.eval(ids)

    def decode_step(state):
        llm.eval([llm.sample(temp=0.0)])

    return dict(time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start),
                load_s=load_s)


def worker_transformers(model, threads, prompt_tokens, gen_tokens, repeats, t_process_start):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    path, ids = peer_prompt(model, prompt_tokens)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()

    def prefill():
        out = hf(torch.tensor([ids]), use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values

    def decode_step(state):
        token, past = state
        out = hf(token, past_key_values=past, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.past_key_values

    with torch.no_grad():
        return time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)


def worker_onnxruntime_genai(onnx_dir, threads, prompt_tokens, gen_tokens, repeats, t_process_start):
    import numpy as np
    import onnxruntime_genai as og

    from lmengine.tokenizer import Tokenizer
    ids = prompt_ids(Tokenizer.from_pretrained_dir(onnx_dir), prompt_tokens)
    config = og.Config(onnx_dir)
    config.clear_providers()
    model = og.Model(config)

    def prefill():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + gen_tokens + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        return gen

    def decode_step(gen):
        gen.generate_next_token()
        return gen

    return time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)

def ct2_model_dir(model, ct2_dir=None):
    """A CTranslate2 int8 conversion of the GGUF model (made once: transformers loads the GGUF
    de-quantized, it is saved as an HF checkpoint, ct2's converter quantizes it to int8)."""
    import ctranslate2

    from lmengine.models.registry import resolve_model
    path = resolve_model(model)
    out = ct2_dir or os.path.join(os.path.expanduser("~"), ".cache", "lmengine", "ct2",
                                  os.path.splitext(os.path.basename(path))[0] + "-int8")
    if os.path.exists(os.path.join(out, "model.bin")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[bench] converting {path} for CTranslate2 into {out} (once)...", file=sys.stderr, flush=True)
    folder, name = os.path.dirname(path), os.path.basename(path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):    # transformers will not save a "gguf-quantized" model
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with tempfile.TemporaryDirectory() as hf_dir:
        plain.save_pretrained(hf_dir)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(hf_dir)
        ctranslate2.converters.TransformersConverter(hf_dir).convert(out, quantization="int8", force=True)
    return out


def ct2_generator(model, threads, ct2_dir):
    import ctranslate2
    return ctranslate2.Generator(ct2_model_dir(model, ct2_dir), device="cpu", compute_type="int8",
                                 intra_threads=threads, inter_threads=1)


def ct2_tokens(model, ids_list):
    """CTranslate2 takes token strings: our ids through the GGUF vocabulary."""
    from lmengine.converters.gguf_file import GGUFFile

    from lmengine.models.registry import resolve_model
    vocab = GGUFFile(resolve_model(model)).metadata["tokenizer.ggml.tokens"]
    return [[vocab[i] for i in ids] for ids in ids_list]


def worker_ctranslate2(model, threads, prompt_tokens, gen_tokens, repeats, t_process_start, ct2_dir=None):
    generator = ct2_generator(model, threads, ct2_dir)
    _, ids = peer_prompt(model, prompt_tokens)
    tokens = ct2_tokens(model, [ids])[0]

    def prefill():   # the prompt and the first greedy token
        steps = generator.generate_tokens(tokens, max_length=gen_tokens + 2, min_length=gen_tokens + 2,
                                          sampling_topk=1)
        next(steps)
        return steps

    def decode_step(steps):
        next(steps)
        return steps

    return time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)
