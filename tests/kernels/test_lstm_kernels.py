"""kernels/lstm.py pieces against NumPy: the serial matrix product (F32, F16, Q8_0 blocks, row and
token tails), the branch-free exp / sigmoid / tanh, and one cell step."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from numba import njit

from lmengine.kernels.lstm import exp_f32, lstm_cell, matmul_serial, sigmoid, tanh_f32

TYPES = {"F32": 0, "F16": 1, "Q8_0": 8}


def encode(w: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return w.astype(np.float32).view(np.uint8).reshape(-1)
    if type_name == "F16":
        return w.astype(np.float16).view(np.uint8).reshape(-1)
    return gguf_quantize(w, GGMLQuantizationType.Q8_0).reshape(-1)


@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("n_rows,n_tok", [(37, 1), (64, 7), (5, 4)])
def test_matmul_serial_matches_numpy(type_name, n_rows, n_tok):
    rng = np.random.default_rng(n_rows + n_tok)
    w = rng.normal(0, 1, (n_rows, 64)).astype(np.float32)
    x = rng.normal(0, 1, (n_tok, 64)).astype(np.float32)
    raw = encode(w, type_name)
    dequantized = gguf_dequantize(raw.reshape(n_rows, -1), GGMLQuantizationType[type_name]).reshape(n_rows, 64)
    out = np.empty((n_tok, n_rows), dtype=np.float32)
    matmul_serial(raw, TYPES[type_name], n_rows, 64, x, out)
    # float32 sums of 64 products of magnitude ~1: summation order moves the result by ~1e-6.
    np.testing.assert_allclose(out, x.astype(np.float64) @ dequantized.T.astype(np.float64), rtol=0, atol=2e-5)


def test_matmul_serial_checks_its_arguments():
    with pytest.raises(ValueError, match="n_rows rows"):
        matmul_serial(np.zeros(10, np.uint8), 0, 4, 4, np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="x must be"):
        matmul_serial(np.zeros(64, np.uint8), 0, 4, 4, np.zeros((1, 5), np.float32), np.zeros((1, 4), np.float32))


@njit
def _apply(x, e, s, t):
    for i in range(x.size):
        e[i] = exp_f32(x[i])
        s[i] = sigmoid(x[i])
        t[i] = tanh_f32(x[i])


def test_exp_sigmoid_tanh_accuracy():
    x = np.concatenate([np.linspace(-100, 100, 400001), np.linspace(-1e-3, 1e-3, 2001),
                        [0.0, 1e-30, -1e-30, np.inf, -np.inf]]).astype(np.float32)
    e, s, t = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    _apply(x, e, s, t)
    x64 = x.astype(np.float64)
    inside = (x64 > -87.0) & (x64 < 88.0)
    # Cephes expf: relative error below 2e-7 (about 2 ulp) where e^x is a normal float32.
    assert np.max(np.abs(e[inside] / np.exp(x64[inside]) - 1)) < 2e-7
    # sigmoid and tanh in [-1, 1]: absolute error of a few float32 ulps of 1.
    with np.errstate(over="ignore"):
        assert np.max(np.abs(s - 1 / (1 + np.exp(-x64)))) < 2e-7
    assert np.max(np.abs(t - np.tanh(x64))) < 2e-7
    assert s[-2] == 1.0 and t[-2] == 1.0 and t[-1] == -1.0 and s[-1] < 1e-37


def test_cell_matches_numpy():
    rng = np.random.default_rng(0)
    hidden = 37
    gates_x, gates_h = rng.normal(0, 2, (2, 4 * hidden)).astype(np.float32)
    c0 = rng.normal(0, 1, hidden).astype(np.float32)
    g = (gates_x + gates_h).astype(np.float64)
    sig = lambda v: 1 / (1 + np.exp(-v))   # noqa: E731
    i, f, gg, o = sig(g[:hidden]), sig(g[hidden:2 * hidden]), np.tanh(g[2 * hidden:3 * hidden]), sig(g[3 * hidden:])
    c_expected = f * c0 + i * gg
    h_expected = o * np.tanh(c_expected)
    h, c = np.zeros(hidden, np.float32), c0.copy()
    lstm_cell(gates_x.copy(), gates_h, hidden, h, c)
    np.testing.assert_allclose(c, c_expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(h, h_expected, rtol=0, atol=1e-6)
