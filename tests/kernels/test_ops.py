"""Elementwise kernels of the forward pass (kernels/ops.py, kernels/matmul.py's activation quantizer;
their C paths in kernels/csrc/ops.c) against float64 NumPy, on every path: the Numba loops (the
references, and the fallback without the extension or with non-contiguous rows) and the C kernels
on every SIMD path this CPU has.

Tolerances: swiglu 1e-6 relative to max(1, |result|) -- float32 rounding plus the exp's relative
error (expf, or AVX-512's vector exp: ~2e-7), through one division and two products; rmsnorm 1e-6
relative (a float32 sum of 576 squares, reassociated). The quantizer and rope: the same bits on
every path (the C kernels perform the loops' float operations, each rounded once).
"""
import numpy as np
import pytest

from lmengine.kernels import native
from lmengine.kernels.ops import rmsnorm, swiglu


NUMBA = "numba"   # a path: the Numba loop (the C kernels take only contiguous rows)


def isas():
    """Every path: NUMBA, then each SIMD path of the C kernels this CPU has."""
    return [NUMBA] + (native.available_isas() if native.HAVE_NATIVE else [])


def strided(a):
    """A copy of a with non-contiguous rows (every other element of a wider array)."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n_tok,ffn_dim", [(1, 1536), (3, 17), (9, 64), (20, 100)])
def test_swiglu_matches_float64(isa, n_tok, ffn_dim):
    rng = np.random.default_rng(ffn_dim)
    gate_up = (rng.standard_normal((n_tok, 2 * ffn_dim)) * 8).astype(np.float32)   # exp far into both tails
    gate_up[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    gate, up = gate_up[:, :ffn_dim], gate_up[:, ffn_dim:]          # views, as the forward passes them
    out = np.full((n_tok, ffn_dim), np.nan, dtype=np.float32)
    if isa == NUMBA:
        out = strided(out)
    else:
        native.set_isa(isa)
    try:
        swiglu(gate, up, out)
    finally:
        if isa != NUMBA:
            native.set_isa(None)
    g, u = gate.astype(np.float64), up.astype(np.float64)
    expected = g / (1 + np.exp(-g)) * u
    assert np.all(np.abs(out - expected) <= 1e-6 * np.maximum(1, np.abs(expected)))


def test_rmsnorm_matches_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 576)).astype(np.float32) * 3
    weight = rng.standard_normal(576).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm(x, weight, 1e-5, out)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5) * weight
    assert np.all(np.abs(out - expected) <= 1e-6 * np.maximum(1, np.abs(expected)))


@pytest.mark.skipif(not native.HAVE_NATIVE, reason="the C extension is not loaded")
@pytest.mark.parametrize("n_tok,n_cols", [(1, 576), (3, 1536), (9, 64), (20, 32)])
def test_activation_quantization_is_the_same_on_every_path(n_tok, n_cols):
    """The C quantizer on every path gives the Numba loop's bits exactly, one term and two,
    including all-zero blocks and values spanning five orders of magnitude."""
    from lmengine.kernels.matmul import _quantize_row_numba, quantize_activations, quantize_activations_x2
    rng = np.random.default_rng(n_cols)
    x = (rng.standard_normal((n_tok, n_cols)) * rng.choice([1e-3, 1, 50], (n_tok, n_cols))).astype(np.float32)
    x[0, :32] = 0
    first = [np.empty((n_tok, n_cols), np.int8), np.empty((n_tok, n_cols // 32), np.float32),
             np.empty((n_tok, n_cols // 32), np.float32)]
    second = [np.empty_like(a) for a in first]
    for t in range(n_tok):                                    # the Numba loop, row by row
        _quantize_row_numba(x[t], first[0][t], first[1][t], first[2][t])
        residual = x[t] - np.repeat(first[1][t], 32) * first[0][t].astype(np.float32)
        _quantize_row_numba(residual, second[0][t], second[1][t], second[2][t])
    expected = {1: first, 2: [np.concatenate([a, b]) for a, b in zip(first, second)]}
    for n_terms, quantize in ((1, quantize_activations), (2, quantize_activations_x2)):
        for isa in native.available_isas():
            native.set_isa(isa)
            try:
                got = quantize(x)
            finally:
                native.set_isa(None)
            for a, b in zip(got, expected[n_terms], strict=True):
                np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_heads,head_dim,rope_dim", [(9, 64, 64), (3, 64, 64), (2, 128, 128), (4, 48, 32),
                                                       (2, 80, 36)])
def test_rope_matches_float64_and_is_the_same_on_every_path(neox, n_heads, head_dim, rope_dim):
    """rope against a float64 rotation (1e-6 relative to the row's scale: one rounded product
    pair and sum per value), and bit-identical on every path (the C kernels keep the loop's
    roundings), on a view as the forward passes it (q inside the q|k|v array)."""
    from lmengine.kernels.ops import rope, rope_angles, rope_inv_freq
    rng = np.random.default_rng(n_heads * head_dim + rope_dim)
    n_tok, width = 5, n_heads * head_dim
    positions = np.array([0, 1, 17, 300, 4095])
    cos, sin = rope_angles(positions, rope_inv_freq(rope_dim, 10000.0))
    qkv = rng.standard_normal((n_tok, width + 24)).astype(np.float32) * 4
    results = []
    for isa in isas():
        x = qkv.copy()[:, :width]
        if isa != NUMBA:
            native.set_isa(isa)
        try:
            if isa == NUMBA:                       # non-contiguous cos, sin rows: the Numba loop
                rope(x, strided(cos), strided(sin), n_heads, head_dim, rope_dim, neox)
            else:
                rope(x, cos, sin, n_heads, head_dim, rope_dim, neox)
        finally:
            if isa != NUMBA:
                native.set_isa(None)
        results.append(x)
    for other in results[1:]:
        assert np.array_equal(other, results[0])
    x64 = qkv[:, :width].astype(np.float64).reshape(n_tok, n_heads, head_dim)
    angles = positions[:, None] * rope_inv_freq(rope_dim, 10000.0)[None, :]       # [n_tok, rope_dim/2]
    c, s = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = rope_dim // 2
    a = np.arange(half) if neox else 2 * np.arange(half)
    b = a + half if neox else a + 1
    expected = x64.copy()
    expected[:, :, a] = x64[:, :, a] * c - x64[:, :, b] * s
    expected[:, :, b] = x64[:, :, a] * s + x64[:, :, b] * c
    assert np.abs(results[0].reshape(n_tok, n_heads, head_dim) - expected).max() <= 1e-6 * np.abs(x64).max()
