"""K-quant products (kernels/csrc/kquants.c, Numba reference lmengine.kernels.kquant): Q2_K,
Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS weights times Q8_K activations.

Weights: the gguf package cannot quantize these types, so the blocks are random bytes with
finite random f16 scales written into their d / dmin fields (every bit pattern of the packed
scales and quants is a valid block); the gguf package's `dequantize` is the independent decoder.

Checks and tolerances (u = 2**-24, the float32 unit roundoff):
* Q8_K quantization: Numba and C (each SIMD path) equal a NumPy reference exactly.
* Numba dot vs float64 `gguf.dequantize(W) @ (xd * xq)`: the kernel's integer sums are exact;
  per superblock it rounds d*xd, float(isum) and their product (and the same for the mins
  term), then adds 2 terms per superblock to a float32 accumulator; the gguf reference rounds
  each weight up to 3 times in float32. So |out - ref| <= (2 nb + 8) u M, nb superblocks per
  row, M = sum_i (|d sc_i q_i| + |dmin mn_i|) |x_i| (the two parts of each weight, obtained from
  gguf with dmin, resp. d, set to 0), plus 1e-30.
* C (every SIMD path) vs Numba: bit for bit (no tolerance). Both form the same exact integer
  sums and do the same float32 operations in the same order per superblock.
* Batch invariance: a (row, token) result is bitwise the same whatever the batch and row range.
* Argument checks: bad type, shapes, ranges, NULL pointers and short buffers give the LME_ERR_*
  codes and leave the outputs untouched.

The C functions come from the `kq` fixture: the extension lmengine.kernels._native, called through cffi.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from checks import random_blocks

from lmengine.kernels import kquant as kq_ref
from lmengine.kernels import native
from lmengine.kernels.kquant import IQ4_XS, K_BLOCK_BYTES, K_TYPES, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, QK_K

U = 2.0 ** -24
OK, ERR_NULL, ERR_TYPE, ERR_SHAPE, ERR_RANGE, ERR_LENGTH = 0, -1, -2, -3, -4, -5
ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2
ISA_NAMES = {ISA_SCALAR: "scalar", ISA_AVX2: "avx2", ISA_AVX512: "avx512"}

# -- the C functions under test ------------------------------------------------------------------

class KFunctions:
    """The C API of kquants.h (ffi, lib) and the ISA selection of the module that holds it."""

    def __init__(self, ffi, lib):
        self.ffi, self.lib = ffi, lib

    def isas(self):
        return [isa for isa in ISA_NAMES if isa <= self.lib.lme_best_isa()]

    def set_isa(self, isa):
        assert self.lib.lme_set_isa(-1 if isa is None else isa) == 0

    def quantize(self, x, xq=None, xd=None, xsum=None):
        """lme_quantize_q8k on x [n_tok, n_cols]: (rc, xq, xd, xsum)."""
        n_tok, n_cols = x.shape
        xq = np.full((n_tok, n_cols), 99, np.int8) if xq is None else xq
        xd = np.full((n_tok, max(n_cols // QK_K, 1)), -1, np.float32) if xd is None else xd
        xsum = np.full((n_tok, max(n_cols // 16, 1)), 9999, np.int16) if xsum is None else xsum
        f = self.ffi.from_buffer
        rc = self.lib.lme_quantize_q8k(f("float[]", x), x.size, n_tok, n_cols, f("int8_t[]", xq), xq.size,
                                       f("float[]", xd), xd.size, f("int16_t[]", xsum), xsum.size)
        return rc, xq, xd, xsum

    def matmul(self, w_type, w, n_rows, n_cols, xq, xd, xsum, row_begin=0, row_end=None, out=None, n_tok=None):
        """lme_matmul_k: (rc, out [n_tok, n_rows]); out starts as NaN unless given."""
        n_tok = xq.shape[0] if n_tok is None else n_tok
        row_end = n_rows if row_end is None else row_end
        out = np.full((n_tok, n_rows), np.nan, np.float32) if out is None else out
        f = self.ffi.from_buffer
        rc = self.lib.lme_matmul_k(w_type, f("uint8_t[]", w), w.size, n_rows, n_cols, row_begin, row_end,
                                   f("int8_t[]", xq), xq.size, f("float[]", xd), xd.size,
                                   f("int16_t[]", xsum), xsum.size, n_tok,
                                   f("float[]", out, require_writable=True), out.size)
        return rc, out


@pytest.fixture(scope="session")
def kq():
    if not native.HAVE_NATIVE:
        pytest.skip(f"the C extension is not loaded: {native.LOAD_ERROR}")
    return KFunctions(native.ffi, native.lib)


@pytest.fixture(params=list(ISA_NAMES), ids=list(ISA_NAMES.values()))
def kisa(request, kq):
    """Force one SIMD path of the module holding the K kernels; skip paths this CPU lacks."""
    if request.param not in kq.isas():
        pytest.skip(f"CPU lacks {ISA_NAMES[request.param]}")
    kq.set_isa(request.param)
    yield request.param
    kq.set_isa(None)


# -- inputs and references ----------------------------------------------------------------------

F16_FIELDS = {Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,), Q3_K: (108,), Q2_K: (80, 82), IQ4_XS: (0,)}
HAS_MINS = {Q2_K, Q4_K, Q5_K}


def make_k_weights(w_type, n_rows, n_cols, seed, spread=True):
    """Random blocks (uint8 [n_rows * row_bytes]) with finite f16 scales (checks.random_blocks)."""
    return random_blocks(n_rows * n_cols // QK_K, K_BLOCK_BYTES[w_type], F16_FIELDS[w_type], seed, spread)


def make_x(n_tok, n_cols, seed):
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    x[:, :QK_K] *= 30.0                               # superblocks of different scales
    if n_cols >= 2 * QK_K:
        x[:, QK_K:QK_K + 16] *= 1e-3
        x[0, QK_K:2 * QK_K] = 0.0                     # an all-zero superblock (scale 0)
    return x


def gguf_dense(w_type, raw, n_rows, n_cols, zero_field=None):
    """float64 [n_rows, n_cols] from gguf's dequantize; zero_field: an f16 offset set to 0 first."""
    blocks = raw.reshape(-1, K_BLOCK_BYTES[w_type]).copy()
    if zero_field is not None:
        blocks[:, zero_field:zero_field + 2] = 0
    dense = gguf_dequantize(blocks, GGMLQuantizationType(w_type))
    return dense.astype(np.float64).reshape(n_rows, n_cols)


def ref_dot(w_type, raw, n_rows, n_cols, xq, xd):
    """(float64 reference [n_tok, n_rows], error bound [n_tok, n_rows]) as in the module doc."""
    x = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), QK_K, axis=1)
    ref = x @ gguf_dense(w_type, raw, n_rows, n_cols).T
    if w_type in HAS_MINS:
        d_field, dmin_field = F16_FIELDS[w_type]
        magnitude = (np.abs(gguf_dense(w_type, raw, n_rows, n_cols, zero_field=dmin_field))
                     + np.abs(gguf_dense(w_type, raw, n_rows, n_cols, zero_field=d_field)))
    else:
        magnitude = np.abs(gguf_dense(w_type, raw, n_rows, n_cols))
    nb = n_cols // QK_K
    return ref, (2 * nb + 8) * U * (np.abs(x) @ magnitude.T) + 1e-30


def ref_quantize_q8k(x):
    """NumPy Q8_K: per 256 values d = max|x| / 127 (NaN skipped), q = rint(x * (1/d)) clipped to
    [-127, 127] (NaN -> 0), sums of 16."""
    n_tok, n_cols = x.shape
    blocks = x.reshape(n_tok, n_cols // QK_K, QK_K)
    magnitude = np.abs(blocks)
    amax = np.where(np.isnan(magnitude), np.float32(0.0), magnitude).max(axis=-1).astype(np.float32)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_d = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
        q = np.rint(blocks * inv_d[..., None])
    q = np.clip(np.nan_to_num(q, nan=0.0, posinf=127.0, neginf=-127.0), -127, 127).astype(np.int8)
    sums = q.reshape(n_tok, n_cols // 16, 16).astype(np.int64).sum(axis=-1).astype(np.int16)
    return q.reshape(n_tok, n_cols), d, sums


# -- Q8_K quantization -------------------------------------------------------------------------------

def _special_x():
    x = make_x(3, 4 * QK_K, seed=5)
    x[1, 0] = np.nan                                   # skipped by max, quantized to 0
    x[1, QK_K + 3] = np.inf                            # a block whose scale is inf: all 0
    x[2, 2 * QK_K:3 * QK_K] = np.float32(1e-42)        # subnormal block
    x[2, 3 * QK_K:] = np.round(x[2, 3 * QK_K:] * 4) / 4    # many ties after scaling
    x[2, 3 * QK_K] = 127.0
    return x


@pytest.mark.parametrize("n_tok,n_cols", [(1, 256), (3, 1024), (5, 2304)])
def test_quantize_q8k_matches_numpy(kq, kisa, n_tok, n_cols):
    x = make_x(n_tok, n_cols, seed=n_cols) if n_tok != 3 else _special_x()
    want = ref_quantize_q8k(x)
    got_numba = kq_ref.quantize_q8k(x)
    rc, *got_c = kq.quantize(x)
    assert rc == OK
    for w, n, c in zip(want, got_numba, got_c):
        np.testing.assert_array_equal(n, w)
        np.testing.assert_array_equal(c, w)
    assert np.abs(got_c[0]).max() <= 127


# -- products ------------------------------------------------------------------------------------

SIZES = [(1, 256, 1), (7, 512, 3), (13, 2304, 6), (3, 4096, 9)]   # (n_rows, n_cols, n_tok)


@pytest.mark.parametrize("w_type", K_TYPES, ids=[kq_ref.K_TYPE_NAMES[t] for t in K_TYPES])
@pytest.mark.parametrize("n_rows,n_cols,n_tok", SIZES)
def test_numba_dot_matches_gguf_float64(w_type, n_rows, n_cols, n_tok):
    raw = make_k_weights(w_type, n_rows, n_cols, seed=w_type * 100 + n_cols)
    xq, xd, xsum = kq_ref.quantize_q8k(make_x(n_tok, n_cols, seed=n_rows))
    ref, bound = ref_dot(w_type, raw, n_rows, n_cols, xq, xd)

    out = np.full((n_tok, n_rows), np.nan, np.float32)
    kq_ref.matmul_k_numba(raw, w_type, n_rows, n_cols, xq, xd, xsum, out)
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"max err {err.max()}, bound there {bound.flat[np.argmax(err - bound)]}"

    # the row function computes the same bits as the matrix loop
    def dot_row(w_row, n, xq_t, xd_t, xsum_t):
        return kq_ref.dot_k_q8k(w_type, w_row, n, xq_t, xd_t, xsum_t)
    row_bytes = n_cols // QK_K * K_BLOCK_BYTES[w_type]
    for r in range(n_rows):
        for t in range(n_tok):
            assert dot_row(raw[r * row_bytes:(r + 1) * row_bytes], n_cols, xq[t], xd[t], xsum[t]) == out[t, r]


def test_bound_is_far_below_a_layout_error():
    """With realistic scales (similar d, dmin in every superblock), reading the two halves of one
    group of 32 bytes in swapped order -- in a single superblock of a 16-superblock row -- moves
    every result by many times the tolerance."""
    w_type, n_rows, n_cols = Q4_K, 6, 4096
    raw = make_k_weights(w_type, n_rows, n_cols, seed=1, spread=False)
    xq, xd, _ = kq_ref.quantize_q8k(make_x(1, n_cols, seed=2))
    ref, bound = ref_dot(w_type, raw, n_rows, n_cols, xq, xd)
    wrong = raw.reshape(n_rows, n_cols // QK_K, K_BLOCK_BYTES[w_type]).copy()
    qs = wrong[:, 5, 16:48]                          # superblock 5: the bytes of groups 0 and 1
    wrong[:, 5, 16:48] = (qs >> 4) | (qs << 4)       # low and high nibbles exchanged
    wrong_ref, _ = ref_dot(w_type, wrong.reshape(-1), n_rows, n_cols, xq, xd)
    assert np.all(np.abs(wrong_ref - ref) > 10 * bound)


@pytest.mark.parametrize("w_type", K_TYPES, ids=[kq_ref.K_TYPE_NAMES[t] for t in K_TYPES])
@pytest.mark.parametrize("n_rows,n_cols,n_tok", SIZES + [(40, 768, 17)])
def test_c_matches_numba_bit_for_bit(kq, kisa, w_type, n_rows, n_cols, n_tok):
    raw = make_k_weights(w_type, n_rows, n_cols, seed=w_type * 7 + n_tok)
    xq, xd, xsum = kq_ref.quantize_q8k(make_x(n_tok, n_cols, seed=n_cols))
    want = np.empty((n_tok, n_rows), np.float32)
    kq_ref.matmul_k_numba(raw, w_type, n_rows, n_cols, xq, xd, xsum, want)
    rc, out = kq.matmul(w_type, raw, n_rows, n_cols, xq, xd, xsum)
    assert rc == OK
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("w_type", K_TYPES, ids=[kq_ref.K_TYPE_NAMES[t] for t in K_TYPES])
def test_token_result_does_not_depend_on_its_batch(kq, kisa, w_type):
    """Exact: each token alone, the whole batch, batches of every size 1..9 at every offset, and
    row sub-ranges all give the same bits (plus a large row so that tiles hold one row)."""
    for n_rows, n_cols, n_all in ((11, 1280, 9), (3, 24576, 5)):
        raw = make_k_weights(w_type, n_rows, n_cols, seed=n_cols + w_type)
        xq, xd, xsum = kq_ref.quantize_q8k(make_x(n_all, n_cols, seed=3))
        rc, full = kq.matmul(w_type, raw, n_rows, n_cols, xq, xd, xsum)
        assert rc == OK
        for n in range(1, n_all + 1):
            for t0 in range(0, n_all - n + 1, max(1, n // 2)):
                rc, part = kq.matmul(w_type, raw, n_rows, n_cols, xq[t0:t0 + n].copy(), xd[t0:t0 + n].copy(),
                                     xsum[t0:t0 + n].copy())
                assert rc == OK
                np.testing.assert_array_equal(part, full[t0:t0 + n])
        out = np.full_like(full, np.nan)
        for r0, r1 in ((0, 1), (1, n_rows - 1), (n_rows - 1, n_rows)):
            rc, _ = kq.matmul(w_type, raw, n_rows, n_cols, xq, xd, xsum, r0, r1, out=out)
            assert rc == OK
        np.testing.assert_array_equal(out, full)


def test_row_range_writes_exactly_its_rows(kq, kisa):
    n_rows, n_cols, n_tok = 9, 512, 3
    raw = make_k_weights(Q4_K, n_rows, n_cols, seed=4)
    xq, xd, xsum = kq_ref.quantize_q8k(make_x(n_tok, n_cols, seed=4))
    rc, out = kq.matmul(Q4_K, raw, n_rows, n_cols, xq, xd, xsum, 2, 5)
    assert rc == OK
    assert np.all(np.isnan(out[:, :2])) and np.all(np.isnan(out[:, 5:])) and not np.any(np.isnan(out[:, 2:5]))


@pytest.mark.parametrize("w_type", K_TYPES, ids=[kq_ref.K_TYPE_NAMES[t] for t in K_TYPES])
def test_non_finite_scales_do_not_crash_and_match_numba(kq, kisa, w_type):
    n_rows, n_cols = 4, 512
    raw = make_k_weights(w_type, n_rows, n_cols, seed=9).reshape(-1, K_BLOCK_BYTES[w_type])
    raw[0, F16_FIELDS[w_type][0]:F16_FIELDS[w_type][0] + 2] = np.array([np.inf], np.float16).view(np.uint8)
    raw[3, F16_FIELDS[w_type][-1]:F16_FIELDS[w_type][-1] + 2] = np.array([np.nan], np.float16).view(np.uint8)
    raw = raw.reshape(-1)
    xq, xd, xsum = kq_ref.quantize_q8k(make_x(2, n_cols, seed=9))
    want = np.empty((2, n_rows), np.float32)
    kq_ref.matmul_k_numba(raw, w_type, n_rows, n_cols, xq, xd, xsum, want)
    rc, out = kq.matmul(w_type, raw, n_rows, n_cols, xq, xd, xsum)
    assert rc == OK
    np.testing.assert_array_equal(out, want)
    assert not np.all(np.isfinite(out[:, 0])) and np.all(np.isfinite(out[:, 2]))


# -- argument checks -------------------------------------------------------------------------------

def test_matmul_k_argument_checks(kq):
    n_rows, n_cols, n_tok = 3, 512, 2
    raw = make_k_weights(Q6_K, n_rows, n_cols, seed=1)
    xq, xd, xsum = kq_ref.quantize_q8k(make_x(n_tok, n_cols, seed=1))
    rc, out = kq.matmul(Q6_K, raw, n_rows, n_cols, xq, xd, xsum)
    assert rc == OK

    def call(**changes):
        args = dict(w_type=Q6_K, w=raw, n_rows=n_rows, n_cols=n_cols, xq=xq, xd=xd, xsum=xsum)
        args.update(changes)
        sentinel = np.full((n_tok, n_rows), -7.0, np.float32)
        rc, out = kq.matmul(args.pop("w_type"), args.pop("w"), args.pop("n_rows"), args.pop("n_cols"),
                            args.pop("xq"), args.pop("xd"), args.pop("xsum"), out=sentinel, **args)
        if rc != OK:
            assert np.all(out == -7.0), "an output was written although the call failed"
        return rc

    for bad_type in (0, 2, 3, 8, 9, 15, 16, 22, 24, 99, -1):
        assert call(w_type=bad_type) == ERR_TYPE
    for bad_cols in (0, -256, 255, 300, 528):
        assert call(n_cols=bad_cols) == ERR_SHAPE
    assert call(n_rows=-1, row_end=0) == ERR_SHAPE
    assert call(n_tok=-1) == ERR_SHAPE
    assert call(n_rows=1 << 62) == ERR_SHAPE                   # row bytes * n_rows overflows
    assert call(row_begin=-1) == ERR_RANGE
    assert call(row_begin=2, row_end=1) == ERR_RANGE
    assert call(row_end=n_rows + 1) == ERR_RANGE
    assert call(w=raw[:-1]) == ERR_LENGTH
    assert call(xq=xq[:, :-1].copy()) == ERR_LENGTH
    assert call(xd=xd[:, :-1].copy()) == ERR_LENGTH
    assert call(xsum=xsum[:, :-1].copy()) == ERR_LENGTH
    assert call(n_rows=n_rows + 1, row_end=n_rows) == ERR_LENGTH   # w too short for 4 rows
    assert call(row_begin=1, row_end=1) == OK                 # empty tile: nothing to do
    assert call(n_tok=0) == OK

    out = np.zeros((n_tok, n_rows), np.float32)
    f, null = kq.ffi.from_buffer, kq.ffi.NULL
    lib = kq.lib
    good = dict(w=f("uint8_t[]", raw), xq=f("int8_t[]", xq), xd=f("float[]", xd), xsum=f("int16_t[]", xsum),
                out=f("float[]", out, require_writable=True))
    for missing in good:
        p = dict(good, **{missing: null})
        rc = lib.lme_matmul_k(Q6_K, p["w"], raw.size, n_rows, n_cols, 0, n_rows, p["xq"], xq.size, p["xd"], xd.size,
                              p["xsum"], xsum.size, n_tok, p["out"], out.size)
        assert rc == ERR_NULL, missing
    rc = lib.lme_matmul_k(Q6_K, good["w"], raw.size, n_rows, n_cols, 0, n_rows, good["xq"], xq.size, good["xd"],
                          xd.size, good["xsum"], xsum.size, n_tok, good["out"], out.size - 1)
    assert rc == ERR_LENGTH


def test_quantize_q8k_argument_checks(kq):
    x = make_x(2, 512, seed=3)
    for bad_cols in (0, 100, 255, 528):
        rc, xq, _, _ = kq.quantize(np.zeros((2, bad_cols), np.float32) if bad_cols > 0 else x[:, :0].copy())
        assert rc == ERR_SHAPE
    for short in ("xq", "xd", "xsum"):
        bufs = dict(xq=np.full((2, 512), 99, np.int8), xd=np.full((2, 2), -1, np.float32),
                    xsum=np.full((2, 32), 9999, np.int16))
        bufs[short] = bufs[short][:, :-1].copy()
        before = {k: v.copy() for k, v in bufs.items()}
        rc, *_ = kq.quantize(x, **bufs)
        assert rc == ERR_LENGTH
        for k in bufs:
            np.testing.assert_array_equal(bufs[k], before[k])
    f, null = kq.ffi.from_buffer, kq.ffi.NULL
    xq, xd, xsum = np.empty((2, 512), np.int8), np.empty((2, 2), np.float32), np.empty((2, 32), np.int16)
    assert kq.lib.lme_quantize_q8k(f("float[]", x), x.size - 1, 2, 512, f("int8_t[]", xq), xq.size,
                                   f("float[]", xd), xd.size, f("int16_t[]", xsum), xsum.size) == ERR_LENGTH
    assert kq.lib.lme_quantize_q8k(null, x.size, 2, 512, f("int8_t[]", xq), xq.size,
                                   f("float[]", xd), xd.size, f("int16_t[]", xsum), xsum.size) == ERR_NULL
    assert kq.lib.lme_quantize_q8k(f("float[]", x), x.size, 2, 512, null, xq.size,
                                   f("float[]", xd), xd.size, f("int16_t[]", xsum), xsum.size) == ERR_NULL
    assert kq.lib.lme_quantize_q8k(f("float[]", x), x.size, -1, 512, f("int8_t[]", xq), xq.size,
                                   f("float[]", xd), xd.size, f("int16_t[]", xsum), xsum.size) == ERR_SHAPE
