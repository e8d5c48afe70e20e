"""GGUF reading: same metadata and tensor infos as the `gguf` package, and clear errors on broken files:
limits checked before anything is allocated, llama.cpp's tensor layout, typed metadata access."""
import struct
import time

import gguf
import numpy as np
import pytest

from lmengine.converters import gguf_file
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
    with pytest.raises(MetadataError, match="llama.block_count"):
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


# -- limits: checked before anything proportional to a count is built ------------------------------

def _kv_value_pos(raw: bytes, key: str) -> tuple:
    """(value type, offset of the value) of metadata `key`."""
    encoded = key.encode()
    pos = raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    return struct.unpack_from("<I", raw, pos)[0], pos + 4


def _with_value(raw: bytes, key: str, value) -> bytes:
    """raw with metadata `key` (u32 or f32, in place) set to value."""
    vtype, pos = _kv_value_pos(raw, key)
    fmt = {4: "<I", 6: "<f"}[vtype]
    data = bytearray(raw)
    struct.pack_into(fmt, data, pos, value)
    return bytes(data)


@pytest.mark.parametrize("key, value, message", [
    ("llama.block_count", 33_554_433, r"'llama.block_count' is 33554433, outside \[1, 512\]"),
    ("llama.block_count", 400, r"'llama.block_count' is 400, more layers than the file has tensors \(21\)"),
    ("llama.block_count", 0, r"'llama.block_count' is 0, outside \[1, 512\]"),
    ("llama.block_count", 1, r"'llama.block_count' is 1, but the file has tensor 'blk.1"),
    ("llama.attention.head_count", 0xFFFFFFFF, "head_count' is 4294967295, outside"),
    ("llama.attention.head_count_kv", 8, r"head_count_kv' is 8, outside \[1, 4\]"),
    ("llama.attention.head_count_kv", 0, "head_count_kv' is 0"),
    ("llama.embedding_length", 1 << 31, "embedding_length' is 2147483648, outside"),
    ("llama.feed_forward_length", 0, "feed_forward_length' is 0"),
    ("llama.vocab_size", 1 << 30, "vocab_size' is 1073741824, outside"),
    ("llama.context_length", 0, "context_length' is 0"),
    ("llama.rope.dimension_count", 15, "rope.dimension_count 15 must be even"),
    ("llama.rope.dimension_count", 32, r"rope.dimension_count' is 32, outside \[2, 16\]"),
    ("llama.rope.freq_base", float("nan"), "rope.freq_base' is nan"),
    ("llama.rope.freq_base", 1e-30, "rope.freq_base' is"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon' is 0.0"),
    ("llama.attention.layer_norm_rms_epsilon", float("inf"), "layer_norm_rms_epsilon' is inf"),
])
def test_model_sizes_out_of_range_fail_fast_naming_the_key(tiny_path, tmp_path, key, value, message):
    """A flipped bit in block_count (33,554,433 layers in a small file) once built an entry per
    layer before any check: 3 GB and a minute. Now each size is range-checked first."""
    path = _write(tmp_path, _with_value(open(tiny_path, "rb").read(), key, value))
    t0 = time.perf_counter()
    with pytest.raises(MetadataError, match=message) as info:
        config_from_gguf(GGUFFile(path))
    assert time.perf_counter() - t0 < 1.0
    assert path in str(info.value)


def test_limits_hold_real_models():
    """The caps sit far above the largest released models (the numbers of the comments)."""
    assert gguf_file.MAX_LAYERS >= 126 and gguf_file.MAX_EMBEDDING >= 18_432
    assert gguf_file.MAX_FFN >= 73_728 and gguf_file.MAX_VOCAB >= 262_144
    assert gguf_file.MAX_CONTEXT >= 10_485_760 and gguf_file.MAX_HEADS >= 128
    assert gguf_file.MAX_ARRAY_ITEMS >= 262_144 and gguf_file.MAX_TENSORS >= 1_138


# hand-made files: header, metadata and tensor infos byte by byte

def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + payload


def _gguf(kvs: list, tensor_infos: bytes = b"", n_tensors: int = 0, data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs) + tensor_infos
    return head + bytes(-len(head) % 32) + data


def _nested_array(depth: int) -> bytes:
    """An array of arrays ... of one u8, `depth` arrays deep (value type 9 = array, 0 = u8)."""
    inner = struct.pack("<IQ", 0, 1) + b"\x07"
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", 9, 1) + inner
    return inner


def test_deeply_nested_arrays_are_a_metadata_error(tmp_path):
    """5,000 nested arrays used to end in RecursionError."""
    path = _write(tmp_path, _gguf([_kv("fuzz.deep", 9, _nested_array(5000))]))
    with pytest.raises(MetadataError, match=r"'fuzz.deep'.*nested more than 4"):
        GGUFFile(path)
    ok = GGUFFile(_write(tmp_path, _gguf([_kv("fuzz.deep", 9, _nested_array(4))]), "ok.gguf"))
    assert ok.metadata["fuzz.deep"] == [[[[7]]]]


@pytest.mark.parametrize("limit, data, error, message", [
    ("MAX_ARRAY_ITEMS", _gguf([_kv("a", 9, struct.pack("<IQ", 0, 100) + bytes(100))]), MetadataError,
     "'a': an array of 100 items is over the limit of 50"),
    ("MAX_STRING_BYTES", _gguf([_kv("s", 8, _string("x" * 100))]), ModelFileError,
     "'s': a string of 100 bytes .* over the limit of 50"),
    ("MAX_METADATA_ENTRIES", _gguf([_kv(f"k{i}", 0, b"\x01") for i in range(60)]), ModelFileError,
     "header claims 60 metadata entries, over the limit of 50"),
])
def test_counts_over_a_limit_are_named(tmp_path, monkeypatch, limit, data, error, message):
    monkeypatch.setattr(gguf_file, limit, 50)
    with pytest.raises(error, match=message):
        GGUFFile(_write(tmp_path, data))


def _string_array(items: list) -> bytes:
    """A metadata array of strings (type 9, item type 8); items are str or raw bytes."""
    raw = [i.encode() if isinstance(i, str) else i for i in items]
    return struct.pack("<IQ", 8, len(raw)) + b"".join(struct.pack("<Q", len(b)) + b for b in raw)


def test_string_arrays_read_as_written(tmp_path):
    """String arrays are decoded in one go (`_decode_joined`); empty strings, multi-byte
    characters, NULs inside a string (which the joined path cannot split: it falls back) and an
    empty array all read back as written."""
    cases = {"plain": ["a", "", "Ġthe", "日本", "🙂", "", "x" * 300],
             "nul": ["a\0b", "", "\0", "c"],
             "empty": []}
    path = _write(tmp_path, _gguf([_kv(k, 9, _string_array(v)) for k, v in cases.items()]))
    meta = GGUFFile(path).metadata
    assert {k: meta[k] for k in cases} == cases


@pytest.mark.parametrize("items, where", [
    (["ok", b"\xff\xfe", "after"], "a string is not valid UTF-8"),
    (["ok", b"\xe6\x97", "after"], "a string is not valid UTF-8"),          # cut in a character
])
def test_a_bad_string_in_an_array_is_named(tmp_path, items, where):
    path = _write(tmp_path, _gguf([_kv("tokenizer.ggml.tokens", 9, _string_array(items))]))
    with pytest.raises(ModelFileError, match=f"'tokenizer.ggml.tokens': {where}"):
        GGUFFile(path)


def test_counts_are_checked_against_the_file_size(tmp_path):
    raw = bytearray(_gguf([_kv("a", 0, b"\x01")]))
    raw[8:16] = struct.pack("<Q", 10_000)            # 10,000 tensor infos in a 64-byte file
    with pytest.raises(TruncatedFileError, match="10000 tensors and 1 metadata entries"):
        GGUFFile(_write(tmp_path, bytes(raw)))
    array = _gguf([_kv("a", 9, struct.pack("<IQ", 8, 1 << 40))])   # 2^40 strings
    with pytest.raises(TruncatedFileError, match="'a': an array of 1099511627776 items"):
        GGUFFile(_write(tmp_path, array))


def test_a_long_tensor_name_and_a_duplicate_key(tmp_path):
    info = _string("t" * 300) + struct.pack("<IQIQ", 1, 8, 0, 0)
    with pytest.raises(ModelFileError, match="tensor info 0: a string of 300 bytes .* limit of 256"):
        GGUFFile(_write(tmp_path, _gguf([], info, n_tensors=1, data=bytes(32))))
    with pytest.raises(MetadataError, match="'a' appears twice"):
        GGUFFile(_write(tmp_path, _gguf([_kv("a", 0, b"\x01"), _kv("a", 0, b"\x02")])))


def test_absurd_dimensions_are_rejected(tmp_path):
    """ne = [0, 2^64 - 1]: zero bytes, but more values than ggml's int64 counts."""
    info = _string("t") + struct.pack("<I", 2) + struct.pack("<QQ", 0, (1 << 64) - 1) + struct.pack("<IQ", 0, 0)
    with pytest.raises(ModelFileError, match=r"tensor 't' has dimensions \[0, 18446744073709551615\]"):
        GGUFFile(_write(tmp_path, _gguf([], info, n_tensors=1)))


# -- llama.cpp's tensor layout -------------------------------------------------------------------------

def _tensor_field(raw: bytes, name: str, field: str) -> int:
    """Offset of the type (u32) or offset (u64) field of tensor `name`'s info."""
    pos = _tensor_info_pos(raw, name)
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    return pos + 4 + 8 * n_dims + (0 if field == "type" else 4)


def _patched(raw: bytes, changes: list) -> bytes:
    """raw with (tensor name, "type" | "offset", new value) changes applied."""
    data = bytearray(raw)
    for name, field, value in changes:
        struct.pack_into("<I" if field == "type" else "<Q", data, _tensor_field(raw, name, field), value)
    return bytes(data)


def _offset(raw: bytes, name: str) -> int:
    return struct.unpack_from("<Q", raw, _tensor_field(raw, name, "offset"))[0]


def test_the_writers_follow_llama_cpps_layout(tiny_path):
    """Our converter's output (the tiny model) lies back to back, aligned, in info order."""
    f = GGUFFile(tiny_path)
    infos = list(f.tensors.values())
    for prev, info in zip(infos, infos[1:]):
        assert info.offset == prev.offset + -(-prev.n_bytes // 32) * 32


def test_every_tensor_at_offset_zero(tiny_path, tmp_path):
    raw = open(tiny_path, "rb").read()
    names = list(GGUFFile(tiny_path).tensors)
    path = _write(tmp_path, _patched(raw, [(n, "offset", 0) for n in names]))
    with pytest.raises(ModelFileError, match=rf"tensor '{names[1]}' \(Q4_1\) is at data offset 0, expected \d+: "
                                             rf"the previous tensor '{names[0]}'"):
        GGUFFile(path)


def test_overlapping_and_misaligned_tensors(tiny_path, tmp_path):
    raw = open(tiny_path, "rb").read()
    a, b = "blk.0.attn_k.weight", "blk.0.attn_v.weight"
    with pytest.raises(ModelFileError, match=f"'{b}'.*the previous tensor '{a}'.*tensors overlap"):
        GGUFFile(_write(tmp_path, _patched(raw, [(b, "offset", _offset(raw, a))])))
    with pytest.raises(ModelFileError, match=f"'{b}'.*not a multiple of general.alignment 32"):
        GGUFFile(_write(tmp_path, _patched(raw, [(b, "offset", _offset(raw, b) + 4)])))


@pytest.mark.parametrize("name, new_type", [("blk.0.attn_q.weight", gguf.GGMLQuantizationType.Q4_0),
                                            ("token_embd.weight", gguf.GGMLQuantizationType.Q8_0)])
def test_a_relabelled_tensor_names_itself(tiny_path, tmp_path, name, new_type):
    """Another type changes the tensor's byte count: the next tensor no longer starts where this
    one ends. (In the tiny file every matrix is Q4_1: 20 bytes per block; Q4_0 has 18, Q8_0 34.)"""
    raw = open(tiny_path, "rb").read()
    path = _write(tmp_path, _patched(raw, [(name, "type", int(new_type))]))
    with pytest.raises(ModelFileError, match=f"previous tensor '{name}' \\({new_type.name}, shape"):
        GGUFFile(path)


def test_relabelling_the_last_tensor(tiny_path, tmp_path):
    """The last tensor: a smaller type leaves bytes after it, a larger one runs past the end."""
    raw = open(tiny_path, "rb").read()
    last = list(GGUFFile(tiny_path).tensors)[-1]
    smaller = _patched(raw, [(last, "type", int(gguf.GGMLQuantizationType.Q4_0))])
    with pytest.raises(ModelFileError, match=f"bytes follow the last tensor '{last}' \\(Q4_0"):
        GGUFFile(_write(tmp_path, smaller))
    larger = _patched(raw, [(last, "type", int(gguf.GGMLQuantizationType.Q8_0))])
    with pytest.raises(TruncatedFileError, match=f"tensor '{last}' \\(Q8_0.*runs past the end"):
        GGUFFile(_write(tmp_path, larger))


# -- typed metadata access ---------------------------------------------------------------------------

def test_typed_access_names_the_key(tmp_path):
    path = _write(tmp_path, _gguf([_kv("tokenizer.chat_template", 4, struct.pack("<I", 5)),
                                   _kv("flag", 7, b"\x01"), _kv("name", 8, _string("x"))]))
    f = GGUFFile(path)
    with pytest.raises(MetadataError, match="'tokenizer.chat_template' should be str, found int 5"):
        f.get("tokenizer.chat_template", types=str)
    with pytest.raises(MetadataError, match="'flag' should be int, found bool"):
        f.require("flag", int)
    with pytest.raises(MetadataError, match="required metadata key 'missing' is missing"):
        f.require("missing", str)
    assert f.get("missing", "default", types=str) == "default"
    assert f.get("name", types=(str, bytes)) == "x" and f.require("flag", bool) is True
    assert f.get("tokenizer.chat_template") == 5       # no types: as stored


def test_type_table_agrees_with_the_gguf_package():
    """GGML_TYPES (read without importing gguf) states what gguf.GGML_QUANT_SIZES states."""
    import gguf

    from lmengine.converters.gguf_file import GGML_TYPES
    for type_id, (name, block_size, type_size) in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert (qtype.name, *gguf.GGML_QUANT_SIZES[qtype]) == (name, block_size, type_size)
