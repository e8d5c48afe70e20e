"""`lmengine bench`: prefill and decode tok/s, time to first token, cold/warm start, peak RSS,
for 1 and N threads, and the same measurements for peer engines that are installed (peers.py), in
the same run, so that the ratios mean something on a noisy shared machine. Every measurement runs
in a fresh worker process (worker.py). `run_bench(args)` takes the parsed `lmengine bench` options.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

from .worker import run_worker

PEER_MODULES = {"llama_cpp": "llama_cpp", "onnxruntime_genai": "onnxruntime_genai",
                "ctranslate2": "ctranslate2", "transformers": "transformers"}


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run_bench(args) -> dict:
    """Every measurement of `lmengine bench` for each model of args.model (a list; None or empty:
    the bundled model), printed as a table (one row per file, engine and thread count) and
    written to args.json."""
    n_cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, n_cores})
    models = list(args.model or [None])
    base = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats}
    results = {"machine": {"cpus": n_cores, "platform": platform.platform(), "python": platform.python_version()},
               "settings": {**base, "threads": threads, "models": [m or "smollm2" for m in models],
                            "backend": args.backend, "activations": args.activations,
                            "kv_cache_dtype": args.kv_cache_dtype}, "files": {}}
    ours = {"activations": args.activations, "kv_cache_dtype": args.kv_cache_dtype} if args.backend == "numba" else {}
    first = args.onnx_dir if args.backend == "onnxruntime" else models[0]

    # cold start: an empty Numba cache, so the first run compiles everything
    if args.backend == "numba" and not args.no_cold:
        with tempfile.TemporaryDirectory() as cache_dir:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
            cold = _run("cold start (empty Numba cache: compiles every kernel, about a minute)", "lmengine",
                        {"model": first, "backend": args.backend, "threads": threads[-1],
                         **ours, **dict(base, repeats=1, gen_tokens=4)}, env=env)
        results["cold_start_to_first_token_s"] = cold.get("start_to_first_token_s")

    peers = args.peers if args.peers is not None else list(PEER_MODULES)
    for model in models:
        label = model or "smollm2"
        ours_model = args.onnx_dir if args.backend == "onnxruntime" else model
        engines = results["files"].setdefault(label, {})
        for t in threads:
            engines.setdefault(f"lmengine-{args.backend}", {})[str(t)] = _run(
                f"{label}: lmengine ({args.backend}), {t} thread(s)", "lmengine",
                {"model": ours_model, "backend": args.backend, "threads": t, **ours, **base})
            for peer in peers:
                if not _have(PEER_MODULES.get(peer, peer)):
                    engines.setdefault(peer, {})["skipped"] = f"{peer} is not installed"
                    continue
                if peer == "onnxruntime_genai" and not args.onnx_dir:
                    engines.setdefault(peer, {})["skipped"] = \
                        "needs --onnx-dir (lmengine convert smollm2 DIR --to onnx --weights int4)"
                    continue
                kwargs = {"threads": t, **base}
                if peer == "onnxruntime_genai":
                    kwargs["onnx_dir"] = args.onnx_dir
                else:
                    kwargs["model"] = label
                if peer == "ctranslate2":
                    kwargs["ct2_dir"] = args.ct2_dir
                engines.setdefault(peer, {})[str(t)] = _run(f"{label}: {peer}, {t} thread(s)", peer, kwargs)

    # the ceiling decode is held against: a plain read loop over as many bytes as the largest model
    ours_name = f"lmengine-{args.backend}"
    sizes = [r["weight_bytes"] for engines in results["files"].values()
             for r in engines.get(ours_name, {}).values() if isinstance(r, dict) and r.get("weight_bytes")]
    if sizes:
        results["bandwidth"] = _run(f"memory read loop over {max(sizes) / 1e9:.2f} GB, {threads[-1]} thread(s)",
                                    "bandwidth", {"n_bytes": max(sizes), "threads": threads[-1]})
        results["bandwidth"]["threads"] = threads[-1]

    if args.batch:
        batch_args = {"threads": threads[-1], "batch_sizes": args.batch, "gen_tokens": min(args.gen_tokens, 32)}
        repeat = {"repeats": args.repeats}
        results["batch"] = _run(f"batched decode, {threads[-1]} thread(s), batch sizes {args.batch}", "batch",
                                {"model": first, "backend": args.backend, **ours, **batch_args, **repeat})
        for peer, extra in (("transformers", {}), ("ctranslate2", {"ct2_dir": args.ct2_dir, **repeat})):
            if peer in peers and _have(peer):
                results[f"batch_{peer}"] = _run(f"{peer} batched generate, batch sizes {args.batch}",
                                                f"{peer}_batch", {"model": models[0] or "smollm2", **batch_args,
                                                                  **extra})
    if args.lstm:
        results["lstm"] = _run_lstm_bench(threads[-1])

    _print_table(results, threads)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    _say(f"wrote {args.json}")
    return results


def _run_lstm_bench(threads):
    from .lstm import bench_lstm_decode
    _say("LSTM decode vs torch nn.LSTM...")
    try:
        return bench_lstm_decode(n_threads=threads)
    except ImportError as e:
        return {"error": f"LSTM benchmark unavailable: {e}"}


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _run(label: str, name: str, kwargs: dict, env: dict | None = None) -> dict:
    """run_worker, saying what runs and for how long: the elapsed seconds while it runs (one line
    redrawn every second on a terminal, a line every 30 s otherwise), then the total."""
    tty = sys.stderr.isatty()
    if tty:
        print(f"[bench] {label}...", end="", file=sys.stderr, flush=True)
    else:
        _say(f"{label}...")

    def tick(elapsed: float) -> None:
        if tty:
            print(f"\r[bench] {label}... {elapsed:.0f} s", end="", file=sys.stderr, flush=True)
        else:
            _say(f"{label}: {elapsed:.0f} s so far")

    t0 = time.perf_counter()
    result = run_worker(name, kwargs, env=env, progress=tick, every=1.0 if tty else 30.0)
    outcome = f"error: {result['error']}" if "error" in result else "done"
    print(("\r" if tty else "") + f"[bench] {label}: {outcome} in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    return result


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def _with_spread(r: dict, key: str, digits: int = 1) -> str:
    """'median (min-max)' of a figure measured over the repeats; the median alone without them."""
    low_mid_high = r.get("spread", {}).get(key)
    if not low_mid_high or low_mid_high[0] == low_mid_high[2]:
        return _fmt(r.get(key), digits)
    low, _, high = low_mid_high
    return f"{_fmt(r.get(key), digits)} ({low:.{digits}f}-{high:.{digits}f})"


def _print_table(results, threads) -> None:
    print()
    print(f"tok/s and TTFT: median (min-max) of {results['settings']['repeats']} run(s)")
    print(f"{'file':28s} {'engine':20s} {'thr':>3s} {'prefill tok/s':>22s} {'decode tok/s':>20s} "
          f"{'TTFT s':>19s} {'start->1st s':>12s} {'load s':>6s} {'RSS MB':>7s}  ratios (ours / peer)")
    for label, engines in results["files"].items():
        name_col = os.path.basename(label)[:28]
        ours_name = next(k for k in engines if k.startswith("lmengine"))
        ours = engines[ours_name]
        for name, per_thread in engines.items():
            if "skipped" in per_thread:
                print(f"{name_col:28s} {name:20s}   - {per_thread['skipped']}")
                continue
            for t in threads:
                r = per_thread.get(str(t), {})
                if "error" in r:
                    print(f"{name_col:28s} {name:20s} {t:>3d} error: {r['error']}")
                    continue
                ratio = ""
                o = ours.get(str(t), {})
                if name != ours_name and o.get("prefill_tok_s") and r.get("prefill_tok_s"):
                    ratio = (f"prefill x{o['prefill_tok_s'] / r['prefill_tok_s']:.2f}, "
                             f"decode x{o['decode_tok_s'] / r['decode_tok_s']:.2f}")
                print(f"{name_col:28s} {name:20s} {t:>3d} {_with_spread(r, 'prefill_tok_s'):>22s} "
                      f"{_with_spread(r, 'decode_tok_s'):>20s} {_with_spread(r, 'ttft_s', 3):>19s} "
                      f"{_fmt(r.get('start_to_first_token_s'), 2):>12s} {_fmt(r.get('load_s'), 2):>6s} "
                      f"{_fmt(r.get('peak_rss_mb'), 0):>7s}  {ratio}")
    bandwidth = results.get("bandwidth", {}).get("read_gb_s")
    if bandwidth:
        t = results["bandwidth"]["threads"]
        print(f"memory read loop, {t} thread(s): {bandwidth:.1f} GB/s; decode at {t} thread(s) reads weights at:")
        for label, engines in results["files"].items():
            r = next((e.get(str(t), {}) for n, e in engines.items() if n.startswith("lmengine")), {})
            if r.get("weight_gb_s"):
                print(f"  {os.path.basename(label)}: {r['weight_gb_s']:.1f} GB/s ({r['weight_gb_s'] / bandwidth:.0%}), "
                      f"{r['weight_bytes'] / 1e6:.0f} MB per token")
    if results.get("cold_start_to_first_token_s") is not None:
        print(f"cold start to first token (empty Numba cache, compiles everything): "
              f"{results['cold_start_to_first_token_s']:.1f} s")
    if "batch" in results:
        b = results["batch"].get("batch_decode_tok_s", {})
        spreads = results["batch"].get("batch_decode_tok_s_spread", {})
        if b:
            single = b.get("1")
            cells = ", ".join(f"{k}: {v:.1f}" + (" [{:.1f}-{:.1f}]".format(spreads[k][0], spreads[k][2])
                                                  if k in spreads else "")
                              + (f" (x{v / single:.1f})" if single else "") for k, v in b.items())
            print(f"batched decode, aggregate tok/s by concurrent sequences, median [min-max]: {cells}")
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
