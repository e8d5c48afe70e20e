"""The encoder forward's parts (engine/models/bert.py, linear.py) against float64 NumPy: attention
over a padded batch (sequence by sequence, over threads) and fused products (one GEMM for q|k|v,
or quantized parts one after another).

Tolerances: attention 1e-5 absolute (float32 scores of 16-wide dot products of O(1) values, a
softmax and a 16-row weighted sum: each ~1e-6 relative); the float fused product 1e-5 relative to
max |y| (float32 GEMM, 64-term sums, BLAS's blocking order); the quantized one equal to its parts,
bit for bit (the same kernel on the same rows)."""
import numpy as np
import pytest

from lmengine.models.bert import dense_attention
from lmengine.models.row_threads import RowThreads


def _reference(q, k, v, lengths, n_heads, causal):
    B, T, width = q.shape
    d = width // n_heads
    out = np.zeros((B, T, width))
    for b in range(B):
        n = lengths[b]
        for h in range(n_heads):
            cols = slice(h * d, (h + 1) * d)
            s = q[b, :n, cols].astype(np.float64) @ k[b, :n, cols].T.astype(np.float64) / np.sqrt(d)
            if causal:
                s[np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
            p = np.exp(s - s.max(1, keepdims=True))
            out[b, :n, cols] = (p / p.sum(1, keepdims=True)) @ v[b, :n, cols]
    return out.reshape(B * T, width)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_attention_matches_float64_with_padding(causal, n_threads):
    rng = np.random.default_rng(n_threads)
    B, T, n_heads, d = 5, 12, 3, 16
    lengths = np.array([12, 1, 7, 12, 3])
    qkv = rng.standard_normal((B, T, 3 * n_heads * d)).astype(np.float32)
    q, k, v = np.split(qkv, 3, axis=-1)             # column views of a fused product, as bert passes them
    rows = RowThreads(n_threads) if n_threads > 1 else None       # None: the caller's thread, BLAS limited here
    got = dense_attention(q, k, v, lengths, n_heads, causal, rows=rows)
    if rows is not None:
        rows.close()
    want = _reference(q, k, v, lengths, n_heads, causal)
    assert got.shape == (B * T, n_heads * d) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5
    padded = (np.arange(T)[None, :] >= lengths[:, None]).reshape(-1)
    assert np.all(got[padded] == 0)                   # padded rows: zeros, never NaN


def _gguf_with(tmp_path, tensors):
    import gguf

    from lmengine.converters.gguf_file import GGUFFile
    path = str(tmp_path / "parts.gguf")
    w = gguf.GGUFWriter(path, "bert")
    for name, (array, qtype) in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return GGUFFile(path)


@pytest.mark.parametrize("qtype_name", ["F32", "Q8_0"])
def test_fused_linear_equals_its_parts(tmp_path, qtype_name):
    import gguf

    from lmengine.models.linear import Linear
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    rng = np.random.default_rng(0)
    mats = {n: rng.standard_normal((rows, 64)).astype(np.float32) for n, rows in (("a", 32), ("b", 64), ("c", 32))}
    tensors = {n + ".weight": (m, qtype) for n, m in mats.items()}
    tensors.update({"a.bias": (rng.standard_normal(32).astype(np.float32), gguf.GGMLQuantizationType.F32),
                    "c.bias": (rng.standard_normal(32).astype(np.float32), gguf.GGMLQuantizationType.F32)})
    f = _gguf_with(tmp_path, tensors)
    parts = [Linear(f, "a.weight", 32, 64, "a.bias"), Linear(f, "b.weight", 64, 64), Linear(f, "c.weight", 32, 64, "c.bias")]
    fused = Linear.fused(parts)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    y = fused(x)
    separate = np.concatenate([p(x) for p in parts], axis=1)
    assert y.shape == (20, 128)
    if qtype_name == "F32":
        want = np.concatenate([x.astype(np.float64) @ m.T.astype(np.float64) for m in mats.values()], axis=1)
        want[:, :32] += tensors["a.bias"][0]
        want[:, 96:] += tensors["c.bias"][0]
        assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()
        np.testing.assert_allclose(y, separate, rtol=0, atol=1e-5 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(y, separate)
    residual = rng.standard_normal((20, 128)).astype(np.float32)
    expect = residual + y
    assert fused(x, residual=residual) is residual
    np.testing.assert_allclose(residual, expect, rtol=0, atol=1e-6 * np.abs(expect).max())
    no_bias = fused(x, add_bias=False)
    np.testing.assert_allclose(no_bias[:, :32], y[:, :32] - tensors["a.bias"][0], rtol=0, atol=1e-5 * np.abs(y).max())
