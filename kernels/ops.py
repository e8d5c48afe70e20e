"""Small elementwise and row-wise kernels of the transformer forward pass.

All functions are Numba njit and work in place on float32 rows: x [n_tok, dim]. They are called
from the model's compiled forward (engine/models/llama.py), so their signatures use plain arrays
and scalars only. They run on one thread: each is a few microseconds of work per token, less than
the cost of waking a thread pool (the matrix products and attention are the parallel parts).
"""
import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight.   x, out: [n_tok, dim]; weight: [dim]."""
    n_tok, dim = x.shape
    for t in range(n_tok):
        ss = 0.0
        for i in range(dim):
            ss += x[t, i] * x[t, i]
        scale = 1.0 / math.sqrt(ss / dim + eps)
        for i in range(dim):
            out[t, i] = np.float32(x[t, i] * scale) * weight[i]


@njit(cache=True, nogil=True)
def rope_inv_freq(rope_dim, base):
    """theta_i = base^(-2i/rope_dim) for i in [0, rope_dim/2): float64 [rope_dim // 2]."""
    half = rope_dim // 2
    inv_freq = np.empty(half, dtype=np.float64)
    for i in range(half):
        inv_freq[i] = base ** (-2.0 * i / rope_dim)
    return inv_freq


@njit(cache=True, nogil=True)
def rope(x, positions, n_heads, head_dim, rope_dim, inv_freq, neox):
    """Rotate the first rope_dim dims of every head of x [n_tok, n_heads*head_dim] in place.

    neox=False (ggml "normal", llama GGUFs): pairs (2i, 2i+1) are rotated by positions[t]*inv_freq[i].
    neox=True  (qwen2, HF rotate_half):      pairs (i, i + rope_dim/2).
    """
    n_tok = x.shape[0]
    half = rope_dim // 2
    for t in range(n_tok):
        pos = positions[t]
        for i in range(half):
            angle = pos * inv_freq[i]
            c = np.float32(math.cos(angle))
            s = np.float32(math.sin(angle))
            for h in range(n_heads):
                base = h * head_dim
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
def swiglu(gate, up):
    """gate[t, i] = silu(gate[t, i]) * up[t, i] in place.   gate, up: [n_tok, ffn_dim]."""
    n_tok, n = gate.shape
    for t in range(n_tok):
        for i in range(n):
            g = gate[t, i]
            gate[t, i] = g / (np.float32(1.0) + math.exp(-g)) * up[t, i]


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
