"""ggml block quant formats: type table, dequantize and quantize, bit for bit as ggml stores them.

A weight is raw ggml blocks: a 1-D uint8 array plus a ggml type id. A block holds `block_size`
values in `block_bytes` bytes; a row of n_cols values is n_cols / block_size whole blocks, and a
matrix stores row r at bytes [r * row_bytes, (r + 1) * row_bytes).

    type   id  values/block  bytes/block  value
    F32     0       1             4       f32
    F16     1       1             2       f16
    BF16   30       1             2       bf16 (the top half of an f32)
    Q8_0    8      32            34       d * q                  q int8
    Q4_0    2      32            18       d * (q - 8)            q 4 bit
    Q4_1    3      32            20       d * q + m              q 4 bit
    Q4_K   12     256           144       d*sc * q - dmin*mn     q 4 bit, sc/mn 6 bit per 32
    Q5_K   13     256           176       d*sc * q - dmin*mn     q 5 bit, sc/mn 6 bit per 32
    Q6_K   14     256           210       d*sc * (q - 32)        q 6 bit, sc int8 per 16

All multi-byte fields are little-endian; d, m, dmin are f16. Each `dequantize_block_*` below
carries the byte layout of its block. Arithmetic is float32 in ggml's order of operations (no
fused multiply-add: these functions never use fastmath), so results equal ggml's dequantization
and the `gguf` package's, bit for bit.

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
Q8_0 = 8
Q4_K = 12
Q5_K = 13
Q6_K = 14
BF16 = 30

QK = 32     # values per block of the 32-value formats (Q8_0, Q4_0, Q4_1)
QK_K = 256  # values per super-block of the K formats (Q4_K, Q5_K, Q6_K)
K_SCALE_BYTES = 12  # packed 6-bit scales and mins of Q4_K / Q5_K: 8 + 8 values in 12 bytes

TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0",
              Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", BF16: "BF16"}
TYPE_IDS = {name: type_id for type_id, name in TYPE_NAMES.items()}

BLOCK_SIZE = {F32: 1, F16: 1, BF16: 1, Q8_0: QK, Q4_0: QK, Q4_1: QK,
              Q4_K: QK_K, Q5_K: QK_K, Q6_K: QK_K}                      # values per block
BLOCK_BYTES = {F32: 4, F16: 2, BF16: 2, Q8_0: 2 + QK, Q4_0: 2 + QK // 2, Q4_1: 4 + QK // 2,
               Q4_K: 4 + K_SCALE_BYTES + QK_K // 2,
               Q5_K: 4 + K_SCALE_BYTES + QK_K // 8 + QK_K // 2,
               Q6_K: QK_K // 2 + QK_K // 4 + QK_K // 16 + 2}          # bytes per block

QUANTIZE_TYPES = (F32, F16, BF16, Q8_0, Q4_0, Q4_1)  # types `quantize` can produce

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
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    if out.size:
        _dequantize_rows(tid, raw.reshape(n_rows, bytes_per_row), n_cols // BLOCK_SIZE[tid], out)
    return out.reshape(shape)


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
    """Q8_0: d = max|x| / 127; q = round(x / d), halves away from zero (C roundf)."""
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
        q = np.int64(a)                           # floor, a >= 0
        if a - np.float32(q) >= np.float32(0.5):  # exact: a - floor(a) is representable
            q += 1
        if v < 0:
            q = -q
        dst[o + 2 + i] = q & 0xFF


@njit(cache=True, nogil=True)
def quantize_block_q4_0(x, x_offset, dst, block_index):
    """Q4_0: m = the value of largest |x| (first one on ties, x[0] if all are zero: numpy argmax);
    d = m / -8; q = min(15, trunc(x / d + 8.5)) so that m maps to 0."""
    m = x[x_offset]
    amax = abs(m)
    for i in range(1, 32):
        v = x[x_offset + i]
        if abs(v) > amax:
            amax = abs(v)
            m = v
    d = m / np.float32(-8.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 18
    store_f16(dst, o, d)
    for j in range(16):
        q_low = min(np.int64(x[x_offset + j] * inv_d + np.float32(8.5)) & 0xFF, 15)
        q_high = min(np.int64(x[x_offset + j + 16] * inv_d + np.float32(8.5)) & 0xFF, 15)
        dst[o + 2 + j] = q_low | (q_high << 4)


@njit(cache=True, nogil=True)
def quantize_block_q4_1(x, x_offset, dst, block_index):
    """Q4_1: d = (max - min) / 15, m = min; q = min(15, trunc((x - min) / d + 0.5))."""
    lo = x[x_offset]
    hi = x[x_offset]
    for i in range(1, 32):
        v = x[x_offset + i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    d = (hi - lo) / np.float32(15.0)
    inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    o = block_index * 20
    store_f16(dst, o, d)
    store_f16(dst, o + 2, lo)
    for j in range(16):
        q_low = min(np.int64((x[x_offset + j] - lo) * inv_d + np.float32(0.5)) & 0xFF, 15)
        q_high = min(np.int64((x[x_offset + j + 16] - lo) * inv_d + np.float32(0.5)) & 0xFF, 15)
        dst[o + 4 + j] = q_low | (q_high << 4)


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
    Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1. Raises ValueError before touching memory on bad input.
    """
    if not (type_id == Q8_0 or type_id == Q4_0 or type_id == Q4_1
            or type_id == F32 or type_id == F16 or type_id == BF16):
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

    Bit-exact with `gguf.quants.quantize` (ggml's reference quantizers) for Q8_0, Q4_0, Q4_1, and
    exact conversions for F32, F16, BF16 (round to nearest even). `.reshape(-1)` gives the raw
    tensor bytes. The block formats need finite values: NaN or inf raise ValueError.
    """
    tid = _check_type(type_id, QUANTIZE_TYPES)
    x = np.ascontiguousarray(values, dtype=np.float32)
    if x.ndim == 0:
        raise QuantShapeError("quantize: values must have at least one dimension (a row)")
    n_cols = x.shape[-1]
    bytes_per_row = row_bytes(tid, n_cols)
    if tid in (Q8_0, Q4_0, Q4_1) and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"quantize: {TYPE_NAMES[tid]} needs finite values; "
                         f"values[{', '.join(map(str, bad))}] is {x[tuple(bad)]}")
    n_rows = x.size // n_cols if n_cols else int(np.prod(x.shape[:-1], dtype=np.int64))
    out = np.empty(x.shape[:-1] + (bytes_per_row,), dtype=np.uint8)
    if x.size:
        _quantize_rows(tid, x.reshape(n_rows, n_cols), n_cols // BLOCK_SIZE[tid],
                       out.reshape(n_rows, bytes_per_row))
    return out
