"""K-quant weights times Q8_K activations: the Numba reference of kernels/csrc/kquants.c (API in
kquants.h), bit for bit.

Weight types (ggml ids): Q2_K 10, Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14, IQ4_XS 23. Each stores a
row in superblocks of 256 values (QK_K); `K_BLOCK_BYTES` gives the bytes per superblock and
kquants.c the byte layout of each. In integer form the weight of value i of a superblock is

    d * sc[s] * q[i] - dmin * mn[s]          s = i // 16 (the 16-value sub-block)

with q, sc, mn small integers and d, dmin the superblock's f16 scales (`decode_superblock`).

Activations, Q8_K (`quantize_q8k`): per token and 256 values, amax = max|x|, xd = amax / 127,
xq = rint(x * (1 / xd)) in [-127, 127] (ties to even; 0 when amax is 0; NaN -> 0), and
xsum[j] = sum of xq[16 j : 16 j + 16]. Three arrays, in the order the C function takes them:
xq int8 [n_tok, n_cols], xd float32 [n_tok, n_cols // 256], xsum int16 [n_tok, n_cols // 16].
(ggml's quantize_row_q8_K maps the value of largest magnitude to -128; here it maps to +-127,
as kernels/matmul.py does for 32-value blocks, so the AVX2 sign trick of IQ4_XS never meets
-128.)

Dot product of one weight row and one token, over superblocks b in order, float32:

    isum = sum_s sc[s] * sum_{i in s} q[i] * xq[i]        exact integers
    imin = sum_s mn[s] * xsum[s]                          (Q2_K, Q4_K, Q5_K)
    acc  = acc + (d * xd) * float32(isum)
    acc  = acc - (dmin * xd) * float32(imin)              (Q2_K, Q4_K, Q5_K)

No fused multiply-add (these functions never use fastmath), so the C kernel, built with
-ffp-contract=off, gives the same bits on every SIMD path.
"""
import numpy as np
from numba import njit, prange

from .quant import load_f16

QK_K = 256          # values per superblock / per Q8_K block
N_SUB = QK_K // 16  # 16-value sub-blocks per superblock (one xsum each)

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS = 10, 11, 12, 13, 14, 23
K_TYPES = (Q4_K, Q6_K, Q5_K, IQ4_XS, Q3_K, Q2_K)
K_TYPE_NAMES = {Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", IQ4_XS: "IQ4_XS"}
K_BLOCK_BYTES = {Q2_K: 84, Q3_K: 110, Q4_K: 144, Q5_K: 176, Q6_K: 210, IQ4_XS: 136}

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int32)    # IQ4_XS's 4-bit codebook (ggml's kvalues_iq4nl)


@njit(cache=True, nogil=True)
def k_block_bytes(w_type):
    """Bytes per superblock of a K type; 0 for any other type."""
    if w_type == Q2_K:
        return 84
    if w_type == Q3_K:
        return 110
    if w_type == Q4_K:
        return 144
    if w_type == Q5_K:
        return 176
    if w_type == Q6_K:
        return 210
    if w_type == IQ4_XS:
        return 136
    return 0


# -- Q8_K activations ------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _q8k_value(v):
    """xq of v = x * (1 / d): rounded to nearest even, NaN -> 0, clamped to [-127, 127]."""
    r = np.rint(v)
    if r != r:
        r = np.float32(0.0)
    r = max(r, np.float32(-127.0))
    r = min(r, np.float32(127.0))
    return np.int8(r)


@njit(cache=True, nogil=True)
def quantize_q8k_into(x, xq, xd, xsum):
    """x float32 [n_tok, n_cols] (n_cols a multiple of 256) -> xq, xd, xsum (see the module doc)."""
    n_tok, n_cols = x.shape
    if n_cols % QK_K != 0:
        raise ValueError("quantize_q8k: n_cols must be a multiple of 256")
    if (xq.shape[0] != n_tok or xq.shape[1] != n_cols or xd.shape[0] != n_tok or xd.shape[1] != n_cols // QK_K
            or xsum.shape[0] != n_tok or xsum.shape[1] != n_cols // 16):
        raise ValueError("quantize_q8k: xq/xd/xsum shapes do not match x")
    for t in range(n_tok):
        for b in range(n_cols // QK_K):
            o = b * QK_K
            amax = np.float32(0.0)
            for i in range(QK_K):
                a = abs(x[t, o + i])
                if a > amax:                      # a NaN is skipped
                    amax = a
            d = amax / np.float32(127.0)
            inv_d = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            xd[t, b] = d
            for i in range(QK_K):
                xq[t, o + i] = _q8k_value(x[t, o + i] * inv_d)
            for j in range(N_SUB):
                s = 0
                for i in range(16):
                    s += np.int32(xq[t, o + 16 * j + i])
                xsum[t, b * N_SUB + j] = s


@njit(cache=True, nogil=True)
def quantize_q8k(x):
    """(xq int8 [n_tok, n_cols], xd float32 [n_tok, n_cols // 256], xsum int16 [n_tok, n_cols // 16])."""
    n_tok, n_cols = x.shape
    xq = np.empty((n_tok, n_cols), dtype=np.int8)
    xd = np.empty((n_tok, n_cols // QK_K), dtype=np.float32)
    xsum = np.empty((n_tok, n_cols // 16), dtype=np.int16)
    quantize_q8k_into(x, xq, xd, xsum)
    return xq, xd, xsum


# -- one superblock in integer form ----------------------------------------------------------------

@njit(cache=True, nogil=True)
def _k4_scale_min(src, o, g):
    """Q4_K / Q5_K: the 6-bit scale and min of group g (32 values) from the 12 bytes at src[o:]:
    groups 0-3 in the low 6 bits of bytes g and g + 4; groups 4-7 in the nibbles of byte g + 4
    (low: scale, high: min) plus the top 2 bits of bytes g - 4 and g as bits 4-5."""
    if g < 4:
        return np.int32(src[o + g]) & 63, np.int32(src[o + g + 4]) & 63
    sc = (np.int32(src[o + g + 4]) & 15) | ((np.int32(src[o + g - 4]) >> 6) << 4)
    mn = (np.int32(src[o + g + 4]) >> 4) | ((np.int32(src[o + g]) >> 6) << 4)
    return sc, mn


@njit(cache=True, nogil=True)
def decode_superblock(w_type, src, o, q, sc, mn):
    """The superblock of type w_type at src[o:] (uint8) -> q int32 [256], sc int32 [16],
    mn int32 [16] (one per 16 values) and returns (d, dmin) float32: value i =
    d * sc[i // 16] * q[i] - dmin * mn[i // 16]."""
    dmin = np.float32(0.0)
    for s in range(N_SUB):
        mn[s] = 0
    if w_type == Q4_K or w_type == Q5_K:
        # [0] d | [2] dmin | [4:16] scales | Q5_K: [16:48] qh | qs (128 bytes)
        d, dmin = load_f16(src, o), load_f16(src, o + 2)
        qs = o + 16 if w_type == Q4_K else o + 48
        for g in range(8):
            c, m = _k4_scale_min(src, o + 4, g)
            sc[2 * g] = sc[2 * g + 1] = c
            mn[2 * g] = mn[2 * g + 1] = m
            for l in range(32):
                v = (np.int32(src[qs + 32 * (g // 2) + l]) >> (4 * (g % 2))) & 15
                if w_type == Q5_K:
                    v |= ((np.int32(src[o + 16 + l]) >> g) & 1) << 4
                q[32 * g + l] = v
    elif w_type == Q6_K:
        # [0:128] ql | [128:192] qh | [192:208] int8 scales | [208] d
        d = load_f16(src, o + 208)
        for s in range(N_SUB):
            v = np.int32(src[o + 192 + s])
            sc[s] = v - 256 if v >= 128 else v
        for h in range(2):                        # two halves of 128 values
            for l in range(32):
                ql0, ql1 = np.int32(src[o + 64 * h + l]), np.int32(src[o + 64 * h + 32 + l])
                qh = np.int32(src[o + 128 + 32 * h + l])
                q[128 * h + l] = ((ql0 & 15) | ((qh & 3) << 4)) - 32
                q[128 * h + 32 + l] = ((ql1 & 15) | (((qh >> 2) & 3) << 4)) - 32
                q[128 * h + 64 + l] = ((ql0 >> 4) | (((qh >> 4) & 3) << 4)) - 32
                q[128 * h + 96 + l] = ((ql1 >> 4) | (((qh >> 6) & 3) << 4)) - 32
    elif w_type == Q3_K:
        # [0:32] hmask | [32:96] qs | [96:108] scales | [108] d
        d = load_f16(src, o + 108)
        for s in range(N_SUB):
            low = np.int32(src[o + 96 + s % 8]) >> (4 * (s // 8)) & 15
            high = (np.int32(src[o + 104 + s % 4]) >> (2 * (s // 4))) & 3
            sc[s] = (low | (high << 4)) - 32
        for g in range(8):                        # 32 values: 2 bits of qs, 1 bit of hmask
            for l in range(32):
                low = (np.int32(src[o + 32 + 32 * (g // 4) + l]) >> (2 * (g % 4))) & 3
                high = (np.int32(src[o + l]) >> g) & 1
                q[32 * g + l] = (low | (high << 2)) - 4
    elif w_type == Q2_K:
        # [0:16] scales (low nibble scale, high nibble min) | [16:80] qs | [80] d | [82] dmin
        d, dmin = load_f16(src, o + 80), load_f16(src, o + 82)
        for s in range(N_SUB):
            sc[s] = np.int32(src[o + s]) & 15
            mn[s] = np.int32(src[o + s]) >> 4
        for g in range(8):
            for l in range(32):
                q[32 * g + l] = (np.int32(src[o + 16 + 32 * (g // 4) + l]) >> (2 * (g % 4))) & 3
    else:
        # IQ4_XS: [0] d | [2] scales_h u16 | [4:8] scales_l | [8:136] qs
        d = load_f16(src, o)
        high = np.int32(src[o + 2]) | (np.int32(src[o + 3]) << 8)
        for g in range(8):
            low = (np.int32(src[o + 4 + g // 2]) >> (4 * (g % 2))) & 15
            sc[2 * g] = sc[2 * g + 1] = (low | (((high >> (2 * g)) & 3) << 4)) - 32
            for l in range(16):
                byte = np.int32(src[o + 8 + 16 * g + l])
                q[32 * g + l] = KVALUES_IQ4NL[byte & 15]
                q[32 * g + 16 + l] = KVALUES_IQ4NL[byte >> 4]
    return d, dmin


@njit(cache=True, nogil=True)
def has_mins(w_type):
    return w_type == Q2_K or w_type == Q4_K or w_type == Q5_K


@njit(cache=True, nogil=True)
def _superblock_sums(q, sc, mn, xq, xo, xsum, so):
    """(isum, imin) of a decoded superblock with one token's block at xq[xo:], xsum[so:]."""
    isum = 0
    imin = 0
    for s in range(N_SUB):
        dot = 0
        for i in range(16):
            dot += q[16 * s + i] * np.int32(xq[xo + 16 * s + i])
        isum += np.int64(sc[s]) * dot
        imin += np.int64(mn[s]) * np.int64(xsum[so + s])
    return isum, imin


@njit(cache=True, nogil=True)
def _add_superblock(mins, acc, d, dmin, xd, isum, imin):
    acc = acc + (d * xd) * np.float32(isum)
    if mins:
        acc = acc - (dmin * xd) * np.float32(imin)
    return acc


# -- dot products ----------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def dot_k_q8k(w_type, w_row, n_cols, xq, xd, xsum):
    """float32 dot product of one weight row (uint8, n_cols // 256 superblocks of w_type) with
    one token's Q8_K activations xq int8 [n_cols], xd float32 [n_cols // 256], xsum int16
    [n_cols // 16]."""
    bytes_ = k_block_bytes(w_type)
    q = np.empty(QK_K, dtype=np.int32)
    sc = np.empty(N_SUB, dtype=np.int32)
    mn = np.empty(N_SUB, dtype=np.int32)
    mins = has_mins(w_type)
    acc = np.float32(0.0)
    for b in range(n_cols // QK_K):
        d, dmin = decode_superblock(w_type, w_row, b * bytes_, q, sc, mn)
        isum, imin = _superblock_sums(q, sc, mn, xq, b * QK_K, xsum, b * N_SUB)
        acc = _add_superblock(mins, acc, d, dmin, xd[b], isum, imin)
    return acc


@njit(cache=True, nogil=True, parallel=True)
def _matmul_k_rows(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out):
    row_bytes = n_cols // QK_K * k_block_bytes(w_type)
    n_tok = xq.shape[0]
    mins = has_mins(w_type)
    for r in prange(n_rows):
        w_row = w_u8[r * row_bytes:(r + 1) * row_bytes]
        q = np.empty(QK_K, dtype=np.int32)
        sc = np.empty(N_SUB, dtype=np.int32)
        mn = np.empty(N_SUB, dtype=np.int32)
        acc = np.zeros(n_tok, dtype=np.float32)
        for b in range(n_cols // QK_K):             # each superblock decoded once for all tokens
            d, dmin = decode_superblock(w_type, w_row, b * k_block_bytes(w_type), q, sc, mn)
            for t in range(n_tok):
                isum, imin = _superblock_sums(q, sc, mn, xq[t], b * QK_K, xsum[t], b * N_SUB)
                acc[t] = _add_superblock(mins, acc[t], d, dmin, xd[t, b], isum, imin)
        for t in range(n_tok):
            out[t, r] = acc[t]


@njit(cache=True, nogil=True)
def matmul_k_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out):
    """out float32 [n_tok, n_rows] = W . x for a K-quant matrix w_u8 (uint8, n_rows rows of
    n_cols // 256 superblocks) and Q8_K activations xq [n_tok, n_cols], xd [n_tok, n_cols // 256],
    xsum [n_tok, n_cols // 16] (as quantize_q8k returns them). Rows in parallel (prange)."""
    if k_block_bytes(w_type) == 0:
        raise ValueError("matmul_k_numba: w_type is not a K-quant type (10, 11, 12, 13, 14, 23)")
    if n_rows < 0 or n_cols <= 0 or n_cols % QK_K != 0:
        raise ValueError("matmul_k_numba: n_cols must be a positive multiple of 256")
    if w_u8.shape[0] < n_rows * (n_cols // QK_K) * k_block_bytes(w_type):
        raise ValueError("matmul_k_numba: w_u8 is shorter than n_rows rows")
    n_tok = xq.shape[0]
    if (xq.shape[1] != n_cols or xd.shape[0] != n_tok or xd.shape[1] != n_cols // QK_K
            or xsum.shape[0] != n_tok or xsum.shape[1] != n_cols // 16):
        raise ValueError("matmul_k_numba: xq/xd/xsum shapes do not match (n_tok, n_cols)")
    if out.shape[0] != n_tok or out.shape[1] != n_rows:
        raise ValueError("matmul_k_numba: out must be [n_tok, n_rows]")
    _matmul_k_rows(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out)
