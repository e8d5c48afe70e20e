"""lmengine.kernels.quant against the gguf package (ggml's own Python port of its quantizers) and,
when llama-cpp-python is installed, against ggml's C quantizers themselves, bit for bit.

Every comparison here is exact: float outputs are compared by their IEEE bits (stricter than ==,
it also tells -0.0 from +0.0); where NaN can occur, NaN positions must match and the payload is
not compared (NaN payloads after arithmetic are not specified by IEEE 754).
"""
import ctypes
import importlib.util
import os

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as GT

from lmengine.kernels import blockcheck
from lmengine.kernels import quant as q
from checks import assert_same_floats, ref_dequantize

ALL_TYPES = (q.F32, q.F16, q.BF16, q.Q8_0, q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.Q2_K, q.Q3_K, q.Q4_K,
             q.Q5_K, q.Q6_K, q.IQ4_NL, q.IQ4_XS)
BLOCK_QUANT_TYPES = (q.Q8_0, q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1)      # gguf.quants quantizes these
K_TYPES = (q.Q2_K, q.Q3_K, q.Q4_K, q.Q5_K, q.Q6_K, q.IQ4_XS)       # 256-value super-blocks
LLAMA_QUANT_TYPES = (q.Q4_K, q.Q5_K, q.Q6_K, q.IQ4_NL, q.IQ4_XS)   # reference: llama.cpp only
ALL_QUANT_TYPES = BLOCK_QUANT_TYPES + LLAMA_QUANT_TYPES

# byte offsets of the f16 fields (scales, mins) inside each block
F16_FIELDS = {**{t: tuple(offset for _, offset in fields) for t, fields in blockcheck.F16_FIELDS.items()},
              q.F16: (0,)}


# -- references ---------------------------------------------------------------------------------


def ref_quantize(type_id, x):
    """gguf.quants' quantization of x, as uint8 [..., row_bytes]."""
    out = np.asarray(gguf.quants.quantize(x, GT(type_id)))
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[:-1] + (-1,))


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

    mixed_zero_block adds a block of +0 with a -0 first; leave it out for Q4_0, Q5_0 (gguf's
    argmax takes the sign of that -0 for d, ggml's scan keeps +0) and Q4_1, Q5_1 (gguf's zero min
    takes its sign from numpy's min reduction): see test_mixed_signed_zeros. We follow ggml.
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


@pytest.mark.parametrize("type_id", K_TYPES + (q.Q5_0, q.Q5_1, q.IQ4_NL),
                         ids=lambda t: q.TYPE_NAMES[t])
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
    bs = q.BLOCK_SIZE[type_id]
    assert_same_floats(q.dequantize(type_id, raw, (3, bs)), ref_dequantize(type_id, raw, (3, bs)))


@pytest.mark.parametrize("type_id", ALL_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_block_functions_and_row_kernel(type_id):
    """The per-format block decoders and dequantize_row_into agree with the Python entry point."""
    block_fn = {q.F32: q.dequantize_block_f32, q.F16: q.dequantize_block_f16,
                q.BF16: q.dequantize_block_bf16, q.Q8_0: q.dequantize_block_q8_0,
                q.Q4_0: q.dequantize_block_q4_0, q.Q4_1: q.dequantize_block_q4_1,
                q.Q4_K: q.dequantize_block_q4_k, q.Q5_K: q.dequantize_block_q5_k,
                q.Q6_K: q.dequantize_block_q6_k, q.Q5_0: q.dequantize_block_q5_0,
                q.Q5_1: q.dequantize_block_q5_1, q.Q2_K: q.dequantize_block_q2_k,
                q.Q3_K: q.dequantize_block_q3_k, q.IQ4_NL: q.dequantize_block_iq4_nl,
                q.IQ4_XS: q.dequantize_block_iq4_xs}[type_id]
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
        x = make_values(rng, n_rows, n_cols, scale,
                        mixed_zero_block=type_id not in (q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1))
        ours = q.quantize(type_id, x)
        ref = ref_quantize(type_id, x)
        if type_id in (q.Q4_0, q.Q5_0):   # all-zero blocks: d = -0 as ggml writes it (see
            ref_blocks = ref.reshape(-1, q.BLOCK_BYTES[type_id])     # test_q4_0_q5_0_all_zero_block_sign)
            ref_blocks[(x.reshape(-1, 32) == 0).all(axis=1), :2] = [0x00, 0x80]
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


@pytest.mark.parametrize("type_id", (q.Q4_1, q.Q5_1), ids=lambda t: q.TYPE_NAMES[t])
def test_q4_1_q5_1_mixed_signed_zeros(type_id):
    """A block of +0 and -0: the sign of its zero min follows ggml's quantize_row_q4_1_ref /
    q5_1_ref, which scan in order with strict < and > (the first zero wins), whereas gguf's numpy
    min/max reduction picks a sign that depends on numpy's SIMD lane order. Decoded values are
    zeros either way, so only the values are compared with gguf here."""
    x = np.zeros((4, 32), np.float32)
    x[0, ::2] = -0.0
    x[1, 1::3] = -0.0
    x[2, 0] = -0.0
    x[3, 31] = -0.0
    blocks = q.quantize(type_id, x)
    m_bits = blocks[:, 2:4].copy().view(np.uint16)[:, 0]
    assert list(m_bits) == [0x8000, 0x0000, 0x8000, 0x0000]   # sign of the first value
    assert (blocks[:, :2] == 0).all()                          # d = (-0 - -0) / 15 = +0
    decoded = q.dequantize(type_id, blocks, x.shape)
    assert (decoded == 0).all()
    assert (decoded == ref_dequantize(type_id, ref_quantize(type_id, x), x.shape)).all()


@pytest.mark.parametrize("type_id", (q.Q4_0, q.Q5_0), ids=lambda t: q.TYPE_NAMES[t])
def test_q4_0_q5_0_all_zero_block_sign(type_id):
    """An all-zero block: ggml's quantize_row_q4_0_ref / q5_0_ref start from max = +0 and replace
    it only on a strictly larger |x|, so d = +0 / -8 = -0 (f16 0x8000) whatever the zeros' signs;
    gguf's argmax takes x[0], so a -0 first gives d = +0 there. We follow ggml (llama.cpp's files);
    decoded values are zeros either way."""
    x = np.zeros((3, 32), np.float32)
    x[0, 0] = -0.0
    x[1, 5] = -0.0
    blocks = q.quantize(type_id, x)
    assert list(blocks[:, :2].copy().view(np.uint16)[:, 0]) == [0x8000] * 3
    decoded = q.dequantize(type_id, blocks, x.shape)
    assert (decoded == 0).all()
    assert (decoded == ref_dequantize(type_id, ref_quantize(type_id, x), x.shape)).all()


def hard_rows(rng, n_rows, n_cols):
    """float32 [n_rows, n_cols] rows of 20 kinds that stress the scale searches: zeros, signed
    zeros, constants, few levels, below GROUP_MAX_EPS (1e-15), sparse, one-signed, heavy tails,
    subnormals, uniform, values on a grid, scales 1e-8 .. 1e4."""
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    for r in range(n_rows):
        s = np.float32(10.0 ** rng.uniform(-8, 4))
        kind = r % 20
        if kind == 0:
            x[r] = 0
        elif kind == 1:
            x[r] = -0.0
            x[r, 5] = 0.0
        elif kind == 2:
            x[r] = s
        elif kind == 3:
            x[r] = rng.integers(-3, 4, n_cols) * s
        elif kind == 4:
            x[r] *= np.float32(1e-16)
        elif kind == 5:
            x[r] = np.where(rng.random(n_cols) < 0.9, 0, x[r] * s)
        elif kind == 6:
            x[r] = np.abs(x[r]) * s + s
        elif kind == 7:
            x[r] = -np.abs(x[r]) * s - s
        elif kind == 8:
            x[r, :32] = 0
            x[r] *= s
        elif kind == 9:
            x[r] = rng.standard_cauchy(n_cols) * s
        elif kind == 10:
            x[r] = np.float32(1e-40) * rng.integers(-5, 5, n_cols)
        elif kind == 11:
            x[r] *= s
            x[r, ::16] = 0
        elif kind == 12:
            x[r] = rng.uniform(-1, 1, n_cols) * s
        elif kind == 13:
            x[r] = np.round(x[r] * 8) / 8
        else:
            x[r] *= s
    return x.astype(np.float32)


# -- quantize: round trips and gguf's decoding --------------------------------------------------

# bits per value of each format's quants
QUANT_BITS = {q.Q8_0: 8, q.Q6_K: 6, q.Q5_0: 5, q.Q5_1: 5, q.Q5_K: 5, q.Q4_0: 4, q.Q4_1: 4,
              q.Q4_K: 4, q.IQ4_NL: 4, q.IQ4_XS: 4}


@pytest.mark.parametrize("type_id", ALL_QUANT_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_quantize_round_trip_error(type_id):
    """Standard normal values: the RMS error of dequantize(quantize(x)) is at most 1.25x the
    uniform-quantization estimate step / sqrt(12), with step = range / (2^bits - 1) and range
    4.4 (about twice the mean max |x| of 32 normal values). The searched scales of the K and IQ4
    formats do better than a plain min/max grid, so this bound holds for all of them.
    gguf's decoding of our blocks is the same as ours, bit for bit."""
    rng = np.random.default_rng(type_id)
    x = rng.standard_normal((128, 1024)).astype(np.float32)
    blocks = q.quantize(type_id, x)
    y = q.dequantize(type_id, blocks, x.shape)
    assert_same_floats(y, ref_dequantize(type_id, blocks, x.shape))
    rms = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)))
    bound = 1.25 * 4.4 / (2 ** QUANT_BITS[type_id] - 1) / np.sqrt(12)
    assert rms <= bound, f"{q.TYPE_NAMES[type_id]}: RMS error {rms:.4f} > {bound:.4f}"
    # hard rows (values within the f16 scales' range) decode to finite values
    h = np.clip(hard_rows(rng, 40, 512), -6e4, 6e4)  # larger values overflow the f16 scales
    hy = q.dequantize(type_id, q.quantize(type_id, h), h.shape)
    assert np.isfinite(hy).all()
    assert (hy[0] == 0).all() and (hy[1] == 0).all()                  # zero rows stay zero


@pytest.mark.parametrize("type_id", LLAMA_QUANT_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_k_quantize_structure(type_id):
    """Properties any correct encoder of these formats has, independent of llama.cpp: an
    all-zero super-block is all zero values; a block of one repeated value decodes close to it;
    the largest |x| of a block is reproduced to within one quant step."""
    bs = q.BLOCK_SIZE[type_id]
    x = np.zeros((3, 2 * bs), np.float32)
    x[1] = 0.75
    x[2] = np.linspace(-1, 1, 2 * bs, dtype=np.float32)
    y = q.dequantize(type_id, q.quantize(type_id, x), x.shape)
    assert (y[0] == 0).all()
    np.testing.assert_allclose(y[1], 0.75, rtol=2.0 ** -(QUANT_BITS[type_id] - 1))
    np.testing.assert_allclose(y[2], x[2], atol=2.0 / (2 ** QUANT_BITS[type_id] - 1))


# -- quantize: bit-exact with ggml (llama.cpp's C library) ------------------------------------------

def _ggml_library():
    """ctypes handle of libggml-base from the installed llama-cpp-python, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib_dir = os.path.join(os.path.dirname(spec.origin), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            fn = lib.ggml_quantize_chunk
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return lib
    return None


@pytest.fixture(scope="module")
def ggml():
    lib = _ggml_library()
    if lib is None:
        pytest.skip("llama-cpp-python (with its libggml-base) is not installed: no C reference")
    return lib


def ggml_quantize(lib, type_id, x):
    """ggml_quantize_chunk(type, x, no importance matrix): what llama_model_quantize writes."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], q.row_bytes(type_id, x.shape[1])), np.uint8)
    n = lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == out.size
    return out


@pytest.mark.parametrize("type_id", ALL_QUANT_TYPES, ids=lambda t: q.TYPE_NAMES[t])
def test_quantize_matches_ggml(ggml, type_id):
    """Every byte equals ggml's quantizer on normal rows at 5 scales and on hard_rows (whose
    all-zero blocks with a -0 first, and sub-blocks in the f16-subnormal range, are where gguf's
    Python port and ggml differ)."""
    rng = np.random.default_rng(100 + type_id)
    rows = [hard_rows(rng, 200, 256), hard_rows(rng, 60, 1024)]
    rows += [(rng.standard_normal((16, 512)) * s).astype(np.float32) for s in (1e-6, 1e-2, 1, 1e2, 1e4)]
    for x in rows:
        ours, ref = q.quantize(type_id, x), ggml_quantize(ggml, type_id, x)
        bad = np.flatnonzero((ours != ref).any(axis=1))
        assert bad.size == 0, f"{bad.size} rows differ, first {bad[:8]} (row kinds {sorted(set(bad % 20))})"


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_type", [-1, 4, 5, 9, 16, 99, 2**40, "Q4_0", None])
def test_unknown_type_id(bad_type):
    with pytest.raises(q.UnsupportedTypeError, match="type id"):
        q.row_bytes(bad_type, 32)
    with pytest.raises(q.UnsupportedTypeError):
        q.dequantize(bad_type, np.zeros(34, np.uint8), (32,))
    with pytest.raises(q.UnsupportedTypeError):
        q.quantize(bad_type, np.zeros(32, np.float32))


def test_quantize_to_q2_k_q3_k_is_unsupported():
    for type_id in (q.Q2_K, q.Q3_K):
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
        if type_id in ALL_QUANT_TYPES:
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
        x = np.zeros((2, 256), np.float32)
        x[1, 40] = bad
        for type_id in ALL_QUANT_TYPES:
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
        q.dequantize_row_into(9, src, 32, out)
    with pytest.raises(ValueError, match="whole number of blocks"):
        q.dequantize_row_into(q.Q8_0, src, 33, out)
    with pytest.raises(ValueError, match="src is shorter"):
        q.dequantize_row_into(q.Q8_0, src, 128, np.zeros(128, np.float32))
    with pytest.raises(ValueError, match="out is shorter"):
        q.dequantize_row_into(q.Q8_0, src, 96, out[:64])
    with pytest.raises(ValueError, match="cannot quantize"):
        q.quantize_row_into(q.Q3_K, x, 96, src)
    with pytest.raises(ValueError, match="cannot quantize"):
        q.quantize_row_into(9, x, 96, src)
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
