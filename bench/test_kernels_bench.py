"""Throughput of the matmul kernels (pytest-benchmark).

    pytest bench/test_kernels_bench.py                 # everything (a few minutes on 2 cores)
    pytest bench/test_kernels_bench.py -k "gemv"       # decode-shaped products only

Each case is one weight matrix times n_tok activation rows: GEMV (n_tok=1, decode) and GEMM
(n_tok=128, prefill), for the paths
    c_packed  C int8 kernel on the 16-row packed layout (AVX2, AVX-512 VNNI; what models use there)
    c_q8      C int8 kernels on ggml's row-major blocks (activations quantized beforehand, as a
              model does once per layer)
    numba_q8  Numba int8 kernels (the fallback without the extension)
    c_f32     C float-activation kernels (the exact path)
    numba_f32 Numba float-activation kernels
on 1 and 2 threads (numba.set_num_threads). `extra_info` holds the weight bytes streamed per
second (GB/s, best round) and, for GEMM, multiply-adds per second. Matrices:
    small    576 x 1536 Q4_1 (an FFN matrix of SmolLM2-135M; fits in L2/L3)
    vocab    49152 x 576 Q8_0 (SmolLM2's embedding / output matrix, 30 MB)
    big      110592 x 1536 Q4_1 (106 MB, larger than the L3: memory bandwidth bound)
Numba paths skip GEMM on the two large matrices (seconds to tens of seconds per round).

`test_attention_throughput`: one decode step's attention (SmolLM2's 9 query / 3 kv heads of 64)
for 1 and 16 sequences at positions 128 and 1024.
"""
import time

import numba
import numpy as np
import pytest

from lmengine.kernels import matmul as mm
from lmengine.kernels import native
from lmengine.kernels.quant import Q4_1, Q8_0, quantize

MATRICES = {"small": (Q4_1, 576, 1536), "vocab": (Q8_0, 49152, 576), "big": (Q4_1, 110592, 1536)}
PATHS = ("c_packed", "c_q8", "numba_q8", "c_f32", "numba_f32")
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


@pytest.fixture(scope="module")
def packed(weights):
    """name -> the packed form of weights[name] (made on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            w_type, n_rows, n_cols = MATRICES[name]
            cache[name] = native.pack_q8(weights[name], w_type, n_rows, n_cols)
        return cache[name]
    return get


def _kernel(path):
    if path.startswith("c_") and not native.HAVE_NATIVE:
        pytest.skip(f"C extension: {native.LOAD_ERROR}")
    if path == "c_packed" and not native.packs_well():
        pytest.skip("the packed layout is used where its product has a SIMD kernel (AVX2, AVX-512 VNNI)")
    return {"c_packed": mm.matmul_packed_q8, "c_q8": mm.matmul_q8_native, "numba_q8": mm.matmul_q8_numba,
            "c_f32": mm.matmul_f32_native, "numba_f32": mm.matmul_f32_numba}[path]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("n_tok", [1, 128], ids=["gemv", "gemm"])
def test_matmul_throughput(benchmark, weights, packed, matrix, path, n_threads, n_tok):
    w_type, n_rows, n_cols = MATRICES[matrix]
    if n_tok > 1 and matrix != "small" and path.startswith("numba"):
        pytest.skip("Numba GEMM on the large matrices takes seconds to tens of seconds per round")
    kernel = _kernel(path)
    raw = weights[matrix]
    x = np.random.default_rng(1).standard_normal((n_tok, n_cols)).astype(np.float32)
    out = np.empty((n_tok, n_rows), dtype=np.float32)
    if path == "c_packed":
        xq, xd, xs = mm.quantize_activations(x)
        args = (packed(matrix), w_type, n_rows, n_cols, xq, xd, xs, 1, out)
    elif path.endswith("q8"):
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


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("position", [128, 1024])
@pytest.mark.parametrize("n_seqs", [1, 16])
def test_attention_throughput(benchmark, n_seqs, position, n_threads):
    from lmengine.kernels.attention import attention, cache_shapes
    n_heads, n_kv_heads, head_dim = 9, 3, 64
    rng = np.random.default_rng(2)
    k_shape, v_shape = cache_shapes(1, n_seqs, n_kv_heads, position + 1, head_dim)
    k_cache = rng.standard_normal(k_shape[1:]).astype(np.float32)
    v_cache = rng.standard_normal(v_shape[1:]).astype(np.float32)
    q = rng.standard_normal((n_seqs, n_heads * head_dim)).astype(np.float32)
    out = np.empty_like(q)
    args = (q, k_cache, v_cache, np.arange(n_seqs), np.full(n_seqs, position), n_heads, n_kv_heads, head_dim, out)
    numba.set_num_threads(n_threads)
    try:
        attention(*args)
        benchmark.pedantic(attention, args=args, rounds=50, warmup_rounds=2)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    best = benchmark.stats.stats.min
    kv_bytes = 2 * n_seqs * n_kv_heads * (position + 1) * head_dim * 4
    benchmark.extra_info["kv_GB_per_s"] = round(kv_bytes / best / 1e9, 2)
