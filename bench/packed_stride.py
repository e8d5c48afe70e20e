"""The packed kernel with unpadded and padded activation rows, in the same minute.

    python -m lmengine.bench.packed_stride [--threads 1] [--types Q4_K Q6_K Q4_0] [--model F.gguf]

Unpadded int8 activation rows of a 4096- or 8192-column matrix are a multiple of 4 KB apart, so
the 8 tokens the AVX2 kernel reads together share L1 sets (kernels/matmul.py, X_ROW_PAD). Part 1
times `matmul_packed_q8` on random 2048-row matrices of several widths at 1 / 8 / 16 tokens, both
ways, and checks that both give the same bits. Part 2 (--model) times the 16 ffn_down products of
a loaded GGUF both ways at 8 / 16 / 128 tokens. Needs the C extension.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

N_ROWS = 2048
WIDTHS = (2048, 4096, 7936, 8192)


def best_seconds(fn, repeats: int = 5, calls: int = 3) -> float:
    """The fastest of `repeats` timings of `calls` calls of fn, per call (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def synthetic(type_names, progress=print) -> None:
    from lmengine.kernels import matmul as mm
    from lmengine.kernels import native, quant

    rng = np.random.default_rng(0)
    for n_cols in WIDTHS:
        w = rng.standard_normal((N_ROWS, n_cols)).astype(np.float32)
        for name in type_names:
            w_type = getattr(quant, name)
            packed = native.pack_q8(quant.quantize(w_type, w).reshape(-1), w_type, N_ROWS, n_cols)
            rates = {}
            for padded in (False, True):
                row = []
                for n_tok in (1, 8, 16):
                    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
                    acts = mm.padded_activations(x, 1) if padded else mm.quantize_activations(x)
                    out = np.empty((n_tok, N_ROWS), dtype=np.float32)
                    seconds = best_seconds(lambda: mm.matmul_packed_q8(packed, w_type, N_ROWS, n_cols, *acts, 1, out))
                    reference = np.empty_like(out)
                    mm.matmul_packed_q8(packed, w_type, N_ROWS, n_cols, *mm.quantize_activations(x), 1, reference)
                    if not np.array_equal(out, reference):
                        raise AssertionError(f"{name} {n_cols} columns: padded rows changed the result")
                    row.append(N_ROWS * n_cols * n_tok / seconds / 1e9)
                rates[padded] = " / ".join(f"{r:.1f}" for r in row)
            progress(f"{N_ROWS} x {n_cols} {name}: GMAC/s at 1 / 8 / 16 tokens, unpadded {rates[False]}, "
                     f"padded {rates[True]}")


def model_ffn_down(path: str, progress=print) -> None:
    from lmengine.backends.numba_backend import NumbaLlamaBackend
    from lmengine.config import config_from_gguf
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.kernels import matmul as mm

    gguf = GGUFFile(path)
    backend = NumbaLlamaBackend(gguf, config_from_gguf(gguf), n_ctx=256, n_slots=1, pack=True)
    model = backend.weights.model
    down = model.ffn_down
    if (down.packed_at < 0).any():
        progress(f"{path}: ffn_down is not packed on this machine; nothing to compare")
        return
    rng = np.random.default_rng(0)
    for n_tok in (8, 16, 128):
        x = rng.standard_normal((n_tok, down.n_cols)).astype(np.float32)
        out = np.empty((n_tok, down.n_rows), dtype=np.float32)
        seconds = {}
        for name, acts in (("unpadded", mm.quantize_activations(x)), ("padded", mm.padded_activations(x, 1))):
            def every_layer(acts=acts):
                for layer in range(model.n_layers):
                    mm.matmul_packed_q8(model.packed[down.packed_at[layer]:], down.w_type[layer], down.n_rows,
                                        down.n_cols, *acts, 1, out)
            seconds[name] = best_seconds(every_layer, calls=1)
        progress(f"{path}: {model.n_layers} ffn_down products ({down.n_cols} columns), {n_tok} tokens: "
                 f"unpadded {seconds['unpadded'] * 1e3:.1f} ms, padded {seconds['padded'] * 1e3:.1f} ms "
                 f"(x{seconds['unpadded'] / seconds['padded']:.2f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmengine.bench.packed_stride", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="Numba threads (default 1: the kernel alone)")
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q4_0"],
                        help="weight types of the synthetic matrices")
    parser.add_argument("--model", help="also time the ffn_down products of this GGUF (2 threads is typical)")
    args = parser.parse_args(argv)
    import numba

    from lmengine.kernels import native
    if not native.HAVE_NATIVE:
        raise SystemExit("the packed kernel needs the C extension (python kernels/build_native.py)")
    numba.set_num_threads(args.threads)
    synthetic(args.types)
    if args.model:
        model_ffn_down(args.model)


if __name__ == "__main__":
    main()
