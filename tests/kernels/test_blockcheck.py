"""lmengine.kernels.blockcheck: the load-time scan for blocks whose float fields are inf or NaN.

References, independent of the kernel:
- REF_FIELDS below: each block type's f16 fields, their offsets summed from the member sizes of
  ggml's block structs (ggml-common.h), not copied from the module under test;
- the `gguf` package's dequantize (ggml's own NumPy port): a field is a float field that matters
  exactly when planting inf/NaN there makes the block decode to a non-finite value, and blocks
  with finite fields decode to finite values (so no float field is missing from the table);
- a NumPy scan that decodes every field through numpy's float16 / float32 view and np.isfinite.
Every comparison is exact (block indices, True/False): nothing here is approximate.
"""
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as GT

from lmengine.kernels import blockcheck as bc
from lmengine.kernels import quant as q

BLOCK_TYPES = (q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.Q8_0, q.Q2_K, q.Q3_K, q.Q4_K, q.Q5_K, q.Q6_K,
               q.IQ4_NL, q.IQ4_XS)
FLOAT_TYPES = (q.F32, q.F16, q.BF16)
ALL_TYPES = FLOAT_TYPES + BLOCK_TYPES
GGUF_QUANTIZES = (q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.Q8_0)  # + the float types; not K / IQ4

# f16 fields per block type: (name, offset), offsets = sizes of the struct members before them
REF_FIELDS = {
    q.Q4_0: (("d", 0),),                                   # d, qs[16]
    q.Q4_1: (("d", 0), ("m", 2)),                          # d, m, qs[16]
    q.Q5_0: (("d", 0),),                                   # d, qh[4], qs[16]
    q.Q5_1: (("d", 0), ("m", 2)),                          # d, m, qh[4], qs[16]
    q.Q8_0: (("d", 0),),                                   # d, qs[32]
    q.Q2_K: (("d", 16 + 64), ("dmin", 16 + 64 + 2)),       # scales[16], qs[64], d, dmin
    q.Q3_K: (("d", 32 + 64 + 12),),                        # hmask[32], qs[64], scales[12], d
    q.Q4_K: (("d", 0), ("dmin", 2)),                       # d, dmin, scales[12], qs[128]
    q.Q5_K: (("d", 0), ("dmin", 2)),                       # d, dmin, scales[12], qh[32], qs[128]
    q.Q6_K: (("d", 128 + 64 + 16),),                       # ql[128], qh[64], scales[16], d
    q.IQ4_NL: (("d", 0),),                                 # d, qs[16]
    q.IQ4_XS: (("d", 0),),                                 # d, scales_h, scales_l[4], qs[128]
}
VALUE_BYTES = {q.F32: 4, q.F16: 2, q.BF16: 2}

# non-finite bit patterns: +inf, -inf, quiet NaN, negative NaN with a payload
BAD_BITS = {"f16": (0x7C00, 0xFC00, 0x7E00, 0xFD01),
            "bf16": (0x7F80, 0xFF80, 0x7FC0, 0xFF81),
            "f32": (0x7F800000, 0xFF800000, 0x7FC00000, 0xFF800001)}
# finite patterns next to them: the largest finite, and (BF16 only) f16's inf pattern, finite there
EDGE_FINITE_BITS = {"f16": (0x7BFF, 0xFBFF, 0x0001), "bf16": (0x7F7F, 0xFF7F, 0x7C00),
                    "f32": (0x7F7FFFFF, 0xFF7FFFFF, 0x00000001)}
BLOCKS_PER_ROW = 8
TOTAL_BYTES = 5 << 19   # 2.5 MiB per test tensor: more than one chunk, so the parallel path runs


def block_bytes(type_id):
    return q.BLOCK_BYTES[type_id]


def n_test_blocks(type_id):
    """Blocks of a TOTAL_BYTES test tensor, whole rows of BLOCKS_PER_ROW blocks."""
    return TOTAL_BYTES // block_bytes(type_id) // BLOCKS_PER_ROW * BLOCKS_PER_ROW


def chunk_blocks(type_id):
    return bc.CHUNK_BYTES // block_bytes(type_id)


def fields_of(type_id):
    """(name, offset, kind) of each float field of a block (a float type: the value itself)."""
    if type_id in FLOAT_TYPES:
        kind = {q.F32: "f32", q.F16: "f16", q.BF16: "bf16"}[type_id]
        return (("value", 0, kind),)
    return tuple((name, offset, "f16") for name, offset in REF_FIELDS[type_id])


def put_bits(raw, type_id, block, offset, kind, bits):
    """Write the little-endian float bits of `kind` at byte `offset` of block `block` of raw."""
    width = 4 if kind == "f32" else 2
    o = block * block_bytes(type_id) + offset
    raw[o:o + width] = np.array([bits], "<u4" if width == 4 else "<u2").view(np.uint8)


# -- building clean tensors ---------------------------------------------------------------------

def random_finite_f16_bits(rng, n):
    """n finite f16 scales in [-2, 2] as uint16 bits."""
    return rng.uniform(-2.0, 2.0, n).astype("<f2").view("<u2")


def clean_blocks(type_id, n_blocks, seed=0):
    """n_blocks blocks of type_id with finite float fields, as a flat uint8 array. Float types and
    the types gguf.quants quantizes: quantized normal values. K / IQ4 types: random bytes with
    random finite f16 fields at REF_FIELDS."""
    rng = np.random.default_rng(seed + type_id)
    n_values = n_blocks * q.BLOCK_SIZE[type_id]
    if type_id in FLOAT_TYPES or type_id in GGUF_QUANTIZES:
        x = rng.standard_normal((1, n_values)).astype(np.float32)
        raw = np.ascontiguousarray(gguf.quants.quantize(x, GT(type_id))).view(np.uint8).reshape(-1)
        assert raw.size == n_blocks * block_bytes(type_id)
        return raw.copy()
    raw = rng.integers(0, 256, (n_blocks, block_bytes(type_id)), dtype=np.uint8)
    for _, offset in REF_FIELDS[type_id]:
        raw[:, offset:offset + 2] = random_finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


_CLEAN = {}


def clean_tensor(type_id):
    """A copy of the (cached) clean TOTAL_BYTES tensor of type_id."""
    if type_id not in _CLEAN:
        _CLEAN[type_id] = clean_blocks(type_id, n_test_blocks(type_id))
    return _CLEAN[type_id].copy()


def gguf_block_is_finite(type_id, raw, block):
    """Whether gguf's dequantize of block `block` of raw gives only finite values."""
    one = raw[block * block_bytes(type_id):(block + 1) * block_bytes(type_id)].copy()
    if type_id == q.F32:
        return bool(np.isfinite(one.view("<f4")).all())
    if type_id == q.F16:
        return bool(np.isfinite(one.view("<f2")).all())
    with np.errstate(invalid="ignore", over="ignore"):    # inf * 0 -> NaN is what we look for
        return bool(np.isfinite(gguf.quants.dequantize(one, GT(type_id))).all())


# -- the NumPy reference scan -------------------------------------------------------------------

def ref_bad_blocks(type_id, raw, n_blocks):
    """bool [n_blocks]: block b holds an inf or NaN float field, decoded with NumPy floats."""
    blocks = raw[:n_blocks * block_bytes(type_id)].reshape(n_blocks, block_bytes(type_id))
    bad = np.zeros(n_blocks, dtype=bool)
    for _, offset, kind in fields_of(type_id):
        if kind == "f32":
            values = blocks[:, offset:offset + 4].copy().view("<f4")[:, 0]
        elif kind == "f16":
            values = blocks[:, offset:offset + 2].copy().view("<f2")[:, 0]
        else:  # bf16: the top half of an f32
            top_half = blocks[:, offset:offset + 2].copy().view("<u2")[:, 0].astype(np.uint32)
            values = (top_half << 16).view("<f4")
        bad |= ~np.isfinite(values)
    return bad


def ref_first_bad(type_id, raw, n_blocks):
    hits = np.flatnonzero(ref_bad_blocks(type_id, raw, n_blocks))
    return int(hits[0]) if hits.size else -1


# -- tests: the layout table --------------------------------------------------------------------

def test_layout_table_matches_ggml_structs():
    assert bc.F16_FIELDS == REF_FIELDS
    assert set(bc.SUPPORTED_TYPES) == set(ALL_TYPES)


@pytest.mark.parametrize("type_id", BLOCK_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_fields_are_the_float_fields_gguf_decodes(type_id):
    """Finite fields -> gguf decodes finite values; inf/NaN in any one field -> it does not."""
    rng = np.random.default_rng(type_id)
    raw = rng.integers(0, 256, 64 * block_bytes(type_id), dtype=np.uint8)
    blocks = raw.reshape(64, -1)
    for _, offset in REF_FIELDS[type_id]:
        blocks[:, offset:offset + 2] = random_finite_f16_bits(rng, 64).view(np.uint8).reshape(-1, 2)
    assert all(gguf_block_is_finite(type_id, raw, b) for b in range(64))
    for _, offset, kind in fields_of(type_id):
        for bits in BAD_BITS[kind]:
            broken = raw.copy()
            put_bits(broken, type_id, 5, offset, kind, bits)
            assert not gguf_block_is_finite(type_id, broken, 5)


# -- tests: first_nonfinite_block ---------------------------------------------------------------

@pytest.fixture(params=["numba", "numpy"])
def scan(request, monkeypatch):
    """first_nonfinite_block (Numba, parallel over chunks) or first_nonfinite_block_numpy (what
    check_finite_scales runs on all but large float tensors), which must give the same answers;
    the NumPy scan in steps of 1000 blocks, so that the test tensors span several steps."""
    if request.param == "numba":
        return bc.first_nonfinite_block
    monkeypatch.setattr(bc, "NUMPY_CHUNK_BLOCKS", 1000)
    return bc.first_nonfinite_block_numpy


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_clean_tensor_scans_clean(type_id, scan):
    raw = clean_tensor(type_id)
    n = n_test_blocks(type_id)
    assert n > 2 * chunk_blocks(type_id)          # the parallel path runs
    assert not ref_bad_blocks(type_id, raw, n).any()
    assert scan(type_id, raw, n) == -1
    assert scan(type_id, raw[:5 * block_bytes(type_id)], 5) == -1
    assert scan(type_id, np.zeros(0, np.uint8), 0) == -1


def planted_positions(type_id):
    """Blocks to plant in: start, middle, end, and both sides of the first chunk boundary."""
    n, c = n_test_blocks(type_id), chunk_blocks(type_id)
    return {"start": 0, "middle": n // 2 + 3, "end": n - 1, "chunk_last": c - 1, "chunk_first": c}


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_planted_nonfinite_field_is_found(type_id, scan):
    clean = clean_tensor(type_id)
    n = n_test_blocks(type_id)
    for position, block in planted_positions(type_id).items():
        for name, offset, kind in fields_of(type_id):
            for bits in BAD_BITS[kind]:
                raw = clean.copy()
                put_bits(raw, type_id, block, offset, kind, bits)
                what = f"{position} block {block}, field {name}, bits {bits:#x}"
                assert ref_first_bad(type_id, raw, n) == block, what
                assert not gguf_block_is_finite(type_id, raw, block), what
                assert scan(type_id, raw, n) == block, what


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_finite_edge_values_are_not_flagged(type_id, scan):
    clean = clean_tensor(type_id)
    n = n_test_blocks(type_id)
    for name, offset, kind in fields_of(type_id):
        for bits in EDGE_FINITE_BITS[kind]:
            raw = clean.copy()
            for block in planted_positions(type_id).values():
                put_bits(raw, type_id, block, offset, kind, bits)
            assert ref_first_bad(type_id, raw, n) == -1
            assert scan(type_id, raw, n) == -1, (name, hex(bits))


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_first_of_several_bad_blocks(type_id, scan):
    """Bad blocks in several chunks: the smallest index wins, whichever thread finds its own first."""
    n, c = n_test_blocks(type_id), chunk_blocks(type_id)
    name, offset, kind = fields_of(type_id)[-1]
    raw = clean_tensor(type_id)
    for block in (n - 1, 2 * c + 7, c + 1):
        put_bits(raw, type_id, block, offset, kind, BAD_BITS[kind][2])
    assert scan(type_id, raw, n) == c + 1
    # and only blocks 0 .. n_blocks - 1 are scanned: a bad block past them is not seen
    assert scan(type_id, raw, c + 1) == -1


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_random_bytes_match_numpy_reference(type_id, scan):
    """Random bytes: every bad block, found one after another, equals the NumPy scan's list."""
    rng = np.random.default_rng(100 + type_id)
    bb = block_bytes(type_id)
    # many small matrices of raw random bytes (an f16 field is inf/NaN with probability 1/32)
    # starting at byte 0..3 of an allocation, so float types take the word and the byte path
    for trial in range(200):
        n, skip = int(rng.integers(1, 80)), trial % 4
        raw = rng.integers(0, 256, n * bb + skip, dtype=np.uint8)[skip:]
        assert scan(type_id, raw, n) == ref_first_bad(type_id, raw, n), trial
    # one large, mostly finite matrix: random bytes with every inf/NaN field made finite (the
    # exponent's top bit cleared), then the exponent bits of one field set in ~40 random blocks
    n = n_test_blocks(type_id)
    raw = rng.integers(0, 256, n * bb, dtype=np.uint8)
    blocks = raw.reshape(n, bb)
    fields = fields_of(type_id)
    for _, offset, kind in fields:
        top = offset + (3 if kind == "f32" else 1)            # byte holding the exponent's top bit
        blocks[ref_bad_blocks(type_id, raw, n), top] &= 0xBF
    assert not ref_bad_blocks(type_id, raw, n).any()
    exponent = {"f16": 0x7C00, "bf16": 0x7F80, "f32": 0x7F800000}
    for block in rng.choice(n, 40, replace=False):
        _, offset, kind = fields[rng.integers(len(fields))]
        width = 4 if kind == "f32" else 2
        word = blocks[block, offset:offset + width].view("<u4" if width == 4 else "<u2")
        word |= exponent[kind]                                # random sign and mantissa kept
    expected = np.flatnonzero(ref_bad_blocks(type_id, raw, n))
    assert expected.size == 40
    found, start = [], 0
    while True:   # scan the rest of the tensor after each bad block (whole-value offsets: aligned)
        b = scan(type_id, raw[start * bb:], n - start)
        if b < 0:
            break
        found.append(start + b)
        start += b + 1
    assert found == expected.tolist()


@pytest.mark.parametrize("type_id", FLOAT_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_unaligned_float_buffer_uses_the_byte_path(type_id, scan):
    """A float tensor that does not start on a whole word: same answers (generic byte path)."""
    n = n_test_blocks(type_id)
    storage = np.zeros(n * block_bytes(type_id) + 1, np.uint8)
    raw = storage[1:]
    raw[:] = clean_tensor(type_id)
    assert raw.ctypes.data % block_bytes(type_id) != 0
    assert scan(type_id, raw, n) == -1
    name, offset, kind = fields_of(type_id)[0]
    for block in planted_positions(type_id).values():
        for bits in BAD_BITS[kind]:
            broken = storage.copy()[1:]
            put_bits(broken, type_id, block, offset, kind, bits)
            assert scan(type_id, broken, n) == block
    broken = storage.copy()[1:]
    for block, bits in zip(planted_positions(type_id).values(), EDGE_FINITE_BITS[kind]):
        put_bits(broken, type_id, block, offset, kind, bits)
    assert scan(type_id, broken, n) == -1


def test_first_nonfinite_block_rejects_bad_arguments(scan):
    raw = np.zeros(10 * 18, np.uint8)
    with pytest.raises(ValueError, match="shorter"):
        scan(q.Q4_0, raw, 11)
    with pytest.raises(ValueError, match="unsupported"):
        scan(4, raw, 1)                   # a removed ggml type (Q4_2)
    with pytest.raises(ValueError, match="unsupported"):
        scan(99, raw, 1)
    with pytest.raises(ValueError, match="unsupported"):
        scan(-1, raw, 1)
    with pytest.raises(ValueError, match="negative"):
        scan(q.Q4_0, raw, -1)


# -- tests: check_finite_scales -----------------------------------------------------------------

@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_check_finite_scales_messages(type_id):
    n = n_test_blocks(type_id)
    n_rows, n_cols = n // BLOCKS_PER_ROW, BLOCKS_PER_ROW * q.BLOCK_SIZE[type_id]
    raw = clean_tensor(type_id)
    assert bc.check_finite_scales(type_id, raw, n_rows, n_cols, "blk.0.ffn_up.weight") is None
    block = planted_positions(type_id)["middle"]
    row, in_row = divmod(block, BLOCKS_PER_ROW)
    for name, offset, kind in fields_of(type_id):
        for bits, word in ((BAD_BITS[kind][1], "-inf"), (BAD_BITS[kind][3], "NaN")):
            broken = raw.copy()
            put_bits(broken, type_id, block, offset, kind, bits)
            message = bc.check_finite_scales(type_id, broken, n_rows, n_cols, "blk.0.ffn_up.weight")
            assert "'blk.0.ffn_up.weight'" in message and q.TYPE_NAMES[type_id] in message
            assert f"row {row}," in message and word in message
            if type_id in FLOAT_TYPES:
                assert f"value {block} " in message and f"column {in_row})" in message
            else:
                assert f"block {block} " in message and f"{name} = {word}" in message


@pytest.mark.parametrize("type_id", (q.Q4_1, q.Q2_K, q.Q4_K), ids=lambda t: q.TYPE_NAMES[t])
def test_check_finite_scales_names_both_bad_fields(type_id):
    n = 4 * BLOCKS_PER_ROW
    raw = clean_blocks(type_id, n)
    (d_name, d_offset), (m_name, m_offset) = REF_FIELDS[type_id]
    put_bits(raw, type_id, 9, d_offset, "f16", 0x7C00)
    put_bits(raw, type_id, 9, m_offset, "f16", 0x7E00)
    message = bc.check_finite_scales(type_id, raw, 4, BLOCKS_PER_ROW * q.BLOCK_SIZE[type_id], "t")
    assert f"{d_name} = +inf" in message and f"{m_name} = NaN" in message
    assert "block 9 " in message and "row 1," in message and "block 1 of 8" in message


def test_check_finite_scales_accepts_file_views(tmp_path):
    """bytes, a 2-D (rows, row_bytes) array, a read-only memory map: no copy, same answer."""
    type_id, n_rows, n_cols = q.Q8_0, 6, 64
    raw = clean_blocks(type_id, n_rows * 2)
    put_bits(raw, type_id, 7, 0, "f16", 0xFC00)
    expected = bc.check_finite_scales(type_id, raw, n_rows, n_cols, "w")
    assert "block 7 " in expected and "row 3," in expected
    assert bc.check_finite_scales(type_id, raw.tobytes(), n_rows, n_cols, "w") == expected
    assert bc.check_finite_scales(type_id, raw.reshape(n_rows, -1), n_rows, n_cols, "w") == expected
    path = tmp_path / "tensor.bin"
    path.write_bytes(b"\0" * 32 + raw.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")[32:]
    assert not mapped.flags.writeable
    assert bc.check_finite_scales(type_id, mapped, n_rows, n_cols, "w") == expected
    f16 = np.ones((3, 5), np.float16)
    f16[2, 4] = np.nan
    assert "row 2, column 4" in bc.check_finite_scales(q.F16, f16, 3, 5, "norm")


def test_check_finite_scales_rejects_bad_arguments():
    raw = np.zeros(4 * 34, np.uint8)
    with pytest.raises(ValueError, match="type id 99"):
        bc.check_finite_scales(99, raw, 4, 32, "w")
    with pytest.raises(ValueError, match="whole 32-value blocks"):
        bc.check_finite_scales(q.Q8_0, raw, 4, 33, "w")
    with pytest.raises(ValueError, match="needs 4 x 34 = 136 bytes, got 135"):
        bc.check_finite_scales(q.Q8_0, raw[:-1], 4, 32, "w")
    with pytest.raises(ValueError, match="C-contiguous"):
        bc.check_finite_scales(q.Q8_0, np.zeros(2 * 4 * 34, np.uint8)[::2], 4, 32, "w")
    assert bc.check_finite_scales(q.Q8_0, np.zeros(0, np.uint8), 0, 32, "w") is None


@pytest.mark.parametrize("type_id", FLOAT_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_check_finite_scales_large_float_tensor_takes_the_numba_scan(type_id, monkeypatch):
    """Float tensors from NUMBA_SCAN_MIN_BYTES on go to the parallel Numba scan: same message."""
    n = n_test_blocks(type_id)
    raw = clean_tensor(type_id)
    block = planted_positions(type_id)["middle"]
    name, offset, kind = fields_of(type_id)[0]
    put_bits(raw, type_id, block, offset, kind, BAD_BITS[kind][3])
    n_rows, n_cols = n // BLOCKS_PER_ROW, BLOCKS_PER_ROW * q.BLOCK_SIZE[type_id]
    small = bc.check_finite_scales(type_id, raw, n_rows, n_cols, "w")
    calls, numba_scan = [], bc.first_nonfinite_block
    monkeypatch.setattr(bc, "NUMBA_SCAN_MIN_BYTES", 0)
    monkeypatch.setattr(bc, "first_nonfinite_block", lambda *a: calls.append(a) or numba_scan(*a))
    assert bc.check_finite_scales(type_id, raw, n_rows, n_cols, "w") == small
    assert calls and f"value {block} " in small
