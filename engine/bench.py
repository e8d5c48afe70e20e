"""`lmengine bench`: prefill and decode tok/s, time to first token, cold/warm start, peak RSS,
for 1 and N threads, and the same measurements for peer engines that are installed, in the
same run, so that the ratios mean something on a noisy shared machine.

Every measurement runs in a fresh subprocess (`python -m engine.bench worker ...`) so that peak
RSS and start times are the process's own. A worker prints one JSON line.

Peers (each measured when its package imports; install them yourself):
    llama_cpp          pip install llama-cpp-python      (builds llama.cpp: several minutes)
    onnxruntime_genai  pip install onnxruntime-genai     (runs our own ONNX int4 export)
    ctranslate2        pip install ctranslate2 torch transformers
                       (int8; the GGUF is loaded by transformers, saved as an HF checkpoint and
                       converted by ct2's converter once, into --ct2-dir or ~/.cache/lmengine/ct2)
    transformers       pip install torch transformers    (loads the GGUF, de-quantized to fp32)
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_TEXT = ("The history of computing is a story of people, machines and ideas. From the abacus "
               "to the analytical engine, from vacuum tubes to transistors, each step made "
               "calculation faster and cheaper. ")


def _prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(PROMPT_TEXT))
    return ids[:n_tokens]


# ------------------------------------------------------------------------------------------
# workers (run in a subprocess; print one JSON line)
# ------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start):
    """Median prefill and decode tok/s over `repeats` runs of one engine.

    prefill(): runs the prompt as a fresh sequence and returns the decoding state;
    decode_step(state): generates one greedy token and returns the next state. The first
    prefill's end also stamps the process's start-to-first-token time."""
    prefill_rates, decode_rates, start_to_first_token = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = prefill()
        prefill_rates.append(prompt_tokens / (time.perf_counter() - t0))
        if start_to_first_token is None:
            start_to_first_token = time.time() - t_process_start
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            state = decode_step(state)
        decode_rates.append(gen_tokens / (time.perf_counter() - t0))
    prefill_tok_s = statistics.median(prefill_rates)
    return {"prefill_tok_s": prefill_tok_s, "decode_tok_s": statistics.median(decode_rates),
            "ttft_s": prompt_tokens / prefill_tok_s, "start_to_first_token_s": start_to_first_token,
            "peak_rss_mb": _peak_rss_mb()}


def worker_lmengine(model, backend, threads, prompt_tokens, gen_tokens, repeats, t_process_start,
                    activations="mixed", kv_cache_dtype="auto"):
    import numpy as np

    from .llm import LLM
    from .params import SamplingParams
    llm = LLM(model, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads, backend=backend, max_batch_size=1,
              activations=activations, kv_cache_dtype=kv_cache_dtype)
    ids = _prompt_ids(llm.tokenizer, prompt_tokens)
    # time to first token of a fresh process (load + compile or cache load + prefill + sample)
    assert llm.generate(ids, SamplingParams(temperature=0, max_tokens=1)).token_ids
    start_to_first_token = time.time() - t_process_start
    engine = llm.backend
    slot = np.zeros(1, dtype=np.int64)

    def prefill():
        logits = engine.forward(0, np.asarray(ids, dtype=np.int64), 0)
        return int(np.argmax(logits[-1])), prompt_tokens        # (next token, its position)

    def decode_step(state):
        token, position = state
        logits = engine.forward_batch(slot, np.array([token], dtype=np.int64), np.array([position], dtype=np.int64))
        return int(np.argmax(logits[0])), position + 1

    result = _time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)
    # end-to-end through the public API (sampler, detokenizer, scheduler)
    t0 = time.perf_counter()
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True))
    result.update(generate_tok_s=len(out.token_ids) / (time.perf_counter() - t0),
                  start_to_first_token_s=start_to_first_token, load_s=llm.load_seconds)
    return result


def worker_batch(model, threads, batch_sizes, gen_tokens, backend="numba", activations="mixed", repeats=1,
                 kv_cache_dtype="auto"):
    """Aggregate decode tok/s of B concurrent sequences (one forward per step for all); the
    median of `repeats` runs per B."""
    import numpy as np

    from .llm import LLM
    llm = LLM(model, n_ctx=64 + gen_tokens, n_threads=threads, backend=backend, max_batch_size=max(batch_sizes),
              activations=activations, kv_cache_dtype=kv_cache_dtype)
    results = {}
    prompts = [llm.tokenizer.encode(f"Story {i}: once upon a time in a land far away,") for i in range(max(batch_sizes))]
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

    for b in batch_sizes:
        results[str(b)] = statistics.median(run(b) for _ in range(repeats))
    return {"batch_decode_tok_s": results, "peak_rss_mb": _peak_rss_mb()}


def _peer_prompt(model, prompt_tokens):
    """(GGUF path, prompt ids) for a peer engine that loads the same file."""
    from converters.gguf_file import GGUFFile

    from .models.registry import resolve_model
    from .tokenizer import Tokenizer
    path = resolve_model(model)
    return path, _prompt_ids(Tokenizer.from_gguf(GGUFFile(path)), prompt_tokens)


def worker_llama_cpp(model, threads, prompt_tokens, gen_tokens, repeats, t_process_start):
    from llama_cpp import Llama
    path, ids = _peer_prompt(model, prompt_tokens)
    llm = Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=prompt_tokens, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(ids)

    def decode_step(state):
        llm.eval([llm.sample(temp=0.0)])

    return _time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)


def worker_transformers(model, threads, prompt_tokens, gen_tokens, repeats, t_process_start):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    path, ids = _peer_prompt(model, prompt_tokens)
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
        return _time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)


def worker_onnxruntime_genai(onnx_dir, threads, prompt_tokens, gen_tokens, repeats, t_process_start):
    import numpy as np
    import onnxruntime_genai as og

    from .tokenizer import Tokenizer
    ids = _prompt_ids(Tokenizer.from_pretrained_dir(onnx_dir), prompt_tokens)
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

    return _time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)

def _ct2_model_dir(model, ct2_dir=None):
    """A CTranslate2 int8 conversion of the GGUF model (made once: transformers loads the GGUF
    de-quantized, it is saved as an HF checkpoint, ct2's converter quantizes it to int8)."""
    import ctranslate2

    from .models.registry import resolve_model
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


def _ct2_generator(model, threads, ct2_dir):
    import ctranslate2
    return ctranslate2.Generator(_ct2_model_dir(model, ct2_dir), device="cpu", compute_type="int8",
                                 intra_threads=threads, inter_threads=1)


def _ct2_tokens(model, ids_list):
    """CTranslate2 takes token strings: our ids through the GGUF vocabulary."""
    from converters.gguf_file import GGUFFile

    from .models.registry import resolve_model
    vocab = GGUFFile(resolve_model(model)).metadata["tokenizer.ggml.tokens"]
    return [[vocab[i] for i in ids] for ids in ids_list]


def worker_ctranslate2(model, threads, prompt_tokens, gen_tokens, repeats, t_process_start, ct2_dir=None):
    generator = _ct2_generator(model, threads, ct2_dir)
    _, ids = _peer_prompt(model, prompt_tokens)
    tokens = _ct2_tokens(model, [ids])[0]

    def prefill():   # the prompt and the first greedy token
        steps = generator.generate_tokens(tokens, max_length=gen_tokens + 2, min_length=gen_tokens + 2,
                                          sampling_topk=1)
        next(steps)
        return steps

    def decode_step(steps):
        next(steps)
        return steps

    return _time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)


def worker_ctranslate2_batch(model, threads, batch_sizes, gen_tokens, ct2_dir=None, repeats=1):
    """CTranslate2's generate_batch on the same prompts as `worker_batch`: aggregate decode tok/s
    (time for gen_tokens + 1 tokens minus the time for 1, i.e. without the prompts)."""
    from converters.gguf_file import GGUFFile

    from .models.registry import resolve_model
    from .tokenizer import Tokenizer
    generator = _ct2_generator(model, threads, ct2_dir)
    tok = Tokenizer.from_gguf(GGUFFile(resolve_model(model)))
    prompts = _ct2_tokens(model, [tok.encode(f"Story {i}: once upon a time in a land far away,")
                                  for i in range(max(batch_sizes))])
    results = {}
    for b in batch_sizes:
        def run(n_new):
            t0 = time.perf_counter()
            generator.generate_batch(prompts[:b], max_length=n_new, min_length=n_new, sampling_topk=1,
                                     include_prompt_in_result=False, max_batch_size=b)
            return time.perf_counter() - t0
        run(2)  # warm-up
        results[str(b)] = statistics.median(b * gen_tokens / max(run(gen_tokens + 1) - run(1), 1e-9)
                                            for _ in range(repeats))
    return {"batch_decode_tok_s": results, "peak_rss_mb": _peak_rss_mb()}


def worker_transformers_batch(model, threads, batch_sizes, gen_tokens):
    """HF transformers' batched greedy generate on the same prompts: aggregate decode tok/s."""
    import torch
    from transformers import AutoModelForCausalLM

    from converters.gguf_file import GGUFFile

    from .models.registry import resolve_model
    from .tokenizer import Tokenizer
    torch.set_num_threads(threads)
    path = resolve_model(model)
    tok = Tokenizer.from_gguf(GGUFFile(path))
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    prompts = [tok.encode(f"Story {i}: once upon a time in a land far away,") for i in range(max(batch_sizes))]
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
    return {"batch_decode_tok_s": results, "peak_rss_mb": _peak_rss_mb()}


WORKERS = {"lmengine": worker_lmengine, "llama_cpp": worker_llama_cpp, "transformers": worker_transformers,
           "onnxruntime_genai": worker_onnxruntime_genai, "ctranslate2": worker_ctranslate2,
           "batch": worker_batch, "transformers_batch": worker_transformers_batch,
           "ctranslate2_batch": worker_ctranslate2_batch}
BATCH_WORKERS = ("batch", "transformers_batch", "ctranslate2_batch")
PEER_MODULES = {"llama_cpp": "llama_cpp", "onnxruntime_genai": "onnxruntime_genai",
                "ctranslate2": "ctranslate2", "transformers": "transformers"}


def _worker_main(argv) -> None:
    t_process_start = float(os.environ.get("LMENGINE_BENCH_T0", time.time()))
    name, kwargs = argv[0], json.loads(argv[1])
    if name not in BATCH_WORKERS:
        kwargs["t_process_start"] = t_process_start
    print("BENCH_RESULT " + json.dumps(WORKERS[name](**kwargs)), flush=True)


# ------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------

def _run_worker(name: str, kwargs: dict, env: dict | None = None, timeout: int = 1800) -> dict:
    env = dict(os.environ if env is None else env)
    env["LMENGINE_BENCH_T0"] = repr(time.time())
    proc = subprocess.run([sys.executable, "-m", "engine.bench", "worker", name, json.dumps(kwargs)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["worker failed"]}


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run_bench(args) -> dict:
    n_cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, n_cores})
    base = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats}
    results = {"machine": {"cpus": n_cores, "platform": platform.platform(), "python": platform.python_version()},
               "settings": {**base, "threads": threads, "model": args.model or "smollm2",
                            "backend": args.backend, "activations": args.activations,
                            "kv_cache_dtype": args.kv_cache_dtype}, "engines": {}}
    ours = {"activations": args.activations, "kv_cache_dtype": args.kv_cache_dtype} if args.backend == "numba" else {}
    model = args.onnx_dir if args.backend == "onnxruntime" else args.model

    # cold start: an empty Numba cache, so the first run compiles everything
    if args.backend == "numba":
        _say("cold start (empty Numba cache: compiles every kernel)...")
        with tempfile.TemporaryDirectory() as cache_dir:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
            cold = _run_worker("lmengine", {"model": model, "backend": args.backend, "threads": threads[-1],
                                            **ours, **dict(base, repeats=1, gen_tokens=4)}, env=env)
        results["cold_start_to_first_token_s"] = cold.get("start_to_first_token_s")

    peers = args.peers if args.peers is not None else list(PEER_MODULES)
    for t in threads:
        _say(f"lmengine ({args.backend}), {t} thread(s)...")
        results["engines"].setdefault(f"lmengine-{args.backend}", {})[str(t)] = _run_worker(
            "lmengine", {"model": model, "backend": args.backend, "threads": t, **ours, **base})
        for peer in peers:
            if not _have(PEER_MODULES.get(peer, peer)):
                results["engines"].setdefault(peer, {})["skipped"] = f"{peer} is not installed"
                continue
            if peer == "onnxruntime_genai" and not args.onnx_dir:
                results["engines"].setdefault(peer, {})["skipped"] = "needs --onnx-dir (lmengine convert smollm2 DIR --to onnx --weights int4)"
                continue
            _say(f"{peer}, {t} thread(s)...")
            kwargs = {"threads": t, **base}
            kwargs["onnx_dir" if peer == "onnxruntime_genai" else "model"] = args.onnx_dir if peer == "onnxruntime_genai" else (args.model or "smollm2")
            if peer == "ctranslate2":
                kwargs["ct2_dir"] = args.ct2_dir
            results["engines"].setdefault(peer, {})[str(t)] = _run_worker(peer, kwargs)

    if args.batch:
        _say(f"batched decode, {threads[-1]} thread(s), batch sizes {args.batch}...")
        batch_args = {"threads": threads[-1], "batch_sizes": args.batch, "gen_tokens": min(args.gen_tokens, 32)}
        repeat = {"repeats": args.repeats}
        results["batch"] = _run_worker("batch", {"model": model, "backend": args.backend, **ours, **batch_args,
                                                 **repeat})
        for peer, extra in (("transformers", {}), ("ctranslate2", {"ct2_dir": args.ct2_dir, **repeat})):
            if peer in peers and _have(peer):
                _say(f"{peer} batched generate, batch sizes {args.batch}...")
                results[f"batch_{peer}"] = _run_worker(f"{peer}_batch", {
                    "model": args.model or "smollm2", **batch_args, **extra})
    if args.lstm:
        results["lstm"] = _run_lstm_bench(threads[-1])

    _print_table(results, threads)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    _say(f"wrote {args.json}")
    return results


def _run_lstm_bench(threads):
    try:
        from .models.lstm import benchmark_lstm
    except ImportError as e:
        return {"error": f"LSTM benchmark unavailable: {e}"}
    _say("LSTM decode vs torch nn.LSTM...")
    return benchmark_lstm(threads=threads)


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def _print_table(results, threads) -> None:
    engines = results["engines"]
    ours_name = next(k for k in engines if k.startswith("lmengine"))
    ours = engines[ours_name]
    print()
    print(f"{'engine':26s} {'thr':>3s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'TTFT s':>7s} "
          f"{'start->1st s':>12s} {'RSS MB':>7s}  ratios (ours / peer)")
    for name, per_thread in engines.items():
        if "skipped" in per_thread:
            print(f"{name:26s}   - {per_thread['skipped']}")
            continue
        for t in threads:
            r = per_thread.get(str(t), {})
            if "error" in r:
                print(f"{name:26s} {t:>3d} error: {r['error']}")
                continue
            ratio = ""
            if name != ours_name and str(t) in ours and "prefill_tok_s" in ours[str(t)] and r.get("prefill_tok_s"):
                o = ours[str(t)]
                ratio = (f"prefill x{o['prefill_tok_s'] / r['prefill_tok_s']:.2f}, "
                         f"decode x{o['decode_tok_s'] / r['decode_tok_s']:.2f}")
            print(f"{name:26s} {t:>3d} {_fmt(r.get('prefill_tok_s')):>14s} {_fmt(r.get('decode_tok_s')):>13s} "
                  f"{_fmt(r.get('ttft_s'), 3):>7s} {_fmt(r.get('start_to_first_token_s'), 2):>12s} "
                  f"{_fmt(r.get('peak_rss_mb'), 0):>7s}  {ratio}")
    if results.get("cold_start_to_first_token_s") is not None:
        print(f"cold start to first token (empty Numba cache, compiles everything): "
              f"{results['cold_start_to_first_token_s']:.1f} s")
    if "batch" in results:
        b = results["batch"].get("batch_decode_tok_s", {})
        if b:
            single = b.get("1")
            cells = ", ".join(f"{k}: {v:.1f}" + (f" (x{v / single:.1f})" if single else "") for k, v in b.items())
            print(f"batched decode, aggregate tok/s by concurrent sequences: {cells}")
        else:
            print(f"batched decode: {results['batch']}")
    for peer in ("transformers", "ctranslate2"):
        if f"batch_{peer}" in results:
            b = results[f"batch_{peer}"].get("batch_decode_tok_s", {})
            ours = results.get("batch", {}).get("batch_decode_tok_s", {})
            cells = ", ".join(f"{k}: {v:.1f}" + (f" (ours x{ours[k] / v:.2f})" if k in ours else "") for k, v in b.items())
            print(f"{peer} batched generate, aggregate tok/s: {cells or results[f'batch_{peer}']}")
    if "lstm" in results:
        print(f"LSTM: {json.dumps(results['lstm'])}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "worker":
        _worker_main(sys.argv[2:])
    else:
        from .cli import main
        sys.exit(main(["bench", *sys.argv[1:]]))
