"""LSTM decode throughput: our Numba backend against PyTorch's own nn.LSTM stepping on the same
weights, in the same process, for several batch sizes.

Both sides do the same work per step: embed one token per sequence, advance every LSTM layer one
step, compute the output layer's logits, and feed back their argmax. PyTorch runs under
inference_mode with the same thread count. Run it with `lmengine bench --lstm` or directly:

    python bench/lstm_bench.py [model.gguf] [--threads N] [--batch 1 64]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):                     # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SHAPE = {"vocab": 96, "emb_dim": 64, "hidden_sizes": (128,)}   # the char model


def random_lstm_gguf(path, vocab=96, emb_dim=64, hidden_sizes=(128,), out_type="F32", seed=0) -> str:
    """Write a random LSTM LM (char vocabulary) to `path`: the benchmark's default model."""
    from converters.lstm_gguf import LSTMLayerWeights, LSTMWeights, Vocabulary, write_lstm_gguf
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


def bench_lstm_decode(gguf_path=None, batch_sizes=(1, 64), n_threads: int | None = None,
                      min_seconds: float = 1.0, min_steps: int = 50, warmup_steps: int = 10) -> dict:
    """Decode tokens/s (sequences x steps / s) of our backend and of torch nn.LSTM stepping.

    gguf_path: an `lstm` GGUF; None builds a random one of DEFAULT_SHAPE. Returns
    {"model": {...}, "threads": n, "results": [{"batch", "ours_tok_s", "torch_tok_s", "speedup",
    "max_abs_diff"}, ...]} where max_abs_diff compares the first step's logits of the two.
    """
    import numba
    import torch

    from converters.torch_lstm import torch_lstm_from_gguf
    from engine.backends.lstm_backend import LSTMBackend

    tmp = None
    if gguf_path is None:
        tmp = tempfile.TemporaryDirectory()
        gguf_path = random_lstm_gguf(os.path.join(tmp.name, "bench_lstm.gguf"), DEFAULT_SHAPE["vocab"],
                                     DEFAULT_SHAPE["emb_dim"], DEFAULT_SHAPE["hidden_sizes"])
    n_threads = n_threads or numba.config.NUMBA_NUM_THREADS
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    embedding, layers, head = torch_lstm_from_gguf(gguf_path)
    steps_cap = 1_000_000
    results = []
    try:
        for b in batch_sizes:
            backend = LSTMBackend(gguf_path, n_ctx=steps_cap, n_slots=b, n_threads=n_threads)
            slots = np.arange(b, dtype=np.int64)
            first = np.arange(b, dtype=np.int64) % backend.vocab_size
            ours_first = backend.forward_batch(slots, first, np.zeros(b, dtype=np.int64))
            state = {"tok": ours_first.argmax(-1)}

            def ours_step():
                logits = backend.forward_batch(slots, state["tok"], backend.lengths[slots])
                state["tok"] = logits.argmax(-1)

            with torch.inference_mode():
                hc = [(torch.zeros(1, b, l.hidden_size), torch.zeros(1, b, l.hidden_size)) for l in layers]
                tstate = {"tok": torch.from_numpy(first), "hc": hc}

                def torch_step():
                    x = embedding(tstate["tok"])[:, None, :]                       # [b, 1, E]
                    for k, lstm in enumerate(layers):
                        x, tstate["hc"][k] = lstm(x, tstate["hc"][k])
                    logits = head(x[:, 0])                                        # [b, V]
                    tstate["tok"] = logits.argmax(-1)
                    return logits

                torch_first = torch_step().numpy()
                for _ in range(warmup_steps):
                    ours_step()
                    torch_step()
                ours = _rate(ours_step, min_seconds, min_steps) * b
                theirs = _rate(torch_step, min_seconds, min_steps) * b
            results.append({"batch": b, "ours_tok_s": ours, "torch_tok_s": theirs, "speedup": ours / theirs,
                            "max_abs_diff": float(np.abs(ours_first - torch_first).max())})
            backend.close()
    finally:
        torch.set_num_threads(torch_threads)
        if tmp is not None:
            tmp.cleanup()
    model = {"vocab": int(head.out_features), "emb_dim": int(embedding.embedding_dim),
             "hidden_sizes": [int(l.hidden_size) for l in layers],
             "path": "random " + str(DEFAULT_SHAPE) if tmp is not None else os.fspath(gguf_path)}
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="an lstm GGUF (default: a random char model)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=1.0, help="minimum measuring time per point")
    args = p.parse_args(argv)
    print(format_results(bench_lstm_decode(args.model, args.batch, args.threads, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
