"""LayerNorm with bias and GELU: the elementwise kernels of the GPT-2 and BERT forward passes.

Like kernels/ops.py these work in place on float32 rows x [n_tok, dim] and are Numba njit. Each
goes over threads (prange over rows) from PARALLEL_MIN_TOKENS rows on: an encoder runs thousands
of rows per call (32 sentences x 128 tokens), a decode step one row per sequence.

GELU comes in the two forms models use:
    erf  (BERT, `hidden_act="gelu"`):        0.5 x (1 + erf(x / sqrt(2)))
    tanh (GPT-2, `gelu_new`/`gelu_pytorch_tanh`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
Both evaluate in float32 (libm's erff/tanhf: a few ulp, well inside the 1e-4 the model tests
allow) - float64 erf made GELU a tenth of an encoder's time.
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
def layernorm(x, weight, bias, eps, out):
    """out[t] = (x[t] - mean(x[t])) / sqrt(var(x[t]) + eps) * weight + bias.
    x, out: float32 [n_tok, dim] (out may be x); weight, bias: float32 [dim]."""
    if x.shape[0] >= PARALLEL_MIN_TOKENS:
        _layernorm_parallel(x, weight, bias, eps, out)
    else:
        for t in range(x.shape[0]):
            _layernorm_row(x, weight, bias, eps, out, t)


@njit(cache=True, nogil=True)
def _gelu_row(x, t, form):
    half, one = np.float32(0.5), np.float32(1.0)
    if form == GELU_TANH:
        c, a = np.float32(math.sqrt(2.0 / math.pi)), np.float32(0.044715)
        for i in range(x.shape[1]):
            v = x[t, i]
            x[t, i] = half * v * (one + math.tanh(c * (v + a * v * v * v)))
    else:
        r = np.float32(1.0 / math.sqrt(2.0))
        for i in range(x.shape[1]):
            v = x[t, i]
            x[t, i] = half * v * (one + math.erf(v * r))


@njit(cache=True, nogil=True, parallel=True)
def _gelu_parallel(x, form):
    for t in prange(x.shape[0]):
        _gelu_row(x, t, form)


@njit(cache=True, nogil=True)
def gelu(x, form):
    """x = gelu(x) in place; form GELU_ERF or GELU_TANH.   x: float32 [n_tok, dim]."""
    if x.shape[0] >= PARALLEL_MIN_TOKENS:
        _gelu_parallel(x, form)
    else:
        for t in range(x.shape[0]):
            _gelu_row(x, t, form)


@njit(cache=True, nogil=True, parallel=True)
def add_bias_rows(x, bias):
    """x[t] += bias for every row (over threads).   x: float32 [n_tok, dim]; bias: float32 [dim]."""
    for t in prange(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] += bias[i]


@njit(cache=True, nogil=True, parallel=True)
def add_rows(x, y):
    """x += y (over threads).   x, y: float32 [n_tok, dim]."""
    for t in prange(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] += y[t, i]
