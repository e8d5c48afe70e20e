"""The benchmark's worker process: `python -m lmengine.bench.worker NAME JSON_KWARGS` runs one
measurement in a fresh interpreter (so that peak RSS and start times are the process's own) and
prints one line, `BENCH_RESULT {json}`. `run_worker` starts one and reads that line back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import batch, peers
from .measure import decode_weight_bytes, prompt_ids, time_engine


def worker_lmengine(model, backend, threads, prompt_tokens, gen_tokens, repeats, t_process_start,
                    activations="mixed", kv_cache_dtype="auto"):
    import numpy as np

    from lmengine.llm import LLM
    from lmengine.params import SamplingParams
    llm = LLM(model, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads, backend=backend, max_batch_size=1,
              activations=activations, kv_cache_dtype=kv_cache_dtype)
    ids = prompt_ids(llm.tokenizer, prompt_tokens)
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

    result = time_engine(prefill, decode_step, prompt_tokens, gen_tokens, repeats, t_process_start)
    # end-to-end through the public API (sampler, detokenizer, scheduler)
    t0 = time.perf_counter()
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True))
    result.update(generate_tok_s=len(out.token_ids) / (time.perf_counter() - t0),
                  start_to_first_token_s=start_to_first_token, load_s=llm.load_seconds)
    if llm.gguf is not None:
        result["weight_bytes"] = decode_weight_bytes(llm.gguf)
        result["weight_gb_s"] = result["weight_bytes"] * result["decode_tok_s"] / 1e9
    return result


def worker_bandwidth(n_bytes, threads):
    from .bandwidth import memory_read_gb_s
    return {"read_gb_s": memory_read_gb_s(int(n_bytes), int(threads))}


WORKERS = {"lmengine": worker_lmengine, "llama_cpp": peers.worker_llama_cpp,
           "transformers": peers.worker_transformers, "onnxruntime_genai": peers.worker_onnxruntime_genai,
           "ctranslate2": peers.worker_ctranslate2, "batch": batch.worker_batch,
           "transformers_batch": batch.worker_transformers_batch,
           "ctranslate2_batch": batch.worker_ctranslate2_batch, "bandwidth": worker_bandwidth}
NO_START_TIME = ("batch", "transformers_batch", "ctranslate2_batch", "bandwidth")   # workers without t_process_start


def run_worker(name: str, kwargs: dict, env: dict | None = None, timeout: int = 1800,
               progress=None, every: float = 10.0) -> dict:
    """Run worker `name` in a fresh process; its result dict, or {"error": [last stderr line]}.
    While it runs, progress(elapsed_seconds) is called every `every` seconds."""
    env = dict(os.environ if env is None else env)
    env["LMENGINE_BENCH_T0"] = repr(time.time())
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lmengine.bench.worker", name, json.dumps(kwargs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=every)   # a retry after a timeout loses no output
            break
        except subprocess.TimeoutExpired:
            elapsed = time.perf_counter() - t0
            if elapsed > timeout:
                proc.kill()
                proc.communicate()
                return {"error": [f"worker {name} timed out after {timeout} s"]}
            if progress is not None:
                progress(elapsed)
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return {"error": (stderr or stdout).strip().splitlines()[-1:] or ["worker failed"]}


def main(argv) -> None:
    t_process_start = float(os.environ.get("LMENGINE_BENCH_T0", time.time()))
    name, kwargs = argv[0], json.loads(argv[1])
    if name not in NO_START_TIME:
        kwargs["t_process_start"] = t_process_start
    print("BENCH_RESULT " + json.dumps(WORKERS[name](**kwargs)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
