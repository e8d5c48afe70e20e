"""LSTM decode throughput: our Numba backend against PyTorch's own nn.LSTM stepping on the same
weights, in the same process, for several batch sizes.

Both sides do the same work per step: embed one token per sequence, advance every LSTM layer one
step, compute the output layer's logits, and feed back their argmax. PyTorch runs under
inference_mode with the same thread count. Each side is measured in its own subprocess (see
`_measure_in_subprocess`). Run it with `lmengine bench --lstm` or directly:

    python -m lmengine.bench.lstm [model.gguf] [--threads N] [--batch 1 64]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

DEFAULT_SHAPE = {"vocab": 96, "emb_dim": 64, "hidden_sizes": (128,)}   # the char model


def random_lstm_gguf(path, vocab=96, emb_dim=64, hidden_sizes=(128,), out_type="F32", seed=0) -> str:
    """Write a random LSTM LM (char vocabulary) to `path`: the benchmark's default model."""
    from lmengine.converters.lstm_gguf import LSTMLayerWeights, LSTMWeights, Vocabulary, write_lstm_gguf
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(0.0, 0.2, shape).astype(np.float32)   # noqa: E731
    layers, n_in = [], emb_dim
    for h in hidden_sizes:
        layers.append(LSTMLayerWeights(w_ih=normal(4 * h, n_in), w_hh=normal(4 * h, h), bias=normal(4 * h)))
        n_in = h
    weights = LSTMWeights(embedding=normal(vocab, emb_dim), layers=layers, output_weight=normal(vocab, n_in),
                          output_bias=normal(vocab), output_activation="softmax", source="keras")
    tokens = [chr(0x21 + i) if i < 94 else chr(0x4E00 + i) for i in range(vocab)]
    write_lstm_gguf(path, weights, Vocabulary(kind="char", tokens=tokens), out_type, name="bench-lstm", progress=None)
    return os.fspath(path)


def _rate(step, min_seconds: float, min_steps: int) -> float:
    """Steps per second of `step()` over at least min_seconds and min_steps."""
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_steps and elapsed >= min_seconds:
            return n / elapsed


def measure(side: str, gguf_path, batch: int, n_threads: int, min_seconds: float, min_steps: int,
            warmup_steps: int) -> dict:
    """Decode tok/s of one side ("lmengine" or "torch") in this process, and its first-step logits.
    Start: token i % vocab for sequence i; then each step feeds back the argmax."""
    import torch

    torch.set_num_threads(n_threads)
    if side == "lmengine":
        from lmengine.backends.lstm_backend import LSTMBackend
        backend = LSTMBackend(gguf_path, n_ctx=1 << 30, n_slots=batch, n_threads=n_threads)
        slots = np.arange(batch, dtype=np.int64)
        first = backend.forward_batch(slots, slots % backend.vocab_size, np.zeros(batch, dtype=np.int64))
        state = {"tok": first.argmax(-1)}

        def step():
            logits = backend.forward_batch(slots, state["tok"], backend.lengths[slots])
            state["tok"] = logits.argmax(-1)
    elif side == "torch":
        from lmengine.converters.torch_lstm import torch_lstm_from_gguf
        embedding, layers, head = torch_lstm_from_gguf(gguf_path)
        hc = [(torch.zeros(1, batch, l.hidden_size), torch.zeros(1, batch, l.hidden_size)) for l in layers]
        state = {"tok": torch.arange(batch) % head.out_features, "hc": hc}

        @torch.inference_mode()
        def step():
            x = embedding(state["tok"])[:, None, :]                               # [b, 1, E]
            for k, lstm in enumerate(layers):
                x, state["hc"][k] = lstm(x, state["hc"][k])
            logits = head(x[:, 0])                                                # [b, V]
            state["tok"] = logits.argmax(-1)
            return logits

        first = step().numpy()
    else:
        raise ValueError(f"side must be 'lmengine' or 'torch', got {side!r}")
    for _ in range(warmup_steps):
        step()
    return {"tok_s": _rate(step, min_seconds, min_steps) * batch, "first_logits": np.asarray(first).tolist()}


def _measure_in_subprocess(side, gguf_path, batch, n_threads, min_seconds, min_steps, warmup_steps) -> dict:
    """`measure` in a fresh Python: Numba's and PyTorch's OpenMP thread pools (two different
    libgomp copies) slow each other down badly when they share a process, so each side runs alone."""
    import json
    import subprocess
    cmd = [sys.executable, "-m", "lmengine.bench.lstm", "--worker", side, os.fspath(gguf_path), "--batch", str(batch),
           "--threads", str(n_threads), "--seconds", str(min_seconds), "--min-steps", str(min_steps),
           "--warmup", str(warmup_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"LSTM benchmark worker ({side}, batch {batch}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_lstm_decode(gguf_path=None, batch_sizes=(1, 64), n_threads: int | None = None,
                      min_seconds: float = 1.0, min_steps: int = 50, warmup_steps: int = 10) -> dict:
    """Decode tokens/s (sequences x steps / s) of our backend and of torch nn.LSTM stepping on the
    same weights, each measured in its own subprocess, one after the other.

    gguf_path: an `lstm` GGUF; None builds a random one of DEFAULT_SHAPE. Returns
    {"model": {...}, "threads": n, "results": [{"batch", "ours_tok_s", "torch_tok_s", "speedup",
    "max_abs_diff"}, ...]}; max_abs_diff compares the two sides' first-step logits.
    """
    import numba
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.config import LSTMConfig

    n_threads = int(n_threads or numba.config.NUMBA_NUM_THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        described = "random " + str(DEFAULT_SHAPE) if gguf_path is None else os.fspath(gguf_path)
        if gguf_path is None:
            gguf_path = random_lstm_gguf(os.path.join(tmp, "bench_lstm.gguf"), DEFAULT_SHAPE["vocab"],
                                         DEFAULT_SHAPE["emb_dim"], DEFAULT_SHAPE["hidden_sizes"])
        cfg = LSTMConfig.from_gguf(GGUFFile(gguf_path))
        results = []
        for b in batch_sizes:
            args = (gguf_path, b, n_threads, min_seconds, min_steps, warmup_steps)
            ours = _measure_in_subprocess("lmengine", *args)
            theirs = _measure_in_subprocess("torch", *args)
            diff = np.abs(np.asarray(ours["first_logits"]) - np.asarray(theirs["first_logits"])).max()
            results.append({"batch": b, "ours_tok_s": ours["tok_s"], "torch_tok_s": theirs["tok_s"],
                            "speedup": ours["tok_s"] / theirs["tok_s"], "max_abs_diff": float(diff)})
    model = {"vocab": cfg.vocab_size, "emb_dim": cfg.emb_dim, "hidden_sizes": list(cfg.hidden_sizes),
             "weights": ",".join(sorted(cfg.tensor_types)), "path": described}
    return {"model": model, "threads": n_threads, "results": results}


def format_results(report: dict) -> str:
    lines = [f"LSTM decode, {report['model']}, {report['threads']} thread(s)",
             f"{'batch':>6} {'lmengine tok/s':>15} {'torch tok/s':>12} {'speedup':>8} {'max|diff|':>10}"]
    for r in report["results"]:
        lines.append(f"{r['batch']:>6} {r['ours_tok_s']:>15.0f} {r['torch_tok_s']:>12.0f} {r['speedup']:>7.2f}x "
                     f"{r['max_abs_diff']:>10.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="an lstm GGUF (default: a random char model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=1.0, help="minimum measuring time per point")
    p.add_argument("--min-steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--worker", choices=["lmengine", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.model, args.batch[0], args.threads, args.seconds, args.min_steps,
                                 args.warmup)))
        return 0
    print(format_results(bench_lstm_decode(args.model, args.batch, args.threads, args.seconds, args.min_steps,
                                           args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
