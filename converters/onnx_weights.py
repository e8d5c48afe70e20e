"""GGUF weights -> the two forms the ONNX export stores: float32 matrices, and MatMulNBits blocks.

MatMulNBits (onnxruntime's com.microsoft contrib op) holds a weight W [n_rows, n_cols] (output
features first, as in GGUF) as blocks of `block_size` values along a row:

    W[r, c] = (q[r, c] - zero_point[r, b]) * scale[r, b]        b = c // block_size

with q packed `8 // bits` values per byte, the earlier value in the low bits. ggml's 4-bit
formats are the same arithmetic with a different nibble order, so their bits carry over without
a float round trip:

    Q4_0  (18 bytes / 32 values)  d f16 | qs[16]                 value = d * (q - 8)
    Q4_1  (20 bytes / 32 values)  d f16 | m f16 | qs[16]         value = d * q + m
    Q4_K  (144 bytes / 256 values) d f16 | dmin f16 | scales[12] | qs[128]
          8 sub-blocks of 32, each value = d * sc_j * q - dmin * m_j (6-bit sc_j, m_j)
    Q8_0  (34 bytes / 32 values)  d f16 | qs int8[32]            value = d * q   (-> 8-bit blocks)

In ggml's 32-value blocks byte j holds value j (low nibble) and value j + 16 (high nibble);
MatMulNBits wants values 2j and 2j + 1 in byte j: a pure reordering of nibbles.

The affine forms (Q4_1, Q4_K) add a per-block minimum. MatMulNBits could take it as a float zero
point -min/scale, but onnxruntime's fast kernels take integer zero points only (a float zero
point is ~20x slower), so the minimum is kept apart: zero point 0, plus `block_mins`
[n_rows, n_blocks], which the exporter applies as blocksum(x) @ block_mins.T. Other formats
(F32, F16, Q5_K, Q6_K...) are dequantized and quantized to Q4_1 blocks (ggml's round to nearest
between the block's min and max), then carried over like Q4_1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConversionError, UnsupportedQuantTypeError

# ggml type ids (GGMLQuantizationType values)
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, BF16 = 0, 1, 2, 3, 8, 12, 30

BLOCK = 32        # values per MatMulNBits block (ggml's small block, and Q4_K's sub-block)
QK_K = 256        # values per Q4_K super-block


@dataclass
class NBitsMatrix:
    """A weight W [n_rows, n_cols] in MatMulNBits layout, plus optional per-block minimums:

        W[r, c] = (q[r, c] - zero_point[r, b]) * scale[r, b] + block_mins[r, b]    b = c // 32
    """

    bits: int                        # 4 or 8
    packed: np.ndarray               # uint8 [n_rows, n_blocks, BLOCK * bits // 8]
    scales: np.ndarray               # float32 [n_rows, n_blocks]
    zero_points: np.ndarray | None   # uint8 [n_rows, ceil(n_blocks * bits / 8)] packed, or None: 2^(bits-1)
    block_mins: np.ndarray | None    # float32 [n_rows, n_blocks], or None
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.packed.shape[0]

    @property
    def block_size(self) -> int:
        return BLOCK

    def dequantize(self) -> np.ndarray:
        """float32 [n_rows, n_cols]: what the exported graph multiplies by (for tests and checks)."""
        q = unpack_bits(self.packed, self.bits).astype(np.float32)           # [rows, blocks, 32]
        n_blocks = self.scales.shape[1]
        if self.zero_points is None:
            zp = np.full(self.scales.shape, 2.0 ** (self.bits - 1), np.float32)
        else:
            zp = unpack_bits(self.zero_points, self.bits).reshape(self.n_rows, -1)[:, :n_blocks].astype(np.float32)
        w = (q - zp[:, :, None]) * self.scales[:, :, None]
        if self.block_mins is not None:
            w = w + self.block_mins[:, :, None]
        return w.reshape(self.n_rows, -1)[:, : self.n_cols]


def type_name(type_id: int) -> str:
    import gguf
    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


# -- float32 ---------------------------------------------------------------------------------

def dequantize(raw: np.ndarray, type_id: int, shape: tuple) -> np.ndarray:
    """float32 array of `shape` from a tensor's raw ggml blocks (the gguf package does the math)."""
    import gguf
    from gguf import quants
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    raw = np.asarray(raw, dtype=np.uint8)
    if type_id == F32:
        return raw.view(np.float32).reshape(shape).copy()
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        values = quants.dequantize(raw.reshape(rows, -1), qtype)
    except (ValueError, NotImplementedError, quants.QuantError) as e:
        raise UnsupportedQuantTypeError(f"cannot dequantize ggml {type_name(type_id)} blocks: {e}") from e
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def permute_rows(raw: np.ndarray, shape: tuple, rows: np.ndarray) -> np.ndarray:
    """raw blocks of a [n_rows, n_cols] (or [n_rows]) tensor with its rows taken in order `rows`.
    Works on any block format, since a row is a whole number of blocks."""
    n_rows = shape[0]
    return np.ascontiguousarray(np.asarray(raw, dtype=np.uint8).reshape(n_rows, -1)[rows]).reshape(-1)


# -- MatMulNBits -----------------------------------------------------------------------------

def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n * bits // 8] -> uint8 [..., n] values (MatMulNBits order: low bits first)."""
    if bits == 8:
        return packed
    lo, hi = packed & 0x0F, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [..., 2n] values in 0..15 -> uint8 [..., n]: value 2j low, 2j + 1 high."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 16 bytes of a 32-value block ([..., 16]) -> uint8 [..., 32] values in order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] little-endian f16 -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _affine(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> NBitsMatrix:
    """Blocks with value = scale * q + minimum (q uint8 [rows, blocks, 32] in 0..15): 4-bit
    MatMulNBits with zero point 0 and the minimums apart (see the module docstring)."""
    n_rows, n_blocks = scale.shape
    zero_points = np.zeros((n_rows, (n_blocks + 1) // 2), np.uint8)
    return NBitsMatrix(4, pack_nibbles(q), scale.astype(np.float32), zero_points,
                       minimum.astype(np.float32), n_cols=n_blocks * BLOCK)


def _blocks(raw: np.ndarray, n_rows: int, block_bytes: int) -> np.ndarray:
    return np.asarray(raw, dtype=np.uint8).reshape(n_rows, -1, block_bytes)


def _from_q4_0(raw, n_rows):
    b = _blocks(raw, n_rows, 18)                                   # [rows, blocks, 18]
    q = _ggml_nibbles(b[:, :, 2:])                                 # [rows, blocks, 32]
    return NBitsMatrix(4, pack_nibbles(q), _f16(b[:, :, 0:2]), None, None, n_cols=q.shape[1] * BLOCK)


def _from_q4_1(raw, n_rows):
    b = _blocks(raw, n_rows, 20)
    return _affine(_ggml_nibbles(b[:, :, 4:]), _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]))


def _from_q8_0(raw, n_rows):
    b = _blocks(raw, n_rows, 34)
    q = b[:, :, 2:] ^ np.uint8(0x80)            # int8 two's complement + 128 = uint8 offset form
    return NBitsMatrix(8, np.ascontiguousarray(q), _f16(b[:, :, 0:2]), None, None, n_cols=q.shape[1] * BLOCK)


def _q4_k_scales_mins(s: np.ndarray):
    """The 12 packed scale bytes of Q4_K super-blocks ([..., 12]) -> (sc, m) uint8 [..., 8] each:
    j < 4: sc = s[j] & 63, m = s[j+4] & 63; j >= 4: 4 low bits from s[j+4], 2 high bits from the
    top of s[j-4] (sc) or s[j] (m)."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def _from_q4_k(raw, n_rows):
    b = _blocks(raw, n_rows, 144)                                  # [rows, super, 144]
    d, dmin = _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4])
    sc, m = _q4_k_scales_mins(b[:, :, 4:16])                        # [rows, super, 8]
    qs = b[:, :, 16:].reshape(n_rows, -1, 4, 32)                    # 4 chunks of 64 values
    # chunk c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n_rows, -1, BLOCK)   # [rows, super*8, 32]
    scale = (d[:, :, None] * sc).reshape(n_rows, -1)
    minimum = (-(dmin[:, :, None] * m)).reshape(n_rows, -1)
    return _affine(q, scale, minimum)


CARRY_OVER = {Q4_0: _from_q4_0, Q4_1: _from_q4_1, Q8_0: _from_q8_0, Q4_K: _from_q4_k}


def quantize_4bit(w: np.ndarray) -> NBitsMatrix:
    """float32 [n_rows, n_cols] (n_cols a multiple of 32) -> 4-bit blocks, via ggml's Q4_1
    (scale = (max - min) / 15, round to nearest), i.e. what llama.cpp would store."""
    import gguf
    from gguf import quants
    n_rows, n_cols = w.shape
    if n_cols % BLOCK:
        raise ConversionError(f"cannot quantize a matrix of {n_cols} columns to 4-bit blocks of {BLOCK}")
    blocks = quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.Q4_1)
    return _from_q4_1(blocks, n_rows)


def to_nbits_bits(type_id: int) -> int:
    """The bit width `to_nbits` gives a matrix of this ggml type (8 for Q8_0, else 4)."""
    return 8 if type_id == Q8_0 else 4


def to_nbits(raw: np.ndarray, type_id: int, shape: tuple) -> NBitsMatrix:
    """A [n_rows, n_cols] GGUF matrix as MatMulNBits blocks: the bits themselves for Q4_0, Q4_1,
    Q4_K (4-bit) and Q8_0 (8-bit); otherwise dequantized and quantized to 4 bits."""
    n_rows, n_cols = shape
    if type_id in CARRY_OVER and n_cols % BLOCK == 0:
        return CARRY_OVER[type_id](raw, n_rows)
    return quantize_4bit(dequantize(raw, type_id, shape))


def concat_nbits(mats: list) -> NBitsMatrix:
    """Matrices of the same bit width and n_cols stacked along the rows (one MatMulNBits for
    several projections of the same input). Missing zero points / minimums become their
    defaults (2^(bits-1), 0) where another part has them."""
    if len(mats) == 1:
        return mats[0]
    bits, n_cols = mats[0].bits, mats[0].n_cols
    if any(m.bits != bits or m.n_cols != n_cols for m in mats):
        raise ConversionError("cannot stack MatMulNBits matrices of different bit widths or column counts")
    zero_points = None
    if any(m.zero_points is not None for m in mats):
        default = np.uint8(0x88) if bits == 4 else np.uint8(0x80)
        zero_points = np.concatenate([
            m.zero_points if m.zero_points is not None else
            np.full((m.n_rows, (m.scales.shape[1] * bits + 7) // 8), default, np.uint8) for m in mats])
    block_mins = None
    if any(m.block_mins is not None for m in mats):
        block_mins = np.concatenate([m.block_mins if m.block_mins is not None else
                                     np.zeros(m.scales.shape, np.float32) for m in mats])
    return NBitsMatrix(bits, np.concatenate([m.packed for m in mats]), np.concatenate([m.scales for m in mats]),
                       zero_points, block_mins, n_cols)
