"""kernels.quant against the gguf package (ggml's own Python port of its quantizers), bit for bit.

Every comparison here is exact: float outputs are compared by their IEEE bits (stricter than ==,
it also tells -0.0 from +0.0); where NaN can occur, NaN positions must match and the payload is
not compared (NaN payloads after arithmetic are not specified by IEEE 754).
"""
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as GT

from kernels import quant as q
from converters.gguf_file import GGUFFile

ALL_TYPES = (q.F32, q.F16, q.BF16, q.Q8_0, q.Q4_0, q.Q4_1, q.Q4_K, q.Q5_K, q.Q6_K)
BLOCK_QUANT_TYPES = (q.Q8_0, q.Q4_0, q.Q4_1)
K_TYPES = (q.Q4_K, q.Q5_K, q.Q6_K)

# byte offsets of the f16 fields (scales, mins) inside each block
F16_FIELDS = {q.Q8_0: (0,), q.Q4_0: (0,), q.Q4_1: (0, 2), q.Q4_K: (0, 2), q.Q5_K: (0, 2),
              q.Q6_K: (208,), q.F16: (0,)}


# -- references ---------------------------------------------------------------------------------

def ref_dequantize(type_id, raw, shape):
    """gguf.quants' dequantization of raw blocks, as float32 of `shape`."""
    rows = np.asarray(raw, dtype=np.uint8).reshape(-1, q.row_bytes(type_id, shape[-1]))
    if type_id == q.F32:
        out = rows.view(np.float32)
    elif type_id == q.F16:
        out = rows.view(np.float16).astype(np.float32)
    else:
        out = gguf.quants.dequantize(rows, GT(type_id))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def ref_quantize(type_id, x):
    """gguf.quants' quantization of x, as uint8 [..., row_bytes]."""
    out = np.asarray(gguf.quants.quantize(x, GT(type_id)))
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[:-1] + (-1,))


def assert_same_floats(ours, ref):
    """Same shape, float32, same IEEE bits everywhere except that NaN only has to meet NaN."""
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    if np.array_equal(ours.view(np.uint32), ref.view(np.uint32)):
        return                                              # identical bits, NaNs included
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan), "NaN positions differ"
    diff = np.flatnonzero(ours.view(np.uint32)[~nan] != ref.view(np.uint32)[~nan])
    assert diff.size == 0, (f"{diff.size} values differ; first at flat index {diff[0]}: "
                            f"ours {ours[~nan][diff[0]]!r} ref {ref[~nan][diff[0]]!r}")


def random_blocks(rng, type_id, n_blocks, finite_scales):
    """Random raw bytes for n_blocks blocks; with finite_scales, f16 fields hold no inf/NaN."""
    raw = rng.integers(0, 256, (n_blocks, q.BLOCK_BYTES[type_id]), dtype=np.uint8)
    if finite_scales:
        for offset in F16_FIELDS.get(type_id, ()):
            high = raw[:, offset + 1]  # sign, 5 exponent bits, top 2 mantissa bits
            is_inf_nan = (high & 0x7C) == 0x7C
            raw[is_inf_nan, offset + 1] = high[is_inf_nan] & 0xBF  # exponent 31 -> 15
    return raw.reshape(-1)


def make_values(rng, n_rows, n_cols, scale, mixed_zero_block=True):
    """float32 [n_rows, n_cols] normal values times `scale`, with special blocks mixed in.

    mixed_zero_block adds a block of +0 with a -0 first; leave it out for Q4_1, whose zero min
    takes its sign from numpy's min reduction in gguf (see test_q4_1_mixed_signed_zeros).
    """
    x = (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)
    blocks = x.reshape(-1, 32)  # a view: edits land in x
    specials = [
        np.zeros(32, np.float32),                                   # all +0
        np.full(32, -0.0, np.float32),                              # all -0
        -np.abs(blocks[0]),                                         # negative only
        np.abs(blocks[0]) + scale,                                  # positive only, min > 0
        np.full(32, 3.0 * scale, np.float32),                       # constant: max == min
        np.where(np.arange(32) == 5, 100 * scale, 0.01 * scale).astype(np.float32),  # one outlier
        np.r_[[127.0], np.arange(31) * 0.5 - 7.5].astype(np.float32),  # x/d on halves for Q8_0
        np.r_[[-8.0], np.arange(31) * 0.5 - 7.5].astype(np.float32),  # exact x/d+8.5 for Q4_0
    ]
    if mixed_zero_block:
        specials.append(np.r_[[-0.0], np.zeros(31)].astype(np.float32))  # -0 first: Q4_0's d sign
    for i, special in enumerate(specials):
        if 2 * i + 1 < len(blocks):
            blocks[2 * i + 1] = special
    return x


# -- type table ---------------------------------------------------------------------------------

def test_type_table_matches_gguf():
    for type_id in ALL_TYPES:
        assert q.TYPE_NAMES[type_id] == GT(type_id).name
        assert q.TYPE_IDS[GT(type_id).name] == type_id
        assert (q.BLOCK_SIZE[type_id], q.BLOCK_BYTES[type_id]) == gguf.GGML_QUANT_SIZES[GT(type_id)]
        assert q.block_size(type_id) == q.BLOCK_SIZE[type_id]
        assert q.block_bytes(type_id) == q.BLOCK_BYTES[type_id]
        assert q.type_name(type_id) == GT(type_id).name
        n_cols = 4 * q.BLOCK_SIZE[type_id]
        assert q.row_bytes(type_id, n_cols) == 4 * q.BLOCK_BYTES[type_id]
        assert q.row_bytes(type_id, 0) == 0


# -- half precision -----------------------------------------------------------------------------

def test_f16_decode_all_bit_patterns():
    bits = np.arange(65536, dtype=np.uint16)
    ours = q.dequantize(q.F16, bits.view(np.uint8), (65536,))
    assert_same_floats(ours, bits.view(np.float16).astype(np.float32))
    assert np.isnan(ours).sum() == 2 * 1023                 # 2 signs x 1023 non-zero NaN mantissas
    # the scalar helper other kernels use, on a few classes of value
    for h in (0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFC00, 0x7E01):
        expected = np.array([h], np.uint16).view(np.float16).astype(np.float32)[0]
        got = q.half_bits_to_float(h)
        assert (np.isnan(got) and np.isnan(expected)) or \
            np.float32(got).view(np.uint32) == expected.view(np.uint32)


def _f16_bits_ours(x):
    return q.quantize(q.F16, x).view(np.uint16).reshape(x.shape)


def _f16_bits_numpy(x):
    return x.astype(np.float16).view(np.uint16)


def test_f16_encode_round_trips_every_half():
    bits = np.arange(65536, dtype=np.uint16)
    values = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(values)
    ours = _f16_bits_ours(values)
    assert np.array_equal(ours[~nan], bits[~nan])          # exact, incl. -0, subnormals, inf
    assert np.isnan(ours.view(np.float16)[nan]).all()       # NaN stays NaN


def test_f16_encode_rounds_to_nearest_even():
    halfs = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # +0 .. 65504
    upper = np.r_[halfs[1:], 65536.0]
    mids = ((halfs + upper) / 2).astype(np.float32)        # exact ties (12 significant bits)
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)),
                             np.nextafter(mids, np.float32(0))])
    tiny = np.float32(2.0 ** -25) * np.array([0.5, 0.99, 1, 1.01, 1.5, 2, 2.5, 3], np.float32)
    x = np.concatenate([around, -around, tiny, -tiny, [65519.99, 65520, 1e10, -1e10, 1e-40]]).astype(np.float32)
    assert np.array_equal(_f16_bits_ours(x), _f16_bits_numpy(x))


def test_f16_encode_random_floats():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    nan = np.isnan(x)
    ours = _f16_bits_ours(x)
    assert np.array_equal(ours[~nan], _f16_bits_numpy(x[~nan]))
    assert np.isnan(ours[nan].view(np.float16)).all()


def test_bf16_encode_random_bits_including_nan():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x[:4] = [np.inf, -np.inf, 3.3895314e38, -3.4028235e38]  # round up into inf
    assert np.array_equal(q.quantize(q.BF16, x[None]), ref_quantize(q.BF16, x[None]))


# -- dequantize: random raw blocks --------------------------------------------------------------

@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
@pytest.mark.parametrize("finite_scales", [True, False], ids=["finite", "any_bytes"])
def test_dequantize_random_blocks(type_id, finite_scales):
    rng = np.random.default_rng(type_id * 2 + finite_scales)
    bs = q.BLOCK_SIZE[type_id]
    for shape in [(1, bs), (3, 2 * bs), (7, 5 * bs), (2, 3, 2 * bs), (4 * bs,)]:
        n_blocks = int(np.prod(shape)) // bs
        raw = random_blocks(rng, type_id, n_blocks, finite_scales)
        ours = q.dequantize(type_id, raw, shape)
        assert ours.shape == shape
        ref = ref_dequantize(type_id, raw, shape)
        if finite_scales and type_id not in (q.F32, q.BF16):
            assert np.isfinite(ref).all()
        assert_same_floats(ours, ref)


@pytest.mark.parametrize("type_id", K_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_k_quant_extreme_fields(type_id):
    """All-ones quant and scale bytes (6-bit scales and mins at 63, every high bit set), all-zero
    bytes, and scales that are f16 subnormals."""
    n = q.BLOCK_BYTES[type_id]
    ones = np.full(n, 0xFF, np.uint8)
    zeros = np.zeros(n, np.uint8)
    subnormal = random_blocks(np.random.default_rng(3), type_id, 1, True)
    for offset in F16_FIELDS[type_id]:
        ones[offset:offset + 2] = [0xFF, 0x7B]        # 65504
        subnormal[offset:offset + 2] = [0x01, 0x80]   # -2^-24
    raw = np.concatenate([ones, zeros, subnormal])
    assert_same_floats(q.dequantize(type_id, raw, (3, 256)), ref_dequantize(type_id, raw, (3, 256)))


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_block_functions_and_row_kernel(type_id):
    """The per-format block decoders and dequantize_row_into agree with the Python entry point."""
    block_fn = {q.F32: q.dequantize_block_f32, q.F16: q.dequantize_block_f16,
                q.BF16: q.dequantize_block_bf16, q.Q8_0: q.dequantize_block_q8_0,
                q.Q4_0: q.dequantize_block_q4_0, q.Q4_1: q.dequantize_block_q4_1,
                q.Q4_K: q.dequantize_block_q4_k, q.Q5_K: q.dequantize_block_q5_k,
                q.Q6_K: q.dequantize_block_q6_k}[type_id]
    bs = q.BLOCK_SIZE[type_id]
    raw = random_blocks(np.random.default_rng(4), type_id, 3, True)
    expected = ref_dequantize(type_id, raw, (3 * bs,))

    out = np.full(3 * bs + 5, 7.0, np.float32)
    q.dequantize_row_into(type_id, raw, 3 * bs, out)
    assert_same_floats(out[:3 * bs], expected)
    assert (out[3 * bs:] == 7.0).all()                     # nothing written past n

    one = np.zeros(bs + 1, np.float32)
    block_fn(raw, 2, one, 1)                               # block 2 at out_offset 1
    assert_same_floats(one[1:], expected[2 * bs:])


# -- quantize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_id", (q.F32, q.F16, q.BF16) + BLOCK_QUANT_TYPES,
                         ids=lambda t: q.TYPE_NAMES[t])
@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1.0, 1e3, 1e6])
def test_quantize_matches_gguf(type_id, scale):
    rng = np.random.default_rng(int(np.log10(scale)) + 10 * type_id + 100)
    for n_rows, n_cols in [(1, 32), (3, 64), (7, 96), (5, 256), (33, 576)]:
        x = make_values(rng, n_rows, n_cols, scale, mixed_zero_block=type_id != q.Q4_1)
        ours = q.quantize(type_id, x)
        ref = ref_quantize(type_id, x)
        assert ours.dtype == np.uint8 and ours.shape == (n_rows, q.row_bytes(type_id, n_cols))
        assert np.array_equal(ours, ref), f"{n_rows}x{n_cols}: bytes differ in rows " \
            f"{np.flatnonzero((ours != ref).any(axis=1))}"
        # and the decode of those bytes, for completeness
        assert_same_floats(q.dequantize(type_id, ours, x.shape), ref_dequantize(type_id, ref, x.shape))


def test_quantize_shapes_and_dtypes():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 64))                    # float64, 3-D: cast like gguf does
    ours = q.quantize(q.Q4_1, x)
    assert ours.shape == (2, 3, 40)
    assert np.array_equal(ours, ref_quantize(q.Q4_1, x.astype(np.float32)))
    assert np.array_equal(q.quantize(q.Q8_0, x[0, 0]), ref_quantize(q.Q8_0, x[0, 0].astype(np.float32)))
    assert q.quantize(q.Q8_0, np.zeros((0, 32), np.float32)).shape == (0, 34)


def test_q8_0_rounds_half_away_from_zero():
    # max |x| = 127 -> d = 1: x / d lands exactly on halves
    x = np.zeros(32, np.float32)
    x[:7] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    blocks = q.quantize(q.Q8_0, x)
    assert list(blocks[2:9].view(np.int8)) == [127, 1, 2, 3, -1, -2, -3]
    assert np.array_equal(blocks, ref_quantize(q.Q8_0, x))


def test_q4_1_mixed_signed_zeros():
    """A block of +0 and -0: the sign of its zero min follows ggml's quantize_row_q4_1_ref, which
    scans in order with strict < and > (the first zero wins), whereas gguf's numpy min/max
    reduction picks a sign that depends on numpy's SIMD lane order. Decoded values are zeros
    either way, so only the values are compared with gguf here."""
    x = np.zeros((4, 32), np.float32)
    x[0, ::2] = -0.0
    x[1, 1::3] = -0.0
    x[2, 0] = -0.0
    x[3, 31] = -0.0
    blocks = q.quantize(q.Q4_1, x)
    m_bits = blocks[:, 2:4].copy().view(np.uint16)[:, 0]
    assert list(m_bits) == [0x8000, 0x0000, 0x8000, 0x0000]   # sign of the first value
    assert (blocks[:, :2] == 0).all()                          # d = (-0 - -0) / 15 = +0
    decoded = q.dequantize(q.Q4_1, blocks, x.shape)
    assert (decoded == 0).all()
    assert (decoded == ref_dequantize(q.Q4_1, ref_quantize(q.Q4_1, x), x.shape)).all()


# -- the bundled model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """The bundled model, opened once (parsing its metadata takes seconds)."""
    return GGUFFile(smollm2_path)


def test_every_tensor_of_smollm2(smollm2):
    f = smollm2
    seen_types = set()
    for name, info in f.tensors.items():
        raw = f.tensor_bytes(name)
        ours = q.dequantize(info.type_id, raw, info.shape)
        assert_same_floats(ours, ref_dequantize(info.type_id, raw, info.shape))
        seen_types.add(info.type_name)
    assert seen_types == {"F32", "Q8_0", "Q4_1"}


def test_smollm2_q8_0_requantizes_to_the_same_bytes(smollm2):
    """ggml's Q8_0 maps each block's max |x| to +-127, so quantizing the decoded values again gives
    the file's bytes back: our quantizer agrees with the one that wrote the file."""
    f = smollm2
    info = f.tensors["token_embd.weight"]
    assert info.type_id == q.Q8_0
    raw = np.asarray(f.tensor_bytes("token_embd.weight")).reshape(info.shape[0], -1)
    values = q.dequantize(q.Q8_0, raw, info.shape)
    assert np.array_equal(q.quantize(q.Q8_0, values), raw)


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_type", [-1, 4, 7, 9, 99, 2**40, "Q4_0", None])
def test_unknown_type_id(bad_type):
    with pytest.raises(q.UnsupportedTypeError, match="type id"):
        q.row_bytes(bad_type, 32)
    with pytest.raises(q.UnsupportedTypeError):
        q.dequantize(bad_type, np.zeros(34, np.uint8), (32,))
    with pytest.raises(q.UnsupportedTypeError):
        q.quantize(bad_type, np.zeros(32, np.float32))


def test_quantize_to_k_types_is_unsupported():
    for type_id in K_TYPES:
        with pytest.raises(q.UnsupportedTypeError, match="Q8_0=8"):
            q.quantize(type_id, np.zeros(256, np.float32))


@pytest.mark.parametrize("type_id,n_cols", [(q.Q4_0, 33), (q.Q8_0, 16), (q.Q4_K, 32), (q.Q6_K, 300),
                                            (q.Q4_1, -32)])
def test_row_length_not_whole_blocks(type_id, n_cols):
    with pytest.raises(q.QuantShapeError, match=f"multiple of {q.BLOCK_SIZE[type_id]}"):
        q.row_bytes(type_id, n_cols)
    if n_cols > 0:
        with pytest.raises(q.QuantShapeError):
            q.dequantize(type_id, np.zeros(4096, np.uint8), (2, n_cols))
        if type_id in BLOCK_QUANT_TYPES:
            with pytest.raises(q.QuantShapeError):
                q.quantize(type_id, np.zeros((2, n_cols), np.float32))


def test_raw_buffer_of_wrong_length():
    raw = np.zeros(3 * 20, np.uint8)                       # 3 Q4_1 blocks
    with pytest.raises(q.QuantShapeError, match="needs 2 x 40 = 80 bytes, got 60"):
        q.dequantize(q.Q4_1, raw, (2, 64))
    with pytest.raises(q.QuantShapeError):
        q.dequantize(q.Q4_1, raw[:-1], (3, 32))
    with pytest.raises(q.QuantShapeError):
        q.dequantize(q.Q4_1, np.zeros(61, np.uint8), (3, 32))
    with pytest.raises(TypeError, match="uint8"):
        q.dequantize(q.F32, np.zeros(8, np.float32), (8,))
    assert q.dequantize(q.Q4_1, bytes(60), (3, 32)).shape == (3, 32)  # bytes are accepted


def test_quantize_rejects_non_finite():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 64), np.float32)
        x[1, 40] = bad
        for type_id in BLOCK_QUANT_TYPES:
            with pytest.raises(ValueError, match=r"values\[1, 40\]"):
                q.quantize(type_id, x)
    with pytest.raises(q.QuantShapeError):
        q.quantize(q.Q8_0, np.float32(1.0))


def test_row_kernels_check_their_arguments():
    """The Numba entry points raise instead of reading or writing out of bounds."""
    src = np.zeros(3 * 34, np.uint8)
    out = np.zeros(96, np.float32)
    x = np.zeros(96, np.float32)
    with pytest.raises(ValueError, match="unsupported ggml type id"):
        q.dequantize_row_into(7, src, 32, out)
    with pytest.raises(ValueError, match="whole number of blocks"):
        q.dequantize_row_into(q.Q8_0, src, 33, out)
    with pytest.raises(ValueError, match="src is shorter"):
        q.dequantize_row_into(q.Q8_0, src, 128, np.zeros(128, np.float32))
    with pytest.raises(ValueError, match="out is shorter"):
        q.dequantize_row_into(q.Q8_0, src, 96, out[:64])
    with pytest.raises(ValueError, match="cannot quantize"):
        q.quantize_row_into(q.Q4_K, x, 96, src)
    with pytest.raises(ValueError, match="whole number of blocks"):
        q.quantize_row_into(q.Q8_0, x, 40, src)
    with pytest.raises(ValueError, match="x is shorter"):
        q.quantize_row_into(q.Q8_0, x[:64], 96, src)
    with pytest.raises(ValueError, match="dst is shorter"):
        q.quantize_row_into(q.Q8_0, x, 96, src[:-1])
    q.quantize_row_into(q.Q8_0, x + 1, 96, src)            # valid call: all blocks (d=1/127, q=127)
    assert np.array_equal(src.reshape(3, 34), ref_quantize(q.Q8_0, (x + 1).reshape(3, 32)))


def test_error_classes_are_value_errors():
    assert issubclass(q.UnsupportedTypeError, ValueError)
    assert issubclass(q.QuantShapeError, ValueError)
