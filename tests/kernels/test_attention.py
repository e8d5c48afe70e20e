"""Attention over the KV cache (kernels/attention.py, kernels/csrc/attention.c) against a float64
NumPy softmax attention, on every path: the C kernel on every SIMD path this CPU has (portable C
for any head size; AVX2 for head sizes that are multiples of 8; AVX-512 for 32, 64, 128), and the
Numba loop (the reference, and the fallback without the extension or with non-contiguous rows).

Both cache element types are covered: float32, and f16 (stored as uint16 bits). With f16 the
reference takes the keys and values rounded to f16 by NumPy, so the kernels are held to the same
tolerance: the f16 -> float32 conversion is exact, and only the rounding at the store (checked
bit for bit against NumPy's float16) differs from float32.

Tolerance: 1e-5 absolute on outputs of size ~1 (values are N(0, 1), so the output, a convex
combination of value rows, is bounded by them). float32 rounding of a 128-term dot product,
a softmax over up to 300 positions and a weighted sum of 300 rows stays below ~1e-6; the
AVX-512 kernel's polynomial exp has a relative error of ~2e-7.
"""
import math

import numpy as np
import pytest

from lmengine.kernels import native
from lmengine.kernels.attention import KEY_TILE, KV_DTYPES, attention, cache_shapes, write_kv

TOLERANCE = 1e-5


def reference(q, keys, values, n_heads, n_kv_heads, head_dim, position):
    """float64 causal GQA for one token: q [n_heads*head_dim], keys/values [n_kv_heads, n_ctx, head_dim]."""
    group = n_heads // n_kv_heads
    out = np.empty(n_heads * head_dim)
    for h in range(n_heads):
        k = keys[h // group, :position + 1].astype(np.float64)
        v = values[h // group, :position + 1].astype(np.float64)
        scores = k @ q[h * head_dim:(h + 1) * head_dim].astype(np.float64) / math.sqrt(head_dim)
        w = np.exp(scores - scores.max())
        out[h * head_dim:(h + 1) * head_dim] = (w / w.sum()) @ v
    return out


NAN = {"f32": np.float32(np.nan), "f16": np.float16(np.nan).view(np.uint16)}


def filled_cache(rng, n_slots, n_kv_heads, n_ctx, head_dim, slot, kv_dtype="f32"):
    """Caches of element type kv_dtype with random keys/values for every position of `slot`
    (through write_kv), and the same keys/values as plain arrays [n_kv_heads, n_ctx, head_dim]
    (rounded to f16 by NumPy when the cache holds f16)."""
    k_shape, v_shape = cache_shapes(1, n_slots, n_kv_heads, n_ctx, head_dim)
    dtype = KV_DTYPES[kv_dtype]
    k_cache = np.full(k_shape[1:], NAN[kv_dtype], dtype=dtype)   # unwritten positions must not matter
    v_cache = np.full(v_shape[1:], NAN[kv_dtype], dtype=dtype)
    keys = rng.standard_normal((n_kv_heads, n_ctx, head_dim)).astype(np.float32)
    values = rng.standard_normal((n_kv_heads, n_ctx, head_dim)).astype(np.float32)
    positions = np.arange(n_ctx)
    write_kv(keys.transpose(1, 0, 2).reshape(n_ctx, -1).copy(), values.transpose(1, 0, 2).reshape(n_ctx, -1).copy(),
             np.full(n_ctx, slot), positions, n_kv_heads, head_dim, k_cache, v_cache)
    if kv_dtype == "f16":
        keys, values = keys.astype(np.float16).astype(np.float32), values.astype(np.float16).astype(np.float32)
    return k_cache, v_cache, keys, values


def paths():
    """(name, isa to force) for every attention path of this machine; isa None: the Numba loop."""
    found = [("numba", None)]
    if native.HAVE_NATIVE:
        found += [(f"c-{native.ISA_NAMES[isa]}", isa) for isa in native.available_isas()]
    return found


@pytest.fixture(params=paths(), ids=lambda p: p[0])
def path(request):
    if request.param[1] is not None:
        native.set_isa(request.param[1])
    yield request.param[0]
    if request.param[1] is not None:
        native.set_isa(None)


def rows_for(path, shape):
    """A float32 array of `shape` whose rows are contiguous for the C paths, and strided (every
    other element of a wider array) for the Numba path: `attention` and `write_kv` pass rows to C
    only when they are contiguous."""
    if path == "numba":
        return np.zeros(shape[:-1] + (2 * shape[-1],), dtype=np.float32)[..., ::2]
    return np.zeros(shape, dtype=np.float32)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads", [(64, 9, 3), (32, 4, 4), (128, 8, 2), (48, 6, 1),
                                                         (64, 14, 2)])
def test_attention_matches_float64(path, head_dim, n_heads, n_kv_heads, kv_dtype):
    rng = np.random.default_rng(head_dim + n_heads)
    n_ctx = 40 if head_dim == 128 else 300      # not a multiple of 16: the last tile is partial
    k_cache, v_cache, keys, values = filled_cache(rng, 2, n_kv_heads, n_ctx, head_dim, slot=1, kv_dtype=kv_dtype)
    positions = np.array([0, 1, 15, 16, 17, 31, 39] + ([200, n_ctx - 1] if n_ctx > 40 else []))
    q = rng.standard_normal((len(positions), n_heads * head_dim)).astype(np.float32)
    out = rows_for(path, q.shape)
    attention(q, k_cache, v_cache, np.ones(len(positions), dtype=np.int64), positions, n_heads, n_kv_heads,
              head_dim, out)
    for t, p in enumerate(positions):
        expected = reference(q[t], keys, values, n_heads, n_kv_heads, head_dim, p)
        assert np.abs(out[t] - expected).max() <= TOLERANCE, (path, head_dim, p)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_batch_of_slots_equals_one_by_one(kv_dtype):
    """Tokens of several slots in one call give bit-identical results to one call each."""
    rng = np.random.default_rng(1)
    head_dim, n_heads, n_kv_heads, n_ctx = 64, 9, 3, 64
    k_shape, v_shape = cache_shapes(1, 4, n_kv_heads, n_ctx, head_dim)
    k_cache = rng.standard_normal(k_shape[1:]).astype(np.float32)
    v_cache = rng.standard_normal(v_shape[1:]).astype(np.float32)
    if kv_dtype == "f16":
        k_cache, v_cache = k_cache.astype(np.float16).view(np.uint16), v_cache.astype(np.float16).view(np.uint16)
    slots, positions = np.array([3, 0, 2, 1]), np.array([63, 0, 17, 33])
    q = rng.standard_normal((4, n_heads * head_dim)).astype(np.float32)
    together = np.empty_like(q)
    attention(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, together)
    for t in range(4):
        alone = np.empty((1, q.shape[1]), dtype=np.float32)
        attention(q[t:t + 1].copy(), k_cache, v_cache, slots[t:t + 1], positions[t:t + 1], n_heads, n_kv_heads,
                  head_dim, alone)
        assert np.array_equal(alone[0], together[t])


def test_cache_layout():
    """write_kv puts position p's key at tile p // 16, lane p % 16, transposed; values by row."""
    k_shape, v_shape = cache_shapes(2, 3, 2, 40, 8)
    assert k_shape == (2, 3, 2, 3, 8, KEY_TILE) and v_shape == (2, 3, 2, 48, 8)
    k_cache, v_cache = np.zeros(k_shape[1:], np.float32), np.zeros(v_shape[1:], np.float32)
    k = np.arange(16, dtype=np.float32).reshape(1, 16)
    write_kv(k, -k, np.array([2]), np.array([37]), 2, 8, k_cache, v_cache)
    assert np.array_equal(k_cache[2, 1, 2, :, 5], k[0, 8:])
    assert np.array_equal(v_cache[2, 0, 37], -k[0, :8])
    assert np.count_nonzero(k_cache) == 15 and np.count_nonzero(v_cache) == 15   # (k[0, 0] is 0)


def test_f16_store_rounds_as_numpy(path):
    """write_kv into an f16 cache stores NumPy's float16 bits (round to nearest even): normal
    values, ties, subnormals, overflow to inf, signed zeros, inf; NaN stays NaN."""
    rng = np.random.default_rng(7)
    head_dim = 64
    special = np.array([0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, np.inf, -np.inf, 6e-8, 3e-8, 2.98e-8,
                        1e-5, -1e-5, 6.1035e-05, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2049.0, 2051.0],
                       dtype=np.float32)
    x = (rng.standard_normal(4 * head_dim) * np.exp(rng.uniform(-20, 12, 4 * head_dim))).astype(np.float32)
    x[:special.size] = special
    x[-1] = np.nan
    k = rows_for(path, (4, head_dim))              # four tokens, one kv head
    k[:] = x.reshape(4, head_dim)
    k_shape, v_shape = cache_shapes(1, 1, 1, 16, head_dim)
    k_cache, v_cache = np.zeros(k_shape[1:], np.uint16), np.zeros(v_shape[1:], np.uint16)
    write_kv(k, k, np.zeros(4, np.int64), np.arange(4), 1, head_dim, k_cache, v_cache)
    with np.errstate(over="ignore"):               # 65520 and 1e6 overflow to inf, as they should
        expected = k.astype(np.float16).view(np.uint16)
    stored_v = v_cache[0, 0, :4]
    stored_k = k_cache[0, 0, 0, :, :4].T
    nan = np.isnan(k)
    for stored in (stored_k, stored_v):
        assert np.array_equal(stored[~nan], expected[~nan])
        assert np.isnan(stored[nan].view(np.float16)).all()


@pytest.mark.skipif(not native.HAVE_NATIVE, reason="the C extension is not loaded")
def test_c_kernel_rejects_bad_arguments(isa):
    """lme_attention checks shapes and lengths (never reads past a buffer) on every path, and does
    any head size."""
    ffi, lib = native.ffi, native.lib
    f = lambda a: ffi.from_buffer("float[]", a)   # noqa: E731
    q, out = np.zeros(2 * 64, np.float32), np.zeros(2 * 64, np.float32)
    keys, values, scores = np.zeros(32 * 64, np.float32), np.zeros(20 * 64, np.float32), np.zeros(64, np.float32)

    def call(n_pos=20, group=2, head_dim=64, keys=keys, scores=scores, values=values, kv_type=0, first_pos=0,
             cap=0.0):
        return lib.lme_attention(kv_type, f(q), q.size, group, head_dim, f(keys), keys.size, f(values),
                                 values.size, n_pos, first_pos, cap, f(scores), scores.size, f(out), out.size)
    assert call(n_pos=0) == -3 and call(group=0) == -3 and call(head_dim=-1) == -3
    assert call(group=2 ** 62) == -3 and call(n_pos=2 ** 60) == -3      # sizes that overflow int64
    assert call(kv_type=2) == -2                      # neither F32 (0) nor F16 (1)
    assert call(n_pos=21) == -5                       # values hold 20 positions
    assert call(keys=keys[:16 * 64]) == -5            # 20 positions need two key tiles
    assert call(scores=scores[:32]) == -5             # two heads need two rows of 32 scores
    assert call(group=3) == -5                        # q holds two heads
    assert call(first_pos=-1) == -3 and call(first_pos=20) == -3      # the window holds no position
    assert call(cap=-1.0) == -3 and call(cap=math.inf) == -3 and call(cap=math.nan) == -3
    assert call() == 0
    assert call(first_pos=19, cap=50.0) == 0
    assert call(kv_type=1) == 0                       # f16: lengths count elements
    assert call(head_dim=48) == 0 and call(head_dim=20) == 0     # any head size
