"""The C kernels (kernels/csrc/qdot.c via kernels.native): every SIMD path this CPU has, forced
one at a time, against the NumPy references of test_matmul and against the Numba kernels; argument
checks of the C functions and their Python wrappers; the Numba fallback in a process without
the extension, running code that was cached with it.

Tolerances are the bounds stated in test_matmul (integer block sums are exact; only the order
of float32 accumulation differs between paths). C against Numba: both are within their bound of
the exact reference, so they differ by at most twice that bound.
"""
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from kernels import matmul as mm
from kernels import native
from kernels.quant import BF16, F16, F32, Q4_0, Q4_1, Q8_0
from test_matmul import (FLOAT_TYPES, Q8_TYPES, float_bound, make_weights, make_x, q8_bound,
                         ref_matmul_q8)

pytestmark = pytest.mark.skipif(not native.HAVE_NATIVE, reason=f"C extension: {native.LOAD_ERROR}")

SIZES = [  # (n_rows, n_cols, n_tok): rows not a multiple of the tile, 1..17 tokens, several chunks
    (1, 32, 1), (17, 64, 2), (45, 576, 5), (33, 1536, 17), (5, 4128, 3)]


@pytest.mark.parametrize("w_type", Q8_TYPES)
@pytest.mark.parametrize("n_rows,n_cols,n_tok", SIZES)
def test_q8_rows_match_numpy_and_numba(isa, w_type, n_rows, n_cols, n_tok):
    raw, _ = make_weights(w_type, n_rows, n_cols, seed=n_cols + w_type)
    x = make_x(n_tok, n_cols, seed=n_rows)
    xq, xd, xs = mm.quantize_activations(x)
    ref, error_scale = ref_matmul_q8(raw, w_type, n_rows, n_cols, xq, xd, xs)
    bound = q8_bound(n_cols, error_scale)

    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    native.matmul_q8_rows(raw, w_type, n_rows, n_cols, 0, n_rows, xq, xd, xs, out)
    assert np.all(np.abs(out - ref) <= bound)

    numba_out = np.empty_like(out)
    mm.matmul_q8_numba(raw, w_type, n_rows, n_cols, xq, xd, xs, numba_out)
    assert np.all(np.abs(out - numba_out) <= 2 * bound)

    threaded = np.full_like(out, np.nan)
    mm.matmul_q8_native(raw, w_type, n_rows, n_cols, xq, xd, xs, threaded)
    np.testing.assert_array_equal(threaded, out)       # tiles do not change a row's arithmetic


@pytest.mark.parametrize("w_type", Q8_TYPES)
@pytest.mark.parametrize("n_cols", (32, 96, 544, 16416))    # 1, 3, 17 and 513 blocks per row
def test_q8_token_result_does_not_depend_on_its_batch(isa, w_type, n_cols):
    """Exact equality, no tolerance: a (row, token) result is the same float whatever n_tok is
    (1..17: every token-group size and tail of each path), wherever the token sits in the batch
    and whatever rows share the call (batched decode must equal one-by-one decode bit for bit)."""
    n_rows, n_all = 19 if n_cols < 16416 else 5, 17
    raw, _ = make_weights(w_type, n_rows, n_cols, seed=n_cols + 7 * w_type)
    xq, xd, xs = mm.quantize_activations(make_x(n_all, n_cols, seed=n_cols))
    batch = np.full((n_all, n_rows), np.nan, dtype=np.float32)
    native.matmul_q8_rows(raw, w_type, n_rows, n_cols, 0, n_rows, xq, xd, xs, batch)
    assert np.all(np.isfinite(batch))

    def run(tokens, row_begin=0, row_end=n_rows):
        out = np.full((len(tokens), n_rows), np.nan, dtype=np.float32)
        native.matmul_q8_rows(raw, w_type, n_rows, n_cols, row_begin, row_end, xq[tokens].copy(),
                              xd[tokens].copy(), xs[tokens].copy(), out)
        return out[:, row_begin:row_end]

    for n_tok in range(1, n_all + 1):                   # contiguous sub-batches at shifting offsets
        start = (5 * n_tok) % (n_all - n_tok + 1)
        tokens = np.arange(start, start + n_tok)
        np.testing.assert_array_equal(run(tokens), batch[tokens])
    shuffled = np.random.default_rng(n_cols).permutation(n_all)      # every token at a new position
    np.testing.assert_array_equal(run(shuffled), batch[shuffled])
    repeated = np.array([3, 3, 0, 3, 16, 3, 3, 3, 3, 1])            # the same token in many slots
    np.testing.assert_array_equal(run(repeated), batch[repeated])
    for row in (0, 1, n_rows - 1):                                  # a row alone, and odd row ranges
        np.testing.assert_array_equal(run(np.arange(n_all), row, row + 1), batch[:, row:row + 1])
        np.testing.assert_array_equal(run(np.arange(n_all), row, n_rows), batch[:, row:])


def test_q8_paths_agree_on_a_large_batch():
    """Every SIMD path against the scalar one on 70 tokens (many full token groups): within the
    q8 bound (only the float accumulation order differs between paths), for each weight type."""
    n_rows, n_cols, n_tok = 23, 1536, 70
    xq, xd, xs = mm.quantize_activations(make_x(n_tok, n_cols, seed=70))
    for w_type in Q8_TYPES:
        raw, _ = make_weights(w_type, n_rows, n_cols, seed=70 + w_type)
        ref, error_scale = ref_matmul_q8(raw, w_type, n_rows, n_cols, xq, xd, xs)
        bound = q8_bound(n_cols, error_scale)
        for isa in native.available_isas():
            native.set_isa(isa)
            out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
            native.matmul_q8_rows(raw, w_type, n_rows, n_cols, 0, n_rows, xq, xd, xs, out)
            assert np.all(np.abs(out - ref) <= bound), native.ISA_NAMES[isa]
        native.set_isa(None)


@pytest.mark.parametrize("w_type", FLOAT_TYPES)
@pytest.mark.parametrize("n_rows,n_cols,n_tok", SIZES)
def test_f32_rows_match_numpy(isa, w_type, n_rows, n_cols, n_tok):
    raw, dense = make_weights(w_type, n_rows, n_cols, seed=n_cols * 3 + w_type)
    x = make_x(n_tok, n_cols, seed=n_rows + 5)
    bound = float_bound(dense, x)
    ref = x.astype(np.float64) @ dense.T
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    native.matmul_f32_rows(raw, w_type, n_rows, n_cols, 0, n_rows, x, out)
    assert np.all(np.abs(out - ref) <= bound)
    threaded = np.full_like(out, np.nan)
    mm.matmul_f32_native(raw, w_type, n_rows, n_cols, x, threaded)
    np.testing.assert_array_equal(threaded, out)


@pytest.mark.parametrize("w_type", (F32, F16, BF16))
@pytest.mark.parametrize("n_cols", (1, 7, 33, 100))
def test_f32_rows_any_width(isa, w_type, n_cols):
    """Float types have 1-value blocks: every width works (SIMD tails)."""
    raw, dense = make_weights(w_type, 9, n_cols, seed=n_cols)
    x = make_x(3, n_cols, seed=n_cols)
    out = np.empty((3, 9), dtype=np.float32)
    native.matmul_f32_rows(raw, w_type, 9, n_cols, 0, 9, x, out)
    assert np.all(np.abs(out - x.astype(np.float64) @ dense.T) <= float_bound(dense, x))


@pytest.mark.parametrize("w_type", FLOAT_TYPES)
def test_f32_decode_is_exact(isa, w_type):
    """With one-hot activations out[t, r] = W[r, t] exactly: the decode equals gguf's
    dequantize bit for bit, including f16 subnormals, -0 and the largest f16 scales."""
    n_rows, n_cols = 8, 64
    raw, dense = make_weights(w_type, n_rows, n_cols, seed=11)
    if w_type == F16:
        special = np.array([2.0 ** -24, -(2.0 ** -20), -0.0, 65504.0, -65504.0, 6.1e-5], dtype=np.float16)
        raw.view(np.float16)[:special.size] = special
        dense[0, :special.size] = special.astype(np.float64)
    x = np.eye(n_cols, dtype=np.float32)
    out = np.empty((n_cols, n_rows), dtype=np.float32)
    native.matmul_f32_rows(raw, w_type, n_rows, n_cols, 0, n_rows, x, out)
    np.testing.assert_array_equal(out, dense.T.astype(np.float32))


def test_row_range_writes_only_its_rows(isa):
    raw, _ = make_weights(Q4_1, 40, 96, seed=3)
    x = make_x(4, 96, seed=3)
    xq, xd, xs = mm.quantize_activations(x)
    full = np.empty((4, 40), dtype=np.float32)
    native.matmul_q8_rows(raw, Q4_1, 40, 96, 0, 40, xq, xd, xs, full)
    part = np.full((4, 40), -7.0, dtype=np.float32)
    native.matmul_q8_rows(raw, Q4_1, 40, 96, 13, 29, xq, xd, xs, part)
    np.testing.assert_array_equal(part[:, 13:29], full[:, 13:29])
    assert np.all(part[:, :13] == -7.0) and np.all(part[:, 29:] == -7.0)


def test_thread_count_does_not_change_results():
    raw, _ = make_weights(Q8_0, 300, 576, seed=8)
    x = make_x(7, 576, seed=8)
    results = []
    for n_threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(n_threads)
        for act_q8 in (False, True):
            out = np.empty((7, 300), dtype=np.float32)
            mm.matmul(raw, Q8_0, 300, 576, x, out, act_q8)
            results.append(out)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_array_equal(results[1], results[3])


def test_public_entry_points_use_the_c_kernels():
    assert mm.use_native()
    raw, _ = make_weights(Q4_1, 20, 64, seed=1)
    x = make_x(2, 64, seed=1)
    xq, xd, xs = mm.quantize_activations(x)
    via_public, via_c = np.empty((2, 20), np.float32), np.empty((2, 20), np.float32)
    mm.matmul_q8(raw, Q4_1, 20, 64, xq, xd, xs, via_public)
    mm.matmul_q8_native(raw, Q4_1, 20, 64, xq, xd, xs, via_c)
    np.testing.assert_array_equal(via_public, via_c)


def test_non_contiguous_arrays_take_the_numba_path():
    raw, dense = make_weights(Q8_0, 12, 64, seed=2)
    x = make_x(3, 128, seed=2)[:, ::2]                     # strided view [3, 64]
    out = np.empty((3, 24), dtype=np.float32)[:, ::2]       # strided output [3, 12]
    mm.matmul(raw, Q8_0, 12, 64, x, out, False)
    assert np.all(np.abs(out - x.astype(np.float64) @ dense.T) <= float_bound(dense, x))
    with pytest.raises(ValueError, match="C-contiguous"):
        mm.matmul_f32_native(raw, Q8_0, 12, 64, np.ascontiguousarray(x), out)


# -- argument checks ----------------------------------------------------------------------------

def _c_args_q8(raw, n_rows, n_cols, xq, xd, xs, out, w_type=Q8_0):
    ffi = native.ffi
    return [w_type, ffi.from_buffer("uint8_t[]", raw), raw.size, n_rows, n_cols, 0, n_rows,
            ffi.from_buffer("int8_t[]", xq), xq.size, ffi.from_buffer("float[]", xd), xd.size,
            ffi.from_buffer("float[]", xs), xs.size, xq.shape[0],
            ffi.from_buffer("float[]", out, require_writable=True), out.size]


def test_c_function_rejects_bad_arguments():
    lib, ffi = native.lib, native.ffi
    raw, _ = make_weights(Q8_0, 4, 64, seed=5)
    xq, xd, xs = mm.quantize_activations(make_x(2, 64, seed=5))
    out = np.full((2, 4), -1.0, dtype=np.float32)
    good = _c_args_q8(raw, 4, 64, xq, xd, xs, out)
    assert lib.lme_matmul_q8(*good) == 0

    def status(**changes):
        names = ["w_type", "w", "w_len", "n_rows", "n_cols", "row_begin", "row_end", "xq", "xq_len",
                 "xd", "xd_len", "xs", "xs_len", "n_tok", "out", "out_len"]
        args = list(good)
        for name, value in changes.items():
            args[names.index(name)] = value
        return lib.lme_matmul_q8(*args)

    assert status(w=ffi.NULL) == -1 and status(xq=ffi.NULL) == -1 and status(out=ffi.NULL) == -1
    assert status(xd=ffi.NULL) == -1 and status(xs=ffi.NULL) == -1
    assert status(w_type=F16) == -2 and status(w_type=99) == -2 and status(w_type=-1) == -2
    assert status(n_cols=48) == -3 and status(n_cols=0) == -3 and status(n_rows=-1) == -3
    assert status(n_tok=-1) == -3 and status(n_rows=2 ** 62) == -3
    assert status(row_begin=-1) == -4 and status(row_end=5) == -4 and status(row_begin=3, row_end=2) == -4
    assert status(w_len=raw.size - 1) == -5 and status(out_len=7) == -5 and status(xq_len=127) == -5
    assert status(xd_len=3) == -5 and status(xs_len=3) == -5
    assert status(n_tok=3) == -5                            # more tokens than xq/out hold
    # nothing to do: an empty row range or no tokens returns 0 without reading anything
    assert status(row_begin=2, row_end=2, w=ffi.NULL) == 0
    assert status(n_tok=0, xq=ffi.NULL) == 0

    x = make_x(2, 64, seed=5)
    f32_good = [Q8_0, ffi.from_buffer("uint8_t[]", raw), raw.size, 4, 64, 0, 4,
                ffi.from_buffer("float[]", x), x.size, 2, ffi.from_buffer("float[]", out, require_writable=True),
                out.size]
    assert lib.lme_matmul_f32(*f32_good) == 0
    assert lib.lme_matmul_f32(*(f32_good[:7] + [ffi.NULL] + f32_good[8:])) == -1
    assert lib.lme_matmul_f32(*(f32_good[:8] + [x.size - 1] + f32_good[9:])) == -5
    assert lib.lme_matmul_f32(*([14] + f32_good[1:])) == -2        # Q6_K: not a C type


def test_python_wrappers_raise_value_error():
    raw, _ = make_weights(Q4_0, 4, 64, seed=6)
    x = make_x(2, 64, seed=6)
    xq, xd, xs = mm.quantize_activations(x)
    out = np.empty((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="w_u8 holds"):
        native.matmul_q8_rows(raw[:-1], Q4_0, 4, 64, 0, 4, xq, xd, xs, out)
    with pytest.raises(ValueError, match="row range"):
        native.matmul_q8_rows(raw, Q4_0, 4, 64, 0, 5, xq, xd, xs, out)
    with pytest.raises(ValueError, match="w_type"):
        native.matmul_q8_rows(raw, F16, 4, 64, 0, 4, xq, xd, xs, out)
    with pytest.raises(ValueError, match="xq"):
        native.matmul_q8_rows(raw, Q4_0, 4, 64, 0, 4, xq[:, :32].copy(), xd, xs, out)
    with pytest.raises(ValueError, match="out has shape"):
        native.matmul_q8_rows(raw, Q4_0, 4, 64, 0, 4, xq, xd, xs, out[:1].copy())
    with pytest.raises(ValueError, match="C-contiguous"):
        native.matmul_f32_rows(raw, Q4_0, 4, 64, 0, 4, np.asfortranarray(x), out)
    with pytest.raises(ValueError, match="float32"):
        native.matmul_f32_rows(raw, Q4_0, 4, 64, 0, 4, x.astype(np.float64), out)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.matmul_f32_rows(raw, Q4_0, 4, 48, 0, 4, x[:, :48].copy(), out)


def test_set_isa_rejects_unknown_paths():
    with pytest.raises(ValueError, match="not supported"):
        native.set_isa(7)
    native.set_isa(None)
    assert native.get_isa() == native.best_isa()


# -- without the extension ------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from kernels import matmul as mm, native
    from kernels.quant import Q4_1, quantize, dequantize
    expect_native = sys.argv[1] == "1"
    assert native.HAVE_NATIVE == expect_native and mm.use_native() == expect_native
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 96)).astype(np.float32)
    raw = quantize(Q4_1, w).reshape(-1)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(Q4_1, raw, (37, 96)).astype(np.float64).T
    for act_q8 in (False, True):
        out = np.empty((3, 37), dtype=np.float32)
        mm.matmul(raw, Q4_1, 37, 96, x, out, act_q8)
        assert np.abs(out - ref).max() < (0.5 if act_q8 else 1e-3), np.abs(out - ref).max()
    # attention and swiglu: the C kernels, or in this process the Numba loops
    from kernels.attention import attention, cache_shapes, write_kv
    from kernels.ops import swiglu
    k_shape, v_shape = cache_shapes(1, 1, 2, 40, 64)
    k_cache, v_cache = np.zeros(k_shape[1:], np.float32), np.zeros(v_shape[1:], np.float32)
    kv = rng.standard_normal((2, 40, 128)).astype(np.float32)
    write_kv(kv[0], kv[1], np.zeros(40, np.int64), np.arange(40), 2, 64, k_cache, v_cache)
    q = rng.standard_normal((1, 4 * 64)).astype(np.float32)
    att = np.empty_like(q)
    attention(q, k_cache, v_cache, np.zeros(1, np.int64), np.array([39]), 4, 2, 64, att)
    for h in range(4):
        keys, values = kv[0][:, (h // 2) * 64:(h // 2 + 1) * 64], kv[1][:, (h // 2) * 64:(h // 2 + 1) * 64]
        s = keys.astype(np.float64) @ q[0, h * 64:(h + 1) * 64] / 8.0
        w = np.exp(s - s.max())
        assert np.abs(att[0, h * 64:(h + 1) * 64] - (w / w.sum()) @ values).max() < 1e-5
    g = rng.standard_normal((2, 50)).astype(np.float32)
    sw = np.empty_like(g)
    swiglu(g, g, sw)
    assert np.abs(sw - g.astype(np.float64) ** 2 / (1 + np.exp(-g.astype(np.float64)))).max() < 1e-5
    print("cache_hits", sum(mm.matmul.stats.cache_hits.values()))
""")


def _run_child(have_native):
    env = dict(os.environ, LMENGINE_NO_NATIVE="0" if have_native else "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _CHILD, "1" if have_native else "0"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_cached_code_runs_with_and_without_the_extension():
    """Code compiled (and cached on disk) in a process with the extension runs correctly from
    that cache in a process without it, and the reverse: the choice is made at run time."""
    _run_child(have_native=True)                     # compiles or loads the cache
    assert _run_child(have_native=False) >= 1        # loads the same cached code, Numba path
    assert _run_child(have_native=True) >= 1
