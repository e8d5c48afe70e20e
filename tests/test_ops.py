"""Elementwise kernels of the forward pass (kernels/ops.py; swiglu's AVX-512 C path in
kernels/csrc/ops.c) against float64 NumPy, on every path this CPU has.

Tolerances: swiglu 1e-6 relative to max(1, |result|) -- float32 rounding plus the vector exp's
~2e-7 relative error, through one division and two products; rmsnorm 1e-6 relative (a float32
sum of 576 squares, reassociated).
"""
import numpy as np
import pytest

from kernels import native
from kernels.ops import rmsnorm, swiglu


def isas():
    return native.available_isas() if native.HAVE_NATIVE else [None]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("n_tok,ffn_dim", [(1, 1536), (3, 17), (9, 64), (20, 100)])
def test_swiglu_matches_float64(isa, n_tok, ffn_dim):
    rng = np.random.default_rng(ffn_dim)
    gate_up = (rng.standard_normal((n_tok, 2 * ffn_dim)) * 8).astype(np.float32)   # exp far into both tails
    gate_up[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    gate, up = gate_up[:, :ffn_dim], gate_up[:, ffn_dim:]          # views, as the forward passes them
    out = np.full((n_tok, ffn_dim), np.nan, dtype=np.float32)
    if isa is not None:
        native.set_isa(isa)
    try:
        swiglu(gate, up, out)
    finally:
        if isa is not None:
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
    """The C quantizer (AVX-512) gives the Numba loop's bits exactly, one term and two, including
    all-zero blocks and values spanning five orders of magnitude."""
    from kernels.matmul import quantize_activations, quantize_activations_x2
    rng = np.random.default_rng(n_cols)
    x = (rng.standard_normal((n_tok, n_cols)) * rng.choice([1e-3, 1, 50], (n_tok, n_cols))).astype(np.float32)
    x[0, :32] = 0
    for quantize in (quantize_activations, quantize_activations_x2):
        results = []
        for isa in native.available_isas():
            native.set_isa(isa)
            try:
                results.append(quantize(x))
            finally:
                native.set_isa(None)
        for other in results[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_heads,head_dim,rope_dim", [(9, 64, 64), (3, 64, 64), (2, 128, 128), (4, 48, 32),
                                                       (2, 80, 36)])
def test_rope_matches_float64_and_is_the_same_on_every_path(neox, n_heads, head_dim, rope_dim):
    """rope against a float64 rotation (1e-6 relative to the row's scale: one rounded product
    pair and sum per value), and bit-identical on every path (the C kernel keeps the loop's
    roundings), on a strided view as the forward passes it (q inside the q|k|v array)."""
    from kernels.ops import rope, rope_angles, rope_inv_freq
    rng = np.random.default_rng(n_heads * head_dim + rope_dim)
    n_tok, width = 5, n_heads * head_dim
    positions = np.array([0, 1, 17, 300, 4095])
    cos, sin = rope_angles(positions, rope_inv_freq(rope_dim, 10000.0))
    qkv = rng.standard_normal((n_tok, width + 24)).astype(np.float32) * 4
    results = []
    for isa in isas():
        x = qkv.copy()[:, :width]
        if isa is not None:
            native.set_isa(isa)
        try:
            rope(x, cos, sin, n_heads, head_dim, rope_dim, neox)
        finally:
            if isa is not None:
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
