"""The exact int8 path of Q5_0, Q5_1 and IQ4_NL weights (kernels/csrc/qdot.c section 4, Numba
reference `lmengine.kernels.matmul._matmul_exact_numba`): 32-value weight blocks times Q8_0-style
activation blocks (xq, xd, xs from `quantize_activations`), through `lme_matmul_q8`.

Weights: random bytes (every bit pattern of qh / qs is a valid block) with finite random f16
scales (and Q5_1 mins) written into their fields; the gguf package's `dequantize` is the
independent decoder.

Checks and tolerances (u = 2**-24, the float32 unit roundoff):
* Numba vs float64 `gguf.dequantize(W) @ (xd * xq)`: the integer sums are exact; per block the
  kernel rounds dw*xd, its product with isum, mw*xs and their sum (and xs = xd*sum(xq) was rounded
  once), then adds 8 blocks in a tree of depth 3 and the group to a float32 accumulator
  (nb/8 groups); gguf rounds each weight at most twice. So every term carries at most
  k = ceil(nb/8) + 10 roundings: |out - ref| <= k u M, M = sum_b |dw xd| sum_i |q_i xq_i| +
  |mw xd| sum_i |xq_i| in the kernel's integer form (Q5_0: q = 0..31, mw = -16 dw), plus 1e-30.
* C (every SIMD path) vs Numba: bit for bit (same exact integers, same float32 operations in the
  same order; no tolerance).
* int8 path vs the float path (float64 W x on unquantized x): rint moves each activation by at
  most xd/2, so |out - W x| <= sum_b (xd_b / 2) sum_i |w_i| + the float bounds (two int8 terms:
  the second term's xd2 / 2 plus u |x| per value for the rounded residual).
* Batch invariance: a (row, token) result is bitwise the same whatever the batch and row range.
* Argument checks: bad type, shapes, ranges, NULL pointers and short buffers give LME_ERR_*
  codes and leave the output untouched.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from checks import random_blocks

from lmengine.kernels import matmul as mm
from lmengine.kernels import native
from lmengine.kernels.quant import IQ4_NL, Q5_0, Q5_1, QK

U = 2.0 ** -24
OK, ERR_NULL, ERR_TYPE, ERR_SHAPE, ERR_RANGE, ERR_LENGTH = 0, -1, -2, -3, -4, -5
TYPES = (Q5_0, Q5_1, IQ4_NL)
NAMES = {Q5_0: "Q5_0", Q5_1: "Q5_1", IQ4_NL: "IQ4_NL"}
BLOCK_BYTES = {Q5_0: 22, Q5_1: 24, IQ4_NL: 18}
F16_FIELDS = {Q5_0: (0,), Q5_1: (0, 2), IQ4_NL: (0,)}     # d (and m)
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int64)

ids = [NAMES[t] for t in TYPES]


# -- inputs and references ------------------------------------------------------------------------

def make_weights(w_type, n_rows, n_cols, seed, spread=True):
    """Random blocks (uint8 [n_rows * row_bytes]) with finite f16 d (and m) (checks.random_blocks)."""
    return random_blocks(n_rows * n_cols // QK, BLOCK_BYTES[w_type], F16_FIELDS[w_type], seed, spread)


def make_x(n_tok, n_cols, seed):
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    x[:, :QK] *= 30.0                                  # blocks of different scales
    if n_cols >= 3 * QK:
        x[:, QK:2 * QK] *= 1e-3
        x[0, 2 * QK:3 * QK] = 0.0                      # an all-zero block (scale 0)
    return x


def gguf_dense(w_type, raw, n_rows, n_cols):
    """float64 [n_rows, n_cols] from gguf's dequantize."""
    blocks = raw.reshape(-1, BLOCK_BYTES[w_type])
    return gguf_dequantize(blocks, GGMLQuantizationType(w_type)).astype(np.float64).reshape(n_rows, n_cols)


def integer_form(w_type, raw, n_rows, n_cols):
    """(q int64 [n_rows, nb, 32], d, m float64 [n_rows, nb]) in the kernel's form, W = d q + m,
    read from the byte layout independently of the kernels."""
    b = raw.reshape(n_rows, n_cols // QK, BLOCK_BYTES[w_type])
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    if w_type == IQ4_NL:
        qs = b[:, :, 2:18].astype(np.int64)
        return KVALUES[np.concatenate([qs & 15, qs >> 4], axis=2)], d, np.zeros_like(d)
    o = 2 if w_type == Q5_0 else 4
    qh = b[:, :, o:o + 4].copy().view("<u4")[:, :, 0].astype(np.int64)
    qs = b[:, :, o + 4:o + 20].astype(np.int64)
    bits = (qh[:, :, None] >> np.arange(32)) & 1
    q = np.concatenate([qs & 15, qs >> 4], axis=2) | (bits << 4)
    m = -16.0 * d if w_type == Q5_0 else b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    return q, d, m


def ref_dot(w_type, raw, n_rows, n_cols, xq, xd):
    """(float64 reference [n_tok, n_rows], error bound [n_tok, n_rows]) as in the module doc."""
    n_tok, nb = xq.shape[0], n_cols // QK
    x = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), QK, axis=1)
    ref = x @ gguf_dense(w_type, raw, n_rows, n_cols).T
    q, d, m = integer_form(w_type, raw, n_rows, n_cols)
    xq_b = np.abs(xq.astype(np.int64)).reshape(n_tok, nb, QK)
    xd64 = np.abs(xd.astype(np.float64))
    magnitude = (np.einsum("rb,tb,rbi,tbi->tr", np.abs(d), xd64, np.abs(q), xq_b)
                 + np.einsum("rb,tb,tb->tr", np.abs(m), xd64, xq_b.sum(axis=2)))
    k = -(-nb // 8) + 10
    return ref, k * U * magnitude + 1e-30


def numba_out(w_type, raw, n_rows, n_cols, xq, xd, xs):
    out = np.full((xq.shape[0], n_rows), np.nan, np.float32)
    mm.matmul_q8_numba(raw, w_type, n_rows, n_cols, xq, xd, xs, out)
    return out


def c_matmul(w_type, w, n_rows, n_cols, xq, xd, xs, row_begin=0, row_end=None, out=None, n_tok=None):
    """lme_matmul_q8 through cffi: (rc, out [n_tok, n_rows]); out starts as NaN unless given."""
    n_tok = xq.shape[0] if n_tok is None else n_tok
    row_end = n_rows if row_end is None else row_end
    out = np.full((max(n_tok, 0), n_rows), np.nan, np.float32) if out is None else out
    f = native.ffi.from_buffer
    rc = native.lib.lme_matmul_q8(w_type, f("uint8_t[]", w), w.size, n_rows, n_cols, row_begin, row_end,
                                  f("int8_t[]", xq), xq.size, f("float[]", xd), xd.size, f("float[]", xs), xs.size,
                                  n_tok, f("float[]", out, require_writable=True), out.size)
    return rc, out


@pytest.fixture(scope="module", autouse=True)
def _needs_native():
    if not native.HAVE_NATIVE:
        pytest.skip(f"the C extension is not loaded: {native.LOAD_ERROR}")


# -- the Numba reference against gguf ---------------------------------------------------------------

SIZES = [(1, 32, 1), (7, 256, 3), (13, 800, 6), (3, 4096, 9)]    # (n_rows, n_cols, n_tok); 800: 25 blocks


@pytest.mark.parametrize("w_type", TYPES, ids=ids)
@pytest.mark.parametrize("n_rows,n_cols,n_tok", SIZES)
def test_numba_dot_matches_gguf_float64(w_type, n_rows, n_cols, n_tok):
    raw = make_weights(w_type, n_rows, n_cols, seed=w_type * 100 + n_cols)
    xq, xd, xs = mm.quantize_activations(make_x(n_tok, n_cols, seed=n_rows))
    ref, bound = ref_dot(w_type, raw, n_rows, n_cols, xq, xd)
    out = numba_out(w_type, raw, n_rows, n_cols, xq, xd, xs)
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"max err {err.max()}, bound there {bound.flat[np.argmax(err - bound)]}"


@pytest.mark.parametrize("w_type", TYPES, ids=ids)
def test_bound_is_far_below_a_layout_error(w_type):
    """With realistic scales, swapping the low and high nibbles (values j and j + 16) of every
    other block of a 64-block row moves every result by many times the tolerance: the bound can
    see a layout error."""
    n_rows, n_cols = 5, 2048
    raw = make_weights(w_type, n_rows, n_cols, seed=3, spread=False)
    xq, xd, _ = mm.quantize_activations(make_x(1, n_cols, seed=4))
    ref, bound = ref_dot(w_type, raw, n_rows, n_cols, xq, xd)
    wrong = raw.reshape(n_rows, n_cols // QK, BLOCK_BYTES[w_type]).copy()
    o = BLOCK_BYTES[w_type] - 16                             # qs: the last 16 bytes
    wrong[:, 1::2, o:] = (wrong[:, 1::2, o:] >> 4) | (wrong[:, 1::2, o:] << 4)
    wrong_ref, _ = ref_dot(w_type, wrong.reshape(-1), n_rows, n_cols, xq, xd)
    assert np.all(np.abs(wrong_ref - ref) > 10 * bound)


# -- C against the reference, every SIMD path -------------------------------------------------------

@pytest.mark.parametrize("w_type", TYPES, ids=ids)
@pytest.mark.parametrize("n_rows,n_cols,n_tok", SIZES + [(40, 480, 17), (17, 64, 5)])
def test_c_matches_numba_bit_for_bit(isa, w_type, n_rows, n_cols, n_tok):
    raw = make_weights(w_type, n_rows, n_cols, seed=w_type * 7 + n_tok)
    xq, xd, xs = mm.quantize_activations(make_x(n_tok, n_cols, seed=n_cols))
    want = numba_out(w_type, raw, n_rows, n_cols, xq, xd, xs)
    rc, out = c_matmul(w_type, raw, n_rows, n_cols, xq, xd, xs)
    assert rc == OK
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("w_type", TYPES, ids=ids)
def test_token_result_does_not_depend_on_its_batch(isa, w_type):
    """Exact: the whole batch, batches of every size 1..9 at several offsets, and row sub-ranges
    all give the same bits."""
    n_rows, n_cols, n_all = 11, 1312, 9                       # 41 blocks: 5 groups of 8 and 1
    raw = make_weights(w_type, n_rows, n_cols, seed=n_cols + w_type)
    xq, xd, xs = mm.quantize_activations(make_x(n_all, n_cols, seed=3))
    rc, full = c_matmul(w_type, raw, n_rows, n_cols, xq, xd, xs)
    assert rc == OK
    for n in range(1, n_all + 1):
        for t0 in range(0, n_all - n + 1, max(1, n // 2)):
            rc, part = c_matmul(w_type, raw, n_rows, n_cols, xq[t0:t0 + n].copy(), xd[t0:t0 + n].copy(),
                                xs[t0:t0 + n].copy())
            assert rc == OK
            np.testing.assert_array_equal(part, full[t0:t0 + n])
    out = np.full_like(full, np.nan)
    for r0, r1 in ((0, 1), (1, n_rows - 1), (n_rows - 1, n_rows)):
        rc, _ = c_matmul(w_type, raw, n_rows, n_cols, xq, xd, xs, r0, r1, out=out)
        assert rc == OK
    np.testing.assert_array_equal(out, full)


def test_row_range_writes_exactly_its_rows(isa):
    n_rows, n_cols, n_tok = 9, 256, 3
    raw = make_weights(Q5_1, n_rows, n_cols, seed=4)
    xq, xd, xs = mm.quantize_activations(make_x(n_tok, n_cols, seed=4))
    rc, out = c_matmul(Q5_1, raw, n_rows, n_cols, xq, xd, xs, 2, 5)
    assert rc == OK
    assert np.all(np.isnan(out[:, :2])) and np.all(np.isnan(out[:, 5:])) and not np.any(np.isnan(out[:, 2:5]))


@pytest.mark.parametrize("w_type", TYPES, ids=ids)
def test_non_finite_scales_do_not_crash_and_match_numba(isa, w_type):
    n_rows, n_cols = 4, 512
    raw = make_weights(w_type, n_rows, n_cols, seed=9).reshape(-1, BLOCK_BYTES[w_type])
    blocks_per_row = n_cols // QK
    first, last = F16_FIELDS[w_type][0], F16_FIELDS[w_type][-1]
    raw[3, first:first + 2] = np.array([np.inf], np.float16).view(np.uint8)                  # row 0
    raw[3 * blocks_per_row + 5, last:last + 2] = np.array([np.nan], np.float16).view(np.uint8)  # row 3
    raw = raw.reshape(-1)
    xq, xd, xs = mm.quantize_activations(make_x(2, n_cols, seed=9))
    want = numba_out(w_type, raw, n_rows, n_cols, xq, xd, xs)
    rc, out = c_matmul(w_type, raw, n_rows, n_cols, xq, xd, xs)
    assert rc == OK
    np.testing.assert_array_equal(out, want)
    assert not np.all(np.isfinite(out[:, 0])) and np.all(np.isfinite(out[:, 1:3]))


# -- through `matmul`: the model's entry point, every activation mode ------------------------------

@pytest.mark.parametrize("w_type", TYPES, ids=ids)
@pytest.mark.parametrize("act", [mm.ACT_INT8, mm.ACT_INT8X2])
def test_matmul_takes_the_int_path_and_tracks_float(isa, w_type, act):
    n_rows, n_cols, n_tok = 24, 544, 3
    assert mm.has_int_path(w_type, n_cols)
    raw = make_weights(w_type, n_rows, n_cols, seed=w_type + 17, spread=False)
    x = make_x(n_tok, n_cols, seed=5)
    out = np.full((n_tok, n_rows), np.nan, np.float32)
    mm.matmul(raw, w_type, n_rows, n_cols, x, out, act)

    # the int path's own arithmetic: the reference on the same int8 terms, summed term by term
    if act == mm.ACT_INT8:
        xq, xd, xs = mm.quantize_activations(x)
        np.testing.assert_array_equal(out, numba_out(w_type, raw, n_rows, n_cols, xq, xd, xs))
        step = xd.astype(np.float64) / 2                      # the largest move of an activation
    else:
        xq, xd, xs = mm.quantize_activations_x2(x)
        terms = numba_out(w_type, raw, n_rows, n_cols, xq, xd, xs)
        np.testing.assert_array_equal(out, terms[:n_tok] + terms[n_tok:])
        x_abs_max = np.abs(x.astype(np.float64)).reshape(n_tok, -1, QK).max(axis=2)
        step = xd[n_tok:].astype(np.float64) / 2 + 2 * U * x_abs_max

    # against float64 W x on the unquantized activations
    dense = gguf_dense(w_type, raw, n_rows, n_cols)
    exact = x.astype(np.float64) @ dense.T
    quant_bound = step @ np.abs(dense).reshape(n_rows, -1, QK).sum(axis=2).T
    _, float_bound = ref_dot(w_type, raw, n_rows, n_cols, xq[:n_tok], xd[:n_tok])
    float_bound = 2 * float_bound + n_cols * U * (np.abs(x.astype(np.float64)) @ np.abs(dense).T)
    assert np.all(np.abs(out - exact) <= quant_bound + float_bound)
    if act == mm.ACT_INT8X2:                                  # two terms: far closer than one
        xd1 = mm.quantize_activations(x)[1].astype(np.float64) / 2
        assert np.abs(out - exact).max() < 0.05 * (xd1 @ np.abs(dense).reshape(n_rows, -1, QK).sum(axis=2).T).max()


def test_matmul_float_mode_and_non_contiguous_use_numba(isa):
    """ACT_F32 takes the float path; non-contiguous arrays the Numba reference (same bits)."""
    n_rows, n_cols, n_tok = 8, 256, 2
    raw = make_weights(Q5_0, n_rows, n_cols, seed=2, spread=False)
    x = make_x(n_tok, n_cols, seed=2)
    out = np.empty((n_tok, n_rows), np.float32)
    mm.matmul(raw, Q5_0, n_rows, n_cols, x, out, mm.ACT_F32)
    dense = gguf_dense(Q5_0, raw, n_rows, n_cols)
    bound = n_cols * U * (np.abs(x.astype(np.float64)) @ np.abs(dense).T) + 1e-30
    assert np.all(np.abs(out - x.astype(np.float64) @ dense.T) <= bound)

    xq, xd, xs = mm.quantize_activations(x)
    wide = np.zeros((n_tok, 2 * n_cols), np.int8)
    wide[:, ::2] = xq
    strided = np.full((n_tok, n_rows), np.nan, np.float32)
    mm.matmul_q8(raw, Q5_0, n_rows, n_cols, wide[:, ::2], xd, xs, strided)
    rc, c_out = c_matmul(Q5_0, raw, n_rows, n_cols, xq, xd, xs)
    assert rc == OK
    np.testing.assert_array_equal(strided, c_out)


# -- argument checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("w_type", TYPES, ids=ids)
def test_argument_checks(w_type):
    n_rows, n_cols, n_tok = 3, 96, 2
    raw = make_weights(w_type, n_rows, n_cols, seed=1)
    xq, xd, xs = mm.quantize_activations(make_x(n_tok, n_cols, seed=1))
    rc, _ = c_matmul(w_type, raw, n_rows, n_cols, xq, xd, xs)
    assert rc == OK

    def call(**changes):
        args = dict(w_type=w_type, w=raw, n_rows=n_rows, n_cols=n_cols, xq=xq, xd=xd, xs=xs)
        args.update(changes)
        sentinel = np.full((n_tok, n_rows), -7.0, np.float32)
        rc, out = c_matmul(args.pop("w_type"), args.pop("w"), args.pop("n_rows"), args.pop("n_cols"),
                           args.pop("xq"), args.pop("xd"), args.pop("xs"), out=sentinel, **args)
        if rc != OK:
            assert np.all(out == -7.0), "an output was written although the call failed"
        return rc

    for bad_type in (0, 1, 4, 5, 9, 10, 19, 21, 23, 30, 99, -1):
        assert call(w_type=bad_type) == ERR_TYPE
    for bad_cols in (0, -32, 31, 100):
        assert call(n_cols=bad_cols) == ERR_SHAPE
    assert call(n_rows=-1, row_end=0) == ERR_SHAPE
    assert call(n_tok=-1) == ERR_SHAPE
    assert call(n_rows=1 << 62) == ERR_SHAPE                  # row bytes * n_rows overflows
    assert call(row_begin=-1) == ERR_RANGE
    assert call(row_begin=2, row_end=1) == ERR_RANGE
    assert call(row_end=n_rows + 1) == ERR_RANGE
    assert call(w=raw[:-1]) == ERR_LENGTH
    assert call(xq=xq[:, :-1].copy()) == ERR_LENGTH
    assert call(xd=xd[:, :-1].copy()) == ERR_LENGTH
    assert call(xs=xs[:, :-1].copy()) == ERR_LENGTH
    assert call(n_rows=n_rows + 1, row_end=n_rows) == ERR_LENGTH   # w too short for 4 rows
    assert call(row_begin=1, row_end=1) == OK                # empty tile: nothing to do
    assert call(n_tok=0) == OK

    out = np.zeros((n_tok, n_rows), np.float32)
    f, null, lib = native.ffi.from_buffer, native.ffi.NULL, native.lib
    good = dict(w=f("uint8_t[]", raw), xq=f("int8_t[]", xq), xd=f("float[]", xd), xs=f("float[]", xs),
                out=f("float[]", out, require_writable=True))
    for missing in good:
        p = dict(good, **{missing: null})
        rc = lib.lme_matmul_q8(w_type, p["w"], raw.size, n_rows, n_cols, 0, n_rows, p["xq"], xq.size, p["xd"],
                               xd.size, p["xs"], xs.size, n_tok, p["out"], out.size)
        assert rc == ERR_NULL, missing
    rc = lib.lme_matmul_q8(w_type, good["w"], raw.size, n_rows, n_cols, 0, n_rows, good["xq"], xq.size, good["xd"],
                           xd.size, good["xs"], xs.size, n_tok, good["out"], out.size - 1)
    assert rc == ERR_LENGTH

    # the Python entry points raise ValueError on shapes the C kernel would reject
    with pytest.raises(ValueError):
        mm.matmul_q8(raw, w_type, n_rows, n_cols, xq[:, :-32].copy(), xd, xs, out)
    with pytest.raises(ValueError):
        mm.matmul_q8(raw[:-1], w_type, n_rows, n_cols, xq, xd, xs, out)

