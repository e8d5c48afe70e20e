"""ggml block quant formats: type table, dequantize and quantize, bit for bit as ggml stores them.

A weight is raw ggml blocks: a 1-D uint8 array plus a ggml type id. A block holds `block_size`
values in `block_bytes` bytes; a row of n_cols values is n_cols / block_size whole blocks, and a
matrix stores row r at bytes [r * row_bytes, (r + 1) * row_bytes).

    type    id  values/block  bytes/block  value
    F32      0       1             4       f32
    F16      1       1             2       f16
    BF16    30       1             2       bf16 (the top half of an f32)
    Q8_0     8      32            34       d * q                  q int8
    Q4_0     2      32            18       d * (q - 8)            q 4 bit
    Q4_1     3      32            20       d * q + m              q 4 bit
    Q5_0     6      32            22       d * (q - 16)           q 5 bit
    Q5_1     7      32            24       d * q + m              q 5 bit
    Q2_K    10     256            84       d*sc * q - dmin*mn     q 2 bit, sc/mn 4 bit per 16
    Q3_K    11     256           110       d*(sc-32) * (q - 4)    q 3 bit, sc 6 bit per 16
    Q4_K    12     256           144       d*sc * q - dmin*mn     q 4 bit, sc/mn 6 bit per 32
    Q5_K    13     256           176       d*sc * q - dmin*mn     q 5 bit, sc/mn 6 bit per 32
    Q6_K    14     256           210       d*sc * (q - 32)        q 6 bit, sc int8 per 16
    IQ4_NL  20      32            18       d * KV[q]              q 4 bit index into 16 int8 levels
    IQ4_XS  23     256           136       d*(sc-32) * KV[q]      q 4 bit, sc 6 bit per 32

All multi-byte fields are little-endian; d, m, dmin are f16. Each `dequantize_block_*` below
carries the byte layout of its block. Arithmetic is float32 in ggml's order of operations (no
fused multiply-add: these functions never use fastmath), so results equal ggml's dequantization
and the `gguf` package's, bit for bit.

Quantizers (`quantize_block_*`) write the bytes llama.cpp's file quantizer (`llama_model_quantize`,
no importance matrix) writes. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: ggml's quantize_row_*_ref, which the
`gguf` package ports to NumPy; the two differ only in signs of zero (an all-zero block whose first
value is -0: d or m) and in blocks of values below 2^-128 (1 / d overflows), where we follow ggml
and the decoded values are the same. Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS (no gguf port):
ggml-quants.c `quantize_row_q{4,5,6}_K_ref` (their least-squares scale searches
`make_qkx2_quants` / `make_qx_quants`) and `quantize_iq4_nl` / `quantize_iq4_xs` (7 trial scales
each side). Those searches are float32 code whose result depends on the exact order of operations
and on rounding to nearest even (`nearest_int`), so the Numba code here keeps ggml's order, every
operand float32 (an int or a Python float literal would promote to float64 in Numba), and no FMA.

Numba has little float16 support, so half precision is converted here by bit manipulation
(`half_bits_to_float`, `float_to_half_bits`, round to nearest even).

Every Numba function here is `njit(cache=True, nogil=True)` and can be called from other Numba
kernels (matmul reads blocks through `load_f16` and the `dequantize_block_*` functions).
The Python entry points `dequantize` and `quantize` check their arguments and raise
`UnsupportedTypeError` / `QuantShapeError` (both ValueError) with a message naming the values;
`kernels` imports nothing from `engine`, which maps them onto its own exception classes.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

# -- ggml type table ---------------------------------------------------------------------------

F32 = 0
F16 = 1
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
IQ4_NL = 20
IQ4_XS = 23
BF16 = 30

QK = 32     # values per block of the 32-value formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL)
QK_K = 256  # values per super-block of the K formats (Q2_K .. Q6_K, IQ4_XS)
K_SCALE_BYTES = 12  # packed 6-bit scales and mins of Q4_K / Q5_K: 8 + 8 values in 12 bytes

TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
              Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K",
              IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS", BF16: "BF16"}
TYPE_IDS = {name: type_id for type_id, name in TYPE_NAMES.items()}

BLOCK_SIZE = {F32: 1, F16: 1, BF16: 1, Q8_0: QK, Q4_0: QK, Q4_1: QK, Q5_0: QK, Q5_1: QK,
              IQ4_NL: QK, Q2_K: QK_K, Q3_K: QK_K, Q4_K: QK_K, Q5_K: QK_K, Q6_K: QK_K,
              IQ4_XS: QK_K}                                           # values per block
BLOCK_BYTES = {F32: 4, F16: 2, BF16: 2, Q8_0: 2 + QK, Q4_0: 2 + QK // 2, Q4_1: 4 + QK // 2,
               Q5_0: 2 + 4 + QK // 2, Q5_1: 4 + 4 + QK // 2, IQ4_NL: 2 + QK // 2,
               Q2_K: QK_K // 16 + QK_K // 4 + 4,
               Q3_K: QK_K // 8 + QK_K // 4 + 12 + 2,
               Q4_K: 4 + K_SCALE_BYTES + QK_K // 2,
               Q5_K: 4 + K_SCALE_BYTES + QK_K // 8 + QK_K // 2,
               Q6_K: QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,
               IQ4_XS: 2 + 2 + QK_K // 64 + QK_K // 2}                # bytes per block

# types `quantize` can produce (everything but Q2_K and Q3_K)
QUANTIZE_TYPES = (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)
FLOAT_TYPES = (F32, F16, BF16)  # stored values, not blocks with scales

# The 16 levels of IQ4_NL / IQ4_XS (ggml's kvalues_iq4nl): a 4-bit index selects one.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)

# The same table as int64 arrays indexed by type id, for Numba code (0 = not a supported type).
N_TYPE_IDS = max(TYPE_NAMES) + 1
BLOCK_SIZE_BY_ID = np.zeros(N_TYPE_IDS, dtype=np.int64)
BLOCK_BYTES_BY_ID = np.zeros(N_TYPE_IDS, dtype=np.int64)
for _t in TYPE_NAMES:
    BLOCK_SIZE_BY_ID[_t] = BLOCK_SIZE[_t]
    BLOCK_BYTES_BY_ID[_t] = BLOCK_BYTES[_t]
del _t


class UnsupportedTypeError(ValueError):
    """A ggml type id that no kernel here implements (or cannot quantize to)."""


class QuantShapeError(ValueError):
    """A row length that is not whole blocks, or a buffer whose length disagrees with its shape."""


def _check_type(type_id, supported=None) -> int:
    """type_id as int, or UnsupportedTypeError naming it and the supported types."""
    supported = TYPE_NAMES if supported is None else supported
    try:
        tid = int(type_id)
    except (TypeError, ValueError):
        raise UnsupportedTypeError(f"ggml type id must be an int, got {type_id!r}") from None
    if tid not in supported:
        names = ", ".join(f"{TYPE_NAMES[t]}={t}" for t in sorted(supported))
        raise UnsupportedTypeError(f"unsupported ggml type id {tid} (supported: {names})")
    return tid


def type_name(type_id) -> str:
    """'Q4_1' for 3, etc."""
    return TYPE_NAMES[_check_type(type_id)]


def block_size(type_id) -> int:
    """Values per block."""
    return BLOCK_SIZE[_check_type(type_id)]


def block_bytes(type_id) -> int:
    """Bytes per block."""
    return BLOCK_BYTES[_check_type(type_id)]


def check_row_length(type_id, n_cols) -> None:
    """QuantShapeError unless a row of n_cols values is a whole number of blocks."""
    tid = _check_type(type_id)
    n_cols = int(n_cols)
    if n_cols < 0 or n_cols % BLOCK_SIZE[tid] != 0:
        raise QuantShapeError(
            f"a {TYPE_NAMES[tid]} row must hold a non-negative multiple of {BLOCK_SIZE[tid]} values, "
            f"got {n_cols}")


def row_bytes(type_id, n_cols) -> int:
    """Bytes of one row of n_cols values (n_cols a multiple of the block size)."""
    check_row_length(type_id, n_cols)
    tid = int(type_id)
    return int(n_cols) // BLOCK_SIZE[tid] * BLOCK_BYTES[tid]


# -- bit casts and half precision ----------------------------------------------------------------

@intrinsic
def _bits_as_f32(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        i32 = ir.IntType(32)
        if bits.bitwidth > 32:
            value = builder.trunc(value, i32)
        elif bits.bitwidth < 32:
            value = builder.zext(value, i32)
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The IEEE bits of a float32, as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@njit(cache=True, nogil=True)
def half_bits_to_float(h):
    """float32 value of the f16 with bits h (0..65535). Exact; inf stays inf, NaN stays NaN (payload kept)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0x1F:                      # inf / NaN
        return _bits_as_f32(sign | 0x7F800000 | (mantissa << 13))
    if exponent == 0:
        if mantissa == 0:                     # +-0
            return _bits_as_f32(sign)
        # subnormal: mantissa * 2^-24; shift the leading 1 up to the implicit-bit position
        exponent = 1
        while (mantissa & 0x400) == 0:
            mantissa <<= 1
            exponent -= 1
        mantissa &= 0x3FF
    return _bits_as_f32(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13))


@njit(cache=True, nogil=True)
def float_to_half_bits(x):
    """f16 bits (int) of the float32 x, rounded to nearest, ties to even (as numpy and F16C do).

    Overflow gives inf; NaN gives a quiet NaN with the sign and top payload bits kept.
    """
    bits = np.int64(_f32_bits(np.float32(x)))
    sign = (bits >> 16) & 0x8000
    ax = bits & 0x7FFFFFFF
    if ax >= 0x7F800000:                       # inf / NaN
        if ax == 0x7F800000:
            return sign | 0x7C00
        return sign | 0x7E00 | ((ax >> 13) & 0x3FF)
    if ax >= 0x477FF000:                       # >= 65520: rounds past 65504 to inf
        return sign | 0x7C00
    if ax >= 0x38800000:                       # >= 2^-14: a normal f16
        rebiased = ax - ((127 - 15) << 23)     # exponent bias 127 -> 15
        h = rebiased >> 13
        rest = rebiased & 0x1FFF
        if rest > 0x1000 or (rest == 0x1000 and (h & 1) == 1):
            h += 1                             # a carry into the exponent is still correct
        return sign | h
    exponent = ax >> 23
    if exponent < 102:                         # < 2^-25: rounds to zero
        return sign
    # f16 subnormal: value / 2^-24 = significand >> (126 - exponent), rounded to nearest even
    significand = (ax & 0x7FFFFF) | 0x800000
    shift = 126 - exponent                     # 14..24
    h = significand >> shift
    rest = significand & ((1 << shift) - 1)
    halfway = 1 << (shift - 1)
    if rest > halfway or (rest == halfway and (h & 1) == 1):
        h += 1
    return sign | h


@njit(cache=True, nogil=True)
def load_f16(src, offset):
    """float32 value of the little-endian f16 at src[offset:offset+2] (src uint8)."""
    return half_bits_to_float(np.int64(src[offset]) | (np.int64(src[offset + 1]) << 8))


@njit(cache=True, nogil=True)
def store_f16(dst, offset, x):
    """Write the float32 x as a little-endian f16 at dst[offset:offset+2] (dst uint8)."""
    h = float_to_half_bits(x)
    dst[offset] = h & 0xFF
    dst[offset + 1] = h >> 8


@njit(cache=True, nogil=True)
def _load_i8(src, offset):
    """The byte at src[offset] as a signed int8 value."""
    v = np.int64(src[offset])
    return v - 256 if v >= 128 else v


@njit(cache=True, nogil=True)
def _load_u16(src, offset):
    """The little-endian uint16 at src[offset:offset+2]."""
    return np.int64(src[offset]) | (np.int64(src[offset + 1]) << 8)


@njit(cache=True, nogil=True)
def _load_u32(src, offset):
    """The little-endian uint32 at src[offset:offset+4]."""
    return _load_u16(src, offset) | (_load_u16(src, offset + 2) << 16)


@njit(cache=True, nogil=True)
def _store_u32(dst, offset, v):
    """Write the low 32 bits of v little-endian at dst[offset:offset+4]."""
    for k in range(4):
        dst[offset + k] = (v >> (8 * k)) & 0xFF


# -- dequantize: one block ----------------------------------------------------------------------
# Signature of every block decoder: (src uint8 [.. n_blocks * block_bytes], block_index,
# out float32, out_offset) -> writes block_size values to out[out_offset:].

@njit(cache=True, nogil=True)
def dequantize_block_f32(src, block_index, out, out_offset):
    """F32, 4 bytes: one little-endian float32."""
    o = block_index * 4
    bits = (np.int64(src[o]) | (np.int64(src[o + 1]) << 8) | (np.int64(src[o + 2]) << 16)
            | (np.int64(src[o + 3]) << 24))
    out[out_offset] = _bits_as_f32(bits)


@njit(cache=True, nogil=True)
def dequantize_block_f16(src, block_index, out, out_offset):
    """F16, 2 bytes: one little-endian f16."""
    out[out_offset] = load_f16(src, block_index * 2)


@njit(cache=True, nogil=True)
def dequantize_block_bf16(src, block_index, out, out_offset):
    """BF16, 2 bytes: the top 16 bits of a float32 (little-endian)."""
    o = block_index * 2
    out[out_offset] = _bits_as_f32((np.int64(src[o]) | (np.int64(src[o + 1]) << 8)) << 16)


@njit(cache=True, nogil=True)
def dequantize_block_q8_0(src, block_index, out, out_offset):
    """Q8_0, 34 bytes:  [0:2] d f16 | [2:34] q int8 x 32.   value[i] = q[i] * d."""
    o = block_index * 34
    d = load_f16(src, o)
    for i in range(32):
        out[out_offset + i] = np.float32(_load_i8(src, o + 2 + i)) * d


@njit(cache=True, nogil=True)
def dequantize_block_q4_0(src, block_index, out, out_offset):
    """Q4_0, 18 bytes:  [0:2] d f16 | [2:18] qs 16 bytes.

    Byte qs[j] holds value j in its low nibble and value j + 16 in its high nibble.
    value = d * (nibble - 8).
    """
    o = block_index * 18
    d = load_f16(src, o)
    for j in range(16):
        byte = np.int64(src[o + 2 + j])
        out[out_offset + j] = d * np.float32((byte & 0xF) - 8)
        out[out_offset + j + 16] = d * np.float32((byte >> 4) - 8)


@njit(cache=True, nogil=True)
def dequantize_block_q4_1(src, block_index, out, out_offset):
    """Q4_1, 20 bytes:  [0:2] d f16 | [2:4] m f16 | [4:20] qs 16 bytes.

    Byte qs[j] holds value j in its low nibble and value j + 16 in its high nibble.
    value = d * nibble + m.
    """
    o = block_index * 20
    d = load_f16(src, o)
    m = load_f16(src, o + 2)
    for j in range(16):
        byte = np.int64(src[o + 4 + j])
        out[out_offset + j] = d * np.float32(byte & 0xF) + m
        out[out_offset + j + 16] = d * np.float32(byte >> 4) + m


@njit(cache=True, nogil=True)
def k_scale_min(src, scales_offset, j):
    """6-bit (scale, min) of sub-block j (0..7) of a Q4_K/Q5_K super-block.

    The 12 scale bytes s[0..11] pack 8 scales and 8 mins of 6 bits:
      j < 4:  scale = s[j] & 63,                            min = s[j+4] & 63
      j >= 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4,   min = (s[j+4] >> 4) | (s[j] >> 6) << 4
    (the top two bits of sub-blocks 4..7 live in the spare top bits of bytes 0..7).
    """
    s = scales_offset
    if j < 4:
        scale = np.int64(src[s + j]) & 63
        mn = np.int64(src[s + j + 4]) & 63
    else:
        scale = (np.int64(src[s + j + 4]) & 0xF) | ((np.int64(src[s + j - 4]) >> 6) << 4)
        mn = (np.int64(src[s + j + 4]) >> 4) | ((np.int64(src[s + j]) >> 6) << 4)
    return scale, mn


@njit(cache=True, nogil=True)
def dequantize_block_q4_k(src, block_index, out, out_offset):
    """Q4_K, 144 bytes:  [0:2] d f16 | [2:4] dmin f16 | [4:16] scales (see k_scale_min)
    | [16:144] qs 128 bytes.

    8 sub-blocks of 32 values. qs is 4 chunks of 32 bytes; chunk c holds sub-block 2c in the low
    nibbles and sub-block 2c+1 in the high nibbles. value = (d*scale) * nibble - (dmin*min).
    """
    o = block_index * 144
    d = load_f16(src, o)
    dmin = load_f16(src, o + 2)
    for j in range(8):
        scale, mn = k_scale_min(src, o + 4, j)
        d_sub = d * np.float32(scale)
        m_sub = dmin * np.float32(mn)
        q_base = o + 16 + (j // 2) * 32
        shift = 4 * (j % 2)
        base = out_offset + j * 32
        for i in range(32):
            q = (np.int64(src[q_base + i]) >> shift) & 0xF
            out[base + i] = d_sub * np.float32(q) - m_sub


@njit(cache=True, nogil=True)
def dequantize_block_q5_k(src, block_index, out, out_offset):
    """Q5_K, 176 bytes:  [0:2] d f16 | [2:4] dmin f16 | [4:16] scales (see k_scale_min)
    | [16:48] qh 32 bytes | [48:176] qs 128 bytes.

    8 sub-blocks of 32 values. Low 4 bits as in Q4_K (qs chunk c: sub-block 2c low nibbles,
    2c+1 high nibbles); the 5th bit of value i of sub-block j is bit j of qh[i].
    value = (d*scale) * q - (dmin*min).
    """
    o = block_index * 176
    d = load_f16(src, o)
    dmin = load_f16(src, o + 2)
    qh = o + 16
    for j in range(8):
        scale, mn = k_scale_min(src, o + 4, j)
        d_sub = d * np.float32(scale)
        m_sub = dmin * np.float32(mn)
        q_base = o + 48 + (j // 2) * 32
        shift = 4 * (j % 2)
        base = out_offset + j * 32
        for i in range(32):
            low = (np.int64(src[q_base + i]) >> shift) & 0xF
            high = (np.int64(src[qh + i]) >> j) & 1
            out[base + i] = d_sub * np.float32(low | (high << 4)) - m_sub


@njit(cache=True, nogil=True)
def dequantize_block_q6_k(src, block_index, out, out_offset):
    """Q6_K, 210 bytes:  [0:128] ql | [128:192] qh | [192:208] scales int8 x 16 | [208:210] d f16.

    Two halves h of 128 values, each with 64 bytes of ql and 32 bytes of qh. Value r (0..127) of
    half h: low 4 bits = (ql[64h + r % 64] >> 4*(r // 64)) & 15,
            high 2 bits = (qh[32h + r % 32] >> 2*(r // 32)) & 3.
    value i (0..255) = (d * scales[i // 16]) * (q - 32).
    """
    o = block_index * 210
    d = load_f16(src, o + 208)
    for h in range(2):
        ql = o + 64 * h
        qh = o + 128 + 32 * h
        for r in range(128):
            low = (np.int64(src[ql + r % 64]) >> (4 * (r // 64))) & 0xF
            high = (np.int64(src[qh + r % 32]) >> (2 * (r // 32))) & 3
            i = 128 * h + r
            d_sub = d * np.float32(_load_i8(src, o + 192 + i // 16))
            out[out_offset + i] = d_sub * np.float32((low | (high << 4)) - 32)


@njit(cache=True, nogil=True)
def dequantize_block_q5_0(src, block_index, out, out_offset):
    """Q5_0, 22 bytes:  [0:2] d f16 | [2:6] qh uint32 | [6:22] qs 16 bytes.

    Value j (0..15): low nibble of qs[j], 5th bit = bit j of qh; value j + 16: high nibble of
    qs[j], 5th bit = bit j + 16 of qh. value = d * (q - 16).
    """
    o = block_index * 22
    d = load_f16(src, o)
    qh = _load_u32(src, o + 2)
    for j in range(16):
        byte = np.int64(src[o + 6 + j])
        q_low = (byte & 0xF) | (((qh >> j) & 1) << 4)
        q_high = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4)
        out[out_offset + j] = d * np.float32(q_low - 16)
        out[out_offset + j + 16] = d * np.float32(q_high - 16)


@njit(cache=True, nogil=True)
def dequantize_block_q5_1(src, block_index, out, out_offset):
    """Q5_1, 24 bytes:  [0:2] d f16 | [2:4] m f16 | [4:8] qh uint32 | [8:24] qs 16 bytes.

    Quants as in Q5_0 (low nibbles: values 0..15, high nibbles: 16..31, 5th bits in qh).
    value = d * q + m.
    """
    o = block_index * 24
    d = load_f16(src, o)
    m = load_f16(src, o + 2)
    qh = _load_u32(src, o + 4)
    for j in range(16):
        byte = np.int64(src[o + 8 + j])
        q_low = (byte & 0xF) | (((qh >> j) & 1) << 4)
        q_high = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4)
        out[out_offset + j] = d * np.float32(q_low) + m
        out[out_offset + j + 16] = d * np.float32(q_high) + m


@njit(cache=True, nogil=True)
def dequantize_block_q2_k(src, block_index, out, out_offset):
    """Q2_K, 84 bytes:  [0:16] scales (low nibble sc, high nibble mn, one byte per 16 values)
    | [16:80] qs 64 bytes | [80:82] d f16 | [82:84] dmin f16.

    Value i (0..255): half h = i // 128, r = i % 128; q = (qs[32h + r % 32] >> 2*(r // 32)) & 3.
    value = (d * sc) * q - (dmin * mn), sc/mn of byte scales[i // 16].
    """
    o = block_index * 84
    d = load_f16(src, o + 80)
    dmin = load_f16(src, o + 82)
    for s in range(16):
        sc = np.int64(src[o + s])
        d_sub = d * np.float32(sc & 0xF)
        m_sub = dmin * np.float32(sc >> 4)
        for k in range(16):
            i = 16 * s + k
            h, r = i // 128, i % 128
            q = (np.int64(src[o + 16 + 32 * h + r % 32]) >> (2 * (r // 32))) & 3
            out[out_offset + i] = d_sub * np.float32(q) - m_sub


@njit(cache=True, nogil=True)
def q3_k_scale(src, scales_offset, s):
    """6-bit scale (0..63, stored with +32) of sub-block s (0..15) of a Q3_K super-block.

    The 12 scale bytes b[0..11]: low 4 bits = b[s] & 15 for s < 8, b[s - 8] >> 4 for s >= 8;
    high 2 bits = (b[8 + s % 4] >> 2*(s // 4)) & 3.
    """
    if s < 8:
        low = np.int64(src[scales_offset + s]) & 0xF
    else:
        low = np.int64(src[scales_offset + s - 8]) >> 4
    high = (np.int64(src[scales_offset + 8 + s % 4]) >> (2 * (s // 4))) & 3
    return low | (high << 4)


@njit(cache=True, nogil=True)
def dequantize_block_q3_k(src, block_index, out, out_offset):
    """Q3_K, 110 bytes:  [0:32] hmask | [32:96] qs 64 bytes | [96:108] scales (see q3_k_scale)
    | [108:110] d f16.

    Value i (0..255): h = i // 128, r = i % 128, plane p = r // 32;
    low 2 bits = (qs[32h + r % 32] >> 2p) & 3, high bit = bit (4h + p) of hmask[r % 32];
    q = low - 4 when the high bit is clear, low when it is set.
    value = (d * (scale - 32)) * q, scale of sub-block i // 16.
    """
    o = block_index * 110
    d = load_f16(src, o + 108)
    for s in range(16):
        d_sub = d * np.float32(q3_k_scale(src, o + 96, s) - 32)
        for k in range(16):
            i = 16 * s + k
            h, r = i // 128, i % 128
            p = r // 32
            low = (np.int64(src[o + 32 + 32 * h + r % 32]) >> (2 * p)) & 3
            high = (np.int64(src[o + r % 32]) >> (4 * h + p)) & 1
            out[out_offset + i] = d_sub * np.float32(low - 4 * (1 - high))


@njit(cache=True, nogil=True)
def dequantize_block_iq4_nl(src, block_index, out, out_offset):
    """IQ4_NL, 18 bytes:  [0:2] d f16 | [2:18] qs 16 bytes.

    Byte qs[j] holds the index of value j in its low nibble and of value j + 16 in its high
    nibble. value = d * KVALUES_IQ4NL[index].
    """
    o = block_index * 18
    d = load_f16(src, o)
    for j in range(16):
        byte = np.int64(src[o + 2 + j])
        out[out_offset + j] = d * np.float32(KVALUES_IQ4NL[byte & 0xF])
        out[out_offset + j + 16] = d * np.float32(KVALUES_IQ4NL[byte >> 4])


@njit(cache=True, nogil=True)
def iq4_xs_scale(src, block_offset, ib):
    """6-bit scale (0..63, stored with +32) of sub-block ib (0..7) of an IQ4_XS super-block:
    low 4 bits = nibble ib % 2 of scales_l[ib // 2], high 2 bits = bits 2ib, 2ib+1 of scales_h."""
    low = (np.int64(src[block_offset + 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF
    high = (_load_u16(src, block_offset + 2) >> (2 * ib)) & 3
    return low | (high << 4)


@njit(cache=True, nogil=True)
def dequantize_block_iq4_xs(src, block_index, out, out_offset):
    """IQ4_XS, 136 bytes:  [0:2] d f16 | [2:4] scales_h uint16 | [4:8] scales_l
    | [8:136] qs 128 bytes (see iq4_xs_scale).

    8 sub-blocks of 32 values; sub-block ib uses qs[16ib : 16ib + 16] as IQ4_NL does
    (low nibbles: values 0..15, high nibbles: 16..31). value = (d * (scale - 32)) * KVALUES_IQ4NL[q].
    """
    o = block_index * 136
    d = load_f16(src, o)
    for ib in range(8):
        d_sub = d * np.float32(iq4_xs_scale(src, o, ib) - 32)
        base = out_offset + 32 * ib
        for j in range(16):
            byte = np.int64(src[o + 8 + 16 * ib + j])
            out[base + j] = d_sub * np.float32(KVALUES_IQ4NL[byte & 0xF])
            out[base + j + 16] = d_sub * np.float32(KVALUES_IQ4NL[byte >> 4])


# -- dequantize: rows ---------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _dequantize_blocks(type_id, src, n_blocks, out):
    """Decode blocks 0..n_blocks-1 of src into out[0 : n_blocks * block_size]. No checks."""
    if type_id == Q8_0:
        for b in range(n_blocks):
            dequantize_block_q8_0(src, b, out, b * QK)
    elif type_id == Q4_0:
        for b in range(n_blocks):
            dequantize_block_q4_0(src, b, out, b * QK)
    elif type_id == Q4_1:
        for b in range(n_blocks):
            dequantize_block_q4_1(src, b, out, b * QK)
    elif type_id == Q4_K:
        for b in range(n_blocks):
            dequantize_block_q4_k(src, b, out, b * QK_K)
    elif type_id == Q5_K:
        for b in range(n_blocks):
            dequantize_block_q5_k(src, b, out, b * QK_K)
    elif type_id == Q6_K:
        for b in range(n_blocks):
            dequantize_block_q6_k(src, b, out, b * QK_K)
    elif type_id == Q5_0:
        for b in range(n_blocks):
            dequantize_block_q5_0(src, b, out, b * QK)
    elif type_id == Q5_1:
        for b in range(n_blocks):
            dequantize_block_q5_1(src, b, out, b * QK)
    elif type_id == Q2_K:
        for b in range(n_blocks):
            dequantize_block_q2_k(src, b, out, b * QK_K)
    elif type_id == Q3_K:
        for b in range(n_blocks):
            dequantize_block_q3_k(src, b, out, b * QK_K)
    elif type_id == IQ4_NL:
        for b in range(n_blocks):
            dequantize_block_iq4_nl(src, b, out, b * QK)
    elif type_id == IQ4_XS:
        for b in range(n_blocks):
            dequantize_block_iq4_xs(src, b, out, b * QK_K)
    elif type_id == F32:
        for b in range(n_blocks):
            dequantize_block_f32(src, b, out, b)
    elif type_id == F16:
        for b in range(n_blocks):
            dequantize_block_f16(src, b, out, b)
    elif type_id == BF16:
        for b in range(n_blocks):
            dequantize_block_bf16(src, b, out, b)


@njit(cache=True, nogil=True)
def dequantize_row_into(type_id, src_u8, n, out_f32):
    """Decode n values (a multiple of the block size) from the blocks at the start of src_u8
    (1-D uint8) into out_f32[:n]. Raises ValueError, before touching memory, for an unknown
    type, n not whole blocks, or arrays too short.
    """
    if type_id < 0 or type_id >= N_TYPE_IDS or BLOCK_SIZE_BY_ID[type_id] == 0:
        raise ValueError("dequantize_row_into: unsupported ggml type id")
    values_per_block = BLOCK_SIZE_BY_ID[type_id]
    if n < 0 or n % values_per_block != 0:
        raise ValueError("dequantize_row_into: n is not a whole number of blocks")
    n_blocks = n // values_per_block
    if src_u8.size < n_blocks * BLOCK_BYTES_BY_ID[type_id]:
        raise ValueError("dequantize_row_into: src is shorter than n values of blocks")
    if out_f32.size < n:
        raise ValueError("dequantize_row_into: out is shorter than n")
    _dequantize_blocks(type_id, src_u8, n_blocks, out_f32)


@njit(cache=True, nogil=True, parallel=True)
def _dequantize_rows(type_id, raw, n_blocks_per_row, out):
    """raw uint8 [n_rows, row_bytes] -> out float32 [n_rows, n_cols], rows in parallel. No checks."""
    for r in prange(raw.shape[0]):
        _dequantize_blocks(type_id, raw[r], n_blocks_per_row, out[r])


def _as_u8(raw, what):
    """A bytes-like or uint8 array as a flat uint8 ndarray (no copy when it can be avoided)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return np.frombuffer(raw, dtype=np.uint8)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 bytes of ggml blocks, got dtype {arr.dtype}")
    return arr.reshape(-1)


def dequantize(type_id, raw_u8, shape) -> np.ndarray:
    """float32 array of `shape` (NumPy order, rows first) from raw ggml blocks of `type_id`.

    raw_u8: uint8 array (or bytes) of exactly prod(shape[:-1]) * row_bytes(type_id, shape[-1])
    bytes, e.g. `GGUFFile.tensor_bytes(name)`. Rows are decoded in parallel (numba threads).
    """
    tid = _check_type(type_id)
    shape = tuple(int(d) for d in np.atleast_1d(np.asarray(shape, dtype=np.int64)))
    if len(shape) == 0 or any(d < 0 for d in shape):
        raise QuantShapeError(f"dequantize: invalid shape {shape}")
    n_cols = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    bytes_per_row = row_bytes(tid, n_cols)
    raw = _as_u8(raw_u8, "dequantize: raw")
    if raw.size != n_rows * bytes_per_row:
        raise QuantShapeError(
            f"dequantize: {TYPE_NAMES[tid]} tensor of shape {shape} needs {n_rows} x {bytes_per_row} = "
            f"{n_rows * bytes_per_row} bytes, got {raw.size}")
    if tid in _FLOAT_VIEWS:     # norms and biases at load: NumPy, no compiled code to load (same bits)
        return _FLOAT_VIEWS[tid](raw).reshape(shape)
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    if out.size:
        _dequantize_rows(tid, raw.reshape(n_rows, bytes_per_row), n_cols // BLOCK_SIZE[tid], out)
    return out.reshape(shape)


# F32 / F16 / BF16 bytes -> a new float32 array, exactly as _dequantize_blocks decodes them
# (f16 -> f32 and bf16 -> f32 are exact widenings)
_FLOAT_VIEWS = {
    F32: lambda raw: raw.view("<f4").astype(np.float32),
    F16: lambda raw: raw.view("<f2").astype(np.float32),
    BF16: lambda raw: (raw.view("<u2").astype(np.uint32) << 16).view(np.float32),
}


# -- quantize: one block --------------------------------------------------------------------------
# Signature of every block encoder: (x float32, x_offset, dst uint8, block_index) -> reads
# block_size values x[x_offset:], writes block_bytes bytes at dst[block_index * block_bytes:].
# The rules are ggml's reference quantizers (quantize_row_*_ref), as the gguf package states them.

@njit(cache=True, nogil=True)
def quantize_block_f32(x, x_offset, dst, block_index):
    """F32: the 4 little-endian bytes of the float32."""
    bits = np.int64(_f32_bits(x[x_offset]))
    o = block_index * 4
    for k in range(4):
        dst[o + k] = (bits >> (8 * k)) & 0xFF


@njit(cache=True, nogil=True)
def quantize_block_f16(x, x_offset, dst, block_index):
    """F16: float32 -> f16 rounded to nearest even."""
    store_f16(dst, block_index * 2, x[x_offset])


@njit(cache=True, nogil=True)
def quantize_block_bf16(x, x_offset, dst, block_index):
    """BF16: top 16 bits of the float32 rounded to nearest even; NaN -> quiet NaN (ggml rule)."""
    bits = np.int64(_f32_bits(x[x_offset]))
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        h = (bits >> 16) | 0x40
    else:
        h = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    o = block_index * 2
    dst[o] = h & 0xFF
    dst[o + 1] = (h >> 8) & 0xFF


@njit(cache=True, nogil=True)
def quantize_block_q8_0(x, x_offset, dst, block_index):
    """Q8_0: d = max|x| / 127; q = round(x / d), halves away from zero (C roundf).

    When d is so small (max|x| < 127 * 2^-128) that 1 / d overflows, x / d is inf or NaN and
    ggml's int8 cast of it gives 0 on x86: q = 0 here too (d is 0 as an f16 anyway)."""
    amax = np.float32(0.0)
    for i in range(32):
        amax = max(amax, abs(x[x_offset + i]))
    d = amax / np.float32(127.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 34
    store_f16(dst, o, d)
    for i in range(32):
        v = x[x_offset + i] * inv_d
        a = abs(v)
        if not a < np.float32(np.inf):            # inf or NaN: see above
            dst[o + 2 + i] = 0
            continue
        q = np.int64(a)                           # floor, a >= 0
        if a - np.float32(q) >= np.float32(0.5):  # exact: a - floor(a) is representable
            q += 1
        if v < 0:
            q = -q
        dst[o + 2 + i] = q & 0xFF


@njit(cache=True, nogil=True)
def _value_of_max_abs(x, x_offset, n):
    """The first of x[x_offset : x_offset + n] with the largest |x|; +0.0 when all are zero
    (ggml's scan: start from 0, replace on a strictly larger |x|)."""
    amax = np.float32(0.0)
    m = np.float32(0.0)
    for i in range(n):
        v = x[x_offset + i]
        if abs(v) > amax:
            amax = abs(v)
            m = v
    return m


@njit(cache=True, nogil=True)
def quantize_block_q4_0(x, x_offset, dst, block_index):
    """Q4_0: m = the value of largest |x| (the first one on ties; +0 if all are zero, so an
    all-zero block has d = -0 as in ggml, where gguf's argmax takes the sign of x[0]);
    d = m / -8; q = min(15, trunc(x / d + 8.5)) so that m maps to 0."""
    m = _value_of_max_abs(x, x_offset, 32)
    d = m / np.float32(-8.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 18
    store_f16(dst, o, d)
    for j in range(16):
        q_low = min(np.int64(x[x_offset + j] * inv_d + np.float32(8.5)) & 0xFF, 15)
        q_high = min(np.int64(x[x_offset + j + 16] * inv_d + np.float32(8.5)) & 0xFF, 15)
        dst[o + 2 + j] = q_low | (q_high << 4)


@njit(cache=True, nogil=True)
def _min_max_32(x, x_offset):
    """(min, max) of the 32 values x[x_offset:x_offset + 32], first value first (ggml's order)."""
    lo = x[x_offset]
    hi = x[x_offset]
    for i in range(1, 32):
        v = x[x_offset + i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@njit(cache=True, nogil=True)
def quantize_block_q4_1(x, x_offset, dst, block_index):
    """Q4_1: d = (max - min) / 15, m = min; q = min(15, trunc((x - min) / d + 0.5))."""
    lo, hi = _min_max_32(x, x_offset)
    d = (hi - lo) / np.float32(15.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 20
    store_f16(dst, o, d)
    store_f16(dst, o + 2, lo)
    for j in range(16):
        q_low = min(np.int64((x[x_offset + j] - lo) * inv_d + np.float32(0.5)) & 0xFF, 15)
        q_high = min(np.int64((x[x_offset + j + 16] - lo) * inv_d + np.float32(0.5)) & 0xFF, 15)
        dst[o + 4 + j] = q_low | (q_high << 4)


@njit(cache=True, nogil=True)
def _pack_q5_quants(dst, qs_offset, qh_offset, q_low, q_high, j, qh):
    """Store 5-bit quants of values j and j + 16 of a Q5_0/Q5_1 block: their low nibbles in byte
    qs[j], their 5th bits as bits j and j + 16 of qh (returned updated)."""
    dst[qs_offset + j] = (q_low & 0xF) | ((q_high & 0xF) << 4)
    return qh | (((q_low >> 4) & 1) << j) | (((q_high >> 4) & 1) << (j + 16))


@njit(cache=True, nogil=True)
def quantize_block_q5_0(x, x_offset, dst, block_index):
    """Q5_0: as Q4_0 with 5 bits. m = the value of largest |x| (as in Q4_0); d = m / -16;
    q = min(31, trunc(x / d + 16.5))."""
    m = _value_of_max_abs(x, x_offset, 32)
    d = m / np.float32(-16.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 22
    store_f16(dst, o, d)
    qh = 0
    for j in range(16):
        q_low = min(np.int64(x[x_offset + j] * inv_d + np.float32(16.5)) & 0xFF, 31)
        q_high = min(np.int64(x[x_offset + j + 16] * inv_d + np.float32(16.5)) & 0xFF, 31)
        qh = _pack_q5_quants(dst, o + 6, o + 2, q_low, q_high, j, qh)
    _store_u32(dst, o + 2, qh)


@njit(cache=True, nogil=True)
def quantize_block_q5_1(x, x_offset, dst, block_index):
    """Q5_1: d = (max - min) / 31, m = min; q = min(31, trunc((x - min) / d + 0.5))."""
    lo, hi = _min_max_32(x, x_offset)
    d = (hi - lo) / np.float32(31.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 24
    store_f16(dst, o, d)
    store_f16(dst, o + 2, lo)
    qh = 0
    for j in range(16):
        q_low = min(np.int64((x[x_offset + j] - lo) * inv_d + np.float32(0.5)) & 0xFF, 31)
        q_high = min(np.int64((x[x_offset + j + 16] - lo) * inv_d + np.float32(0.5)) & 0xFF, 31)
        qh = _pack_q5_quants(dst, o + 8, o + 4, q_low, q_high, j, qh)
    _store_u32(dst, o + 4, qh)


# ---- ggml's scale searches (K-quants and IQ4), float32 in ggml's order of operations ----------

GROUP_MAX_EPS = np.float32(1e-15)  # a group whose max |x| is below this quantizes to zeros


@njit(cache=True, nogil=True)
def nearest_int(fval):
    """ggml's nearest_int: round a float32 (|fval| < 2^22) to the nearest integer, ties to even,
    by adding 1.5 * 2^23 and reading the low mantissa bits."""
    val = np.float32(fval) + np.float32(12582912.0)
    return (np.int64(_f32_bits(val)) & 0x007FFFFF) - 0x00400000


@njit(cache=True, nogil=True)
def make_qkx2_quants(n, nmax, x, x_offset, weights, L, L_offset, L_aux, rmin, rdelta, nstep):
    """Asymmetric quants of x[x_offset : x_offset + n]: x ~ scale * L - the_min, L in 0..nmax.

    ggml's make_qkx2_quants (squared error, weighted): start from L = round((x - min) * nmax /
    (max - min)), then try the nstep + 1 scales (nmax + rmin + rdelta * is) / (max - min), each with
    the least-squares scale and min for its L, and keep the one with the smallest weighted error.
    Writes L[L_offset : L_offset + n] (uint8) and returns (scale, the_min), the_min >= 0.
    """
    fmax = x[x_offset]
    fmin = x[x_offset]
    sum_w = weights[0]
    sum_x = sum_w * x[x_offset]
    for i in range(1, n):
        v = x[x_offset + i]
        if v < fmin:
            fmin = v
        if v > fmax:
            fmax = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if fmin > 0:
        fmin = np.float32(0.0)
    if fmax == fmin:
        for i in range(n):
            L[L_offset + i] = 0
        return np.float32(0.0), -fmin
    iscale = np.float32(nmax) / (fmax - fmin)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        v = x[x_offset + i]
        q = max(0, min(nmax, nearest_int(iscale * (v - fmin))))
        L[L_offset + i] = q
        diff = scale * np.float32(q) + fmin - v
        best_error += weights[i] * (diff * diff)
    if nstep < 1:
        return scale, -fmin
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + np.float32(nmax)) / (fmax - fmin)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            v = x[x_offset + i]
            q = max(0, min(nmax, nearest_int(iscale * (v - fmin))))
            L_aux[i] = q
            w = weights[i]
            fq = np.float32(q)
            sum_l += w * fq
            sum_l2 += w * fq * fq
            sum_xl += w * fq * v
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(L_aux[i]) + this_min - x[x_offset + i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[L_offset + i] = L_aux[i]
                best_error = cur_error
                scale = this_scale
                fmin = this_min
    return scale, -fmin


@njit(cache=True, nogil=True)
def make_qx_quants_rmse(n, nmax, x, x_offset, L, L_offset):
    """Symmetric quants of x[x_offset : x_offset + n]: x ~ scale * (L - nmax), L in 0..2*nmax-1.

    ggml's make_qx_quants with rmse_type 1 and no importance weights: the value of largest |x|
    maps to -nmax; 18 more trial scales (nmax + 0.1 * is for is = -9..9) are ranked by the
    x^2-weighted least-squares fit sum(w x l)^2 / sum(w l^2). Writes L[L_offset : L_offset + n]
    and returns the scale (0 for an all-zero group).
    """
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[x_offset + i])
        if ax > amax:
            amax = ax
            fmax = x[x_offset + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[L_offset + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / fmax
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        v = x[x_offset + i]
        q = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        L[L_offset + i] = q + nmax
        w = v * v
        fq = np.float32(q)
        sumlx += w * v * fq
        suml2 += w * fq * fq
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / fmax
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            v = x[x_offset + i]
            q = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
            w = v * v
            fq = np.float32(q)
            sumlx += w * v * fq
            suml2 += w * fq * fq
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[L_offset + i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[x_offset + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, nogil=True)
def _store_k_scales(dst, scales_offset, ls, lm, j):
    """Pack 6-bit scale ls and min lm of sub-block j into the 12 Q4_K/Q5_K scale bytes (the
    inverse of k_scale_min). Sub-blocks must be stored in order 0..7."""
    s = scales_offset
    if j < 4:
        dst[s + j] = ls
        dst[s + j + 4] = lm
    else:
        dst[s + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        dst[s + j - 4] |= (ls >> 4) << 6
        dst[s + j] |= (lm >> 4) << 6


@njit(cache=True, nogil=True)
def _quantize_k_scales_mins(x, x_offset, dst, o, nmax, rmin, rdelta, nstep, L):
    """The common first half of Q4_K and Q5_K: per sub-block of 32, weights av_x + |x|
    (av_x = rms of the sub-block) and make_qkx2_quants; then the 8 scales and mins as 6-bit
    multiples of d = max_scale / 63 and dmin = max_min / 63 (f16 at dst[o], dst[o + 2]), packed
    at dst[o + 4 : o + 16]; finally every value re-quantized with the stored scales into L.
    """
    L_aux = np.empty(32, np.uint8)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        base = x_offset + 32 * j
        sum_x2 = np.float32(0.0)
        for i in range(32):
            sum_x2 += x[base + i] * x[base + i]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for i in range(32):
            weights[i] = av_x + abs(x[base + i])
        scales[j], mins[j] = make_qkx2_quants(32, nmax, x, base, weights, L, 32 * j, L_aux,
                                              rmin, rdelta, nstep)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)   # C: uint8_t, then MIN(63, .)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        _store_k_scales(dst, o + 4, ls, lm, j)
    store_f16(dst, o, max_scale / np.float32(63.0))
    store_f16(dst, o + 2, max_min / np.float32(63.0))
    d_all = load_f16(dst, o)
    dmin_all = load_f16(dst, o + 2)
    for j in range(8):
        sc, mn = k_scale_min(dst, o + 4, j)
        d = d_all * np.float32(sc)
        if d == 0:
            continue                      # keep the sub-block's quants from make_qkx2_quants
        dm = dmin_all * np.float32(mn)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int((x[x_offset + 32 * j + i] + dm) / d)))


@njit(cache=True, nogil=True)
def quantize_block_q4_k(x, x_offset, dst, block_index):
    """Q4_K (llama.cpp's quantize_row_q4_K_ref): per sub-block of 32, make_qkx2_quants with
    nmax 15 and 21 trial scales (rmin -1, rdelta 0.1); 6-bit scales/mins; 4-bit quants packed as
    dequantize_block_q4_k reads them."""
    o = block_index * 144
    L = np.empty(256, np.uint8)
    _quantize_k_scales_mins(x, x_offset, dst, o, 15, np.float32(-1.0), np.float32(0.1), 20, L)
    for c in range(4):                    # chunk c: sub-block 2c low nibbles, 2c + 1 high
        for i in range(32):
            dst[o + 16 + 32 * c + i] = L[64 * c + i] | (L[64 * c + 32 + i] << 4)


@njit(cache=True, nogil=True)
def quantize_block_q5_k(x, x_offset, dst, block_index):
    """Q5_K (llama.cpp's quantize_row_q5_K_ref): as Q4_K with nmax 31 and 16 trial scales
    (rmin -0.5, rdelta 0.1); the 5th bit of value i of sub-block j goes to bit j of qh[i]."""
    o = block_index * 176
    L = np.empty(256, np.uint8)
    _quantize_k_scales_mins(x, x_offset, dst, o, 31, np.float32(-0.5), np.float32(0.1), 15, L)
    for i in range(32):
        dst[o + 16 + i] = 0
    for c in range(4):
        for i in range(32):
            q_low = np.int64(L[64 * c + i])
            q_high = np.int64(L[64 * c + 32 + i])
            dst[o + 16 + i] |= ((q_low >> 4) << (2 * c)) | ((q_high >> 4) << (2 * c + 1))
            dst[o + 48 + 32 * c + i] = (q_low & 0xF) | ((q_high & 0xF) << 4)


@njit(cache=True, nogil=True)
def quantize_block_q6_k(x, x_offset, dst, block_index):
    """Q6_K (llama.cpp's quantize_row_q6_K_ref): per sub-block of 16, make_qx_quants_rmse with
    nmax 32; int8 scales as multiples of d = -max_scale / 128 (max_scale: the scale of largest
    magnitude); 6-bit quants re-derived from the stored scales, packed as dequantize_block_q6_k
    reads them. A super-block whose scales are all below GROUP_MAX_EPS is all zero bytes."""
    o = block_index * 210
    L = np.empty(256, np.int64)
    scales = np.empty(16, np.float32)
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for ib in range(16):
        scales[ib] = make_qx_quants_rmse(16, 32, x, x_offset + 16 * ib, L, 16 * ib)
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            dst[o + k] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    store_f16(dst, o + 208, np.float32(1.0) / iscale)
    for ib in range(16):
        dst[o + 192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    d_all = load_f16(dst, o + 208)
    for j in range(16):
        d = d_all * np.float32(_load_i8(dst, o + 192 + j))
        if d == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(x[x_offset + 16 * j + i] / d))) + 32
    for h in range(2):                    # half h: 128 values -> ql[64h : 64h + 64], qh[32h : 32h + 32]
        for i in range(32):
            q0, q1, q2, q3 = L[128 * h + i], L[128 * h + i + 32], L[128 * h + i + 64], L[128 * h + i + 96]
            dst[o + 64 * h + i] = (q0 & 0xF) | ((q2 & 0xF) << 4)
            dst[o + 64 * h + i + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            dst[o + 128 + 32 * h + i] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)


@njit(cache=True, nogil=True)
def best_index_iq4nl(v):
    """Index (0..15) of the KVALUES_IQ4NL level nearest to v (ggml's best_index_int8: a binary
    search, the upper level on ties)."""
    if v <= np.float32(KVALUES_IQ4NL[0]):
        return 0
    if v >= np.float32(KVALUES_IQ4NL[15]):
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if v < np.float32(KVALUES_IQ4NL[mid]):
            hi = mid
        else:
            lo = mid
    if v - np.float32(KVALUES_IQ4NL[hi - 1]) < np.float32(KVALUES_IQ4NL[hi]) - v:
        return hi - 1
    return hi


IQ4_NTRY = 7  # llama.cpp's file quantizer tries scales for -127 + t, t = -7..7 (quantize_iq4_nl/xs)


@njit(cache=True, nogil=True)
def iq4_block_scale(x, x_offset, L, L_offset):
    """Scale of one sub-block of 32 for IQ4_NL / IQ4_XS (ggml's quantize_row_iq4_nl_impl inner
    part, no importance matrix, ntry 7): start from d = max / 127 (max: the value of largest
    |x|), take the x^2-weighted least-squares scale for the quants it gives (written to L), then
    try the inverse scales (t - 127) / max for t = -7..7 and keep the best least-squares scale
    (without changing L). Returns 0 and leaves L alone for a group below GROUP_MAX_EPS."""
    amax = np.float32(0.0)
    fmax = np.float32(0.0)
    for j in range(32):
        ax = abs(x[x_offset + j])
        if ax > amax:
            amax = ax
            fmax = x[x_offset + j]
    if amax < GROUP_MAX_EPS:
        return np.float32(0.0)
    d = -fmax / np.float32(KVALUES_IQ4NL[0])
    inv_d = np.float32(1.0) / d
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(32):
        v = x[x_offset + j]
        k = best_index_iq4nl(inv_d * v)
        L[L_offset + j] = k
        q = np.float32(KVALUES_IQ4NL[k])
        w = v * v
        sumqx += w * q * v
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)
    best = d * sumqx
    for t in range(-IQ4_NTRY, IQ4_NTRY + 1):
        inv_d = np.float32(t + np.int64(KVALUES_IQ4NL[0])) / fmax
        sumqx = np.float32(0.0)
        sumq2 = np.float32(0.0)
        for j in range(32):
            v = x[x_offset + j]
            q = np.float32(KVALUES_IQ4NL[best_index_iq4nl(inv_d * v)])
            w = v * v
            sumqx += w * q * v
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, nogil=True)
def _pack_iq4_nibbles(L, L_offset, dst, qs_offset):
    """16 bytes from 32 indices: byte j = L[j] | L[j + 16] << 4."""
    for j in range(16):
        dst[qs_offset + j] = L[L_offset + j] | (L[L_offset + 16 + j] << 4)


@njit(cache=True, nogil=True)
def quantize_block_iq4_nl(x, x_offset, dst, block_index):
    """IQ4_NL (llama.cpp's quantize_iq4_nl): d = iq4_block_scale as f16, every index re-chosen
    with 1 / d (the unrounded float32 d)."""
    o = block_index * 18
    L = np.empty(32, np.uint8)
    d = iq4_block_scale(x, x_offset, L, 0)
    store_f16(dst, o, d)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(32):
        L[j] = best_index_iq4nl(inv_d * x[x_offset + j])
    _pack_iq4_nibbles(L, 0, dst, o + 2)


@njit(cache=True, nogil=True)
def quantize_block_iq4_xs(x, x_offset, dst, block_index):
    """IQ4_XS (llama.cpp's quantize_iq4_xs): iq4_block_scale per sub-block of 32; super-block
    d = -max_scale / 32 (max_scale: the sub-block scale of largest magnitude); 6-bit sub-block
    scales l = round(scale / d) in -32..31 (stored + 32); indices re-chosen with 1 / (d * l)."""
    o = block_index * 136
    L = np.empty(256, np.uint8)
    scales = np.empty(8, np.float32)
    max_scale = np.float32(0.0)
    amax_scale = np.float32(0.0)
    for ib in range(8):
        scales[ib] = iq4_block_scale(x, x_offset + 32 * ib, L, 32 * ib)
        if abs(scales[ib]) > amax_scale:
            amax_scale = abs(scales[ib])
            max_scale = scales[ib]
    d = -max_scale / np.float32(32.0)
    store_f16(dst, o, d)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    scales_h = 0
    for ib in range(8):
        l = max(-32, min(31, nearest_int(inv_d * scales[ib])))
        dl = d * np.float32(l)
        inv_dl = np.float32(1.0) / dl if dl != 0 else np.float32(0.0)
        for j in range(32):
            L[32 * ib + j] = best_index_iq4nl(inv_dl * x[x_offset + 32 * ib + j])
        l += 32
        if ib % 2 == 0:
            dst[o + 4 + ib // 2] = l & 0xF
        else:
            dst[o + 4 + ib // 2] |= (l & 0xF) << 4
        scales_h |= (l >> 4) << (2 * ib)
    dst[o + 2] = scales_h & 0xFF
    dst[o + 3] = scales_h >> 8
    for ib in range(8):
        _pack_iq4_nibbles(L, 32 * ib, dst, o + 8 + 16 * ib)


# -- quantize: rows -------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _quantize_blocks(type_id, x, n_blocks, dst):
    """Encode x[0 : n_blocks * block_size] into dst[0 : n_blocks * block_bytes]. No checks."""
    if type_id == Q8_0:
        for b in range(n_blocks):
            quantize_block_q8_0(x, b * QK, dst, b)
    elif type_id == Q4_0:
        for b in range(n_blocks):
            quantize_block_q4_0(x, b * QK, dst, b)
    elif type_id == Q4_1:
        for b in range(n_blocks):
            quantize_block_q4_1(x, b * QK, dst, b)
    elif type_id == Q5_0:
        for b in range(n_blocks):
            quantize_block_q5_0(x, b * QK, dst, b)
    elif type_id == Q5_1:
        for b in range(n_blocks):
            quantize_block_q5_1(x, b * QK, dst, b)
    elif type_id == Q4_K:
        for b in range(n_blocks):
            quantize_block_q4_k(x, b * QK_K, dst, b)
    elif type_id == Q5_K:
        for b in range(n_blocks):
            quantize_block_q5_k(x, b * QK_K, dst, b)
    elif type_id == Q6_K:
        for b in range(n_blocks):
            quantize_block_q6_k(x, b * QK_K, dst, b)
    elif type_id == IQ4_NL:
        for b in range(n_blocks):
            quantize_block_iq4_nl(x, b * QK, dst, b)
    elif type_id == IQ4_XS:
        for b in range(n_blocks):
            quantize_block_iq4_xs(x, b * QK_K, dst, b)
    elif type_id == F32:
        for b in range(n_blocks):
            quantize_block_f32(x, b, dst, b)
    elif type_id == F16:
        for b in range(n_blocks):
            quantize_block_f16(x, b, dst, b)
    elif type_id == BF16:
        for b in range(n_blocks):
            quantize_block_bf16(x, b, dst, b)


@njit(cache=True, nogil=True)
def quantize_row_into(type_id, x_f32, n, dst_u8):
    """Encode x_f32[:n] (float32, n whole blocks) as blocks of type_id into dst_u8 (uint8).
    Types: QUANTIZE_TYPES (all but Q2_K, Q3_K). Raises ValueError before touching memory on bad
    input.
    """
    if (type_id < 0 or type_id >= N_TYPE_IDS or BLOCK_SIZE_BY_ID[type_id] == 0
            or type_id == Q2_K or type_id == Q3_K):
        raise ValueError("quantize_row_into: cannot quantize to this ggml type id")
    values_per_block = BLOCK_SIZE_BY_ID[type_id]
    if n < 0 or n % values_per_block != 0:
        raise ValueError("quantize_row_into: n is not a whole number of blocks")
    n_blocks = n // values_per_block
    if x_f32.size < n:
        raise ValueError("quantize_row_into: x is shorter than n")
    if dst_u8.size < n_blocks * BLOCK_BYTES_BY_ID[type_id]:
        raise ValueError("quantize_row_into: dst is shorter than n values of blocks")
    _quantize_blocks(type_id, x_f32, n_blocks, dst_u8)


@njit(cache=True, nogil=True, parallel=True)
def _quantize_rows(type_id, x, n_blocks_per_row, dst):
    """x float32 [n_rows, n_cols] -> dst uint8 [n_rows, row_bytes], rows in parallel. No checks."""
    for r in prange(x.shape[0]):
        _quantize_blocks(type_id, x[r], n_blocks_per_row, dst[r])


def quantize(type_id, values) -> np.ndarray:
    """ggml blocks of `values` (float32 [..., n_cols]) as uint8 [..., row_bytes(type_id, n_cols)].

    Bit-exact with `gguf.quants.quantize` (ggml's reference quantizers) for Q8_0, Q4_0, Q4_1,
    Q5_0, Q5_1; with llama.cpp's file quantizer (no importance matrix) for Q4_K, Q5_K, Q6_K,
    IQ4_NL, IQ4_XS; exact conversions for F32, F16, BF16 (round to nearest even). `.reshape(-1)`
    gives the raw tensor bytes. The block formats need finite values: NaN or inf raise ValueError.
    """
    tid = _check_type(type_id, QUANTIZE_TYPES)
    x = np.ascontiguousarray(values, dtype=np.float32)
    if x.ndim == 0:
        raise QuantShapeError("quantize: values must have at least one dimension (a row)")
    n_cols = x.shape[-1]
    bytes_per_row = row_bytes(tid, n_cols)
    if tid not in FLOAT_TYPES and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"quantize: {TYPE_NAMES[tid]} needs finite values; "
                         f"values[{', '.join(map(str, bad))}] is {x[tuple(bad)]}")
    n_rows = x.size // n_cols if n_cols else int(np.prod(x.shape[:-1], dtype=np.int64))
    out = np.empty(x.shape[:-1] + (bytes_per_row,), dtype=np.uint8)
    if x.size:
        _quantize_rows(tid, x.reshape(n_rows, n_cols), n_cols // BLOCK_SIZE[tid],
                       out.reshape(n_rows, bytes_per_row))
    return out
