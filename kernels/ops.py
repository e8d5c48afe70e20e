"""Small elementwise and row-wise kernels of the transformer forward pass.

All functions are Numba njit and work in place on float32 rows: x [n_tok, dim]. They are called
from the model's compiled forward (engine/models/llama.py), so their signatures use plain arrays
and scalars only. They run on one thread (each is a few microseconds of work per token, less than
the cost of waking a thread pool) except swiglu in prompts.
"""
import math

import numpy as np
from numba import njit, prange

from . import native

PARALLEL_MIN_TOKENS = 8   # swiglu's rows go over threads from this many tokens on


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight.   x, out: [n_tok, dim]; weight: [dim].
    The sum of squares is float32, reassociated (vectorized): relative error ~1e-7 * sqrt(dim)."""
    n_tok, dim = x.shape
    for t in range(n_tok):
        ss = np.float32(0.0)
        for i in range(dim):
            ss += x[t, i] * x[t, i]
        scale = np.float32(1.0 / math.sqrt(ss / dim + eps))
        for i in range(dim):
            out[t, i] = (x[t, i] * scale) * weight[i]


@njit(cache=True, nogil=True)
def rope_inv_freq(rope_dim, base):
    """theta_i = base^(-2i/rope_dim) for i in [0, rope_dim/2): float64 [rope_dim // 2]."""
    half = rope_dim // 2
    inv_freq = np.empty(half, dtype=np.float64)
    for i in range(half):
        inv_freq[i] = base ** (-2.0 * i / rope_dim)
    return inv_freq


@njit(cache=True, nogil=True)
def rope_angles(positions, inv_freq):
    """cos, sin float32 [n_tok, rope_dim // 2] of the angles positions[t] * inv_freq[i] (computed
    in float64), shared by q and k of every layer."""
    n_tok, half = positions.shape[0], inv_freq.shape[0]
    cos = np.empty((n_tok, half), dtype=np.float32)
    sin = np.empty((n_tok, half), dtype=np.float32)
    for t in range(n_tok):
        for i in range(half):
            angle = positions[t] * inv_freq[i]
            cos[t, i] = math.cos(angle)
            sin[t, i] = math.sin(angle)
    return cos, sin


@njit(cache=True, nogil=True)
def rope(x, cos, sin, n_heads, head_dim, rope_dim, neox):
    """Rotate the first rope_dim dims of every head of x [n_tok, n_heads*head_dim] in place, pair i
    of token t by the angle whose cos[t, i], sin[t, i] `rope_angles` gives.

    neox=False (ggml "normal", llama GGUFs): pairs (2i, 2i+1).
    neox=True  (qwen2, HF rotate_half):      pairs (i, i + rope_dim/2).
    The C kernel (lme_rope, every ISA) does a token when the extension is loaded, with the same roundings as the
    loop below (the reference).
    """
    n_tok = x.shape[0]
    half = rope_dim // 2
    for t in range(n_tok):
        row, cos_t, sin_t = x[t], cos[t], sin[t]
        if (row.strides[0] == 4 and cos_t.strides[0] == 4 and sin_t.strides[0] == 4
                and native.c_rope(row, n_heads, head_dim, rope_dim, 1 if neox else 0, cos_t, sin_t) == 0):
            continue
        for h in range(n_heads):
            base = h * head_dim
            for i in range(half):
                c = cos[t, i]
                s = sin[t, i]
                if neox:
                    a = base + i
                    b = base + i + half
                else:
                    a = base + 2 * i
                    b = a + 1
                x0 = x[t, a]
                x1 = x[t, b]
                x[t, a] = x0 * c - x1 * s
                x[t, b] = x0 * s + x1 * c


@njit(cache=True, nogil=True)
def _swiglu_row(gate, up, out, t):
    g_row, u_row, o_row = gate[t], up[t], out[t]
    if (g_row.strides[0] == 4 and u_row.strides[0] == 4 and o_row.strides[0] == 4
            and native.c_swiglu(g_row, u_row, o_row) == 0):
        return                                              # the C kernel did it
    for i in range(gate.shape[1]):
        g = gate[t, i]
        out[t, i] = g / (np.float32(1.0) + math.exp(-g)) * up[t, i]


@njit(cache=True, nogil=True, parallel=True)
def _swiglu_parallel(gate, up, out):
    for t in prange(gate.shape[0]):
        _swiglu_row(gate, up, out, t)


@njit(cache=True, nogil=True)
def swiglu(gate, up, out):
    """out[t, i] = silu(gate[t, i]) * up[t, i].   gate, up, out: [n_tok, ffn_dim] (out may be gate).
    The one op here worth threads in a prompt (an exp per value): from PARALLEL_MIN_TOKENS tokens."""
    if gate.shape[0] >= PARALLEL_MIN_TOKENS:
        _swiglu_parallel(gate, up, out)
    else:
        for t in range(gate.shape[0]):
            _swiglu_row(gate, up, out, t)


@njit(cache=True, nogil=True)
def add_inplace(x, y):
    """x += y.   x, y: [n_tok, dim]."""
    n_tok, dim = x.shape
    for t in range(n_tok):
        for i in range(dim):
            x[t, i] += y[t, i]


@njit(cache=True, nogil=True)
def add_bias(x, bias):
    """x[t] += bias for every row.   x: [n_tok, dim]; bias: [dim]."""
    n_tok, dim = x.shape
    for t in range(n_tok):
        for i in range(dim):
            x[t, i] += bias[i]
