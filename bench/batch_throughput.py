"""Aggregate throughput of batch jobs: N prompts of 64 tokens, 64 generated each (greedy, EOS ignored).

    N=2000 T=2 python -m lmengine.bench.batch_throughput lmengine llama_cpp ray

lmengine: lmengine.batch.run_batch (one LLM, T threads, batch B=16); llama_cpp: a Python loop of
llama_cpp.Llama calls (T threads); ray: lmengine.ray.batch_infer with 2 actors x 1 thread on a
local Ray (end to end, model loads included). Prints one JSON line. See docs/SCALE_OUT.md."""
import json
import os
import sys
import tempfile
import time


def main(which) -> dict:
    """Run the engines named in `which`; N, T, B from the environment."""
    N = int(os.environ.get("N", "48")); T = int(os.environ.get("T", "2"))
    from lmengine import LLM
    from lmengine.models.registry import resolve_model
    path = resolve_model("smollm2")
    tok = LLM(path, n_ctx=256, n_threads=1, warmup=False).tokenizer
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    prompts = []
    for i in range(N):
        ids = tok.encode(f"Story {i}: " + " ".join(words[(i + j) % len(words)] for j in range(80)))[:64]
        prompts.append(ids)
    d = tempfile.mkdtemp()
    inp = os.path.join(d, "in.jsonl")
    with open(inp, "w") as f:
        for i, p in enumerate(prompts):
            row = {"custom_id": f"p{i}", "prompt": p, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps(row) + "\n")
    res = {}
    if "lmengine" in which:
        from lmengine.batch import run_batch
        llm = LLM(path, n_ctx=256, n_threads=T, max_batch_size=int(os.environ.get("B", "16")))
        s = run_batch(llm, inp, os.path.join(d, "out.jsonl"), progress=False)
        res["lmengine_batch"] = dict(rows=s.completed_rows, tokens=s.generated_tokens, s=round(s.seconds, 2),
                                     tok_s=round(s.tokens_per_second, 1))
        llm.close()
    if "llama_cpp" in which:
        import llama_cpp
        L = llama_cpp.Llama(path, n_ctx=256, n_threads=T, n_batch=64, verbose=False)
        eos = L.token_eos()
        t = time.perf_counter(); n = 0
        for p in prompts:
            out = L.create_completion(p, max_tokens=64, temperature=0, logit_bias={eos: -1e9})
            n += out["usage"]["completion_tokens"]
        dt = time.perf_counter() - t
        res["llama_cpp_loop"] = dict(tokens=n, s=round(dt, 2), tok_s=round(n / dt, 1))
    if "ray" in which:
        import ray
        from lmengine.ray import batch_infer
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_items([json.loads(l) for l in open(inp)])
        t = time.perf_counter()
        rows = batch_infer(ds, path, None, concurrency=2, threads_per_actor=1, batch_size=N // 2,
                           llm_kwargs={"n_ctx": 256, "max_batch_size": int(os.environ.get("B", "16"))}).take_all()
        dt = time.perf_counter() - t
        n = sum(r["usage"]["completion_tokens"] for r in rows)
        res["ray_2x1"] = dict(rows=len(rows), tokens=n, s_end_to_end=round(dt, 2), tok_s_end_to_end=round(n / dt, 1))
        ray.shutdown()
    return res



if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
