"""Throughput of the matmul kernels (pytest-benchmark).

    pytest bench/test_kernels_bench.py                 # everything (a few minutes on 2 cores)
    pytest bench/test_kernels_bench.py -k "gemv"       # decode-shaped products only

Each case is one weight matrix times n_tok activation rows: GEMV (n_tok=1, decode) and GEMM
(n_tok=128, prefill), for the paths
    c_q8      C int8 kernels (activations quantized beforehand, as a model does once per layer)
    numba_q8  Numba int8 kernels (the fallback without the extension)
    c_f32     C float-activation kernels (the exact path)
    numba_f32 Numba float-activation kernels
on 1 and 2 threads (numba.set_num_threads). `extra_info` holds the weight bytes streamed per
second (GB/s, best round) and, for GEMM, multiply-adds per second. Matrices:
    small    576 x 1536 Q4_1 (an FFN matrix of SmolLM2-135M; fits in L2/L3)
    vocab    49152 x 576 Q8_0 (SmolLM2's embedding / output matrix, 30 MB)
    big      110592 x 1536 Q4_1 (106 MB, larger than the L3: memory bandwidth bound)
Numba paths skip GEMM on the two large matrices (seconds to tens of seconds per round).
"""
import time

import numba
import numpy as np
import pytest

from kernels import matmul as mm
from kernels import native
from kernels.quant import Q4_1, Q8_0, quantize

MATRICES = {"small": (Q4_1, 576, 1536), "vocab": (Q8_0, 49152, 576), "big": (Q4_1, 110592, 1536)}
PATHS = ("c_q8", "numba_q8", "c_f32", "numba_f32")
THREADS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})


@pytest.fixture(scope="module")
def weights():
    """name -> raw blocks; a 1024-row quantized matrix repeated to the full height (fast to build)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (w_type, n_rows, n_cols) in MATRICES.items():
        seed_rows = min(n_rows, 1024)
        blocks = quantize(w_type, rng.standard_normal((seed_rows, n_cols)).astype(np.float32))
        reps = -(-n_rows // seed_rows)
        out[name] = np.ascontiguousarray(np.tile(blocks, (reps, 1))[:n_rows]).reshape(-1)
    return out


def _kernel(path):
    if path.startswith("c_") and not native.HAVE_NATIVE:
        pytest.skip(f"C extension: {native.LOAD_ERROR}")
    return {"c_q8": mm.matmul_q8_native, "numba_q8": mm.matmul_q8_numba,
            "c_f32": mm.matmul_f32_native, "numba_f32": mm.matmul_f32_numba}[path]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("n_tok", [1, 128], ids=["gemv", "gemm"])
def test_matmul_throughput(benchmark, weights, matrix, path, n_threads, n_tok):
    w_type, n_rows, n_cols = MATRICES[matrix]
    if n_tok > 1 and matrix != "small" and path.startswith("numba"):
        pytest.skip("Numba GEMM on the large matrices takes seconds to tens of seconds per round")
    kernel = _kernel(path)
    raw = weights[matrix]
    x = np.random.default_rng(1).standard_normal((n_tok, n_cols)).astype(np.float32)
    out = np.empty((n_tok, n_rows), dtype=np.float32)
    if path.endswith("q8"):
        xq, xd, xs = mm.quantize_activations(x)
        args = (raw, w_type, n_rows, n_cols, xq, xd, xs, out)
    else:
        args = (raw, w_type, n_rows, n_cols, x, out)

    numba.set_num_threads(n_threads)
    try:
        kernel(*args)                                           # compile / load, warm caches
        one_call = _time_once(kernel, args)
        rounds = int(max(3, min(50, 2.0 / max(one_call, 1e-6))))
        benchmark.pedantic(kernel, args=args, rounds=rounds, warmup_rounds=1)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    best = benchmark.stats.stats.min
    benchmark.extra_info["weights_GB_per_s"] = round(raw.size / best / 1e9, 2)
    benchmark.extra_info["weight_MB"] = round(raw.size / 1e6, 1)
    if n_tok > 1:
        benchmark.extra_info["GMAC_per_s"] = round(n_rows * n_cols * n_tok / best / 1e9, 2)
    if native.HAVE_NATIVE:
        benchmark.extra_info["isa"] = native.ISA_NAMES[native.get_isa()]


def _time_once(kernel, args):
    start = time.perf_counter()
    kernel(*args)
    return time.perf_counter() - start
