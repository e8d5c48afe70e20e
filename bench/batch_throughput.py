"""Aggregate throughput of batch jobs: N prompts of 64 tokens, 64 generated each (greedy, EOS ignored).

    N=2000 T=2 python -m lmengine.bench.batch_throughput lmengine llama_cpp ray

Engines (any of them, in this order, in one process, so the ratios are of one run):

  lmengine   lmengine.batch.run_batch, one LLM with T threads and batch B (default 16), OUTPUT
             written as `lmengine batch` writes it; also "gen16": LLM.generate on a list of 16
             such prompts (the rate the scheduler reaches on this mix, 16 sequences together),
             and 16 others with max_tokens=1 (their prefill alone: `prefill16_s`), which gives
             `decode16_tok_s`, the rate of the decode steps with 16 sequences. Both on prompts
             no cache slot holds (a cached prompt is not computed again).
  llama_cpp  a Python loop of llama_cpp.Llama.create_completion calls (same file, T threads),
             over the first PEER_N rows (default N: a loop has no warm-up to amortize, so its
             rate over 200 rows is its rate over 2,000, at a tenth of the time).
  ray        lmengine.ray.batch_infer, 2 actors x 1 thread on a local Ray (`ray.init(num_cpus=2)`),
             map_batches batches of RB rows (default 16).

Figures per engine: `s` and `tok_s` end to end (for Ray: actor start-up and model loads
included; Ray's own start is not); `first_row_s`, the time to the first finished rows; and
`steady_tok_s`, the rate after them: the tokens of the rows that finished later over the time
after the first ones. That is the throughput of a long job, whose fixed costs (model loads,
the first batch filling up) are spread over many rows. For Ray, `actor_load_s` is each actor's
model load, measured in the actor, `cpu_s` the CPU seconds used during the job by the
actors, the driver and Ray's other processes, `ray_cpu_share` the share of the last two (Ray's
overhead in CPU, which does not depend on what else the machine runs), `actor_ready_s` when it was ready (since the job's start),
and `steady_tok_s` every token over the time after the last actor was ready (a batch comes
back whole, so the rate after the first batch would count the other actor's first batch,
which arrives at about the same moment, as nearly free). Use N a multiple of 2 x RB, so the two
actors get as many batches each. The line ends with the ratios the goals of issue 17 are
about. Prints one JSON line; progress goes to stderr. See docs/SCALE_OUT.md."""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from typing import Iterator

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _say(message: str) -> None:
    print(f"batch_throughput: {message}", file=sys.stderr, flush=True)


def make_prompts(tokenizer, n: int, start: int = 0) -> list[list[int]]:
    """n distinct prompts of 64 token ids each (numbered from `start`)."""
    return [tokenizer.encode(f"Story {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(80)))[:64]
            for i in range(start, start + n)]


def rates(arrivals: list[tuple[float, int]], t0: float) -> dict:
    """End-to-end and steady-state figures from (arrival time, tokens) of each group of rows that
    came back together (a chunk of finished rows, a Ray batch, one llama_cpp call), t0 the start.

    steady_tok_s: tokens of the groups after the first arrival over the time after it (None with
    a single arrival: no steady state to see)."""
    tokens = sum(n for _, n in arrivals)
    end = arrivals[-1][0] if arrivals else t0
    first = arrivals[0][0] if arrivals else t0
    out = dict(tokens=tokens, s=round(end - t0, 2), tok_s=round(tokens / max(end - t0, 1e-9), 1),
               first_row_s=round(first - t0, 2))
    first_tokens = sum(n for t, n in arrivals if t == first)
    out["steady_tok_s"] = round((tokens - first_tokens) / (end - first), 1) if end > first else None
    return out


def _timed(chunks: Iterator[list[dict]], arrivals: list[tuple[float, int]]) -> Iterator[list[dict]]:
    """Pass run_batch's chunks of rows through, noting when each came and its generated tokens."""
    for rows in chunks:
        arrivals.append((time.perf_counter(), sum(r["usage"]["completion_tokens"] for r in rows
                                                  if r["error"] is None)))
        yield rows


def bench_lmengine(path: str, inp: str, out: str, prompts: list[list[int]], threads: int, batch: int) -> dict:
    """run_batch on INPUT (the engine `lmengine batch` runs), then generate() on 16 prompts."""
    from lmengine import LLM, SamplingParams
    from lmengine.batch import complete_requests, run_batch
    llm = LLM(path, n_ctx=256, n_threads=threads, max_batch_size=batch)
    try:
        _say(f"lmengine batch: {len(prompts)} rows, {threads} threads, batch {batch}")
        arrivals: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        # run_rows is run_batch's own default, complete_requests(llm, requests), with arrival times noted
        s = run_batch(llm, inp, out, progress=True, progress_interval=30.0,
                      run_rows=lambda requests: _timed(complete_requests(llm, requests), arrivals))
        res = {"lmengine_batch": dict(rows=s.completed_rows, errors=s.error_rows, **rates(arrivals, t0))}
        _say(f"lmengine batch: {res['lmengine_batch']}")
        # prompts no slot holds yet (a prompt already in a slot would not be computed again)
        fresh = make_prompts(llm.tokenizer, 32, start=len(prompts))
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        t = time.perf_counter()
        done = llm.generate(fresh[:16], params)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        prefill = llm.generate(fresh[16:], params.replace(max_tokens=1))     # 16 other prompts, as long
        t_prefill = time.perf_counter() - t
        n = sum(len(c.token_ids) for c in done)
        decode_rows = n - sum(len(c.token_ids) for c in prefill)   # the tokens after each first one
        res["gen16"] = dict(tokens=n, s=round(dt, 2), tok_s=round(n / dt, 1), prefill16_s=round(t_prefill, 2),
                            decode16_tok_s=round(decode_rows / max(dt - t_prefill, 1e-9), 1))
        _say(f"gen16: {res['gen16']}")
        return res
    finally:
        llm.close()


def bench_llama_cpp(path: str, prompts: list[list[int]], threads: int) -> dict:
    """A Python loop of llama_cpp.Llama calls, one prompt at a time."""
    import llama_cpp
    L = llama_cpp.Llama(path, n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
    eos = L.token_eos()
    _say(f"llama_cpp loop: {len(prompts)} rows, {threads} threads")
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        out = L.create_completion(p, max_tokens=64, temperature=0, logit_bias={eos: -1e9})
        arrivals.append((time.perf_counter(), out["usage"]["completion_tokens"]))
        if i % 50 == 49:
            _say(f"llama_cpp loop: {i + 1}/{len(prompts)} rows, {time.perf_counter() - t0:.0f} s")
    res = dict(rows=len(prompts), **rates(arrivals, t0))
    _say(f"llama_cpp loop: {res}")
    return {"llama_cpp_loop": res}


def timed_llm(log_dir: str, path: str, **kwargs):
    """Actor-side model factory for batch_infer: LLM(path, **kwargs), its load time appended to
    a file in log_dir (the actors and the driver share this machine's file system)."""
    from lmengine import LLM
    t = time.time()
    llm = LLM(path, **kwargs)
    with open(os.path.join(log_dir, f"load-{os.getpid()}-{time.time_ns()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "start": t, "s": time.time() - t, "nice": os.nice(0)}, f)
    return llm


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process ("driver") and its descendants
    (Ray's raylet, GCS and workers when ray.init started a local cluster), by role: "actors"
    (the map_batches workers that run the LLMs) and "ray" (every other process of Ray), read
    from /proc (Linux; {} elsewhere). Processes that ended already are not counted."""
    if not os.path.isdir("/proc/self"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, str]] = {}             # pid -> (ppid, cpu s, command line)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        procs[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    me = os.getpid()
    out = {"driver": procs.get(me, (0, 0.0, ""))[1], "actors": 0.0, "ray": 0.0}
    family = {me}
    for _ in range(8):                                          # descendants, a few levels deep
        family |= {pid for pid, (ppid, _, _) in procs.items() if ppid in family}
    for pid in family - {me}:
        _, cpu, cmd = procs[pid]
        out["actors" if "MapWorker" in cmd else "ray"] += cpu
    return out


def bench_ray(path: str, inp: str, batch: int, ray_batch: int) -> dict:
    """lmengine.ray.batch_infer with 2 actors x 1 thread; output batches timed as they come back."""
    import ray

    from lmengine.ray import batch_infer
    # Ray starts its workers at nice 15 (its worker_niceness), the driver and the other engines
    # run at 0: on a machine shared with other jobs the actors would get a fraction of the CPU
    # the in-process engines get. Same priority for all, for a fair comparison.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        items = [json.loads(line) for line in open(inp)]
        ds = ray.data.from_items(items)
        log_dir = tempfile.mkdtemp()
        factory = functools.partial(timed_llm, log_dir, path, n_ctx=256, n_threads=1, max_batch_size=batch)
        _say(f"ray: {len(items)} rows, 2 actors x 1 thread, map_batches of {ray_batch} rows")
        arrivals: list[tuple[float, int]] = []
        rows = 0
        cpu0 = cpu_seconds()
        t0, w0 = time.perf_counter(), time.time()
        out = batch_infer(ds, factory, None, concurrency=2, threads_per_actor=1, batch_size=ray_batch)
        for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
            got = b.to_pylist()
            rows += len(got)
            arrivals.append((time.perf_counter(), sum(r["usage"]["completion_tokens"] for r in got)))
            _say(f"ray: {rows}/{len(items)} rows, {time.perf_counter() - t0:.0f} s")
        cpu = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu_seconds().items()}   # before the actors end
        loads = [json.load(open(os.path.join(log_dir, f))) for f in sorted(os.listdir(log_dir))]
        ready = [x["start"] + x["s"] - w0 for x in loads]          # since the job's start, per actor
        res = dict(rows=rows, **rates(arrivals, t0), map_batches_rows=ray_batch,
                   actor_load_s=[round(x["s"], 2) for x in loads], actor_ready_s=[round(r, 2) for r in ready])
        # Steady state: every token over the time after the last actor had its model loaded (the
        # rate after the first batch would count the other actor's first batch, which arrives
        # at about the same moment, as nearly free).
        # CPU seconds during the job: the actors' (model loads included) and Ray's own (driver,
        # raylet, GCS, other workers): Ray's overhead is the share of the latter
        res["cpu_s"] = cpu
        if cpu:
            res["ray_cpu_share"] = round((cpu["driver"] + cpu["ray"]) / max(sum(cpu.values()), 1e-9), 3)
        busy = res["s"] - max(ready, default=0.0)
        res["steady_tok_s"] = round(res["tokens"] / busy, 1) if busy > 0 else None
        _say(f"ray: {res}")
        return {"ray_2x1": res}
    finally:
        ray.shutdown()


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def main(which) -> dict:
    """Run the engines named in `which`; N, T, B, RB and PEER_N from the environment."""
    N = int(os.environ.get("N", "48")); T = int(os.environ.get("T", "2"))
    B = int(os.environ.get("B", "16")); RB = int(os.environ.get("RB", "16"))
    from lmengine import LLM
    from lmengine.models.registry import resolve_model
    path = resolve_model("smollm2")
    tok = LLM(path, n_ctx=256, n_threads=1, warmup=False).tokenizer
    prompts = make_prompts(tok, N)
    d = tempfile.mkdtemp()
    inp = os.path.join(d, "in.jsonl")
    with open(inp, "w") as f:
        for i, p in enumerate(prompts):
            row = {"custom_id": f"p{i}", "prompt": p, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps(row) + "\n")
    res: dict = {"N": N, "T": T, "B": B}
    if "lmengine" in which:
        res.update(bench_lmengine(path, inp, os.path.join(d, "out.jsonl"), prompts, T, B))
    if "llama_cpp" in which:
        # PEER_N: the loop over the first PEER_N rows only (default all N). A loop of calls has no
        # batch to fill and nothing to amortize: its rate is the same over any number of rows.
        peer_n = min(N, int(os.environ.get("PEER_N", str(N))))
        res["llama_cpp_rows"] = peer_n
        res.update(bench_llama_cpp(path, prompts[:peer_n], T))
    if "ray" in which:
        res["ray_2x1"] = bench_ray(path, inp, B, RB)["ray_2x1"]
    # the goals of issue 17: batch >= 3x the llama_cpp loop; Ray 2x1 >= 0.85x one LLM x 2 threads
    ours, peer, ray_ = res.get("lmengine_batch", {}), res.get("llama_cpp_loop", {}), res.get("ray_2x1", {})
    res["ratios"] = {
        "batch_vs_llama_cpp": _ratio(ours.get("tok_s"), peer.get("tok_s")),
        "batch_vs_llama_cpp_steady": _ratio(ours.get("steady_tok_s"), peer.get("steady_tok_s")),
        "ray_vs_batch": _ratio(ray_.get("tok_s"), ours.get("tok_s")),
        "ray_vs_batch_steady": _ratio(ray_.get("steady_tok_s"), ours.get("steady_tok_s")),
        "batch_vs_gen16": _ratio(ours.get("steady_tok_s"), res.get("gen16", {}).get("tok_s")),
    }
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
