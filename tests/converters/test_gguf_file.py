"""GGUF reading: same metadata and tensor infos as the `gguf` package, and clear errors on broken files."""
import struct

import gguf
import numpy as np
import pytest

from lmengine.converters.gguf_file import GGUFFile
from lmengine.config import config_from_gguf
from lmengine.errors import (BadMagicError, LMEngineError, MetadataError, ModelFileError, TensorShapeError,
                           TruncatedFileError, UnsupportedArchitectureError, UnsupportedQuantTypeError,
                           UnsupportedVersionError)
from tiny_models import make_tiny_model
from checks import assert_same_as_gguf_package


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    make_tiny_model(path, weight_type="q4_1")
    return str(path)


def test_tiny_model_matches_gguf_package(tiny_path):
    assert_same_as_gguf_package(tiny_path)


def _write(tmp_path, data: bytes, name="broken.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_every_truncation_raises_a_clear_error(tiny_path, tmp_path):
    raw = open(tiny_path, "rb").read()
    # every cut inside the header and metadata, then a sample of cuts through the tensor data
    cuts = list(range(0, min(len(raw), 4096), 7)) + list(range(4096, len(raw), max(1, len(raw) // 50)))
    for cut in cuts:
        path = _write(tmp_path, raw[:cut])
        with pytest.raises(ModelFileError) as info:
            GGUFFile(path)
        assert path in str(info.value)


def test_wrong_magic(tmp_path):
    path = _write(tmp_path, b"GGML" + b"\0" * 100)
    with pytest.raises(BadMagicError, match="not a GGUF file"):
        GGUFFile(path)


def test_unknown_version(tiny_path, tmp_path):
    raw = bytearray(open(tiny_path, "rb").read())
    raw[4:8] = struct.pack("<I", 99)
    with pytest.raises(UnsupportedVersionError, match="version 99"):
        GGUFFile(_write(tmp_path, bytes(raw)))


def test_metadata_length_past_end(tiny_path, tmp_path):
    raw = bytearray(open(tiny_path, "rb").read())
    raw[24:32] = struct.pack("<Q", 1 << 40)  # the first key's length
    with pytest.raises(TruncatedFileError, match="runs past the end"):
        GGUFFile(_write(tmp_path, bytes(raw)))


def _tensor_info_pos(raw: bytes, name: str) -> int:
    """Offset of the n_dims field that follows tensor `name` in the tensor-info table."""
    encoded = name.encode()
    pos = raw.index(struct.pack("<Q", len(encoded)) + encoded)
    return pos + 8 + len(encoded)


def test_unknown_quant_type(tiny_path, tmp_path):
    raw = bytearray(open(tiny_path, "rb").read())
    pos = _tensor_info_pos(raw, "blk.0.attn_q.weight")
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    type_pos = pos + 4 + 8 * n_dims
    raw[type_pos:type_pos + 4] = struct.pack("<I", 77)
    with pytest.raises(UnsupportedQuantTypeError, match="blk.0.attn_q.weight.*77"):
        GGUFFile(_write(tmp_path, bytes(raw)))


def test_tensor_offset_past_end(tiny_path, tmp_path):
    raw = bytearray(open(tiny_path, "rb").read())
    pos = _tensor_info_pos(raw, "blk.1.ffn_down.weight")
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    off_pos = pos + 4 + 8 * n_dims + 4
    raw[off_pos:off_pos + 8] = struct.pack("<Q", len(raw))
    with pytest.raises(TruncatedFileError, match="blk.1.ffn_down.weight.*past the end"):
        GGUFFile(_write(tmp_path, bytes(raw)))


def test_shape_mismatch_with_config(tiny_path, tmp_path):
    raw = bytearray(open(tiny_path, "rb").read())
    key = b"llama.feed_forward_length"
    pos = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", raw, pos)[0] == 4  # uint32
    raw[pos + 4:pos + 8] = struct.pack("<I", 128)  # the file's tensors are 96 wide
    with pytest.raises(TensorShapeError, match="ffn_gate.weight.*shape"):
        config_from_gguf(GGUFFile(_write(tmp_path, bytes(raw))))


def test_unsupported_architecture(tiny_path, tmp_path):
    raw = bytearray(open(tiny_path, "rb").read())
    key = b"general.architecture"
    pos = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    assert raw[pos + 8:pos + 13] == b"llama"
    raw[pos + 8:pos + 13] = b"mamba"
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'"):
        config_from_gguf(GGUFFile(_write(tmp_path, bytes(raw))))


def test_missing_metadata(tmp_path):
    path = str(tmp_path / "empty.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(MetadataError, match="llama.attention.head_count"):
        config_from_gguf(GGUFFile(path))


def test_random_corruption_never_crashes(tiny_path, tmp_path):
    """Flip random header bytes: reading either works or raises one of our errors."""
    raw = open(tiny_path, "rb").read()
    header_end = GGUFFile(tiny_path).tensors["token_embd.weight"].offset
    rng = np.random.default_rng(0)
    for i in range(300):
        data = bytearray(raw)
        for pos in rng.integers(4, header_end, size=3):
            data[pos] = rng.integers(0, 256)
        path = _write(tmp_path, bytes(data), f"c{i % 5}.gguf")
        try:
            config_from_gguf(GGUFFile(path))
        except LMEngineError:
            pass
