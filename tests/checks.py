"""Assertions and reference computations shared by tests in several folders."""
import gguf
import numpy as np
from gguf import GGMLQuantizationType as GT

from lmengine.converters.gguf_file import GGUFFile
from lmengine.kernels import quant as q


def assert_same_as_gguf_package(path):
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents(), key
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes
        assert info.shape == tuple(int(d) for d in reversed(list(t.shape)))
        assert info.type_id == int(t.tensor_type)
        assert np.array_equal(ours.tensor_bytes(t.name), t.data.reshape(-1).view(np.uint8))


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


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def random_blocks(n_blocks: int, block_bytes: int, f16_offsets, seed: int, spread: bool = True) -> np.ndarray:
    """uint8 [n_blocks * block_bytes] of random block bytes whose f16 scale fields (at the byte
    offsets f16_offsets of each block) are finite: of mixed sign and magnitudes 1e-4 .. 1e-1
    (spread), or 0.009 .. 0.011."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in f16_offsets:
        if spread:
            scale = rng.choice([-1.0, 1.0], n_blocks) * 10.0 ** rng.uniform(-4, -1, n_blocks)
        else:
            scale = rng.uniform(0.009, 0.011, n_blocks)
        blocks[:, offset:offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)
