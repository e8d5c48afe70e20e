"""Load-time scan for ggml blocks whose float fields hold inf or NaN.

A corrupt (or hostile) GGUF file can hold a block whose f16 scale d, or its offset m / dmin, is
inf or NaN. Every value such a block decodes to is then inf or NaN, and one of them reaching a
matmul turns the logits into NaN: the sampler would emit garbage. ggml rejects such rows
(`ggml_validate_row_data`); the model loader here runs `check_finite_scales` over every weight
matrix once, at load, and raises its own error with the message this module returns.

What is checked, per type (all fields little-endian; byte offsets inside one block, from the
block structs of ggml's ggml-common.h):

    type    id  bytes  checked f16 fields   block layout
    Q4_0     2    18   d@0                  d, qs[16]
    Q4_1     3    20   d@0, m@2             d, m, qs[16]
    Q5_0     6    22   d@0                  d, qh[4], qs[16]
    Q5_1     7    24   d@0, m@2             d, m, qh[4], qs[16]
    Q8_0     8    34   d@0                  d, qs[32]
    Q2_K    10    84   d@80, dmin@82        scales[16], qs[64], d, dmin
    Q3_K    11   110   d@108                hmask[32], qs[64], scales[12], d
    Q4_K    12   144   d@0, dmin@2          d, dmin, scales[12], qs[128]
    Q5_K    13   176   d@0, dmin@2          d, dmin, scales[12], qh[32], qs[128]
    Q6_K    14   210   d@208                ql[128], qh[64], scales[16] (int8), d
    IQ4_NL  20    18   d@0                  d, qs[16]
    IQ4_XS  23   136   d@0                  d, scales_h (u16), scales_l[4], qs[128]
    F32      0     4   the value            (a "block" is one value)
    F16      1     2   the value
    BF16    30     2   the value

The other bytes of a block are integers (quants, 4- or 6-bit sub-scales) that always decode to
finite values. The test is on bits, never a float conversion: a float is inf or NaN exactly when
its exponent bits are all ones, mask 0x7C00 for f16, 0x7F80 for bf16, 0x7F800000 for f32.

Speed: a block type reads only its 2 or 4 scale bytes per block (yet every cache line is fetched:
blocks are 18..210 bytes apart), a float type every value, as uint16 / uint32 words when the
buffer starts on a whole word (else byte by byte, the generic path). The scan is memory-bound: it
splits the tensor into chunks of about CHUNK_BYTES and scans them on Numba's threads
(`numba.set_num_threads` in the calling thread picks how many); a tensor of one chunk is scanned
on the calling thread. Measured on the 2-core AVX2 dev machine (shared, so an upper bound): about
0.1-0.2 s per GiB of Q4_K / Q8_0 / Q4_0 / Q6_K / F16 / F32 / BF16, near its memory bandwidth
(0.11 s per GiB to read one byte per cache line); the generic byte path for unaligned float
buffers is 0.5-1.4 s per GiB.

At load, though, `check_finite_scales` runs `first_nonfinite_block_numpy` (the same scan with
NumPy's strided views) on every tensor but float ones of NUMBA_SCAN_MIN_BYTES and more: loading the
Numba scan's cached machine code took about 1 s of a 2.2 s warm start, while NumPy scans the
blocks of the bundled 135M Q4_1 model in about 0.03 s and of a 1B Q4_0 file (35M blocks) in about
0.3 s (2-core AVX2 machine, 2026-12-05). Large float tensors (an F16 model: ~1 GB/s in NumPy)
keep the parallel scan.

Every Numba function is `njit(cache=True, nogil=True)`. `first_nonfinite_block` raises ValueError
on a type or buffer size it cannot scan (it never reads past the buffer). `check_finite_scales`
returns None for a clean tensor and otherwise a message naming the tensor, block, row and field;
it raises ValueError only for arguments that do not describe a tensor (unknown type, a size that
disagrees with the shape). This module imports nothing from the engine: the caller wraps the
message in the engine's exception.
"""
import numpy as np
from numba import njit, prange

from .quant import (BF16, BLOCK_BYTES, BLOCK_SIZE, F16, F32, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0,
                    Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, TYPE_NAMES)

# -- layout table -------------------------------------------------------------------------------

# type id -> ((field name, byte offset in the block), ...): the f16 fields of each block type
F16_FIELDS = {
    Q4_0: (("d", 0),),
    Q4_1: (("d", 0), ("m", 2)),
    Q5_0: (("d", 0),),
    Q5_1: (("d", 0), ("m", 2)),
    Q8_0: (("d", 0),),
    Q2_K: (("d", 80), ("dmin", 82)),
    Q3_K: (("d", 108),),
    Q4_K: (("d", 0), ("dmin", 2)),
    Q5_K: (("d", 0), ("dmin", 2)),
    Q6_K: (("d", 208),),
    IQ4_NL: (("d", 0),),
    IQ4_XS: (("d", 0),),
}
FLOAT_TYPES = (F32, F16, BF16)  # a "block" is one stored value
SUPPORTED_TYPES = tuple(sorted(FLOAT_TYPES + tuple(F16_FIELDS)))

# The same table as arrays indexed by type id, for the Numba code. _BLOCK_BYTES_BY_ID == 0 marks an
# unsupported id; _FIELD_BY_ID[t] holds the offsets of type t's f16 fields, -1 where it has fewer.
_N_IDS = max(SUPPORTED_TYPES) + 1
_BLOCK_BYTES_BY_ID = np.zeros(_N_IDS, dtype=np.int64)
_FIELD_BY_ID = np.full((_N_IDS, 2), -1, dtype=np.int64)
for _t in SUPPORTED_TYPES:
    _BLOCK_BYTES_BY_ID[_t] = BLOCK_BYTES[_t]
for _t, _fields in F16_FIELDS.items():
    for _k, (_name, _offset) in enumerate(_fields):
        assert 0 <= _offset <= BLOCK_BYTES[_t] - 2, (_t, _name)
        _FIELD_BY_ID[_t, _k] = _offset
del _t, _fields, _k, _name, _offset

CHUNK_BYTES = 1 << 20   # bytes of blocks one thread scans per task (about 1 MiB)
NUMPY_CHUNK_BLOCKS = 1 << 20     # blocks first_nonfinite_block_numpy tests per step (a few MB of temporaries)
NUMBA_SCAN_MIN_BYTES = 64 << 20  # check_finite_scales: float tensors this large take the parallel Numba scan
_EXPONENT_MASK = {F32: 0x7F800000, F16: 0x7C00, BF16: 0x7F80}
SUB_VALUES = 4096        # float types: values counted per step before looking for the first bad one


# -- bit tests ----------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _f16_nonfinite(raw, o):
    """True if the little-endian f16 at raw[o:o+2] is inf or NaN (exponent bits 0x7C00 all ones)."""
    bits = np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8)
    return (bits & 0x7C00) == 0x7C00


@njit(cache=True, nogil=True, inline="always")
def _bf16_nonfinite(raw, o):
    """True if the little-endian bf16 at raw[o:o+2] is inf or NaN (exponent bits 0x7F80)."""
    bits = np.int64(raw[o]) | (np.int64(raw[o + 1]) << 8)
    return (bits & 0x7F80) == 0x7F80


@njit(cache=True, nogil=True, inline="always")
def _f32_nonfinite(raw, o):
    """True if the little-endian f32 at raw[o:o+4] is inf or NaN (exponent bits 0x7F800000)."""
    bits = np.int64(raw[o + 2]) << 16 | (np.int64(raw[o + 3]) << 24)   # bytes 0, 1: mantissa only
    return (bits & 0x7F800000) == 0x7F800000


@njit(cache=True, nogil=True, inline="always")
def _value_nonfinite(type_id, raw, i):
    """True if value i of an F32 / F16 / BF16 tensor is inf or NaN."""
    if type_id == F32:
        return _f32_nonfinite(raw, 4 * i)
    if type_id == F16:
        return _f16_nonfinite(raw, 2 * i)
    return _bf16_nonfinite(raw, 2 * i)


# -- scans of one range of blocks ----------------------------------------------------------------

@njit(cache=True, nogil=True)
def _scan_block_fields(raw, block_bytes, field0, field1, start, stop):
    """First block b in [start, stop) whose f16 at b * block_bytes + field0 (or + field1, when
    field1 >= 0) is non-finite; -1 if none."""
    for b in range(start, stop):
        o = b * block_bytes
        if _f16_nonfinite(raw, o + field0):
            return b
        if field1 >= 0 and _f16_nonfinite(raw, o + field1):
            return b
    return -1


@njit(cache=True, nogil=True)
def _scan_values_bytewise(type_id, raw, start, stop):
    """First value i in [start, stop) of an F32 / F16 / BF16 tensor that is inf or NaN; -1 if
    none. The generic path: byte loads, any alignment of raw."""
    for i in range(start, stop):
        if _value_nonfinite(type_id, raw, i):
            return i
    return -1


@njit(cache=True, nogil=True)
def _scan_words(words, exp_mask, start, stop):
    """First i in [start, stop) whose exponent bits words[i] & exp_mask are all ones; -1 if none.
    words: the values' bits as uint16 (F16, BF16) or uint32 (F32). The fast path: per step of
    SUB_VALUES values it ORs the tests together (a loop the compiler turns into SIMD compares),
    and looks for the first bad value only in a step where one was seen."""
    for s in range(start, stop, SUB_VALUES):
        step = words[s:min(stop, s + SUB_VALUES)]
        seen = False
        for i in range(step.size):      # indices from 0: no negative-index wrap test, SIMD
            seen |= (step[i] & exp_mask) == exp_mask
        if seen:
            for i in range(step.size):
                if (step[i] & exp_mask) == exp_mask:
                    return s + i
    return -1


@njit(cache=True, nogil=True)
def _scan_range(type_id, raw, start, stop):
    """First non-finite block in [start, stop) of a block type, or value of a float type read
    from raw bytes; -1 if none (type_id already checked)."""
    if type_id == F32 or type_id == F16 or type_id == BF16:
        return _scan_values_bytewise(type_id, raw, start, stop)
    return _scan_block_fields(raw, _BLOCK_BYTES_BY_ID[type_id], _FIELD_BY_ID[type_id, 0],
                              _FIELD_BY_ID[type_id, 1], start, stop)


@njit(cache=True, nogil=True)
def _first_found(found):
    """The first entry of found that is >= 0, or -1."""
    for c in range(found.size):
        if found[c] >= 0:
            return found[c]
    return -1


@njit(cache=True, nogil=True, parallel=True)
def _scan_chunks(type_id, raw, n_blocks, chunk_blocks):
    """_scan_range over n_blocks blocks, in chunks of chunk_blocks on Numba's threads."""
    n_chunks = (n_blocks + chunk_blocks - 1) // chunk_blocks
    found = np.full(n_chunks, -1, dtype=np.int64)      # first bad block of each chunk
    for c in prange(n_chunks):
        found[c] = _scan_range(type_id, raw, c * chunk_blocks, min(n_blocks, (c + 1) * chunk_blocks))
    return _first_found(found)


@njit(cache=True, nogil=True, parallel=True)
def _scan_word_chunks(words, exp_mask, n_values, chunk_values):
    """_scan_words over n_values values, in chunks of chunk_values on Numba's threads."""
    n_chunks = (n_values + chunk_values - 1) // chunk_values
    found = np.full(n_chunks, -1, dtype=np.int64)
    for c in prange(n_chunks):
        found[c] = _scan_words(words, exp_mask, c * chunk_values,
                               min(n_values, (c + 1) * chunk_values))
    return _first_found(found)


@njit(cache=True, nogil=True)
def _scan_words_of(words, exp_mask, n_values, chunk_values):
    """_scan_words over n_values values: on this thread when they fit one chunk, else parallel."""
    if n_values <= chunk_values:
        return _scan_words(words, exp_mask, 0, n_values)
    return _scan_word_chunks(words, exp_mask, n_values, chunk_values)


# -- entry points -------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def first_nonfinite_block(type_id, raw_u8, n_blocks):
    """Index of the first of the n_blocks blocks of type type_id in raw_u8 (1-D uint8, blocks back
    to back from byte 0) whose float fields hold inf or NaN (the f16 d, and m / dmin where the
    type has one; the value itself for F32, F16, BF16); -1 when every block is finite.

    Raises ValueError for a type id outside the table above, a negative n_blocks, or a raw_u8
    shorter than n_blocks blocks. Tensors of more than one chunk are scanned in parallel.
    """
    if type_id < 0 or type_id >= _N_IDS or _BLOCK_BYTES_BY_ID[type_id] == 0:
        raise ValueError("first_nonfinite_block: unsupported ggml type id")
    if n_blocks < 0:
        raise ValueError("first_nonfinite_block: n_blocks is negative")
    block_bytes = _BLOCK_BYTES_BY_ID[type_id]
    if raw_u8.size < n_blocks * block_bytes:
        raise ValueError("first_nonfinite_block: raw_u8 is shorter than n_blocks blocks")
    chunk_blocks = max(1, CHUNK_BYTES // block_bytes)
    if type_id == F32 or type_id == F16 or type_id == BF16:
        # fast path: the values as uint16 / uint32 words, when raw_u8 starts on a whole word
        # (a GGUF file aligns every tensor to 32 bytes); else the generic byte path below
        if raw_u8.ctypes.data % block_bytes == 0:
            n_bytes = n_blocks * block_bytes
            if type_id == F32:
                return _scan_words_of(raw_u8[:n_bytes].view(np.uint32), np.uint32(0x7F800000),
                                      n_blocks, chunk_blocks)
            exp_mask = np.uint16(0x7C00) if type_id == F16 else np.uint16(0x7F80)
            return _scan_words_of(raw_u8[:n_bytes].view(np.uint16), exp_mask, n_blocks,
                                  chunk_blocks)
    if n_blocks <= chunk_blocks:
        return _scan_range(type_id, raw_u8, 0, n_blocks)   # one chunk: no thread start-up
    return _scan_chunks(type_id, raw_u8, n_blocks, chunk_blocks)


def first_nonfinite_block_numpy(type_id, raw_u8, n_blocks):
    """first_nonfinite_block (same arguments, same answer, same ValueErrors) in NumPy, on the
    calling thread, with no compiled code to load: strided uint16 / uint32 views of the f16 fields
    of each block (or of every value, for F32 / F16 / BF16), tested NUMPY_CHUNK_BLOCKS blocks at
    a time. check_finite_scales uses it for every tensor but large float ones: loading the Numba
    scan's cached code costs about 1 s at the first model load, more than scanning a whole
    quantized 1B model this way (block types read 2-4 bytes per block; NumPy's cost is per block)."""
    type_id, n_blocks = int(type_id), int(n_blocks)
    if type_id not in SUPPORTED_TYPES:
        raise ValueError("first_nonfinite_block: unsupported ggml type id")
    if n_blocks < 0:
        raise ValueError("first_nonfinite_block: n_blocks is negative")
    block_bytes = BLOCK_BYTES[type_id]
    if raw_u8.size < n_blocks * block_bytes:
        raise ValueError("first_nonfinite_block: raw_u8 is shorter than n_blocks blocks")
    if type_id in FLOAT_TYPES:
        offsets, word, exp_mask = (0,), ("<u4" if type_id == F32 else "<u2"), _EXPONENT_MASK[type_id]
    else:
        offsets, word, exp_mask = tuple(o for _, o in F16_FIELDS[type_id]), "<u2", 0x7C00
    if n_blocks and not any(_has_nonfinite(raw_u8, n_blocks, block_bytes, offset, word, exp_mask)
                            for offset in offsets):
        return -1
    for start in range(0, n_blocks, NUMPY_CHUNK_BLOCKS):
        count = min(NUMPY_CHUNK_BLOCKS, n_blocks - start)
        bad = np.zeros(count, dtype=bool)
        for offset in offsets:      # the field at `offset` of blocks start .. start + count - 1
            words = np.ndarray((count,), dtype=word, buffer=raw_u8, offset=start * block_bytes + offset,
                               strides=(block_bytes,))
            bad |= (words & exp_mask) == exp_mask
        if bad.any():
            return start + int(np.argmax(bad))
    return -1


def _has_nonfinite(raw_u8, n_blocks, block_bytes, offset, word, exp_mask) -> bool:
    """Whether the field at `offset` of any of the n_blocks blocks is inf or NaN: its exponent
    bits all set. Two maxima over strided views, no temporaries (half the time of the locating
    loop, which runs only when this says yes): read as signed, a positive non-finite value is
    >= exp_mask; read as unsigned, a negative one is >= sign | exp_mask."""
    unsigned = np.ndarray((n_blocks,), dtype=word, buffer=raw_u8, offset=offset, strides=(block_bytes,))
    signed = unsigned.view(word.replace("u", "i"))
    sign = 1 << (8 * unsigned.itemsize - 1)
    return int(signed.max()) >= exp_mask or int(unsigned.max()) >= (sign | exp_mask)


def _as_flat_u8(raw, what):
    """raw (bytes-like, or a C-contiguous array of any dtype) as a flat uint8 view, never a copy."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return np.frombuffer(raw, dtype=np.uint8)
    arr = np.asarray(raw)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (a view of the file's bytes), got strides "
                         f"{arr.strides}")
    return arr.reshape(-1).view(np.uint8)


def _describe_f16(bits) -> str:
    """'NaN', '+inf' or '-inf' for non-finite f16 bits."""
    if bits & 0x03FF:
        return "NaN"
    return "-inf" if bits & 0x8000 else "+inf"


def _describe_value(type_id, raw, i) -> str:
    """'NaN', '+inf' or '-inf' for non-finite value i of an F32 / F16 / BF16 tensor."""
    if type_id == F32:
        bits = int(raw[4 * i:4 * i + 4].view("<u4")[0])
        mantissa, sign = bits & 0x007FFFFF, bits & 0x80000000
    else:
        bits = int(raw[2 * i:2 * i + 2].view("<u2")[0])
        mantissa, sign = bits & (0x03FF if type_id == F16 else 0x007F), bits & 0x8000
    if mantissa:
        return "NaN"
    return "-inf" if sign else "+inf"


def check_finite_scales(type_id, raw_u8, n_rows, n_cols, name):
    """None when no block of the tensor `name` holds an inf or NaN float field; else a message
    naming the tensor, the first bad block, its row and the field (and its value).

    raw_u8: the tensor's bytes, n_rows rows of n_cols values of ggml type type_id (row r at bytes
    [r * row_bytes, (r + 1) * row_bytes)), e.g. a uint8 view of the file's memory map; never copied.
    Raises ValueError for an unsupported type, an n_cols that is not whole blocks, or a byte count
    other than n_rows * row_bytes.
    """
    if type_id not in SUPPORTED_TYPES:
        names = ", ".join(f"{TYPE_NAMES[t]}={t}" for t in SUPPORTED_TYPES)
        raise ValueError(f"check_finite_scales: tensor '{name}': ggml type id {type_id} is not "
                         f"one this check knows ({names})")
    type_name, block_size, block_bytes = TYPE_NAMES[type_id], BLOCK_SIZE[type_id], BLOCK_BYTES[type_id]
    n_rows, n_cols = int(n_rows), int(n_cols)
    if n_rows < 0 or n_cols < 0 or n_cols % block_size:
        raise ValueError(f"check_finite_scales: tensor '{name}' ({type_name}): shape {n_rows} x "
                         f"{n_cols} is not rows of whole {block_size}-value blocks")
    raw = _as_flat_u8(raw_u8, f"check_finite_scales: tensor '{name}'")
    blocks_per_row = n_cols // block_size
    n_blocks = n_rows * blocks_per_row
    if raw.size != n_blocks * block_bytes:
        raise ValueError(f"check_finite_scales: tensor '{name}' ({type_name}, {n_rows} x {n_cols}) "
                         f"needs {n_blocks} x {block_bytes} = {n_blocks * block_bytes} bytes, "
                         f"got {raw.size}")
    # quantized tensors and small float ones: NumPy (no compiled code to load at start-up); large
    # float tensors (an F16 / F32 model's matrices): the Numba scan on all threads, 3-5x faster there
    large_floats = type_id in FLOAT_TYPES and raw.size >= NUMBA_SCAN_MIN_BYTES
    scan = first_nonfinite_block if large_floats else first_nonfinite_block_numpy
    b = int(scan(type_id, raw, n_blocks))
    if b < 0:
        return None
    row, in_row = divmod(b, blocks_per_row)
    where = f"tensor '{name}' ({type_name}, {n_rows} rows x {n_cols} values)"
    if type_id in FLOAT_TYPES:
        return (f"{where}: value {b} (row {row}, column {in_row}) is "
                f"{_describe_value(type_id, raw, b)}")
    bad = []
    for field, offset in F16_FIELDS[type_id]:
        o = b * block_bytes + offset
        bits = int(raw[o]) | (int(raw[o + 1]) << 8)
        if (bits & 0x7C00) == 0x7C00:
            bad.append(f"f16 {field} = {_describe_f16(bits)} (byte {o})")
    return (f"{where}: block {b} (row {row}, block {in_row} of {blocks_per_row} in the row) has "
            f"a non-finite scale: {', '.join(bad)}")
