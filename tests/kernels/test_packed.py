"""The 16-row packed layout of Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / IQ4_XS matrices
(kernels/csrc/packed.c) and its int8 product `lme_matmul_packed`: the layout against an independent NumPy decoder, the product on
every SIMD path against the Numba reference on the raw blocks (32-value types) and against float64
NumPy, batch invariance, row ranges, argument checks, and the model with pack=True against
pack=False. The NumPy decoder of ggml's Q4_K / Q5_K / Q6_K / IQ4_XS blocks is itself checked against
the gguf package's dequantization.

Tolerances (u = 2**-24, the float32 unit roundoff). The block sums isum = sum(u_i * xq_i) are
exact int32 in every implementation (|isum| <= 255 * 127 * 32 < 2**24, so even its conversion to
float32 is exact); only the float32 rounding of the scale products and of the accumulation over
blocks differs. With the packed arithmetic (packed.c: acc += isum * (d * xd) per block and term,
then acc += m * (xs_0 [+ xs_1])), one (row, token) result is a float32 sum of
n_blocks * (n_terms + 1) terms, each rounded at most twice before it is added, so by the standard
bound on recursive summation

    |packed - exact| <= K * u * S,   K = n_blocks * (n_terms + 1) + 5,
    S = sum over blocks b and terms j of |d_b * xd_bj * isum_bj| + |m_b * xs_bj|

(S computed in float64 from the data, in the packed form w = d * u + m with u unsigned: for Q8_0
u = q + 128 and m = -128 d, so S is the size of the terms the kernel really adds, which cancel;
for Q4_K / Q5_K, per group of 32 values, d = d_sb * sc and m = -dmin_sb * mn, exact in float32; for
Q6_K u = sc_s * q (signed), d = d_sb, m = 0; for IQ4_XS u = the codebook value, d = d_sb (sc - 32),
m = 0;
the +5 covers the rounding of d * xd, of m * xs, of xs itself against xd * sum(xq), of the sum of
two terms' xs and the final add of the two terms' results in the reference). The Numba reference
`matmul_q8_numba` obeys the same bound (its terms, in the signed form, are no larger), so packed
and Numba differ by at most 2 K u S. A layout or indexing bug is off by whole weight * activation
products, orders of magnitude more.

The model with pack=True against pack=False: see LOGIT_TOLERANCE (the int8 quantizer between
products turns float-order differences into occasional whole rounding steps).
"""
import numpy as np
import pytest

from lmengine.kernels import matmul as mm
from lmengine.kernels import native
from lmengine.kernels.quant import F16, F32, IQ4_XS, Q3_K, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, QK, QK_K, quantize

pytestmark = pytest.mark.skipif(not native.HAVE_NATIVE,
                                reason=f"the C extension lmengine.kernels._native is not loaded: {native.LOAD_ERROR}")

U = 2.0 ** -24
Q8_TYPES = (Q8_0, Q4_0, Q4_1)                        # the 32-value types
K_TYPES = (Q4_K, Q5_K, Q6_K, IQ4_XS)                 # packed per 256-value superblock
PACKED_TYPES = Q8_TYPES + K_TYPES
TYPE_IDS = {Q8_0: "q8_0", Q4_0: "q4_0", Q4_1: "q4_1", Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k", IQ4_XS: "iq4_xs"}
GROUP = 16
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18, Q4_1: 20}          # ggml bytes per 32-value block
GROUP_BLOCK_BYTES = {Q4_1: 320, Q4_0: 288, Q8_0: 544}  # packed bytes per 16 rows x 32 columns (packed.c)
K_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210, IQ4_XS: 136}              # ggml bytes per superblock
K_GROUP_BYTES = {Q4_K: 2368, Q5_K: 2880, Q6_K: 3360, IQ4_XS: 2208}    # packed, per 16 rows x 256 columns
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])
ROW_COUNTS = (1, 15, 16, 17, 37, 100)
COL_COUNTS = (32, 64, 576)
ERR_NULL, ERR_TYPE, ERR_SHAPE, ERR_RANGE, ERR_LENGTH = -1, -2, -3, -4, -5


# -- data --------------------------------------------------------------------------------------------

def make_raw(w_type, n_rows, n_cols, seed):
    """uint8 raw ggml blocks of a random (n_rows, n_cols) matrix: `quantize` of normal values with
    blocks of different scales, and every third row's value bytes replaced by random bytes (every
    nibble and every int8 value including -128, with that row's real scales)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w *= np.exp(rng.uniform(-3, 1, (n_rows, n_cols // QK))).repeat(QK, axis=1).astype(np.float32)
    if w_type in K_TYPES:  # every third row's scale, min and value bytes random (every code), d kept
        blocks = quantize(w_type, w).reshape(n_rows, n_cols // QK_K, K_BYTES[w_type])
        kept = {Q6_K: slice(0, 208), IQ4_XS: slice(2, None)}.get(w_type, slice(4, None))
        blocks[::3, :, kept] = rng.integers(0, 256, blocks[::3, :, kept].shape, dtype=np.uint8)
        return np.ascontiguousarray(blocks).reshape(-1)
    blocks = quantize(w_type, w).reshape(n_rows, n_cols // QK, BLOCK_BYTES[w_type])
    first_value = 4 if w_type == Q4_1 else 2
    noisy = blocks[::3, :, first_value:]
    blocks[::3, :, first_value:] = rng.integers(0, 256, noisy.shape, dtype=np.uint8)
    return np.ascontiguousarray(blocks).reshape(-1)


def make_x(n_tok, n_cols, seed):
    """float32 activations with a small-scale block, an all-zero block (scale 0) and a saturating
    block (every xq = +-127, the largest block sums)."""
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    if n_cols >= 64:
        x[:, 32:64] *= 0.01
    if n_cols >= 96:
        x[0, 64:96] = 0.0
    x[-1, :32] = np.where(rng.random(32) < 0.5, -3.0, 3.0)
    return x


def quantize_x(x, n_terms):
    """(xq, xd, xs) of x in n_terms int8 terms: term j of token t in row j * n_tok + t."""
    return mm.quantize_activations(x) if n_terms == 1 else mm.quantize_activations_x2(x)


def take_tokens(xq, xd, xs, tokens, n_terms):
    """The activations of a sub-batch `tokens` (in that order), in the same term-major layout."""
    n_all = xq.shape[0] // n_terms
    rows = np.concatenate([j * n_all + np.asarray(tokens) for j in range(n_terms)])
    return xq[rows].copy(), xd[rows].copy(), xs[rows].copy()


# -- independent NumPy decoder of the packed layout ----------------------------------------------------

def split_packed(packed, w_type, n_rows, n_cols):
    """(d, m, values) as stored, per row (padded to whole groups) and block:
    d, m uint8 [n_groups * 16, n_blocks, 2] (f16 bytes; m None unless Q4_1), values uint8
    [n_groups * 16, n_blocks, 16 or 32] in ggml byte order (Q8_0 still as q + 128).

    Layout (packed.c): per group of 16 rows, per 32-column block, d f16 x 16 | m f16 x 16 (Q4_1) |
    chunks of 64 bytes, chunk k = bytes 4k..4k+3 of each of the 16 rows (row r at offset 4r)."""
    n_groups, n_blocks = -(-n_rows // GROUP), n_cols // QK
    g = packed.reshape(n_groups, n_blocks, GROUP_BLOCK_BYTES[w_type])

    def per_row(a, width):  # [group, block, 16 * width] -> [group * 16, block, width]
        return a.reshape(n_groups, n_blocks, GROUP, width).transpose(0, 2, 1, 3).reshape(
            n_groups * GROUP, n_blocks, width)

    d = per_row(g[:, :, :32], 2)
    m = per_row(g[:, :, 32:64], 2) if w_type == Q4_1 else None
    start = 64 if w_type == Q4_1 else 32
    n_chunks = (g.shape[2] - start) // 64
    chunks = g[:, :, start:].reshape(n_groups, n_blocks, n_chunks, GROUP, 4)
    values = chunks.transpose(0, 3, 1, 2, 4).reshape(n_groups * GROUP, n_blocks, n_chunks * 4)
    return d, m, values


def unpack(packed, w_type, n_rows, n_cols):
    """The raw ggml blocks uint8 [n_rows, n_blocks, block_bytes] that `packed` encodes."""
    d, m, values = split_packed(packed, w_type, n_rows, n_cols)
    if w_type == Q8_0:
        values = values ^ np.uint8(0x80)
    fields = [d] + ([m] if m is not None else []) + [values]
    return np.concatenate(fields, axis=2)[:n_rows]


def k_form(raw, w_type, n_rows, n_cols):
    """unsigned_form of raw Q4_K / Q5_K superblocks (ggml's layout, read here with NumPy: d, dmin
    f16; 12 bytes s of 6-bit scales and mins, group j < 4: sc = s[j] & 63, mn = s[j + 4] & 63,
    j >= 4: sc = s[j + 4] & 15 | (s[j - 4] >> 6) << 4, mn = s[j + 4] >> 4 | (s[j] >> 6) << 4;
    Q5_K: 32 bytes qh; 128 bytes qs: group g's value l = nibble g % 2 of qs[32 (g / 2) + l], and
    for Q5_K bit g of qh[l] its bit 4); per 32-value group d = d_sb sc, m = -dmin_sb mn. Q6_K:
    q6_k_form."""
    if w_type == Q6_K:
        return q6_k_form(raw, n_rows, n_cols)
    if w_type == IQ4_XS:
        return iq4_xs_form(raw, n_rows, n_cols)
    b = raw.reshape(n_rows, n_cols // QK_K, K_BYTES[w_type])
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    dmin = b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    s = b[:, :, 4:16].astype(np.int64)
    sc = np.concatenate([s[:, :, 0:4] & 63, (s[:, :, 8:12] & 15) | ((s[:, :, 0:4] >> 6) << 4)], axis=2)
    mn = np.concatenate([s[:, :, 4:8] & 63, (s[:, :, 8:12] >> 4) | ((s[:, :, 4:8] >> 6) << 4)], axis=2)
    qs = b[:, :, -128:].reshape(n_rows, -1, 4, 32).astype(np.int64)        # [row, sb, pair, l]
    u = np.stack([qs & 15, qs >> 4], axis=3)                                 # [row, sb, pair, nibble, l]
    u = u.reshape(n_rows, n_cols // QK_K, 8, QK)                             # group g = 2 pair + nibble
    if w_type == Q5_K:
        qh = b[:, :, 16:48].astype(np.int64)                                 # [row, sb, l]
        u = u | ((qh[:, :, None, :] >> np.arange(8)[None, None, :, None]) & 1) << 4
    u = u.reshape(n_rows, n_cols // QK, QK)
    return u, (d[:, :, None] * sc).reshape(n_rows, -1), (-dmin[:, :, None] * mn).reshape(n_rows, -1)


def q6_k_form(raw, n_rows, n_cols):
    """k_form of raw Q6_K superblocks (ggml's layout, read here with NumPy: ql[128] | qh[64] |
    int8 scales[16] | f16 d; value 128 n + 32 k + l: low 4 bits nibble k // 2 of
    ql[64 n + 32 (k % 2) + l], top 2 bits bits 2k, 2k + 1 of qh[32 n + l], minus 32; scale
    scales[value // 16]): u = scale * q (signed), d = d_sb, m = 0 per 32-value group."""
    b = raw.reshape(n_rows, n_cols // QK_K, 210)
    ql = b[:, :, :128].reshape(n_rows, -1, 2, 2, 32).astype(np.int64)    # [row, sb, n, k % 2, l]
    qh = b[:, :, 128:192].reshape(n_rows, -1, 2, 1, 32).astype(np.int64)  # [row, sb, n, 1, l]
    low = np.concatenate([ql & 15, ql >> 4], axis=3)                       # [row, sb, n, k, l]
    top = (qh >> (2 * np.arange(4))[None, None, None, :, None]) & 3
    q = (low | top << 4) - 32
    scale = b[:, :, 192:208].copy().view(np.int8).astype(np.int64).repeat(16, axis=2)
    u = q.reshape(n_rows, -1, QK_K) * scale
    d = b[:, :, 208:210].copy().view(np.float16)[:, :, 0].astype(np.float64)
    d = d.repeat(QK_K // QK, axis=1)
    return u.reshape(n_rows, n_cols // QK, QK), d, np.zeros_like(d)


def iq4_xs_form(raw, n_rows, n_cols):
    """k_form of raw IQ4_XS superblocks (ggml's layout, read here with NumPy: f16 d | u16 scales_h |
    scales_l[4] | qs[128]; group g's value l = KVALUES_IQ4NL[nibble l // 16 of qs[16 g + l % 16]],
    its scale (nibble g % 2 of scales_l[g // 2]) | (bits 2g, 2g + 1 of scales_h) << 4, minus 32):
    u = the codebook value (signed), d = d_sb (scale - 32), m = 0 per 32-value group."""
    b = raw.reshape(n_rows, n_cols // QK_K, 136)
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    scales_h = b[:, :, 2:4].copy().view(np.uint16)[:, :, 0].astype(np.int64)
    scales_l = b[:, :, 4:8].astype(np.int64)
    g = np.arange(8)
    scale = ((scales_l[:, :, g // 2] >> (4 * (g % 2))) & 15) | ((scales_h[:, :, None] >> (2 * g)) & 3) << 4
    qs = b[:, :, 8:].reshape(n_rows, -1, 8, 16).astype(np.int64)
    u = KVALUES_IQ4NL[np.concatenate([qs & 15, qs >> 4], axis=3)]
    d = (d[:, :, None] * (scale - 32)).reshape(n_rows, -1)
    return u.reshape(n_rows, n_cols // QK, QK), d, np.zeros_like(d)


def iq4_xs_packed_form(packed, n_rows, n_cols):
    """(u, d, m) as iq4_xs_form, read from the packed layout with NumPy (packed.c, struct
    iq4_header: per group of 16 rows and superblock: d f16 x 16 | int8 scale - 32 [8 groups][16
    rows] | per group 4 nibble chunks as Q4_1's)."""
    n_groups, n_sb = -(-n_rows // GROUP), n_cols // QK_K
    g = packed.reshape(n_groups, n_sb, K_GROUP_BYTES[IQ4_XS])
    d = g[:, :, 0:32].copy().view(np.float16).astype(np.float64)            # [group, sb, row]
    sc = g[:, :, 32:160].copy().view(np.int8).reshape(n_groups, n_sb, 8, GROUP).astype(np.float64)
    chunks = g[:, :, 160:].reshape(n_groups, n_sb, 8, 4, GROUP, 4).transpose(0, 4, 1, 2, 3, 5).astype(np.int64)
    nibble_bytes = chunks.reshape(n_groups * GROUP, n_sb * 8, 16)
    u = KVALUES_IQ4NL[np.concatenate([nibble_bytes & 15, nibble_bytes >> 4], axis=2)]
    d = (d[:, :, None, :] * sc).transpose(0, 3, 1, 2).reshape(n_groups * GROUP, n_sb * 8)
    return u, d, np.zeros_like(d)


def q6_k_packed_form(packed, n_rows, n_cols):
    """(u, d, m) as q6_k_form, read from the packed layout with NumPy (packed.c, struct q6_header:
    per group of 16 rows and superblock: d f16 x 16 | int8 sc [16 sub-blocks][16 rows] | per group
    6 chunks of 64 bytes: 4 of the low 4 bits as Q4_1's, then chunk 4 + h (row r's byte i at
    4 r + i) holding at bits 2k, 2k + 1 the top bits of value 16 h + 4k + i)."""
    n_groups, n_sb = -(-n_rows // GROUP), n_cols // QK_K
    g = packed.reshape(n_groups, n_sb, K_GROUP_BYTES[Q6_K])
    d = g[:, :, 0:32].copy().view(np.float16).astype(np.float64)            # [group, sb, row]
    sc = g[:, :, 32:288].copy().view(np.int8).reshape(n_groups, n_sb, 16, GROUP).astype(np.int64)
    chunks = g[:, :, 288:].reshape(n_groups, n_sb, 8, 6, GROUP, 4).transpose(0, 4, 1, 2, 3, 5).astype(np.int64)
    n_rows_all = n_groups * GROUP
    nibble_bytes = chunks[:, :, :, :, :4].reshape(n_rows_all, n_sb * 8, 16)
    low = np.concatenate([nibble_bytes & 15, nibble_bytes >> 4], axis=2)
    tops = chunks[:, :, :, :, 4:].reshape(n_rows_all, n_sb * 8, 2, 1, 4)    # [row, block, h, 1, i]
    top = (tops >> (2 * np.arange(4))[None, None, None, :, None]) & 3      # [row, block, h, k, i]
    q = (low | top.reshape(n_rows_all, n_sb * 8, 32) << 4) - 32
    scale = sc.transpose(0, 3, 1, 2).reshape(n_rows_all, n_sb * 16).repeat(16, axis=1)
    u = q * scale.reshape(n_rows_all, n_sb * 8, 32)
    d = d.transpose(0, 2, 1).reshape(n_rows_all, n_sb).repeat(QK_K // QK, axis=1)
    return u, d, np.zeros_like(d)


def k_packed_form(packed, w_type, n_rows, n_cols):
    """(u, d, m) as k_form, read from the packed layout with NumPy (packed.c, struct k_header:
    per group of 16 rows and superblock: d f16 x 16 | dmin f16 x 16 | sc [8 groups][16 rows] |
    mn [8][16] | per group 4 chunks of 64 bytes as Q4_1's (row r's byte j of a group at chunk j / 4,
    offset 4 r + j % 4, holding the low 4 bits of value j and of j + 16), for Q5_K then a 5th chunk
    (row r's byte i at 4 r + i: bit k = bit 4 of value 4k + i, bit 4 + k that of 16 + 4k + i));
    padding rows included. Q6_K: q6_k_packed_form."""
    if w_type == Q6_K:
        return q6_k_packed_form(packed, n_rows, n_cols)
    if w_type == IQ4_XS:
        return iq4_xs_packed_form(packed, n_rows, n_cols)
    n_groups, n_sb = -(-n_rows // GROUP), n_cols // QK_K
    n_chunks = 5 if w_type == Q5_K else 4
    g = packed.reshape(n_groups, n_sb, K_GROUP_BYTES[w_type])
    d = g[:, :, 0:32].copy().view(np.float16).astype(np.float64)            # [group, sb, row]
    dmin = g[:, :, 32:64].copy().view(np.float16).astype(np.float64)
    sc = g[:, :, 64:192].reshape(n_groups, n_sb, 8, GROUP).astype(np.float64)
    mn = g[:, :, 192:320].reshape(n_groups, n_sb, 8, GROUP).astype(np.float64)
    chunks = g[:, :, 320:].reshape(n_groups, n_sb, 8, n_chunks, GROUP, 4)  # [group, sb, k, chunk, row, byte]
    chunks = chunks.transpose(0, 4, 1, 2, 3, 5).astype(np.int64)            # [group, row, sb, k, chunk, byte]
    nibble_bytes = chunks[:, :, :, :, :4].reshape(n_groups * GROUP, n_sb * 8, 16)
    u = np.concatenate([nibble_bytes & 15, nibble_bytes >> 4], axis=2)
    if w_type == Q5_K:
        bits = chunks[:, :, :, :, 4].reshape(n_groups * GROUP, n_sb * 8, 1, 4)        # [row, block, 1, i]
        k = np.arange(4)[None, None, :, None]
        high = np.concatenate([(bits >> k) & 1, (bits >> (4 + k)) & 1], axis=2)      # value 4k + i, 16 + 4k + i
        u = u | high.reshape(n_groups * GROUP, n_sb * 8, 32) << 4

    def per_row(a):  # [group, sb, k, row] -> [group * 16, sb * 8]
        return a.transpose(0, 3, 1, 2).reshape(n_groups * GROUP, n_sb * 8)

    return u, per_row(d[:, :, None, :] * sc), per_row(-dmin[:, :, None, :] * mn)


def unsigned_form(raw, w_type, n_rows, n_cols):
    """(u int64 [n_rows, n_blocks, 32], d f64, m f64 [n_rows, n_blocks]): W = d * u + m with u
    unsigned, read from the raw ggml blocks (Q8_0: u = q + 128, m = -128 d; Q4_0: u = nibble,
    m = -8 d; Q4_1: u = nibble, m from the block; Q4_K, Q5_K: k_form)."""
    if w_type in K_TYPES:
        return k_form(raw, w_type, n_rows, n_cols)
    b = raw.reshape(n_rows, n_cols // QK, BLOCK_BYTES[w_type])
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    if w_type == Q8_0:
        return b[:, :, 2:].copy().view(np.int8).astype(np.int64) + 128, d, -128.0 * d
    nibbles = b[:, :, 4:] if w_type == Q4_1 else b[:, :, 2:]
    u = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=2).astype(np.int64)  # value j | j + 16
    if w_type == Q4_1:
        return u, d, b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    return u, d, -8.0 * d


def exact_product(raw, w_type, n_rows, n_cols, xq, xd, xs, n_terms):
    """(float64 W @ x.T [n_tok, n_rows] with W dequantized and x = sum_j xd_j * xq_j, the error
    scale S [n_tok, n_rows] of the module docstring)."""
    u, d, m = unsigned_form(raw, w_type, n_rows, n_cols)
    w = (d[:, :, None] * u + m[:, :, None]).reshape(n_rows, n_cols)              # exact in float64
    n_tok = xq.shape[0] // n_terms
    x = (xq.reshape(n_terms * n_tok, -1, QK) * xd[:, :, None].astype(np.float64)).reshape(n_terms, n_tok, n_cols)
    exact = x.sum(axis=0) @ w.T
    xq_b = xq.reshape(n_terms * n_tok, -1, QK).astype(np.int64)
    isum = np.einsum("rbi,tbi->trb", u, xq_b)                                        # exact integers
    terms = (np.abs(d[None] * xd[:, None, :] * isum) + np.abs(m[None] * xs[:, None, :])).sum(axis=2)
    return exact, terms.reshape(n_terms, n_tok, n_rows).sum(axis=0)


def error_bound(n_cols, n_terms, scale):
    """K u S of the module docstring, [n_tok, n_rows]."""
    return (n_cols // QK * (n_terms + 1) + 5) * U * scale + 1e-30


def numba_reference(raw, w_type, n_rows, n_cols, xq, xd, xs, n_terms):
    """matmul_q8_numba on the raw blocks, each term as its own token, the terms summed."""
    both = np.full((xq.shape[0], n_rows), np.nan, dtype=np.float32)
    mm.matmul_q8_numba(raw, w_type, n_rows, n_cols, xq, xd, xs, both)
    n_tok = xq.shape[0] // n_terms
    return both.reshape(n_terms, n_tok, n_rows).sum(axis=0, dtype=np.float32)


# -- direct calls of the C functions ---------------------------------------------------------------------

def buf(ctype, a, writable=False):
    return native.ffi.from_buffer(ctype, a, require_writable=writable)


def c_matmul_packed(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out, row_begin=0, row_end=None,
                    n_tok=None, **lengths):
    """One call of lib.lme_matmul_packed (this thread, the forced ISA); returns its status.
    `lengths` overrides p_len / xq_len / xq_stride / xd_len / xs_len / out_len (the true sizes by
    default; xq's row stride is xq.shape[1])."""
    row_end = n_rows if row_end is None else row_end
    n_tok = xq.shape[0] // n_terms if n_tok is None else n_tok
    sizes = dict(p_len=p.size, xq_len=xq.size, xq_stride=xq.shape[1], xd_len=xd.size, xs_len=xs.size,
                 out_len=out.size)
    sizes.update(lengths)
    return native.lib.lme_matmul_packed(
        w_type, buf("uint8_t[]", p), sizes["p_len"], n_rows, n_cols, row_begin, row_end,
        buf("int8_t[]", xq), sizes["xq_len"], sizes["xq_stride"], buf("float[]", xd), sizes["xd_len"],
        buf("float[]", xs), sizes["xs_len"], n_tok, n_terms, buf("float[]", out, True), sizes["out_len"])


def packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms):
    n_tok = xq.shape[0] // n_terms
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    assert c_matmul_packed(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out) == 0
    return out


# -- 1. the layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w_type", Q8_TYPES, ids=TYPE_IDS.get)
@pytest.mark.parametrize("n_cols", COL_COUNTS)
@pytest.mark.parametrize("n_rows", ROW_COUNTS)
def test_pack_round_trip(w_type, n_rows, n_cols):
    raw = make_raw(w_type, n_rows, n_cols, seed=n_rows * 1000 + n_cols + w_type)
    packed = native.pack_q8(raw, w_type, n_rows, n_cols)
    n_groups, n_blocks = -(-n_rows // GROUP), n_cols // QK
    assert packed.dtype == np.uint8 and packed.size == n_groups * n_blocks * GROUP_BLOCK_BYTES[w_type]
    np.testing.assert_array_equal(unpack(packed, w_type, n_rows, n_cols),
                                  raw.reshape(n_rows, n_blocks, BLOCK_BYTES[w_type]))
    d, m, values = split_packed(packed, w_type, n_rows, n_cols)
    for stored in (d, m, values):                       # padding rows: d = m = u = 0
        if stored is not None:
            assert not stored[n_rows:].any()
    if w_type == Q8_0:                                  # stored as q + 128, unsigned
        q = raw.reshape(n_rows, n_blocks, 34)[:, :, 2:].view(np.int8).astype(np.int64)
        np.testing.assert_array_equal(values[:n_rows].astype(np.int64), q + 128)


K_COL_COUNTS = (256, 768)


@pytest.mark.parametrize("w_type", K_TYPES, ids=TYPE_IDS.get)
@pytest.mark.parametrize("n_cols", K_COL_COUNTS)
@pytest.mark.parametrize("n_rows", ROW_COUNTS)
def test_k_pack_round_trip(w_type, n_rows, n_cols):
    """The packed K-type matrix holds the same weights as the ggml blocks, in every group of 32
    values (scales and mins with every code); padding rows have d = m = 0."""
    raw = make_raw(w_type, n_rows, n_cols, seed=n_rows * 1000 + n_cols)
    packed = native.pack_q8(raw, w_type, n_rows, n_cols)
    assert packed.size == -(-n_rows // GROUP) * (n_cols // QK_K) * K_GROUP_BYTES[w_type]
    u, d, m = k_packed_form(packed, w_type, n_rows, n_cols)
    ref_u, ref_d, ref_m = k_form(raw, w_type, n_rows, n_cols)
    np.testing.assert_array_equal(u[:n_rows], ref_u)
    np.testing.assert_array_equal(d[:n_rows], ref_d)
    np.testing.assert_array_equal(m[:n_rows], ref_m)
    assert not d[n_rows:].any() and not m[n_rows:].any()
    assert w_type == IQ4_XS or not u[n_rows:].any()          # (IQ4_XS: nibble 0 is the value -127)


@pytest.mark.parametrize("w_type", K_TYPES, ids=TYPE_IDS.get)
def test_k_decoder_matches_gguf(w_type):
    """The NumPy decoder of ggml's Q4_K / Q5_K / Q6_K / IQ4_XS blocks used above is that of the gguf
    package: the same weights up to the float32 rounding of gguf's d * sc * q - dmin * mn."""
    from gguf import GGMLQuantizationType, quants
    n_rows, n_cols = 37, 768
    raw = make_raw(w_type, n_rows, n_cols, seed=9)
    u, d, m = k_form(raw, w_type, n_rows, n_cols)
    ours = (d[:, :, None] * u + m[:, :, None]).reshape(n_rows, n_cols)
    gguf_type = {Q4_K: GGMLQuantizationType.Q4_K, Q5_K: GGMLQuantizationType.Q5_K,
                 Q6_K: GGMLQuantizationType.Q6_K, IQ4_XS: GGMLQuantizationType.IQ4_XS}[w_type]
    theirs = quants.dequantize(raw.reshape(n_rows, -1), gguf_type).astype(np.float64)
    size = np.maximum(np.abs(d[:, :, None] * u), np.abs(m[:, :, None])).reshape(n_rows, n_cols)
    assert np.all(np.abs(ours - theirs) <= 2 * U * size)
    assert np.abs(ours).max() > 0


def test_packed_bytes_are_the_documented_group_block_sizes():
    for w_type, group_block in GROUP_BLOCK_BYTES.items():
        assert native.packed_bytes(w_type, 16, 32) == group_block
        assert group_block == GROUP * BLOCK_BYTES[w_type]        # packing moves bytes, adds none
        for n_rows in (0,) + ROW_COUNTS:
            for n_cols in COL_COUNTS:
                expected = -(-n_rows // GROUP) * (n_cols // QK) * group_block
                assert native.packed_bytes(w_type, n_rows, n_cols) == expected
                assert native.lib.lme_packed_bytes(w_type, n_rows, n_cols) == expected
    for w_type in K_TYPES:
        for n_rows in (0,) + ROW_COUNTS:
            for n_cols in K_COL_COUNTS:
                expected = -(-n_rows // GROUP) * (n_cols // QK_K) * K_GROUP_BYTES[w_type]
                assert native.packed_bytes(w_type, n_rows, n_cols) == expected
    assert native.PACK_ROWS == GROUP


def test_pack_into_a_view_of_a_larger_array_and_zero_rows():
    raw = make_raw(Q4_1, 20, 64, seed=5)
    size = native.packed_bytes(Q4_1, 20, 64)
    arena = np.full(size + 10, 0xEE, dtype=np.uint8)
    got = native.pack_q8(raw, Q4_1, 20, 64, out=arena[5:5 + size])
    assert np.shares_memory(got, arena)
    np.testing.assert_array_equal(arena[5:5 + size], native.pack_q8(raw, Q4_1, 20, 64))
    assert (arena[:5] == 0xEE).all() and (arena[5 + size:] == 0xEE).all()   # nothing outside `out`
    assert native.pack_q8(np.zeros(0, np.uint8), Q8_0, 0, 64).size == 0


# -- 2. the product against the references ------------------------------------------------------------

PRODUCT_CASES = [  # (n_rows, n_cols, n_tok): partial groups, 1..17 tokens (every token-group tail)
    (1, 32, 1), (15, 64, 3), (16, 32, 8), (17, 576, 9), (37, 96, 17), (100, 64, 2)]
K_PRODUCT_CASES = [(1, 256, 1), (15, 512, 3), (16, 256, 8), (17, 768, 9), (37, 256, 17), (100, 512, 2)]


def cols_for(w_type):
    """A width the type takes (K types: whole superblocks) for the tests below."""
    return 256 if w_type in K_TYPES else 96


@pytest.mark.parametrize("n_terms", (1, 2))
@pytest.mark.parametrize("w_type", PACKED_TYPES, ids=TYPE_IDS.get)
def test_product_matches_numba_reference_and_float64(isa, w_type, n_terms):
    """Within K u S of the float64 product; the 32-value types also within 2 K u S of the Numba
    kernel on the raw blocks (the K types' row-major kernels take Q8_K activations, another input)."""
    for n_rows, n_cols, n_tok in (K_PRODUCT_CASES if w_type in K_TYPES else PRODUCT_CASES):
        raw = make_raw(w_type, n_rows, n_cols, seed=n_rows + n_cols + w_type)
        xq, xd, xs = quantize_x(make_x(n_tok, n_cols, seed=n_rows), n_terms)
        p = native.pack_q8(raw, w_type, n_rows, n_cols)
        out = packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms)

        exact, scale = exact_product(raw, w_type, n_rows, n_cols, xq, xd, xs, n_terms)
        bound = error_bound(n_cols, n_terms, scale)
        case = f"{n_rows}x{n_cols}, {n_tok} tokens"
        assert np.all(np.abs(out - exact) <= bound), case               # the independent reference
        if w_type not in K_TYPES:
            ref = numba_reference(raw, w_type, n_rows, n_cols, xq, xd, xs, n_terms)
            assert np.all(np.abs(out - ref) <= 2 * bound), case          # both within K u S of exact
        assert np.abs(exact).max() > 1e3 * bound.max(), case             # the bound is not vacuous


@pytest.mark.parametrize("n_terms", (1, 2))
def test_numba_entry_points_equal_one_c_call(n_terms):
    """matmul_packed_q8 (16-row groups over threads) equals one C call bit for bit (a row's
    arithmetic does not depend on the call), and matmul_packed quantizes as ACT_INT8 / ACT_INT8X2."""
    n_rows, n_cols, n_tok = 53, 768, 5
    act = mm.ACT_INT8 if n_terms == 1 else mm.ACT_INT8X2
    for w_type in PACKED_TYPES:
        raw = make_raw(w_type, n_rows, n_cols, seed=w_type)
        p = native.pack_q8(raw, w_type, n_rows, n_cols)
        x = make_x(n_tok, n_cols, seed=3)
        xq, xd, xs = quantize_x(x, n_terms)
        single = packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms)
        threaded = np.full_like(single, np.nan)
        mm.matmul_packed_q8(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, threaded)
        np.testing.assert_array_equal(threaded, single)
        from_x = np.full_like(single, np.nan)
        mm.matmul_packed(p, w_type, n_rows, n_cols, x, from_x, act)
        np.testing.assert_array_equal(from_x, single)
    with pytest.raises(ValueError, match="act"):
        mm.matmul_packed(p, w_type, n_rows, n_cols, x, from_x, mm.ACT_F32)
    with pytest.raises(ValueError, match="n_terms"):
        mm.matmul_packed_q8(p, w_type, n_rows, n_cols, xq, xd, xs, 3, threaded)


def test_no_tokens_from_numpy_arrays():
    """A product over 0 tokens (a prefill chunk that wants no logits) with arrays NumPy made:
    NumPy 2 gives an empty array's dimensions stride 0, which must not count as non-contiguous
    (the packed entry points raise on that; they once did here)."""
    n_rows, n_cols = 20, 64
    p = native.pack_q8(make_raw(Q4_1, n_rows, n_cols, seed=2), Q4_1, n_rows, n_cols)
    x = np.empty((0, n_cols), dtype=np.float32)
    out = np.empty((0, n_rows), dtype=np.float32)
    mm.matmul_packed(p, Q4_1, n_rows, n_cols, x, out, mm.ACT_INT8)
    mm.matmul_packed_q8(p, Q4_1, n_rows, n_cols, np.empty((0, n_cols), np.int8), np.empty((0, 2), np.float32),
                        np.empty((0, 2), np.float32), 1, out)


def test_parts_of_mixed_precision_equal_separate_products():
    """matmul_packed_parts on stacked matrices (q|k|v-like: 48, 16 and 16 rows, or a last part
    with a partial group) gives each part exactly the product of that matrix alone at its own
    precision (one term where ACT_INT8, two where ACT_INT8X2); a part boundary off a 16-row group
    and a float precision are refused."""
    n_cols, n_tok = 768, 5
    x = make_x(n_tok, n_cols, seed=4)
    for w_type in PACKED_TYPES:
        for part_rows, part_acts in (((48, 16, 16), (mm.ACT_INT8, mm.ACT_INT8X2, mm.ACT_INT8X2)),
                                     ((32, 21), (mm.ACT_INT8X2, mm.ACT_INT8)),
                                     ((16, 16), (mm.ACT_INT8, mm.ACT_INT8))):
            raws = [make_raw(w_type, rows, n_cols, seed=w_type + i) for i, rows in enumerate(part_rows)]
            stacked = native.pack_q8(np.concatenate(raws), w_type, sum(part_rows), n_cols)
            out = np.full((n_tok, sum(part_rows)), np.nan, dtype=np.float32)
            mm.matmul_packed_parts(stacked, w_type, np.array(part_rows), n_cols, x, out, np.array(part_acts))
            first = 0
            for raw, rows, act in zip(raws, part_rows, part_acts):
                alone = np.full((n_tok, rows), np.nan, dtype=np.float32)
                mm.matmul_packed(native.pack_q8(raw, w_type, rows, n_cols), w_type, rows, n_cols, x, alone, act)
                np.testing.assert_array_equal(out[:, first: first + rows], alone)
                first += rows
    out = np.empty((n_tok, 40), dtype=np.float32)
    p = native.pack_q8(make_raw(Q4_1, 40, n_cols, seed=1), Q4_1, 40, n_cols)
    with pytest.raises(ValueError, match="16-row"):
        mm.matmul_packed_parts(p, Q4_1, np.array([20, 20]), n_cols, x, out, np.array([mm.ACT_INT8] * 2))
    with pytest.raises(ValueError, match="act"):
        mm.matmul_packed_parts(p, Q4_1, np.array([16, 24]), n_cols, x, out, np.array([mm.ACT_INT8, mm.ACT_F32]))


# -- 3. batch invariance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_terms", (1, 2))
@pytest.mark.parametrize("w_type", PACKED_TYPES, ids=TYPE_IDS.get)
def test_token_result_does_not_depend_on_its_batch(isa, w_type, n_terms):
    """Exact equality, no tolerance (packed.c promises it: batched decode == one-by-one decode):
    a token's result is the same float alone or in a batch of 1..17 tokens at any position."""
    n_rows, n_cols, n_all = 37, cols_for(w_type), 17
    raw = make_raw(w_type, n_rows, n_cols, seed=11 * w_type)
    p = native.pack_q8(raw, w_type, n_rows, n_cols)
    xq, xd, xs = quantize_x(make_x(n_all, n_cols, seed=n_terms), n_terms)
    batch = packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms)
    assert np.all(np.isfinite(batch))

    def run(tokens):
        return packed_product(p, w_type, n_rows, n_cols, *take_tokens(xq, xd, xs, tokens, n_terms), n_terms)

    for t in range(n_all):                                              # every token alone
        np.testing.assert_array_equal(run([t]), batch[[t]])
    for n_tok in range(1, n_all + 1):                                   # sub-batches at shifting offsets
        start = (5 * n_tok) % (n_all - n_tok + 1)
        tokens = np.arange(start, start + n_tok)
        np.testing.assert_array_equal(run(tokens), batch[tokens])
    shuffled = np.random.default_rng(w_type).permutation(n_all)         # every token at a new position
    np.testing.assert_array_equal(run(shuffled), batch[shuffled])
    repeated = np.array([3, 3, 0, 3, 16, 3, 3, 3, 3, 1])               # one token in many slots
    np.testing.assert_array_equal(run(repeated), batch[repeated])


@pytest.mark.parametrize("w_type", PACKED_TYPES, ids=TYPE_IDS.get)
def test_padded_activation_rows_give_the_same_bits(isa, w_type):
    """xq rows X_ROW_PAD bytes longer than n_cols (matmul.padded_activations, what the models
    use) give the same floats as unpadded rows, with random bytes in the pad (never read), and
    padded_activations quantizes as quantize_activations / quantize_activations_x2 do."""
    n_rows, n_cols, n_tok = 37, cols_for(w_type), 9
    p = native.pack_q8(make_raw(w_type, n_rows, n_cols, seed=5 + w_type), w_type, n_rows, n_cols)
    x = make_x(n_tok, n_cols, seed=6)
    for n_terms in (1, 2):
        xq, xd, xs = quantize_x(x, n_terms)
        pq, pd, ps = mm.padded_activations(x, n_terms)
        assert pq.shape == (n_terms * n_tok, n_cols + mm.X_ROW_PAD)
        np.testing.assert_array_equal(pq[:, :n_cols], xq)
        np.testing.assert_array_equal(pd, xd)
        np.testing.assert_array_equal(ps, xs)
        pq[:, n_cols:] = np.random.default_rng(n_terms).integers(-128, 128, pq[:, n_cols:].shape)
        np.testing.assert_array_equal(packed_product(p, w_type, n_rows, n_cols, pq, pd, ps, n_terms),
                                      packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms))
        threaded = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
        mm.matmul_packed_q8(p, w_type, n_rows, n_cols, pq, pd, ps, n_terms, threaded)
        np.testing.assert_array_equal(threaded, packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms))
    # the last row needs only n_cols bytes: a buffer that ends there is long enough, one byte less is not
    pq, pd, ps = mm.padded_activations(x, 1)
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    assert c_matmul_packed(p, w_type, n_rows, n_cols, pq, pd, ps, 1, out, xq_len=pq.size - mm.X_ROW_PAD) == 0
    assert c_matmul_packed(p, w_type, n_rows, n_cols, pq, pd, ps, 1, out,
                           xq_len=pq.size - mm.X_ROW_PAD - 1) == ERR_LENGTH


# -- 4. row ranges ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("w_type", PACKED_TYPES, ids=TYPE_IDS.get)
def test_row_range_writes_exactly_its_rows(isa, w_type):
    n_rows, n_cols = 37, cols_for(w_type)                              # groups [0,16) [16,32) [32,37)
    raw = make_raw(w_type, n_rows, n_cols, seed=37 + w_type)
    p = native.pack_q8(raw, w_type, n_rows, n_cols)
    for n_terms, n_tok in ((1, 3), (2, 9)):
        xq, xd, xs = quantize_x(make_x(n_tok, n_cols, seed=n_tok), n_terms)
        full = packed_product(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms)
        for begin, end in ((0, 16), (16, 32), (32, 37), (16, 37), (0, 37), (0, 1), (16, 20), (32, 33),
                           (32, 36), (16, 16), (32, 32)):
            out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
            status = c_matmul_packed(p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out, begin, end)
            assert status == 0, (begin, end)
            np.testing.assert_array_equal(out[:, begin:end], full[:, begin:end])
            outside = np.delete(out, np.arange(begin, end), axis=1)
            assert np.isnan(outside).all(), f"rows outside [{begin}, {end}) were written"


# -- 5. argument checks ------------------------------------------------------------------------------------

@pytest.fixture
def valid_call():
    """A valid (p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out) for lme_matmul_packed."""
    n_rows, n_cols, n_tok, n_terms = 37, 64, 3, 2
    raw = make_raw(Q4_1, n_rows, n_cols, seed=1)
    xq, xd, xs = quantize_x(make_x(n_tok, n_cols, seed=1), n_terms)
    out = np.full((n_tok, n_rows), np.nan, dtype=np.float32)
    return native.pack_q8(raw, Q4_1, n_rows, n_cols), Q4_1, n_rows, n_cols, xq, xd, xs, n_terms, out


def test_matmul_packed_argument_errors(valid_call):
    p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out = valid_call
    args = (p, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out)

    def status(**change):
        kw = dict(zip(("p", "w_type", "n_rows", "n_cols", "xq", "xd", "xs", "n_terms", "out"), args))
        kw.update(change)
        return c_matmul_packed(**kw)

    bad = {
        ERR_RANGE: [dict(row_begin=1), dict(row_begin=8), dict(row_begin=17, row_end=20),
                    dict(row_end=n_rows + 1), dict(row_begin=-16), dict(row_begin=32, row_end=16),
                    dict(row_begin=48, row_end=48)],
        ERR_LENGTH: [dict(p_len=p.size - 1), dict(xq_len=xq.size - 1), dict(xq_stride=n_cols + 1),
                     dict(xd_len=xd.size - 1),
                     dict(xs_len=xs.size - 1), dict(out_len=out.size - 1),
                     dict(n_tok=4), dict(p_len=0), dict(out_len=0)],
        ERR_SHAPE: [dict(n_terms=3, n_tok=2), dict(n_terms=0, n_tok=3), dict(n_terms=-1, n_tok=3), dict(n_cols=48),
                    dict(n_cols=0), dict(n_cols=-32), dict(n_rows=-1), dict(n_tok=-1),
                    dict(xq_stride=n_cols - 1), dict(xq_stride=0), dict(xq_stride=-n_cols),
                    dict(xq_stride=2**62)],
        ERR_TYPE: [dict(w_type=F16), dict(w_type=F32), dict(w_type=Q3_K), dict(w_type=-1), dict(w_type=99)],
    }
    for code, changes in bad.items():
        for change in changes:
            assert status(**change) == code, change
    assert np.isnan(out).all()                                          # no error touched out
    # a shorter packed matrix than n_rows needs (a packing of 16 rows used as 37)
    assert status(p=p[:native.packed_bytes(w_type, 16, n_cols)].copy()) == ERR_LENGTH
    # an x for one term used as two
    xq1, xd1, xs1 = quantize_x(make_x(3, n_cols, seed=1), 1)
    assert status(xq=xq1, xd=xd1, xs=xs1, n_tok=3) == ERR_LENGTH
    assert np.isnan(out).all()
    # NULL pointers
    null = native.ffi.NULL
    good = [w_type, buf("uint8_t[]", p), p.size, n_rows, n_cols, 0, n_rows, buf("int8_t[]", xq), xq.size,
            n_cols, buf("float[]", xd), xd.size, buf("float[]", xs), xs.size, 3, n_terms, buf("float[]", out, True),
            out.size]
    for i in (1, 7, 10, 12, 16):
        call = list(good)
        call[i] = null
        assert native.lib.lme_matmul_packed(*call) == ERR_NULL, i
    assert np.isnan(out).all()
    assert status() == 0 and np.isfinite(out).all()                     # and the valid call works


def test_pack_q8_argument_errors():
    n_rows, n_cols = 20, 64
    raw = make_raw(Q8_0, n_rows, n_cols, seed=2)
    size = native.packed_bytes(Q8_0, n_rows, n_cols)
    dst = np.full(size, 0xAB, dtype=np.uint8)

    def status(w_type=Q8_0, w=raw, w_len=raw.size, rows=n_rows, cols=n_cols, dst_len=size):
        w_ptr = w if w is native.ffi.NULL else buf("uint8_t[]", w)
        return native.lib.lme_pack_q8(w_type, w_ptr, w_len, rows, cols, buf("uint8_t[]", dst, True), dst_len)

    assert status(w_type=F16) == ERR_TYPE and status(w_type=F32) == ERR_TYPE
    assert status(cols=48) == ERR_SHAPE and status(cols=0) == ERR_SHAPE and status(rows=-1) == ERR_SHAPE
    assert status(w_len=raw.size - 1) == ERR_LENGTH and status(dst_len=size - 1) == ERR_LENGTH
    assert status(rows=n_rows + 1) == ERR_LENGTH                           # raw too short for the shape
    assert status(w=native.ffi.NULL) == ERR_NULL
    assert (dst == 0xAB).all()                                            # no error touched dst
    assert native.lib.lme_packed_bytes(F16, 16, 32) == ERR_TYPE
    assert native.lib.lme_packed_bytes(Q8_0, 16, 33) == ERR_SHAPE
    assert native.lib.lme_packed_bytes(Q8_0, -1, 32) == ERR_SHAPE
    for w_type in K_TYPES:                                                 # whole superblocks
        assert native.lib.lme_packed_bytes(w_type, 16, 64) == ERR_SHAPE
        assert native.lib.lme_packed_bytes(w_type, 16, 256) == K_GROUP_BYTES[w_type]
        assert status(w_type=w_type) == ERR_SHAPE
    assert status() == 0


def test_python_pack_q8_raises_value_error():
    raw = make_raw(Q4_0, 20, 64, seed=3)
    with pytest.raises(ValueError, match="w_type must be one of"):
        native.pack_q8(raw, F16, 20, 64)
    with pytest.raises(ValueError, match="shorter"):
        native.pack_q8(raw[:-1], Q4_0, 20, 64)
    with pytest.raises(ValueError, match="out holds"):
        native.pack_q8(raw, Q4_0, 20, 64, out=np.empty(native.packed_bytes(Q4_0, 20, 64) + 1, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        native.pack_q8(raw, Q4_0, 20, 64, out=np.empty(native.packed_bytes(Q4_0, 20, 64), np.int8))
    with pytest.raises(ValueError, match="uint8"):
        native.pack_q8(raw.view(np.int8), Q4_0, 20, 64)
    with pytest.raises(ValueError, match="bad shape"):
        native.packed_bytes(Q4_0, 20, 48)


# -- 6. the model with packed matrices ---------------------------------------------------------------------

# (weight type, dim, n_heads, n_kv_heads, ffn_dim, fused): with every q/k/gate row count a multiple
# of 16, q|k|v and gate|up are fused. dim 96 with 4 heads and 1 KV head has 24-row k: no q|k|v
# fusion; ffn_dim 72 has 72-row gate (no gate|up fusion) and ffn_down stays F16 (72 columns are not
# whole blocks), so that model mixes packed and unpacked matrices. The 300-row output matrix ends
# in a partial group everywhere.
MODELS = [("q4_1", 64, 4, 2, 96, 1), ("q8_0", 96, 3, 1, 64, 1), ("q4_0", 96, 4, 1, 72, 0)]
MODE_NAMES = ("int8", "int8x2", "mixed")


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-dim{m[1]}-ffn{m[4]}")
def tiny(request, tmp_path_factory):
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.config import config_from_gguf
    from tiny_models import make_tiny_model

    wtype, dim, n_heads, n_kv_heads, ffn_dim, fused = request.param
    path = tmp_path_factory.mktemp("packed") / "model.gguf"
    make_tiny_model(path, n_layers=2, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                    vocab_size=300, weight_type=wtype, seed=dim + ffn_dim)
    f = GGUFFile(path)
    return f, config_from_gguf(f), fused


def make_backend(tiny, activations, pack):
    from lmengine.backends.numba_backend import NumbaLlamaBackend
    f, config, _ = tiny
    return NumbaLlamaBackend(f, config, n_ctx=64, n_slots=1, activations=activations, pack=pack)


def greedy(backend, prompt, n_new):
    """n_new greedy tokens after prompt, and the logits each was picked from."""
    logits = [backend.forward(0, prompt, 0)[-1]]
    tokens = []
    for i in range(n_new):
        tokens.append(int(np.argmax(logits[-1])))
        if i + 1 < n_new:
            logits.append(backend.forward(0, np.array(tokens[-1:]), len(prompt) + i)[-1])
    return tokens, np.stack(logits)


def test_model_packs_and_fuses(tiny):
    f, config, fused = tiny
    backend = make_backend(tiny, "int8", True)
    w = backend.weights
    assert backend.packed and w.packed.size > 0
    # every layer matrix (ffn_down is F16 when unfused) and the output matrix
    assert w.n_packed == config.n_layers * (7 if fused else 6) + 1
    assert w.model.output.packed_at[0] >= 0
    assert (w.model.fused_qkv == fused).all() and (w.model.fused_gate_up == fused).all()
    unpacked = make_backend(tiny, "int8", False)
    assert not unpacked.packed and unpacked.weights.packed.size == 0 and unpacked.weights.n_packed == 0
    assert not unpacked.weights.model.fused_qkv.any() and not unpacked.weights.model.fused_gate_up.any()


def test_f32_activations_never_pack(tiny):
    backend = make_backend(tiny, "f32", True)
    assert backend.packed is False
    assert backend.weights.packed.size == 0 and backend.weights.n_packed == 0
    assert not backend.weights.model.fused_qkv.any() and not backend.weights.model.fused_gate_up.any()


# Agreement of pack=True with pack=False, as a fraction of the logit range, per activation mode.
# Both compute the same exact integer block sums; each matrix product differs only in float32
# accumulation order (K u S above, ~1e-7 relative). But that difference passes through the int8
# quantizer of the next product's input, which is discontinuous: a value sitting on a rounding
# boundary of rint(x / xd) (xd = block max / 127) may round up in one backend and down in the
# other, a step of xd in one activation. Every backend with a different float order takes such
# steps; they are not errors of either side.
# * "int8x2": every product has a residual term, so a first-term step is compensated and only a
#   second-term step (xd / 254) remains: 1e-4 of the range (measured <= 2.4e-5 over 3 models x 10
#   prompts x scalar / AVX-512; the int8x2 error against f32 itself is ~2e-5).
# * "int8", "mixed": one-term products take full steps, which move logits by up to ~4e-3 of the
#   range in these tiny models (measured 3.6e-3; on most positions of some prompts, since attention
#   carries a step to later positions) -- about half of int8's whole error against f32 (~6e-3), as
#   one step of xd is comparable to the sum of a block's 32 roundings. So: 1e-2 of the range, still
#   far below a wiring bug (a wrong matrix, row range or scale moves logits by O(range)).
# In every mode the packed model must also be exactly as accurate against the f32 path as the
# unpacked one (rms error within 10%; measured equal to 3 digits): steps fall either way, while a
# lost term or a wrong scale adds error.
LOGIT_TOLERANCE = {"int8x2": 1e-4, "int8": 1e-2, "mixed": 1e-2}


def rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


@pytest.mark.parametrize("activations", MODE_NAMES)
def test_packed_model_matches_unpacked(tiny, activations):
    """Logits at every position of a 24-token prompt within LOGIT_TOLERANCE of the unpacked
    model's and as close to the f32 path; 16 greedy tokens equal, unless the first divergence is
    at a near-tie (top-2 margin within twice the tolerance), which a rounding step may break
    either way."""
    f, config, _ = tiny
    packed, plain = make_backend(tiny, activations, True), make_backend(tiny, activations, False)
    assert packed.packed and not plain.packed
    ids = np.random.default_rng(7).integers(0, config.vocab_size, 24)
    ref = plain.forward(0, ids, 0, all_logits=True)
    got = packed.forward(0, ids, 0, all_logits=True)
    tol = LOGIT_TOLERANCE[activations] * (ref.max() - ref.min())
    assert np.abs(got - ref).max() <= tol, np.abs(got - ref).max() / (ref.max() - ref.min())
    exact = make_backend(tiny, "f32", False).forward(0, ids, 0, all_logits=True)
    assert abs(rms(got - exact) / rms(ref - exact) - 1) <= 0.1, (rms(got - exact), rms(ref - exact))

    prompt = ids[:6]
    ref_tokens, ref_logits = greedy(plain, prompt, 16)
    got_tokens, _ = greedy(packed, prompt, 16)
    if got_tokens != ref_tokens:
        first = next(i for i, (a, b) in enumerate(zip(got_tokens, ref_tokens)) if a != b)
        top2 = np.sort(ref_logits[first])[-2:]
        assert top2[1] - top2[0] <= 2 * tol, (first, got_tokens, ref_tokens)
