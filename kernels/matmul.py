"""Quantized matrix products: out[t, r] = dot(W[r], x[t]) straight from ggml blocks.

W is an (n_rows, n_cols) matrix of raw ggml blocks (1-D uint8 + type id, row r at bytes
[r * row_bytes, (r + 1) * row_bytes)); x is float32 [n_tok, n_cols]; out is float32
[n_tok, n_rows]. Every weight block is read once for all n_tok rows of x: a row of W is decoded
into a small buffer (L1-resident) and dotted with every row of x, so prefill and batched decode
stream the weights once per call. Rows are split over threads (numba prange over row tiles).

Two kinds of arithmetic:

* float path (`act_q8=False`, `matmul_f32`): blocks are decoded to float32 on the fly and dotted
  with float32 activations. Equals NumPy's `dequantize(W) @ x.T` up to float32 summation order.
  Works for every type `lmengine.kernels.quant` can decode (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K formats,
  Q5_0, Q5_1, IQ4_NL; C for the first six, Numba for the others).
* int8 path (`act_q8=True`, `quantize_activations` + `matmul_q8`): each 32-value block of x is
  quantized to int8 with one float32 scale, as ggml's Q8_0/Q8_1 do, and each block product is an
  exact integer dot product of the weight's 4/8-bit values with those int8 values:

      Q8_0 / Q4_0 weights (w = dw * q, q signed):   dot = dw * dx * sum(q * xq)
      Q4_1 weights        (w = dw * q + mw):         dot = dw * dx * sum(q * xq) + mw * xs
                                                      with xs = dx * sum(xq)  (ggml's Q8_1 "s")

  (The C kernels compute Q4_0 in Q4_1's form, q = nibble and mw = -8 dw, to use unsigned x
  signed byte products; same value, different float rounding.)
  Q5_0, Q5_1, IQ4_NL weights (`EXACT_TYPES`, as ggml's vec_dot_q5_0_q8_0 / q5_1_q8_1 /
  iq4_nl_q8_0) take the same activations, in the form w = dw * q + mw (Q5_0: q = 0..31 and
  mw = -16 dw; Q5_1: mw = m; IQ4_NL: q the codebook value, no mw), with one fixed float order
  (blocks summed in groups of 8, see `_matmul_exact_numba`), so that the Numba reference and every
  C SIMD path give the same bits. F32/F16/BF16 weights have no
  integer form; `matmul(..., act_q8=True)` uses the float path for them. Differences to ggml:
  scales dx and xs stay float32 (ggml rounds them to f16), and xq = round-half-to-even(x / dx)
  (ggml's reference rounds halves away from zero; its AVX code rounds to even).

Each path has a Numba implementation (`matmul_f32_numba`, `matmul_q8_numba`, the reference) and a
C implementation in `kernels/csrc/qdot.c` (SIMD, selected by CPUID), reached through
`lmengine.kernels.native`. `matmul`, `matmul_f32`, `matmul_q8` use the C kernels when the extension is
loaded in this process and the Numba ones otherwise; that choice is made at run time on every
call (`use_native()`), so code compiled and cached on disk stays correct in a process where the
extension is missing (see kernels/native.py). Non-contiguous arrays also take the Numba path.

Packed matrices (`matmul_packed`, `matmul_packed_q8`): on AVX2 and AVX-512 VNNI CPUs models re-lay
their Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/IQ4_XS matrices 16 rows at a time
(`lmengine.kernels.native.pack_q8`, kernels/csrc/packed.c) and use these products instead: the
same integer sums with no horizontal sums per block, ~3x the multiply-adds per second of the
row-major kernel with VNNI, 1.1-2.1x with AVX2. The K types and IQ4_XS then take these 32-value
activation blocks instead of Q8_K.

Activation quantization (`quantize_activations`, `quantize_activations_x2`) runs in C
(`lme_quantize_row`: scalar, AVX2, AVX-512, each bit-identical to the Numba loop here) and over threads for
PARALLEL_MIN_TOKENS tokens or more.

Threads: numba.set_num_threads(n) in the calling thread; rows are split in tiles of ROW_TILE
rows (packed: groups of 16), so results do not depend on the thread count.
"""
import numpy as np
from numba import njit, prange

from . import native
from .kquant import QK_K, k_block_bytes, matmul_k_numba, quantize_q8k_into
from .ops import PARALLEL_MIN_TOKENS   # row-wise work goes over threads from this many tokens on
from .quant import BF16, BLOCK_BYTES_BY_ID, BLOCK_SIZE_BY_ID, F16, F32, IQ4_NL, KVALUES_IQ4NL, N_TYPE_IDS
from .quant import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QK
from .quant import dequantize_row_into, half_bits_to_float

ROW_TILE = 16          # rows of W per unit of thread work (one C call per tile)
EXACT_TYPES = (Q5_0, Q5_1, IQ4_NL)          # int8 path with the same bits in C and Numba (below)
Q8_TYPES = (Q8_0, Q4_0, Q4_1) + EXACT_TYPES   # weight types with an int8 path on 32-value activation blocks
GROUP_BLOCKS = 8       # blocks per float group sum of the exact int8 path

# Block tables indexed by type id, for Numba (0 = unsupported type).
_N_TYPE_IDS = N_TYPE_IDS
_BLOCK_SIZE_BY_ID = BLOCK_SIZE_BY_ID
_BLOCK_BYTES_BY_ID = BLOCK_BYTES_BY_ID


# -- argument checks (shared by every entry point; raise before touching memory) ----------------

@njit(cache=True, nogil=True)
def row_bytes_of(w_type, n_cols):
    """Bytes of one row of n_cols values of type w_type; -1 for an unknown type or a partial block."""
    if w_type < 0 or w_type >= _N_TYPE_IDS or _BLOCK_SIZE_BY_ID[w_type] == 0:
        return -1
    block = _BLOCK_SIZE_BY_ID[w_type]
    if n_cols < 0 or n_cols % block != 0:
        return -1
    return n_cols // block * _BLOCK_BYTES_BY_ID[w_type]


@njit(cache=True, nogil=True)
def _check_weights(w_u8, w_type, n_rows, n_cols):
    """ValueError unless w_u8 holds an (n_rows, n_cols) matrix of w_type blocks; returns row_bytes."""
    if w_type < 0 or w_type >= _N_TYPE_IDS or _BLOCK_SIZE_BY_ID[w_type] == 0:
        raise ValueError("matmul: unsupported ggml type id w_type")
    if n_rows < 0 or n_cols <= 0:
        raise ValueError("matmul: n_rows must be >= 0 and n_cols > 0")
    bytes_per_row = row_bytes_of(w_type, n_cols)
    if bytes_per_row < 0:
        raise ValueError("matmul: n_cols is not a whole number of blocks of w_type")
    if n_rows > w_u8.size // bytes_per_row:                    # (no overflow for any n_rows)
        raise ValueError("matmul: w_u8 is shorter than n_rows * row_bytes(w_type, n_cols)")
    return bytes_per_row


@njit(cache=True, nogil=True)
def _check_out(n_tok, n_rows, out):
    if out.ndim != 2 or out.shape[0] != n_tok or out.shape[1] != n_rows:
        raise ValueError("matmul: out must have shape (n_tok, n_rows)")


# -- float path ---------------------------------------------------------------------------------

@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, inline="always")
def _dot_f32(a, b, n):
    """sum(a[:n] * b[:n]) in float32 (reassociated so LLVM vectorizes it)."""
    acc = np.float32(0.0)
    for i in range(n):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, nogil=True, parallel=True)
def matmul_f32_numba(w_u8, w_type, n_rows, n_cols, x, out):
    """Numba float path: out[t, r] = dot(dequantize(W[r]), x[t]) for every row r and token t.

    w_u8 uint8 [>= n_rows * row_bytes], x float32 [n_tok, n_cols], out float32 [n_tok, n_rows].
    """
    bytes_per_row = _check_weights(w_u8, w_type, n_rows, n_cols)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError("matmul: x must have shape (n_tok, n_cols)")
    n_tok = x.shape[0]
    _check_out(n_tok, n_rows, out)
    n_tiles = (n_rows + ROW_TILE - 1) // ROW_TILE if n_tok > 0 else 0
    for tile in prange(n_tiles):
        w_row = np.empty(n_cols, dtype=np.float32)            # one decoded row of W
        for r in range(tile * ROW_TILE, min(n_rows, (tile + 1) * ROW_TILE)):
            dequantize_row_into(w_type, w_u8[r * bytes_per_row:(r + 1) * bytes_per_row], n_cols, w_row)
            for t in range(n_tok):
                out[t, r] = _dot_f32(w_row, x[t], n_cols)


# -- int8 path ----------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _quantize_row_numba(x, xq, xd, xs):
    """One token: x float32 [n_cols] -> xq int8 [n_cols], xd, xs float32 [n_cols // 32]."""
    for b in range(x.shape[0] // QK):
        o = b * QK
        amax = np.float32(0.0)
        for i in range(QK):
            amax = max(amax, abs(x[o + i]))
        d = amax / np.float32(127.0)
        inv_d = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        isum = 0
        for i in range(QK):
            q = np.int32(np.rint(x[o + i] * inv_d))
            xq[o + i] = q
            isum += q
        xd[b] = d
        xs[b] = d * np.float32(isum)


@njit(cache=True, nogil=True)
def _quantize_token(x, xq, xd, xs, n_terms, t, use_c):
    """Token t of x [n_tok, n_cols] in n_terms terms: row t of xq, xd, xs, and for two terms row
    n_tok + t (the residual x - xd * xq). The C kernel (contiguous arrays: use_c)
    computes the same bits as the Numba loop."""
    r = x.shape[0] + np.int64(t)                  # the residual's row (prange may pass t unsigned)
    rq, rd, rs = (xq[r], xd[r], xs[r]) if n_terms == 2 else (xq[t, :0], xd[t, :0], xs[t, :0])
    if use_c and native.c_quantize_row(x[t], xq[t], xd[t], xs[t], rq, rd, rs) == 0:
        return
    _quantize_row_numba(x[t], xq[t], xd[t], xs[t])
    if n_terms == 2:
        residual = np.empty(x.shape[1], dtype=np.float32)
        for i in range(x.shape[1]):
            residual[i] = x[t, i] - xd[t, i // QK] * np.float32(xq[t, i])
        _quantize_row_numba(residual, rq, rd, rs)


@njit(cache=True, nogil=True, parallel=True)
def _quantize_rows_parallel(x, xq, xd, xs, n_terms, use_c):
    for t in prange(x.shape[0]):
        _quantize_token(x, xq, xd, xs, n_terms, t, use_c)


@njit(cache=True, nogil=True)
def _quantize_rows(x, xq, xd, xs, n_terms):
    """Every token of x in n_terms (1 or 2) terms; over threads for PARALLEL_MIN_TOKENS or more.
    xq's rows may be longer than n_cols (a padded row stride, see X_ROW_PAD): only their first
    n_cols bytes are written."""
    n_tok, n_cols = x.shape
    if n_cols % QK != 0:
        raise ValueError("quantize_activations: n_cols must be a multiple of 32")
    n_blocks = n_cols // QK
    if (xq.shape[0] != n_terms * n_tok or xq.shape[1] < n_cols or xd.shape[0] != xq.shape[0]
            or xd.shape[1] != n_blocks or xs.shape[0] != xq.shape[0] or xs.shape[1] != n_blocks):
        raise ValueError("quantize_activations: xq/xd/xs shapes do not match x")
    use_c = _is_contiguous(x) and _is_contiguous(xq) and _is_contiguous(xd) and _is_contiguous(xs)
    if n_tok >= PARALLEL_MIN_TOKENS:
        _quantize_rows_parallel(x, xq, xd, xs, n_terms, use_c)
    else:
        for t in range(n_tok):
            _quantize_token(x, xq, xd, xs, n_terms, t, use_c)


@njit(cache=True, nogil=True)
def quantize_activations_into(x, xq, xd, xs):
    """Quantize x float32 [n_tok, n_cols] per 32-value block into xq int8 [n_tok, n_cols],
    xd float32 [n_tok, n_cols // 32] (scale: x ~ xd * xq) and xs float32 [n_tok, n_cols // 32]
    (xd * sum of the block's xq, for Q4_1 weights).

    Per block: amax = max|x|, d = amax / 127, xq = rint(x * (1 / d)) (0 when amax == 0).
    """
    _quantize_rows(x, xq, xd, xs, 1)


@njit(cache=True, nogil=True)
def _new_activations(x, n_terms, pad):
    """(xq, xd, xs) of x float32 [n_tok, n_cols] in n_terms (1 or 2) int8 terms, xq's rows
    n_cols + pad bytes long (only the first n_cols written)."""
    n_tok, n_cols = x.shape
    if n_cols % QK != 0:
        raise ValueError("quantize_activations: n_cols must be a multiple of 32")
    xq = np.empty((n_terms * n_tok, n_cols + pad), dtype=np.int8)
    xd = np.empty((n_terms * n_tok, n_cols // QK), dtype=np.float32)
    xs = np.empty((n_terms * n_tok, n_cols // QK), dtype=np.float32)
    _quantize_rows(x, xq, xd, xs, n_terms)
    return xq, xd, xs


@njit(cache=True, nogil=True)
def quantize_activations(x):
    """(xq int8 [n_tok, n_cols], xd float32 [n_tok, n_cols//32], xs float32 [n_tok, n_cols//32])
    for x float32 [n_tok, n_cols]; see `quantize_activations_into`. Quantize once, reuse for
    every matrix that reads the same x (q, k, v projections)."""
    return _new_activations(x, 1, 0)


@njit(cache=True, nogil=True)
def _decode_row_q8(w_u8, w_type, row_offset, n_blocks, wq, wd, wm):
    """Integer form of one Q8_0/Q4_0/Q4_1 row: wq int8 [n_blocks*32] (Q8_0: q; Q4_0: nibble - 8;
    Q4_1: nibble 0..15), wd float32 [n_blocks] scales, wm float32 [n_blocks] mins (Q4_1; else 0)."""
    block_bytes = _BLOCK_BYTES_BY_ID[w_type]
    for b in range(n_blocks):
        o = row_offset + b * block_bytes
        wd[b] = half_bits_to_float(np.int64(w_u8[o]) | (np.int64(w_u8[o + 1]) << 8))
        wm[b] = 0.0
        if w_type == Q8_0:
            for i in range(QK):
                wq[b * QK + i] = np.int8(w_u8[o + 2 + i])        # reinterpret the byte as int8
        else:
            q_offset = o + 2
            bias = 8
            if w_type == Q4_1:
                wm[b] = half_bits_to_float(np.int64(w_u8[o + 2]) | (np.int64(w_u8[o + 3]) << 8))
                q_offset = o + 4
                bias = 0
            for j in range(QK // 2):
                byte = np.int32(w_u8[q_offset + j])
                wq[b * QK + j] = (byte & 0xF) - bias
                wq[b * QK + j + QK // 2] = (byte >> 4) - bias


@njit(cache=True, nogil=True)
def is_exact_type(w_type):
    """Q5_0, Q5_1, IQ4_NL: int8 path with the exact (same bits in C and Numba) arithmetic."""
    return w_type == Q5_0 or w_type == Q5_1 or w_type == IQ4_NL


@njit(cache=True, nogil=True)
def _decode_row_exact(w_u8, w_type, row_offset, n_blocks, wq, wd, wm):
    """Integer form of one Q5_0/Q5_1/IQ4_NL row, W = wd * wq + wm per block (as kernels/csrc/qdot.c
    section 4): wq int8 [n_blocks*32] (Q5_0, Q5_1: the 5-bit values 0..31; IQ4_NL: the codebook
    values), wd float32 [n_blocks], wm float32 [n_blocks] (Q5_0: -16 wd; Q5_1: m; IQ4_NL: 0)."""
    block_bytes = _BLOCK_BYTES_BY_ID[w_type]
    for b in range(n_blocks):
        o = row_offset + b * block_bytes
        d = half_bits_to_float(np.int64(w_u8[o]) | (np.int64(w_u8[o + 1]) << 8))
        wd[b] = d
        if w_type == IQ4_NL:                        # [0:2] d | [2:18] qs
            wm[b] = 0.0
            for j in range(QK // 2):
                byte = np.int64(w_u8[o + 2 + j])
                wq[b * QK + j] = KVALUES_IQ4NL[byte & 0xF]
                wq[b * QK + j + QK // 2] = KVALUES_IQ4NL[byte >> 4]
            continue
        qh_offset = o + 2                           # Q5_0: [0:2] d | [2:6] qh | [6:22] qs
        if w_type == Q5_0:
            wm[b] = np.float32(-16.0) * d
        else:                                       # Q5_1: [0:2] d | [2:4] m | [4:8] qh | [8:24] qs
            wm[b] = half_bits_to_float(np.int64(w_u8[o + 2]) | (np.int64(w_u8[o + 3]) << 8))
            qh_offset = o + 4
        qh = np.int64(0)
        for k in range(4):
            qh |= np.int64(w_u8[qh_offset + k]) << (8 * k)
        for j in range(QK // 2):
            byte = np.int64(w_u8[qh_offset + 4 + j])
            wq[b * QK + j] = (byte & 0xF) | (((qh >> j) & 1) << 4)
            wq[b * QK + j + QK // 2] = (byte >> 4) | (((qh >> (j + QK // 2)) & 1) << 4)


@njit(cache=True, nogil=True)
def _group_sum(p):
    """The fixed order of an 8-block group's float sum (that of the C kernels' horizontal sum)."""
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))


@njit(cache=True, nogil=True, parallel=True)
def _matmul_exact_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out, bytes_per_row):
    """The exact int8 path of Q5_0/Q5_1/IQ4_NL (the reference of kernels/csrc/qdot.c section 4,
    bit for bit): per (row, token), blocks in groups of 8, the last one padded with p = 0,

        isum_b = sum_i wq_i * xq_i                    exact integer
        p_j    = (wd_b * xd_b) * float32(isum_b)  (+ wm_b * xs_b: Q5_0, Q5_1)     b = first + j
        acc    = acc + (((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)))

    in float32 without fused multiply-adds (no fastmath here)."""
    n_tok = xq.shape[0]
    n_blocks = n_cols // QK
    mins = w_type != IQ4_NL
    n_tiles = (n_rows + ROW_TILE - 1) // ROW_TILE if n_tok > 0 else 0
    for tile in prange(n_tiles):
        wq = np.empty(n_cols, dtype=np.int8)
        wd = np.empty(n_blocks, dtype=np.float32)
        wm = np.empty(n_blocks, dtype=np.float32)
        p = np.empty(GROUP_BLOCKS, dtype=np.float32)
        for r in range(tile * ROW_TILE, min(n_rows, (tile + 1) * ROW_TILE)):
            _decode_row_exact(w_u8, w_type, r * bytes_per_row, n_blocks, wq, wd, wm)
            for t in range(n_tok):
                acc = np.float32(0.0)
                for first in range(0, n_blocks, GROUP_BLOCKS):
                    for j in range(GROUP_BLOCKS):
                        b = first + j
                        if b >= n_blocks:
                            p[j] = np.float32(0.0)
                            continue
                        isum = np.int32(0)
                        for i in range(b * QK, (b + 1) * QK):
                            isum += np.int32(wq[i]) * np.int32(xq[t, i])
                        v = (wd[b] * xd[t, b]) * np.float32(isum)
                        if mins:
                            v = v + wm[b] * xs[t, b]
                        p[j] = v
                    acc = acc + _group_sum(p)
                out[t, r] = acc


@njit(cache=True, nogil=True)
def _check_q8_args(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out):
    """Shared checks of the int8 entry points; returns row_bytes."""
    if w_type != Q8_0 and w_type != Q4_0 and w_type != Q4_1 and not is_exact_type(w_type):
        raise ValueError("matmul_q8: w_type must be Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL")
    bytes_per_row = _check_weights(w_u8, w_type, n_rows, n_cols)
    n_tok = xq.shape[0]
    if xq.shape[1] != n_cols:
        raise ValueError("matmul_q8: xq must have shape (n_tok, n_cols)")
    if (xd.shape[0] != n_tok or xd.shape[1] != n_cols // QK or xs.shape[0] != n_tok
            or xs.shape[1] != n_cols // QK):
        raise ValueError("matmul_q8: xd and xs must have shape (n_tok, n_cols // 32)")
    _check_out(n_tok, n_rows, out)
    return bytes_per_row


@njit(cache=True, nogil=True)
def matmul_q8_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out):
    """Numba int8 path (the reference for the C kernels). Q8_0, Q4_0, Q4_1: out[t, r] = sum over
    blocks b of wd[b] * xd[t, b] * isum(b) (+ wm[b] * xs[t, b] for Q4_1), isum an exact int32 dot
    product, blocks accumulated in order b = 0, 1, ... in float32 (the C kernels sum in another
    order). Q5_0, Q5_1, IQ4_NL: `_matmul_exact_numba`, bit for bit the C kernels.
    """
    bytes_per_row = _check_q8_args(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out)
    if is_exact_type(w_type):
        _matmul_exact_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out, bytes_per_row)
    else:
        _matmul_q8_rows_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out, bytes_per_row)


@njit(cache=True, nogil=True, parallel=True)
def _matmul_q8_rows_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out, bytes_per_row):
    n_tok = xq.shape[0]
    n_blocks = n_cols // QK
    n_tiles = (n_rows + ROW_TILE - 1) // ROW_TILE if n_tok > 0 else 0
    for tile in prange(n_tiles):
        wq = np.empty(n_cols, dtype=np.int8)          # one row of W as integers
        wd = np.empty(n_blocks, dtype=np.float32)     # its block scales
        wm = np.empty(n_blocks, dtype=np.float32)     # its block mins (Q4_1)
        products = np.empty(n_cols, dtype=np.int32)   # wq * xq[t], exact
        for r in range(tile * ROW_TILE, min(n_rows, (tile + 1) * ROW_TILE)):
            _decode_row_q8(w_u8, w_type, r * bytes_per_row, n_blocks, wq, wd, wm)
            for t in range(n_tok):
                xq_t = xq[t]
                for i in range(n_cols):               # a flat loop: LLVM vectorizes it
                    products[i] = np.int32(wq[i]) * np.int32(xq_t[i])
                acc = np.float32(0.0)
                for b in range(n_blocks):
                    isum = np.int32(0)
                    for i in range(b * QK, (b + 1) * QK):
                        isum += products[i]
                    acc += (wd[b] * xd[t, b]) * np.float32(isum) + wm[b] * xs[t, b]
                out[t, r] = acc


# -- C kernels, one call per row tile ----------------------------------------------------------

@njit(cache=True, nogil=True)
def _is_contiguous(a):
    """Whether a is C-contiguous at run time (a slice typed 'A' by Numba can still be). An empty
    array is (nothing is read; NumPy 2 gives its dimensions stride 0)."""
    if a.size == 0:
        return True
    expected = a.itemsize
    for dim in range(a.ndim - 1, -1, -1):
        if a.shape[dim] != 1 and a.strides[dim] != expected:
            return False
        expected *= a.shape[dim]
    return True


@njit(cache=True, nogil=True)
def _raise_if_failed(status):
    for s in status:
        if s != 0:
            raise RuntimeError("matmul: the C kernel failed (extension not loaded, or it rejected "
                               "arguments that passed the Python-side checks)")


@njit(cache=True, nogil=True, parallel=True)
def matmul_f32_native(w_u8, w_type, n_rows, n_cols, x, out):
    """C float path (`lme_matmul_f32`), row tiles over threads. Arrays must be C-contiguous."""
    _check_weights(w_u8, w_type, n_rows, n_cols)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError("matmul: x must have shape (n_tok, n_cols)")
    n_tok = x.shape[0]
    _check_out(n_tok, n_rows, out)
    if not (_is_contiguous(w_u8) and _is_contiguous(x) and _is_contiguous(out)):
        raise ValueError("matmul_f32_native: w_u8, x and out must be C-contiguous")
    n_tiles = (n_rows + ROW_TILE - 1) // ROW_TILE
    status = np.zeros(n_tiles, dtype=np.int32)
    for tile in prange(n_tiles):
        status[tile] = native.c_matmul_f32(w_type, w_u8, n_rows, n_cols, tile * ROW_TILE,
                                           min(n_rows, (tile + 1) * ROW_TILE), x, n_tok, out)
    _raise_if_failed(status)


@njit(cache=True, nogil=True, parallel=True)
def matmul_q8_native(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out):
    """C int8 path (`lme_matmul_q8`), row tiles over threads. Arrays must be C-contiguous."""
    _check_q8_args(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out)
    if not (_is_contiguous(w_u8) and _is_contiguous(xq) and _is_contiguous(xd)
            and _is_contiguous(xs) and _is_contiguous(out)):
        raise ValueError("matmul_q8_native: w_u8, xq, xd, xs and out must be C-contiguous")
    n_tok = xq.shape[0]
    n_tiles = (n_rows + ROW_TILE - 1) // ROW_TILE
    status = np.zeros(n_tiles, dtype=np.int32)
    for tile in prange(n_tiles):
        status[tile] = native.c_matmul_q8(w_type, w_u8, n_rows, n_cols, tile * ROW_TILE,
                                          min(n_rows, (tile + 1) * ROW_TILE), xq, xd, xs, n_tok, out)
    _raise_if_failed(status)


# -- public entry points: C when loaded in this process (and arrays contiguous), else Numba -----

@njit(cache=True, nogil=True)
def use_native():
    """True when the C kernels are bound in this process (decided at run time, not compile time)."""
    return native.c_native_available() == 1


@njit(cache=True, nogil=True)
def matmul_f32(w_u8, w_type, n_rows, n_cols, x, out):
    """Float path: out[t, r] = dot(dequantize(W[r]), x[t]); x float32 [n_tok, n_cols],
    out float32 [n_tok, n_rows]. Any ggml type `lmengine.kernels.quant` decodes (C: F32, F16, BF16, Q8_0,
    Q4_0, Q4_1; others and non-contiguous arrays go to the Numba kernel)."""
    c_type = (w_type == F32 or w_type == F16 or w_type == BF16 or w_type == Q8_0
              or w_type == Q4_0 or w_type == Q4_1)
    if (c_type and use_native() and _is_contiguous(w_u8) and _is_contiguous(x)
            and _is_contiguous(out)):
        matmul_f32_native(w_u8, w_type, n_rows, n_cols, x, out)
    else:
        matmul_f32_numba(w_u8, w_type, n_rows, n_cols, x, out)


@njit(cache=True, nogil=True)
def matmul_q8(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out):
    """int8 path on activations from `quantize_activations` (w_type Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
    or IQ4_NL): out float32 [n_tok, n_rows]."""
    if (use_native() and _is_contiguous(w_u8) and _is_contiguous(xq) and _is_contiguous(xd)
            and _is_contiguous(xs) and _is_contiguous(out)):
        matmul_q8_native(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out)
    else:
        matmul_q8_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xs, out)


# Activation precision of `matmul` (its `act` argument)
ACT_F32 = 0      # float32 activations: the exact path
ACT_INT8 = 1     # one int8 term per 32-block, as ggml: the fastest path
ACT_INT8X2 = 2   # two int8 terms (value + rounding residual): ~15-bit activations, float accuracy


@njit(cache=True, nogil=True)
def quantize_activations_x2(x):
    """Two-term int8 quantization of x float32 [n_tok, n_cols] as 2 * n_tok rows: rows t are
    x's usual int8 blocks (xd1 * xq1), rows n_tok + t quantize the residual x - xd1 * xq1 (at most
    xd1 / 2 per value), so x = xd1 * xq1 + xd2 * xq2 up to xd1 / 254. A matrix product over the
    2 n_tok rows reads each weight block once; summing row t and row n_tok + t gives W x with
    about 15 bits of activation precision for little more than the int8 path's cost in decode."""
    return _new_activations(x, 2, 0)


# -- K-quant weights (Q2_K .. Q6_K, IQ4_XS) with Q8_K activations (kernels/kquant.py, kquants.c) ----

@njit(cache=True, nogil=True)
def is_k_type(w_type):
    return k_block_bytes(w_type) > 0


@njit(cache=True, nogil=True)
def quantize_q8k_terms(x, n_terms):
    """x float32 [n_tok, n_cols] as Q8_K activations in n_terms (1 or 2) terms, 256-value blocks
    (see kernels/kquant.py): rows t of (xq, xd, xsum) are x's blocks; with two terms rows
    n_tok + t quantize the residual x - xd * xq, as quantize_activations_x2 does for 32-blocks."""
    n_tok, n_cols = x.shape
    xq = np.empty((n_terms * n_tok, n_cols), dtype=np.int8)
    xd = np.empty((n_terms * n_tok, n_cols // QK_K), dtype=np.float32)
    xsum = np.empty((n_terms * n_tok, n_cols // 16), dtype=np.int16)
    _quantize_q8k_rows(x, xq[:n_tok], xd[:n_tok], xsum[:n_tok])
    if n_terms == 2:
        residual = np.empty_like(x)
        for t in range(n_tok):
            for i in range(n_cols):
                residual[t, i] = x[t, i] - xd[t, i // QK_K] * np.float32(xq[t, i])
        _quantize_q8k_rows(residual, xq[n_tok:], xd[n_tok:], xsum[n_tok:])
    return xq, xd, xsum


@njit(cache=True, nogil=True)
def _quantize_q8k_rows(x, xq, xd, xsum):
    """The C quantizer when loaded (same bits as the Numba loop), else the Numba loop."""
    if use_native() and _is_contiguous(x) and _is_contiguous(xq) and _is_contiguous(xd) and _is_contiguous(xsum):
        if native.c_quantize_q8k(x, xq, xd, xsum) == 0:
            return
    quantize_q8k_into(x, xq, xd, xsum)


@njit(cache=True, nogil=True, parallel=True)
def matmul_k_native(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out):
    """C K-quant path (`lme_matmul_k`), row tiles over threads. Arrays must be C-contiguous."""
    n_tiles = (n_rows + ROW_TILE - 1) // ROW_TILE
    status = np.zeros(n_tiles, dtype=np.int32)
    for tile in prange(n_tiles):
        status[tile] = native.c_matmul_k(w_type, w_u8, n_rows, n_cols, tile * ROW_TILE,
                                         min(n_rows, (tile + 1) * ROW_TILE), xq, xd, xsum, xq.shape[0], out)
    _raise_if_failed(status)


@njit(cache=True, nogil=True)
def matmul_k(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out):
    """K-quant weights times Q8_K activations (from quantize_q8k_terms): out float32
    [n_tok, n_rows]. C when loaded (and arrays contiguous), else the Numba reference."""
    if (use_native() and _is_contiguous(w_u8) and _is_contiguous(xq) and _is_contiguous(xd)
            and _is_contiguous(xsum) and _is_contiguous(out)):
        _check_weights(w_u8, w_type, n_rows, n_cols)
        if xq.shape[1] != n_cols or out.shape[0] != xq.shape[0] or out.shape[1] != n_rows:
            raise ValueError("matmul_k: xq/out shapes do not match the matrix")
        matmul_k_native(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out)
    else:
        matmul_k_numba(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, out)


@njit(cache=True, nogil=True)
def _matmul_int_terms(w_u8, w_type, n_rows, n_cols, x, out, n_terms):
    """The integer path of `matmul`: x quantized in n_terms terms (32-value blocks for
    Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL, Q8_K's 256-value blocks for the K types), one product over all terms' rows
    (each weight block read once), then the terms summed in a fixed order."""
    _check_weights(w_u8, w_type, n_rows, n_cols)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError("matmul: x must have shape (n_tok, n_cols)")
    n_tok = x.shape[0]
    _check_out(n_tok, n_rows, out)
    target = out if n_terms == 1 else np.empty((n_terms * n_tok, n_rows), dtype=np.float32)
    if is_k_type(w_type):
        xq, xd, xsum = quantize_q8k_terms(x, n_terms)
        matmul_k(w_u8, w_type, n_rows, n_cols, xq, xd, xsum, target)
    else:
        xq, xd, xs = quantize_activations_x2(x) if n_terms == 2 else quantize_activations(x)
        matmul_q8(w_u8, w_type, n_rows, n_cols, xq, xd, xs, target)
    if n_terms == 2:
        for t in range(n_tok):
            for r in range(n_rows):
                out[t, r] = target[t, r] + target[n_tok + t, r]


@njit(cache=True, nogil=True)
def has_int_path(w_type, n_cols):
    """Whether `matmul` has an integer path for this type (K types need whole superblocks)."""
    return (w_type == Q8_0 or w_type == Q4_0 or w_type == Q4_1 or is_exact_type(w_type)
            or (is_k_type(w_type) and n_cols % QK_K == 0))


@njit(cache=True, nogil=True)
def matmul(w_u8, w_type, n_rows, n_cols, x, out, act):
    """out float32 [n_tok, n_rows] = W @ x.T for W raw ggml blocks (n_rows, n_cols) of w_type and
    x float32 [n_tok, n_cols]. act: ACT_F32 (or False) float path (exact); ACT_INT8 (or True)
    integer dot products on int8 activations (32-value blocks for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL, Q8_K's
    256-value blocks for the K types and IQ4_XS: the fast path); ACT_INT8X2 two int8 terms (see
    quantize_activations_x2). F32/F16/BF16 weights always take the float path."""
    if act != ACT_F32 and has_int_path(w_type, n_cols):
        _matmul_int_terms(w_u8, w_type, n_rows, n_cols, x, out, 2 if act == ACT_INT8X2 else 1)
    else:
        matmul_f32(w_u8, w_type, n_rows, n_cols, x, out)


# -- packed matrices (kernels/csrc/packed.c: 16 rows interleaved, for AVX2 and AVX-512 VNNI) ------

# Bytes added to each row of the packed product's int8 activations. Unpadded, the rows of a
# 4096- or 8192-column matrix are a multiple of 4 KB apart: the 8 tokens the AVX2 kernel reads
# together then share the same L1 sets and evict each other while the weights stream through.
# One thread, 2048 x 8192, 8 / 16 tokens, GMAC/s unpadded -> padded (Zen 3, 2026-12-06): Q4_K
# 65 / 66 -> 81 / 82, Q6_K 50 / 51 -> 58 / 58, Q4_0 68 / 70 -> 83 / 85; 2048 columns unchanged
# (docs/ARCHITECTURE.md, "Padded activation rows").
X_ROW_PAD = 64


@njit(cache=True, nogil=True)
def padded_activations(x, n_terms):
    """(xq, xd, xs) for the packed product: x float32 [n_tok, n_cols] in n_terms (1 or 2) int8
    terms, as quantize_activations / quantize_activations_x2 give them, but with xq's rows
    n_cols + X_ROW_PAD bytes long (the pad is never read)."""
    return _new_activations(x, n_terms, X_ROW_PAD)


@njit(cache=True, nogil=True, parallel=True)
def _packed_groups(p_u8, w_type, n_rows, n_cols, xq, xd, xs, n_tok, group_terms, out):
    """The C product over groups of 16 rows on threads; group g with group_terms[g] terms."""
    n_groups = (n_rows + native.PACK_ROWS - 1) // native.PACK_ROWS
    status = np.zeros(n_groups, dtype=np.int32)
    for group in prange(n_groups):
        row_begin = group * native.PACK_ROWS
        status[group] = native.c_matmul_packed(w_type, p_u8, n_rows, n_cols, row_begin,
                                               min(n_rows, row_begin + native.PACK_ROWS),
                                               xq, xd, xs, n_tok, group_terms[group], out)
    _raise_if_failed(status)


@njit(cache=True, nogil=True)
def _check_packed_args(p_u8, n_rows, n_cols, xq, xd, xs, n_terms, out):
    n_tok = out.shape[0]
    if n_terms != 1 and n_terms != 2:
        raise ValueError("matmul_packed_q8: n_terms must be 1 or 2")
    if (out.shape[1] != n_rows or xq.shape[0] != n_terms * n_tok or xq.shape[1] < n_cols
            or xd.shape[0] != xq.shape[0] or xd.shape[1] != n_cols // QK or xs.shape[0] != xq.shape[0]
            or xs.shape[1] != n_cols // QK):
        raise ValueError("matmul_packed_q8: xq/xd/xs/out shapes do not match (n_tok, n_rows, n_cols)")
    if not (_is_contiguous(p_u8) and _is_contiguous(xq) and _is_contiguous(xd) and _is_contiguous(xs)
            and _is_contiguous(out)):
        raise ValueError("matmul_packed_q8: p_u8, xq, xd, xs and out must be C-contiguous")


@njit(cache=True, nogil=True)
def matmul_packed_q8(p_u8, w_type, n_rows, n_cols, xq, xd, xs, n_terms, out):
    """out float32 [n_tok, n_rows] = W x for W packed by `lmengine.kernels.native.pack_q8` (p_u8 uint8) and
    x given as n_terms (1 or 2) int8 terms: xq int8 [n_terms * n_tok, n_cols] (or rows longer
    than n_cols, padded as `padded_activations` pads them), xd, xs float32
    [n_terms * n_tok, n_cols // 32], term j of token t in row j * n_tok + t (from
    `quantize_activations`, `quantize_activations_x2` or `padded_activations`). Groups of 16
    rows over threads.
    Needs the C extension (packed matrices exist only where it is loaded)."""
    _check_packed_args(p_u8, n_rows, n_cols, xq, xd, xs, n_terms, out)
    n_groups = (n_rows + native.PACK_ROWS - 1) // native.PACK_ROWS
    _packed_groups(p_u8, w_type, n_rows, n_cols, xq, xd, xs, out.shape[0],
                   np.full(n_groups, n_terms, dtype=np.int64), out)


@njit(cache=True, nogil=True)
def matmul_packed_parts(p_u8, w_type, part_rows, n_cols, x, out, part_acts):
    """out float32 [n_tok, sum(part_rows)] = W @ x.T for a packed W made of parts stacked by rows
    (part i: part_rows[i] rows; every part but the last a whole number of 16-row groups), part i
    with activation precision part_acts[i] (ACT_INT8 or ACT_INT8X2). x is quantized once, with
    two terms if any part takes them (the first term is the one-term quantization), so fused
    products such as q|k|v may mix precisions."""
    n_rows = 0
    n_terms = 1
    for i in range(part_rows.shape[0]):
        if part_acts[i] != ACT_INT8 and part_acts[i] != ACT_INT8X2:
            raise ValueError("matmul_packed: act must be ACT_INT8 or ACT_INT8X2")
        if i + 1 < part_rows.shape[0] and part_rows[i] % native.PACK_ROWS != 0:
            raise ValueError("matmul_packed_parts: every part but the last must have whole 16-row groups")
        if part_acts[i] == ACT_INT8X2:
            n_terms = 2
        n_rows += part_rows[i]
    if x.ndim != 2 or x.shape[1] != n_cols or n_cols % QK != 0:
        raise ValueError("matmul_packed: x must have shape (n_tok, n_cols), n_cols a multiple of 32")
    xq, xd, xs = padded_activations(x, n_terms)
    _check_packed_args(p_u8, n_rows, n_cols, xq, xd, xs, n_terms, out)
    group_terms = np.empty((n_rows + native.PACK_ROWS - 1) // native.PACK_ROWS, dtype=np.int64)
    first = 0
    for i in range(part_rows.shape[0]):
        end = (first + part_rows[i] + native.PACK_ROWS - 1) // native.PACK_ROWS
        group_terms[first // native.PACK_ROWS: end] = 2 if part_acts[i] == ACT_INT8X2 else 1
        first += part_rows[i]
    _packed_groups(p_u8, w_type, n_rows, n_cols, xq, xd, xs, x.shape[0], group_terms, out)


@njit(cache=True, nogil=True)
def matmul_packed(p_u8, w_type, n_rows, n_cols, x, out, act):
    """out float32 [n_tok, n_rows] = W @ x.T for a packed W (see matmul_packed_q8) and x float32
    [n_tok, n_cols], activations quantized as `act` says (ACT_INT8 or ACT_INT8X2; packed
    matrices have no float path)."""
    matmul_packed_parts(p_u8, w_type, np.full(1, n_rows, dtype=np.int64), n_cols, x, out,
                        np.full(1, act, dtype=np.int64))
