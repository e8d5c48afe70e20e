"""LayerNorm with bias and GELU: the elementwise kernels of the GPT-2 and BERT forward passes.

Like kernels/ops.py these work in place on float32 rows x [n_tok, dim] and are Numba njit. Each
goes over threads (prange over rows) from PARALLEL_MIN_TOKENS rows on: an encoder runs thousands
of rows per call (32 sentences x 128 tokens), a decode step one row per sequence.

GELU comes in the two forms models use:
    erf  (BERT, `hidden_act="gelu"`):        0.5 x (1 + erf(x / sqrt(2)))
    tanh (GPT-2, `gelu_new`/`gelu_pytorch_tanh`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
Both evaluate in float32. tanh is libm's tanhf. erf is `erf_f32`, a rational function of x^2
(no libm call, no branch), so that LLVM vectorizes the row loop (8 lanes of AVX2): libm's erff,
a call per value, made GELU 15% of an encoder's time; this one is ~10x faster and within 4.4e-7
of erf everywhere (7 float32 ulp at most; tests/kernels/test_layernorm.py), far inside the 1e-4
the model tests allow. `bias_gelu` adds the product's bias in the same pass (one read and one
write of the [n_tok, ffn] activations instead of two each).
"""
import math

import numpy as np
from numba import njit, prange

from .ops import PARALLEL_MIN_TOKENS

GELU_ERF = 0
GELU_TANH = 1


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _layernorm_row(x, weight, bias, eps, out, t):
    dim = x.shape[1]
    mean = 0.0                      # float64 sums: a two-pass mean/variance, no cancellation
    for i in range(dim):
        mean += x[t, i]
    mean /= dim
    var = 0.0
    for i in range(dim):
        d = x[t, i] - mean
        var += d * d
    var /= dim
    scale = 1.0 / math.sqrt(var + eps)
    for i in range(dim):
        out[t, i] = np.float32((x[t, i] - mean) * scale) * weight[i] + bias[i]


@njit(cache=True, nogil=True, parallel=True)
def _layernorm_parallel(x, weight, bias, eps, out):
    for t in prange(x.shape[0]):
        _layernorm_row(x, weight, bias, eps, out, t)


@njit(cache=True, nogil=True)
def layernorm(x, weight, bias, eps, out, parallel=True):
    """out[t] = (x[t] - mean(x[t])) / sqrt(var(x[t]) + eps) * weight + bias.
    x, out: float32 [n_tok, dim] (out may be x); weight, bias: float32 [dim].
    parallel: rows over Numba's threads from PARALLEL_MIN_TOKENS rows on (False: this thread only,
    for a caller that splits the rows among its own threads)."""
    if parallel and x.shape[0] >= PARALLEL_MIN_TOKENS:
        _layernorm_parallel(x, weight, bias, eps, out)
    else:
        for t in range(x.shape[0]):
            _layernorm_row(x, weight, bias, eps, out, t)


# erf(z) ~= z P(z^2) / Q(z^2) for |z| <= 4, z clamped there (erf(4) = 1 - 1.5e-8, 1.0 in float32).
# P and Q (degree 5 in z^2, Q[0] = 1) are a weighted least-squares rational fit to erf on [0, 4],
# made for lmengine (reweighted by 1/Q until it settled; max error 4.4e-7, float32 arithmetic).
_ERF_P = (1.1283791065216064, 0.1919049769639969, 0.05289509519934654, 0.0038168509490787983,
          0.00028372122324071825, 2.007141119975131e-06)
_ERF_Q = (1.0, 0.5034040808677673, 0.114681676030159, 0.015072232112288475, 0.0011707475641742349,
          3.758881211979315e-05)
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in _ERF_P)
_Q1, _Q2, _Q3, _Q4, _Q5 = (np.float32(c) for c in _ERF_Q[1:])


@njit(cache=True, nogil=True, inline="always")
def erf_f32(z):
    """erf(z) of a float32, within 4.4e-7 (see _ERF_P); branch-free so that loops over it vectorize."""
    z = min(max(z, np.float32(-4.0)), np.float32(4.0))
    t = z * z
    p = ((((_P5 * t + _P4) * t + _P3) * t + _P2) * t + _P1) * t + _P0
    q = ((((_Q5 * t + _Q4) * t + _Q3) * t + _Q2) * t + _Q1) * t + np.float32(1.0)
    return min(max(z * p / q, np.float32(-1.0)), np.float32(1.0))    # never past +-1 (the fit is, by an ulp)


# error_model="numpy": erf_f32's division needs no zero check (its divisor is >= 1). Numba's
# default ("python") puts one in the loop, which stops it vectorizing: the one-threaded path of
# bias_gelu ran 7x slower with it (13.7 against 2.4 ms for 2048 x 1536 values; the prange path
# compiles with NumPy's model already).
@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _bias_gelu_row(x, bias, t, form):
    half, one = np.float32(0.5), np.float32(1.0)
    n = x.shape[1]
    if form == GELU_TANH:
        c, a = np.float32(math.sqrt(2.0 / math.pi)), np.float32(0.044715)
        for i in range(n):
            v = x[t, i] + bias[i]
            x[t, i] = half * v * (one + math.tanh(c * (v + a * v * v * v)))
    else:
        r = np.float32(1.0 / math.sqrt(2.0))
        for i in range(n):
            v = x[t, i] + bias[i]
            x[t, i] = half * v * (one + erf_f32(v * r))


@njit(cache=True, nogil=True, parallel=True)
def _bias_gelu_parallel(x, bias, form):
    for t in prange(x.shape[0]):
        _bias_gelu_row(x, bias, t, form)


@njit(cache=True, nogil=True)
def bias_gelu(x, bias, form, parallel=True):
    """x = gelu(x + bias) in place, every row; form GELU_ERF or GELU_TANH.
    x: float32 [n_tok, dim] (C-contiguous); bias: float32 [dim] (zeros for none).
    parallel: as for `layernorm`."""
    if parallel and x.shape[0] >= PARALLEL_MIN_TOKENS:
        _bias_gelu_parallel(x, bias, form)
    else:
        for t in range(x.shape[0]):
            _bias_gelu_row(x, bias, t, form)


def gelu(x, form):
    """x = gelu(x) in place; form GELU_ERF or GELU_TANH.   x: float32 [n_tok, dim] (C-contiguous)."""
    bias_gelu(x, np.zeros(x.shape[1], dtype=np.float32), form)


@njit(cache=True, nogil=True, inline="always")
def _add_row(x, y, bias, t):
    for i in range(x.shape[1]):
        x[t, i] += y[t, i] + bias[i]


@njit(cache=True, nogil=True, parallel=True)
def _add_rows_parallel(x, y, bias):
    for t in prange(x.shape[0]):
        _add_row(x, y, bias, t)


@njit(cache=True, nogil=True)
def add_rows_bias(x, y, bias, parallel=True):
    """x += y + bias, bias added to every row: a product's residual and bias in one pass.
    x, y: float32 [n_tok, dim]; bias: float32 [dim]. parallel: as for `layernorm`."""
    if parallel and x.shape[0] >= PARALLEL_MIN_TOKENS:
        _add_rows_parallel(x, y, bias)
    else:
        for t in range(x.shape[0]):
            _add_row(x, y, bias, t)


def add_rows(x, y, parallel=True):
    """x += y.   x, y: float32 [n_tok, dim]. parallel: as for `layernorm`."""
    add_rows_bias(x, y, np.zeros(x.shape[1], dtype=np.float32), parallel)
