"""lmengine.kernels.matmul against NumPy references built from the gguf package's blocks.

Float path: the reference is float64 `dequantize(W) @ x.T` with `gguf.quants.dequantize`.
int8 path: the reference repeats the int8 math in NumPy (block integer sums in int64, the float
scale products in float64), decoding the integer form of the blocks independently of the kernels.

Tolerances (u = 2**-24, float32 unit roundoff):
* float path: |out - ref| <= n_cols * u * sum_i |w_i x_i| + 1e-30, the worst-case error of a
  float32 dot product of length n_cols (any summation order); a decoding bug is orders larger.
* int8 path vs its NumPy reference: the products q * xq are exact integers, so only float32
  rounding differs. The SIMD kernels sum each block's integer products in 8 lanes and scale and
  add the lanes in float, so in the worst case every product is its own float term:
  |out - ref| <= (8 * n_blocks + 3) * u * sum_b (|dw dx| * sum_i |q_i xq_i| + |mw xs|)
  (a sum of 8 * n_blocks + n_blocks terms, each rounded at most twice before it is added).
* int8 path vs float path: rint moves each activation by at most dx/2, so
  |out_q8 - out_f32| <= sum_b (dx_b / 2) * sum_{i in b} |w_i|  (+ the two float bounds above).
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from numba import njit

from lmengine.kernels import matmul as mm
from lmengine.kernels.quant import BF16, F16, F32, Q4_0, Q4_1, Q8_0

U = 2.0 ** -24
FLOAT_TYPES = (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
Q8_TYPES = (Q8_0, Q4_0, Q4_1)


def make_weights(w_type, n_rows, n_cols, seed):
    """(raw uint8 blocks, dequantized float64 [n_rows, n_cols]) of a random matrix, via gguf."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w[:, :32] *= 5.0                                  # blocks of different scales
    blocks = gguf_quantize(w, GGMLQuantizationType(w_type))
    raw = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1)
    dense = gguf_dequantize(blocks, GGMLQuantizationType(w_type)).astype(np.float64)
    return raw, dense.reshape(n_rows, n_cols)


def make_x(n_tok, n_cols, seed):
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    x[:, 32:64] *= 0.01                               # a small-scale block
    if n_cols >= 96:
        x[0, 64:96] = 0.0                             # an all-zero block (scale 0)
    return x


def float_bound(dense, x):
    """Worst-case float32 dot-product error per output, [n_tok, n_rows]."""
    return dense.shape[1] * U * (np.abs(x.astype(np.float64)) @ np.abs(dense).T) + 1e-30


# -- NumPy int8 reference -----------------------------------------------------------------------

def ref_quantize_activations(x):
    """The kernels' activation quantizer in NumPy (same float32 operations, so bit-identical)."""
    n_tok, n_cols = x.shape
    blocks = x.reshape(n_tok, n_cols // 32, 32)
    amax = np.abs(blocks).max(axis=2)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.rint(blocks * inv_d[:, :, None]).astype(np.int8)
    s = (d * q.astype(np.int64).sum(axis=2).astype(np.float32)).astype(np.float32)
    return q.reshape(n_tok, n_cols), d, s


def ref_integer_blocks(raw, w_type, n_rows, n_cols):
    """(q int64 [n_rows, n_blocks, 32], d f64 [n_rows, n_blocks], m f64 [n_rows, n_blocks]):
    W = d * q + m per block, read straight from the ggml byte layout."""
    n_blocks = n_cols // 32
    nbytes = {Q8_0: 34, Q4_0: 18, Q4_1: 20}[w_type]
    b = raw.reshape(n_rows, n_blocks, nbytes)
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    m = np.zeros_like(d)
    if w_type == Q8_0:
        q = b[:, :, 2:34].copy().view(np.int8).astype(np.int64)
        return q, d, m
    qs = b[:, :, 4:20] if w_type == Q4_1 else b[:, :, 2:18]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).astype(np.int64)   # value j | j + 16
    if w_type == Q4_1:
        m = b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    else:
        q -= 8
    return q, d, m


def ref_matmul_q8(raw, w_type, n_rows, n_cols, xq, xd, xs):
    """(out f64 [n_tok, n_rows], error scale [n_tok, n_rows]) of the int8 path.

    The error scale is sum_b |dw dx| sum_i |q_i xq_i| + |mw xs_b| in the form the C kernels
    compute: Q4_0 there runs as unsigned nibbles (q + 8) with a min of -8 dw, like Q4_1."""
    q, d, m = ref_integer_blocks(raw, w_type, n_rows, n_cols)
    n_tok = xq.shape[0]
    xq_b = xq.reshape(n_tok, -1, 32).astype(np.int64)
    isum = np.einsum("rbi,tbi->trb", q, xq_b)                          # exact integers
    scale = d[None] * xd[:, None, :].astype(np.float64)                # [n_tok, n_rows, n_blocks]
    mins = m[None] * xs[:, None, :].astype(np.float64)
    out = (scale * isum + mins).sum(axis=2)
    if w_type == Q4_0:
        q, m = q + 8, -8.0 * d
    abs_isum = np.einsum("rbi,tbi->trb", np.abs(q), np.abs(xq_b))
    abs_mins = np.abs(m[None] * xs[:, None, :].astype(np.float64))
    return out, (np.abs(scale) * abs_isum + abs_mins).sum(axis=2)


def q8_bound(n_cols, error_scale):
    return (8 * (n_cols // 32) + 3) * U * error_scale + 1e-30


# -- float path -----------------------------------------------------------------------------------

@pytest.mark.parametrize("w_type", FLOAT_TYPES)
@pytest.mark.parametrize("n_rows,n_cols,n_tok", [(17, 64, 1), (70, 576, 3), (33, 1536, 2), (1, 32, 17)])
def test_float_path_matches_dequantized_numpy(w_type, n_rows, n_cols, n_tok):
    raw, dense = make_weights(w_type, n_rows, n_cols, seed=w_type * 7 + n_cols)
    x = make_x(n_tok, n_cols, seed=n_rows)
    ref = x.astype(np.float64) @ dense.T
    bound = float_bound(dense, x)
    for kernel in (mm.matmul_f32_numba, mm.matmul_f32):
        out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
        kernel(raw, w_type, n_rows, n_cols, x, out)
        assert np.all(np.abs(out - ref) <= bound), kernel
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    mm.matmul(raw, w_type, n_rows, n_cols, x, out, False)
    assert np.all(np.abs(out - ref) <= bound)
    # and equal to NumPy's own float32 product of the dequantized matrix, to float32 rounding
    np.testing.assert_allclose(out, x @ dense.astype(np.float32).T, rtol=0, atol=float(bound.max()) * 2)


def test_float_types_use_float_path_when_act_q8():
    raw, dense = make_weights(F16, 20, 96, seed=3)
    x = make_x(4, 96, seed=3)
    out = np.empty((4, 20), dtype=np.float32)
    mm.matmul(raw, F16, 20, 96, x, out, True)
    assert np.all(np.abs(out - x.astype(np.float64) @ dense.T) <= float_bound(dense, x))


# -- int8 path ------------------------------------------------------------------------------------

def test_quantize_activations_matches_numpy():
    x = make_x(5, 1536, seed=9)
    x[1, :32] = np.float32(127.0) * np.arange(32, dtype=np.float32) / 2   # exact .5 ties
    xq, xd, xs = mm.quantize_activations(x)
    rq, rd, rs = ref_quantize_activations(x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xd, rd)
    np.testing.assert_array_equal(xs, rs)
    assert np.all(np.abs(xq.astype(np.int32)) <= 127)
    # x ~ xd * xq within half a step
    err = np.abs(x.reshape(5, -1, 32) - xd[:, :, None] * xq.reshape(5, -1, 32))
    assert np.all(err <= xd[:, :, None] * (0.5 + 1e-6))


@pytest.mark.parametrize("w_type", Q8_TYPES)
@pytest.mark.parametrize("n_rows,n_cols,n_tok", [(17, 32, 1), (70, 576, 5), (33, 1536, 2), (16, 64, 17)])
def test_q8_path_matches_numpy_integer_reference(w_type, n_rows, n_cols, n_tok):
    raw, dense = make_weights(w_type, n_rows, n_cols, seed=w_type + n_cols)
    x = make_x(n_tok, n_cols, seed=n_rows + 1)
    xq, xd, xs = mm.quantize_activations(x)
    ref, abs_terms = ref_matmul_q8(raw, w_type, n_rows, n_cols, xq, xd, xs)
    bound = q8_bound(n_cols, abs_terms)
    for kernel in (mm.matmul_q8_numba, mm.matmul_q8):
        out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
        kernel(raw, w_type, n_rows, n_cols, xq, xd, xs, out)
        assert np.all(np.abs(out - ref) <= bound), kernel
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    mm.matmul(raw, w_type, n_rows, n_cols, x, out, True)
    assert np.all(np.abs(out - ref) <= bound)

    # against the float path: each activation moved by at most dx/2
    w_abs_blocks = np.abs(dense).reshape(n_rows, -1, 32).sum(axis=2)          # [n_rows, n_blocks]
    quant_bound = 0.5 * xd.astype(np.float64) @ w_abs_blocks.T                # [n_tok, n_rows]
    exact = x.astype(np.float64) @ dense.T
    assert np.all(np.abs(out - exact) <= quant_bound + bound + float_bound(dense, x))


# -- calling conventions and errors ---------------------------------------------------------------

@njit(cache=True)
def _two_projections(w_u8, w_type, n_rows, n_cols, x, act_q8):
    """What a model's forward does: matmul called from inside Numba code, twice."""
    out = np.empty((x.shape[0], n_rows), dtype=np.float32)
    matmul(w_u8[: w_u8.size], w_type, n_rows, n_cols, x, out, act_q8)
    out2 = np.empty_like(out)
    matmul(w_u8, w_type, n_rows, n_cols, x, out2, act_q8)
    return out, out2


matmul = mm.matmul   # global for _two_projections


@pytest.mark.parametrize("act_q8", [False, True])
def test_callable_from_njit(act_q8):
    raw, dense = make_weights(Q4_1, 40, 128, seed=1)
    x = make_x(3, 128, seed=1)
    out, out2 = _two_projections(raw, Q4_1, 40, 128, x, act_q8)
    direct = np.empty_like(out)
    mm.matmul(raw, Q4_1, 40, 128, x, direct, act_q8)
    np.testing.assert_array_equal(out, direct)
    np.testing.assert_array_equal(out2, direct)


def test_zero_rows_and_tokens():
    raw, _ = make_weights(Q8_0, 4, 64, seed=2)
    # a claimed height far beyond the weights is rejected (no int64 overflow in the check)
    with pytest.raises(ValueError, match="shorter"):
        mm.matmul(raw, Q8_0, 2 ** 40, 64, np.empty((0, 64), np.float32), np.empty((0, 2 ** 40), np.float32), True)
    mm.matmul(raw, Q8_0, 0, 64, make_x(2, 64, 0), np.empty((2, 0), np.float32), True)
    mm.matmul(raw, Q8_0, 4, 64, np.empty((0, 64), np.float32), np.empty((0, 4), np.float32), True)
    mm.matmul(raw, Q8_0, 4, 64, np.empty((0, 64), np.float32), np.empty((0, 4), np.float32), False)


@pytest.mark.parametrize("act_q8", [False, True])
def test_bad_arguments_raise_value_error(act_q8):
    raw, _ = make_weights(Q4_0, 8, 64, seed=4)
    x = make_x(2, 64, seed=4)
    out = np.empty((2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="shorter"):
        mm.matmul(raw[:-1], Q4_0, 8, 64, x, out, act_q8)
    with pytest.raises(ValueError, match="type"):
        mm.matmul(raw, 99, 8, 64, x, out, act_q8)
    with pytest.raises(ValueError, match="whole number of blocks"):
        mm.matmul(raw, Q4_0, 8, 48, x[:, :48].copy(), out, act_q8)
    with pytest.raises(ValueError, match="x must have shape|xq must have shape"):
        mm.matmul(raw, Q4_0, 8, 64, make_x(2, 96, 0), out, act_q8)
    with pytest.raises(ValueError, match="out must have shape"):
        mm.matmul(raw, Q4_0, 8, 64, x, np.empty((2, 7), np.float32), act_q8)
    with pytest.raises(ValueError, match="out must have shape"):
        mm.matmul(raw, Q4_0, 8, 64, x, np.empty((3, 8), np.float32), act_q8)
