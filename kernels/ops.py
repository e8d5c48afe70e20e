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
def rope_angles(positions, inv_freq, mscale=1.0):
    """cos, sin float32 [n_tok, rope_dim // 2] of the angles positions[t] * inv_freq[i] (computed
    in float64), times mscale (YaRN's / long-rope's attention factor: it scales the rotated dims
    only), shared by q and k of every layer."""
    n_tok, half = positions.shape[0], inv_freq.shape[0]
    cos = np.empty((n_tok, half), dtype=np.float32)
    sin = np.empty((n_tok, half), dtype=np.float32)
    for t in range(n_tok):
        for i in range(half):
            angle = positions[t] * inv_freq[i]
            cos[t, i] = math.cos(angle) * mscale
            sin[t, i] = math.sin(angle) * mscale
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
def softmax_rows(s, sums):
    """s[r] = exp(s[r] - max(s[r])) in place and sums[r] = the sum of the new s[r], every row: a
    softmax before its division (attention divides its output rows instead). s: float32
    [n_rows, n_cols], C-contiguous, a finite value in every row (-inf entries give 0);
    sums: float32 [n_rows]. The C kernel when the extension is loaded (SIMD exp: within float
    rounding of this loop, see ops.c), else this loop (expf)."""
    n_rows, n_cols = s.shape
    if n_rows == 0:
        return
    if (s.strides[1] == 4 and s.strides[0] == 4 * n_cols and sums.strides[0] == 4
            and native.c_softmax_rows(s, n_cols, sums) == 0):
        return                                              # the C kernel did it
    for r in range(n_rows):
        best = np.float32(-np.inf)
        for j in range(n_cols):
            best = max(best, s[r, j])
        total = np.float32(0.0)
        for j in range(n_cols):
            e = np.float32(math.exp(s[r, j] - best))
            s[r, j] = e
            total += e
        sums[r] = total


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


@njit(cache=True, nogil=True)
def geglu(gate, up, out):
    """out[t, i] = gelu_tanh(gate[t, i]) * up[t, i] (GeGLU, gemma's feed-forward; gelu_tanh is
    0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3), HF's "gelu_pytorch_tanh").
    gate, up, out: [n_tok, ffn_dim] (out may be gate).

    Computed as g / (1 + exp(-2 z)), the same function (0.5 (1 + tanh z) is the logistic of 2z):
    expf is about 4.6x faster here than tanhf (70 against 320 us for one token's 8192 values on
    the AVX2 dev machine, 2026-12-05), and the two forms differ by float rounding (~1e-7
    relative). Large |g| stays finite: exp overflows to inf (out -> -0) or underflows to 0 (out
    -> g * up)."""
    c2 = np.float32(-2.0 * math.sqrt(2.0 / math.pi))
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + math.exp(c2 * (g + np.float32(0.044715) * g * g * g))) * up[t, i]


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def head_rmsnorm(x, weight, n_heads, head_dim, eps):
    """RMSNorm of every head of x [n_tok, n_heads*head_dim] in place, by weight [head_dim]
    (qwen3's and gemma3's q/k norms)."""
    for t in range(x.shape[0]):
        for h in range(n_heads):
            base = h * head_dim
            ss = np.float32(0.0)
            for i in range(head_dim):
                ss += x[t, base + i] * x[t, base + i]
            scale = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
            for i in range(head_dim):
                x[t, base + i] = (x[t, base + i] * scale) * weight[i]


@njit(cache=True, nogil=True)
def softcap(x, cap):
    """x = cap * tanh(x / cap) in place (gemma2's final logit soft-capping).   x: [n, m]."""
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] = np.float32(cap * math.tanh(x[t, i] / cap))


# -- RoPE frequencies with the scalings GGUF files state (plain NumPy: computed once at load) ------

def rope_frequencies(rope_dim: int, base: float, scaling: str = "none", factor: float = 1.0,
                     freq_factors=None, orig_ctx: int = 0, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> np.ndarray:
    """float64 [rope_dim // 2]: the angle per position of each rotated pair, base^(-2i/rope_dim)
    with the model's scaling applied:

    - freq_factors [rope_dim // 2] (GGUF tensor rope_freqs.weight: Llama 3's scaling as
      llama.cpp's converter precomputes it; rope_factors_long/short of phi3): divide each frequency;
    - "linear" (position interpolation): divide every frequency by `factor`;
    - "yarn": NTK-by-parts as HF's `_compute_yarn_parameters` (pairs rotating more than beta_fast
      times over `orig_ctx` keep their frequency, fewer than beta_slow are interpolated by
      `factor`, a linear ramp between). Its attention factor is `yarn_attention_factor`.
    """
    inv_freq = 1.0 / base ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "yarn":
        def correction_dim(n_rot):     # the pair index that rotates n_rot times over orig_ctx
            return rope_dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extrapolation = 1.0 - ramp      # 1: keep the frequency, 0: interpolate it
        inv_freq = inv_freq / factor * (1.0 - extrapolation) + inv_freq * extrapolation
    elif scaling != "none":
        raise ValueError(f"unknown rope scaling {scaling!r} (none, linear, yarn)")
    return inv_freq


def yarn_attention_factor(factor: float) -> float:
    """YaRN's scale of cos and sin (so of every attention score, squared): 0.1 ln(factor) + 1."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0
