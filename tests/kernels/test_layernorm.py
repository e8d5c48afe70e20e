"""The encoder's elementwise kernels (kernels/layernorm.py) against float64 NumPy/math.

Tolerances: erf_f32 4.5e-7 absolute (the fit's stated bound, 4.4e-7, in float32 arithmetic; libm's
erff is ~1e-7); GELU-erf 1e-6 relative to max(1, |x|) (erf's error times 0.5 |x|, plus float32
rounding); GELU-tanh 1e-6 likewise (libm tanhf, a few ulp); LayerNorm 2e-6 relative to the
output's scale (float64 sums, one float32 rounding of each term); the adds exact (one float32 add
of float32 values, or two, compared with the same two in NumPy).
"""
import math

import numpy as np
import pytest

from lmengine.kernels.layernorm import (GELU_ERF, GELU_TANH, add_rows, add_rows_bias, bias_gelu, erf_f32, gelu,
                                         layernorm)


def _erf64(x):
    return np.vectorize(math.erf)(np.asarray(x, dtype=np.float64))


def test_erf_f32_within_its_bound_everywhere():
    from numba import njit

    @njit
    def erf_all(x, out):
        for i in range(x.shape[0]):
            out[i] = erf_f32(x[i])
    x = np.concatenate([np.linspace(-6, 6, 400_001), [0.0, -0.0, 1e-30, -1e-30, 3.9999, 4.0, 4.0001, 50.0, -1e30,
                                                          np.inf, -np.inf]]).astype(np.float32)
    out = np.empty_like(x)
    erf_all(x, out)
    assert np.abs(out - _erf64(x)).max() <= 4.5e-7
    assert np.all(np.abs(out) <= 1.0) and out[-2] == 1.0 and out[-1] == -1.0   # saturates, never overshoots
    assert np.array_equal(np.sign(out[x != 0]), np.sign(x[x != 0]))           # odd: no sign flips near 0


@pytest.mark.parametrize("form", [GELU_ERF, GELU_TANH])
@pytest.mark.parametrize("n_tok,dim", [(1, 7), (5, 33), (40, 1536)])   # below and above PARALLEL_MIN_TOKENS
def test_bias_gelu_matches_float64(form, n_tok, dim):
    rng = np.random.default_rng(dim + form)
    x = (rng.standard_normal((n_tok, dim)) * 4).astype(np.float32)
    x[0, :3] = [0.0, 30.0, -30.0][:min(3, dim)]
    bias = rng.standard_normal(dim).astype(np.float32)
    v = (x + bias).astype(np.float64)                 # the float32 sum, as the kernel forms it
    if form == GELU_ERF:
        want = 0.5 * v * (1 + _erf64(v / math.sqrt(2)))
    else:
        want = 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    got = x.copy()
    bias_gelu(got, bias, form)
    assert np.all(np.abs(got - want) <= 1e-6 * np.maximum(1, np.abs(v)))
    plain = (x + bias).copy()
    gelu(plain, form)                                 # gelu == bias_gelu with a zero bias
    np.testing.assert_array_equal(plain, got)


@pytest.mark.parametrize("n_tok", [1, 64])
def test_layernorm_matches_float64(n_tok):
    rng = np.random.default_rng(n_tok)
    x = (rng.standard_normal((n_tok, 384)) * 3 + 5).astype(np.float32)     # an offset mean, as residuals have
    w, b = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-12) * w + b
    out = np.empty_like(x)
    layernorm(x, w, b, 1e-12, out)
    assert np.abs(out - want).max() <= 2e-6 * np.abs(want).max()
    layernorm(x, w, b, 1e-12, x)                      # in place: the same values
    np.testing.assert_array_equal(x, out)


def test_residual_adds_exact():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 20, 48)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    a = x.copy()
    add_rows(a, y)
    np.testing.assert_array_equal(a, x + y)
    b = x.copy()
    add_rows_bias(b, y, bias)
    np.testing.assert_array_equal(b, x + (y + bias))
