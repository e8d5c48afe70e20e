"""The C kernels (kernels/csrc/, API lmengine.h, via lmengine.kernels.native): every entry point on
every SIMD path this CPU has (the `isa` fixture forces each one, the portable C path included),
against independent references (NumPy, float64) and against the Numba kernels they replace;
argument checks of the C functions and their Python wrappers; the Numba fallback in a process
without the extension, running code that was cached with it. (The packed product: test_packed.)

Tolerances:
* matmul: the bounds stated in test_matmul (integer block sums are exact; only the order of
  float32 accumulation differs between paths). C against Numba: both are within their bound of
  the exact reference, so they differ by at most twice that bound.
* quantize_row, to_f16, rope: none -- every path computes the Numba loop's bits (same float
  operations, each rounded once, no fused multiply-adds).
* swiglu: none on the portable path (expf, as the Numba loop); AVX2's and AVX-512's polynomial exp: 1e-6
  relative to max(1, |result|) as in test_ops.
* softmax_rows: none on the portable path (expf, as the Numba loop). SIMD paths: each weight
  within 1e-6 relative of exp() of the same float32 difference in float64 (the polynomial's
  ~2e-7 and one rounding); each sum within 1e-6 + n_cols * 2^-24 relative (one rounding per
  addition of values <= 1, in lanes).
* attention: 1e-5 absolute, as in test_attention (float32 sums in a per-path order, and the
  exponential's rounding).
"""
import os
import subprocess
import sys
import textwrap

import math

import numba
import numpy as np
import pytest

from lmengine.kernels import matmul as mm
from lmengine.kernels import native
from lmengine.kernels.attention import KEY_TILE, _attend_group
from lmengine.kernels.quant import BF16, F16, F32, Q4_0, Q4_1, Q8_0, float_to_half_bits
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


# -- the elementwise kernels and attention on every path ------------------------------------------

ERR_NULL, ERR_TYPE, ERR_SHAPE, ERR_LENGTH = -1, -2, -3, -5


def _f32(a):
    return native.ffi.from_buffer("float[]", a, require_writable=a.flags.writeable)


def _i8(a):
    return native.ffi.from_buffer("int8_t[]", a, require_writable=True)


def _u16(a):
    return native.ffi.from_buffer("uint16_t[]", a, require_writable=True)


def c_quantize_row(x, n_terms):
    """lme_quantize_row on one token: (xq, xd, xs) and, with two terms, the residual's (rq, rd, rs)."""
    n, nb = x.size, x.size // 32
    xq, xd, xs = np.full(n, 99, np.int8), np.full(nb, np.nan, np.float32), np.full(nb, np.nan, np.float32)
    rq, rd, rs = np.full(n, 99, np.int8), np.full(nb, np.nan, np.float32), np.full(nb, np.nan, np.float32)
    r_len = n if n_terms == 2 else 0
    status = native.lib.lme_quantize_row(_f32(x), n, _i8(xq), n, _f32(xd), nb, _f32(xs), nb,
                                         _i8(rq), r_len, _f32(rd), nb, _f32(rs), nb)
    assert status == 0
    return (xq, xd, xs) + ((rq, rd, rs) if n_terms == 2 else ())


def numba_quantize_row(x, n_terms):
    """The same from the Numba loop (kernels/matmul.py `_quantize_row_numba`), the residual as
    `_quantize_token` forms it."""
    n, nb = x.size, x.size // 32
    xq, xd, xs = np.empty(n, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32)
    mm._quantize_row_numba(x, xq, xd, xs)
    if n_terms == 1:
        return xq, xd, xs
    residual = (x - np.repeat(xd, 32) * xq.astype(np.float32)).astype(np.float32)   # float32 ops
    rq, rd, rs = np.empty(n, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32)
    mm._quantize_row_numba(residual, rq, rd, rs)
    return xq, xd, xs, rq, rd, rs


def quantize_input(n_cols, seed):
    """Activations spanning 60 orders of magnitude, with an all-zero block, a block of -0.0, a
    subnormal block (its scale underflows to 0), and a block of exact rounding ties (max 127, so
    d = 1 and x * (1 / d) = x: 2.5 -> 2, -3.5 -> -4, 0.5 -> 0 under round-half-even)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n_cols) * rng.choice([1e-30, 1e-3, 1.0, 50.0, 1e30], n_cols)).astype(np.float32)
    x[:32] = 0.0
    if n_cols >= 160:
        x[32:64] = -0.0
        x[64:96] = 1e-45
        x[96:128] = np.resize(np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 125.5], np.float32), 32)
        x[128:160] = -x[128:160]
    return x


@pytest.mark.parametrize("n_terms", (1, 2))
@pytest.mark.parametrize("n_cols", (32, 576, 4128))
def test_quantize_row_is_the_numba_loop_bit_for_bit(isa, n_terms, n_cols):
    x = quantize_input(n_cols, seed=n_cols + n_terms)
    got, expected = c_quantize_row(x, n_terms), numba_quantize_row(x, n_terms)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))   # bits (also -0.0)
    if n_cols >= 160:
        np.testing.assert_array_equal(got[0][96:104], [127, 2, -4, 0, 0, 2, -126, 126])   # the ties
    # and the meaning, independently: x ~ xd * xq within half a step, xs = xd * sum(xq)
    d = np.repeat(got[1].astype(np.float64), 32)
    assert np.all(np.abs(x - d * got[0]) <= d * (0.5 + 1e-4) + 1e-38)    # d, 1 / d, x / d rounded
    np.testing.assert_allclose(got[2], got[1] * got[0].reshape(-1, 32).sum(axis=1, dtype=np.float64), rtol=1e-7)


@numba.njit(cache=True)
def _swiglu_numba(gate, up, out):
    """kernels/ops.py's loop (reached there only without the C path)."""
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + math.exp(-g)) * up[i]


@pytest.mark.parametrize("n", (1, 15, 16, 17, 1536))
def test_swiglu(isa, n):
    rng = np.random.default_rng(n)
    gate = (rng.standard_normal(n) * 8).astype(np.float32)            # exp far into both tails
    gate[:4] = [-100.0, 100.0, 0.0, -0.0][:n]
    up = rng.standard_normal(n).astype(np.float32)
    out = np.full(n + 1, np.nan, np.float32)                           # one more: must stay untouched
    assert native.lib.lme_swiglu(_f32(gate), n, _f32(up), n, _f32(out), n) == 0
    assert np.isnan(out[n])
    out = out[:n]
    expected = gate / (1 + np.exp(-gate.astype(np.float64))) * up
    assert np.all(np.abs(out - expected) <= 1e-6 * np.maximum(1, np.abs(expected)))
    numba_out = np.empty(n, np.float32)
    _swiglu_numba(gate, up, numba_out)
    if isa == native.ISA_SCALAR:                                       # expf: the Numba loop's bits
        np.testing.assert_array_equal(out.view(np.uint32), numba_out.view(np.uint32))


@pytest.mark.parametrize("n_cols", (1, 7, 8, 9, 16, 17, 128, 130))
def test_softmax_rows(isa, n_cols):
    from lmengine.kernels.ops import softmax_rows
    rng = np.random.default_rng(n_cols)
    n_rows = 5
    scores = (rng.standard_normal((n_rows, n_cols)) * 10).astype(np.float32)
    if n_cols > 1:
        scores[1, 1:] = -np.inf                                       # a causal mask's row
        scores[2, -1] = -np.inf
    s = scores.copy()
    sums = np.full(n_rows + 1, np.nan, np.float32)                     # one more: must stay untouched
    assert native.lib.lme_softmax_rows(_f32(s), s.size, n_cols, _f32(sums), n_rows + 1) == 0
    assert np.isnan(sums[n_rows])
    diff = (scores - scores.max(axis=1, keepdims=True)).astype(np.float32)   # the float32 difference
    want = np.exp(diff.astype(np.float64))
    masked = np.isinf(scores)
    assert np.all(np.abs(s - want)[~masked] <= 1e-6 * want[~masked])
    assert np.all(s[masked] <= 1e-37)                                  # 0, or the SIMD clamp's ~1e-38
    want_sums = want.sum(axis=1)
    assert np.all(np.abs(sums[:n_rows] - want_sums) <= (1e-6 + n_cols * 2.0 ** -24) * want_sums)
    wide = np.zeros((n_rows, n_cols + 3), np.float32)                 # rows not contiguous: the Numba loop
    wide[:, :n_cols] = scores
    loop_sums = np.empty(n_rows, np.float32)
    softmax_rows(wide[:, :n_cols], loop_sums)
    if isa == native.ISA_SCALAR:                                       # expf, in order: the loop's bits
        np.testing.assert_array_equal(s.view(np.uint32), wide[:, :n_cols].view(np.uint32))
        np.testing.assert_array_equal(sums[:n_rows].view(np.uint32), loop_sums.view(np.uint32))
    ours = scores.copy()
    softmax_rows(ours, np.empty(n_rows, np.float32))                  # contiguous: the C kernel
    np.testing.assert_array_equal(ours.view(np.uint32), s.view(np.uint32))


def test_softmax_rows_checks_its_arguments():     # LME_ERR_NULL -1, _SHAPE -3, _LENGTH -5
    s, sums = np.zeros(12, np.float32), np.zeros(4, np.float32)
    assert native.lib.lme_softmax_rows(native.ffi.NULL, 12, 3, _f32(sums), 4) == -1
    assert native.lib.lme_softmax_rows(_f32(s), 12, 0, _f32(sums), 4) == -3
    assert native.lib.lme_softmax_rows(_f32(s), 12, 5, _f32(sums), 4) == -3
    assert native.lib.lme_softmax_rows(_f32(s), 12, 3, _f32(sums), 3) == -5
    assert native.lib.lme_softmax_rows(_f32(s), 0, 3, _f32(sums), 0) == 0     # no rows: nothing to do


def f16_rounding_cases():
    """Every f16 boundary: the float32 midpoints between consecutive f16 values (ties: rounded to
    the even one), one float32 step either side of them, every f16 value itself (exact), the
    overflow threshold 65520 and beyond, tiny values, infinities, and random bit patterns."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)   # 0 .. 65504
    mid = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)                          # exact ties
    up, down = np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(0))
    specials = np.array([65504.0, 65519.99, 65520.0, 1e6, 3e38, np.inf, 2.0 ** -25, 2.0 ** -26, 1e-45, 0.0],
                        dtype=np.float32)
    bits = np.random.default_rng(0).integers(0, 2 ** 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    positive = np.concatenate([mid, up, down, halves.astype(np.float32), specials])
    return np.concatenate([positive, -positive, bits.view(np.float32)])


@numba.njit(cache=True)
def _to_f16_numba(x, out):
    for i in range(x.shape[0]):
        out[i] = float_to_half_bits(x[i])


def test_to_f16_rounds_as_the_reference(isa):
    x = f16_rounding_cases()
    out = np.zeros(x.size, np.uint16)
    assert native.lib.lme_to_f16(_f32(x), x.size, _u16(out), out.size) == 0
    reference = np.empty(x.size, np.uint16)
    _to_f16_numba(x, reference)
    np.testing.assert_array_equal(out, reference)                      # NaN payloads too
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out[~nan], x[~nan].astype(np.float16).view(np.uint16))   # NumPy
    assert np.isnan(out[nan].view(np.float16)).all()
    for n in (1, 7, 8, 9, 17):                                          # SIMD tails; nothing past n
        tail = np.full(n + 1, 0xBEEF, np.uint16)
        assert native.lib.lme_to_f16(_f32(x[:n].copy()), n, _u16(tail), n) == 0
        np.testing.assert_array_equal(tail[:n], reference[:n])
        assert tail[n] == 0xBEEF


@pytest.mark.parametrize("neox", (0, 1))
@pytest.mark.parametrize("n_heads,head_dim,rope_dim", [(3, 64, 64), (2, 128, 128), (4, 48, 32), (2, 80, 36),
                                                       (1, 600, 520), (2, 16, 0)])
def test_rope_is_float32_rotation_bit_for_bit(isa, neox, n_heads, head_dim, rope_dim):
    """NumPy float32 arithmetic (each product and sum rounded to float32, no FMA) is the reference,
    bit for bit; rope_dim 520 is past the AVX-512 kernel's 512 (the portable loop does it)."""
    rng = np.random.default_rng(n_heads * head_dim + rope_dim + neox)
    x = (rng.standard_normal(n_heads * head_dim) * 4).astype(np.float32)
    angles = rng.uniform(-100, 100, rope_dim // 2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    half = rope_dim // 2
    a = np.arange(half) if neox else 2 * np.arange(half)
    b = a + half if neox else a + 1
    expected = x.reshape(n_heads, head_dim).copy()
    x0, x1 = expected[:, a].copy(), expected[:, b].copy()
    expected[:, a] = x0 * cos - x1 * sin
    expected[:, b] = x0 * sin + x1 * cos
    got = np.append(x, np.float32(7.0))                                # one more: must stay untouched
    assert native.lib.lme_rope(_f32(got), x.size, n_heads, head_dim, rope_dim, neox, _f32(cos), half,
                               _f32(sin), half) == 0
    np.testing.assert_array_equal(got[:-1].view(np.uint32), expected.reshape(-1).view(np.uint32))
    assert got[-1] == 7.0


def attention_case(rng, group, head_dim, n_pos, f16, first_pos=0, cap=0.0, q_scale=1.0):
    """(q, keys tiles, values, float64 reference out) for one kv head over positions first_pos ..
    n_pos - 1, scores soft-capped to cap * tanh(s / cap) when cap > 0; keys/values rounded to f16
    first when f16 (their bits as uint16); q drawn with standard deviation q_scale / sqrt(head_dim)."""
    n_tiles = -(-n_pos // KEY_TILE)
    k = rng.standard_normal((n_tiles * KEY_TILE, head_dim)).astype(np.float32)
    v = rng.standard_normal((n_tiles * KEY_TILE, head_dim)).astype(np.float32)
    k[n_pos:] = v[n_pos:] = np.nan                                     # unused positions must not matter
    if f16:
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    q = (rng.standard_normal(group * head_dim) * q_scale / math.sqrt(head_dim)).astype(np.float32)   # pre-scaled
    keys = np.ascontiguousarray(k.reshape(n_tiles, KEY_TILE, head_dim).transpose(0, 2, 1))
    expected = np.empty(group * head_dim)
    for g in range(group):
        s = k[first_pos:n_pos].astype(np.float64) @ q[g * head_dim:(g + 1) * head_dim]
        if cap > 0:
            s = cap * np.tanh(s / cap)
        w = np.exp(s - s.max())
        expected[g * head_dim:(g + 1) * head_dim] = (w / w.sum()) @ v[first_pos:n_pos]
    if f16:
        keys, v = keys.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
    return q, keys, v, expected


@pytest.mark.parametrize("f16", (0, 1), ids=("f32", "f16"))
@pytest.mark.parametrize("head_dim", (8, 20, 32, 48, 64, 80, 128))
def test_attention_any_head_dim_and_group(isa, f16, head_dim):
    """lme_attention for every head size (multiples of 8 on the AVX2 kernel, others on the
    portable loop; AVX-512: its own kernel for 32/64/128) and group sizes 1..9 (runs of heads and
    their remainders), against float64 and against the Numba reference `_attend_group`."""
    rng = np.random.default_rng(head_dim + f16)
    for group in (1, 2, 3, 4, 5, 7, 9):
        for n_pos in (1, 2, 15, 16, 17, 100):
            q, keys, values, expected = attention_case(rng, group, head_dim, n_pos, f16)
            padded = -(-n_pos // KEY_TILE) * KEY_TILE
            scores = np.empty(group * padded, np.float32)
            out = np.full(group * head_dim + 1, np.nan, np.float32)
            status = native.lib.lme_attention(
                f16, _f32(q), q.size, group, head_dim, native.ffi.from_buffer(keys), keys.size,
                native.ffi.from_buffer(values), n_pos * head_dim, n_pos, 0, 0.0, _f32(scores), scores.size,
                _f32(out), group * head_dim)
            assert status == 0
            assert np.isnan(out[-1])
            out = out[:-1]
            case = (group, n_pos)
            assert np.abs(out - expected).max() <= 1e-5, case
            numba_out = np.empty_like(out)
            _attend_group(q, group, head_dim, keys, values, n_pos, np.empty(padded, np.float32), numba_out)
            assert np.abs(out - numba_out).max() <= 1e-5, case


@pytest.mark.parametrize("f16", (0, 1), ids=("f32", "f16"))
@pytest.mark.parametrize("head_dim", (20, 32, 64, 128, 256))
def test_attention_window_and_softcap(isa, f16, head_dim):
    """lme_attention over a sliding window (first_pos > 0: inside a key tile, on a tile's edge, the
    last position alone) and with gemma2's soft-capping, on every path (256: the AVX2 kernel on
    AVX-512 CPUs; 20: the portable loop), against float64 and the Numba reference `_attend_group`.
    Tolerance 1e-5 as above; the scores are scaled up (x3: standard deviation ~3) so that caps of
    5 and 50 change them by far more than that (5 tanh(3 / 5) = 2.7)."""
    rng = np.random.default_rng(head_dim + 10 * f16)
    for group in (1, 3, 4, 8):
        for n_pos, first_pos, cap in ((100, 37, 0.0), (100, 48, 5.0), (100, 99, 0.0), (17, 0, 5.0),
                                      (40, 16, 50.0), (300, 250, 5.0)):
            q, keys, values, expected = attention_case(rng, group, head_dim, n_pos, f16, first_pos, cap, q_scale=3.0)
            padded = -(-n_pos // KEY_TILE) * KEY_TILE
            scores = np.empty(group * padded, np.float32)
            out = np.full(group * head_dim + 1, np.nan, np.float32)
            status = native.lib.lme_attention(
                f16, _f32(q), q.size, group, head_dim, native.ffi.from_buffer(keys), keys.size,
                native.ffi.from_buffer(values), n_pos * head_dim, n_pos, first_pos, cap, _f32(scores),
                scores.size, _f32(out), group * head_dim)
            assert status == 0
            assert np.isnan(out[-1])
            out = out[:-1]
            case = (group, n_pos, first_pos, cap)
            assert np.abs(out - expected).max() <= 1e-5, case
            numba_out = np.empty_like(out)
            _attend_group(q, group, head_dim, keys, values, n_pos, np.empty(padded, np.float32), numba_out,
                          first_pos, np.float32(cap))
            assert np.abs(out - numba_out).max() <= 1e-5, case


def test_elementwise_c_functions_reject_bad_arguments():
    """Each checks its pointers and lengths (and shapes) before touching memory."""
    lib, null = native.lib, native.ffi.NULL
    x = np.ones(64, np.float32)
    out = np.full(64, -1.0, np.float32)
    assert lib.lme_swiglu(null, 64, _f32(x), 64, _f32(out), 64) == ERR_NULL
    assert lib.lme_swiglu(_f32(x), 64, _f32(x), 63, _f32(out), 64) == ERR_LENGTH
    assert lib.lme_swiglu(_f32(x), 64, _f32(x), 64, _f32(out), 63) == ERR_LENGTH
    assert (out == -1.0).all()
    assert lib.lme_swiglu(_f32(x), 0, _f32(x), 0, _f32(out), 0) == 0 and (out == -1.0).all()

    xq, xd, xs = np.zeros(64, np.int8), np.zeros(2, np.float32), np.zeros(2, np.float32)

    def quantize(x_len=64, xq_len=64, xd_len=2, xs_len=2, r_len=0, xq_ptr=None, r_ptr=null):
        xq_ptr = _i8(xq) if xq_ptr is None else xq_ptr
        return lib.lme_quantize_row(_f32(x), x_len, xq_ptr, xq_len, _f32(xd), xd_len, _f32(xs), xs_len,
                                    r_ptr, r_len, _f32(xd), xd_len, _f32(xs), xs_len)
    assert quantize(x_len=48) == ERR_SHAPE
    assert quantize(xq_ptr=null) == ERR_NULL and quantize(r_len=64) == ERR_NULL   # second term, no rq
    assert quantize(xq_len=63) == ERR_LENGTH and quantize(xd_len=1) == ERR_LENGTH and quantize(xs_len=1) == ERR_LENGTH
    assert quantize(r_len=32, r_ptr=_i8(np.zeros(64, np.int8))) == ERR_LENGTH
    assert not xq.any() and not xd.any() and not xs.any()
    assert quantize() == 0 and (xq == 127).all()

    halves = np.zeros(64, np.uint16)
    assert lib.lme_to_f16(null, 64, _u16(halves), 64) == ERR_NULL
    assert lib.lme_to_f16(_f32(x), 64, _u16(halves), 63) == ERR_LENGTH and not halves.any()

    cs = np.ones(32, np.float32)
    def rope(x_len=64, n_heads=2, head_dim=32, rope_dim=32, cos_len=16, sin_len=16, cos=None):
        return lib.lme_rope(_f32(out), x_len, n_heads, head_dim, rope_dim, 0, _f32(cs) if cos is None else cos,
                            cos_len, _f32(cs), sin_len)
    assert rope(rope_dim=33) == ERR_SHAPE and rope(rope_dim=34) == ERR_SHAPE and rope(head_dim=0) == ERR_SHAPE
    assert rope(n_heads=-1) == ERR_SHAPE and rope(rope_dim=-2) == ERR_SHAPE
    assert rope(n_heads=2 ** 62) == ERR_SHAPE                          # n_heads * head_dim overflows
    assert rope(cos=null) == ERR_NULL
    assert rope(x_len=63) == ERR_LENGTH and rope(cos_len=15) == ERR_LENGTH and rope(sin_len=15) == ERR_LENGTH
    assert (out == -1.0).all()


# -- without the extension ------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from lmengine.kernels import matmul as mm, native
    from lmengine.kernels.quant import Q4_1, quantize, dequantize
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
    from lmengine.kernels.attention import attention, cache_shapes, write_kv
    from lmengine.kernels.ops import swiglu
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
