"""`lmengine quantize` (lmengine.converters.quantize): per-tensor types as llama.cpp's quantizer
chooses them, outputs that the `gguf` package reads and decodes close to the source, the
metadata kept, clear errors that never leave a DST behind, and (when llama-cpp-python is
installed) the same tensor bytes as llama.cpp's own quantizer, and llama.cpp running our files.

Models are small random llama GGUFs (rows of 256 values or more, so every K type fits).
"""
import os
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from lmengine.cli import main as cli_main
from lmengine.converters import quantize as qz
from lmengine.converters.errors import ConversionError, ModelFileError, UnsupportedQuantTypeError
from lmengine.converters.gguf_file import GGUFFile
from lmengine.converters.hf import write_llama_gguf
from lmengine.kernels import quant as q
from checks import assert_same_as_gguf_package, ref_dequantize
from tiny_models import byte_level_vocab

OUTPUT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S",
                "Q6_K", "IQ4_NL", "IQ4_XS")

# bits per value of each ggml type's quants: sets the error bound of test_every_output_type
TYPE_BITS = {q.Q8_0: 8, q.Q6_K: 6, q.Q5_0: 5, q.Q5_1: 5, q.Q5_K: 5, q.Q4_0: 4, q.Q4_1: 4,
             q.Q4_K: 4, q.IQ4_NL: 4, q.IQ4_XS: 4}


def model_tensors(rng, n_layers, dim, ffn, n_heads, n_kv_heads, vocab, tied=False):
    """{gguf name: float32 array} of a random llama model (weights ~ N(0, 0.05^2), norms ~ 1)."""
    kv_dim = dim // n_heads * n_kv_heads

    def w(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    t = {"token_embd.weight": w(vocab, dim)}
    for i in range(n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
        t[p + "attn_q.weight"] = w(dim, dim)
        t[p + "attn_k.weight"] = w(kv_dim, dim)
        t[p + "attn_v.weight"] = w(kv_dim, dim)
        t[p + "attn_output.weight"] = w(dim, dim)
        t[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
        t[p + "ffn_gate.weight"] = w(ffn, dim)
        t[p + "ffn_up.weight"] = w(ffn, dim)
        t[p + "ffn_down.weight"] = w(dim, ffn)
    t["output_norm.weight"] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    if not tied:
        t["output.weight"] = w(vocab, dim)
    return t


def write_model(path, *, n_layers=2, dim=256, ffn=512, n_heads=4, n_kv_heads=2, vocab=512,
                weight_type="f16", tied=False, seed=0):
    """A random llama GGUF with a byte-level vocabulary (llama.cpp loads it); returns the path."""
    rng = np.random.default_rng(seed)
    hparams = dict(n_layers=n_layers, dim=dim, ffn_dim=ffn, n_heads=n_heads, n_kv_heads=n_kv_heads,
                   rope_base=10000.0, norm_eps=1e-5, n_ctx=256, vocab_size=vocab)
    tensors = model_tensors(rng, n_layers, dim, ffn, n_heads, n_kv_heads, vocab, tied)
    write_llama_gguf(str(path), "llama", hparams, tensors, weight_type, vocab_with_a_merge(vocab))
    return str(path)


def vocab_with_a_merge(vocab_size):
    """The 256 byte tokens, "ĠĠ" (two spaces) and control tokens, with the merge "Ġ Ġ" and the
    "default" pre-tokenizer: llama.cpp refuses a gpt2 vocabulary without merges (GGUFWriter drops
    an empty merges array) and does not know a pre-tokenizer named "gpt2"."""
    vocab = byte_level_vocab(vocab_size)
    vocab["pre"] = "default"
    vocab["tokens"][256] = "ĠĠ"
    vocab["token_types"][256] = 1
    vocab["merges"] = ["Ġ Ġ"]
    return vocab


def tensor_values(path) -> dict:
    """{name: float32 values} of a GGUF, decoded by the gguf package (the reference)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        out[t.name] = ref_dequantize(int(t.tensor_type), t.data.reshape(-1).view(np.uint8), shape)
    return out


def fields(path) -> dict:
    """{key: (value types, contents)} of a GGUF's metadata, read by the gguf package."""
    return {k: (list(f.types), f.contents()) for k, f in gguf.GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def src_f16(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("quantize") / "src-f16.gguf")


@pytest.fixture(scope="module")
def src_f32(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("quantize") / "src-f32.gguf", weight_type="f32")


def files_in(folder) -> list:
    return sorted(os.listdir(folder))


# -- every output type --------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", OUTPUT_TYPES)
def test_every_output_type(src_f16, tmp_path, type_name):
    """The output loads with our GGUFFile and gguf.GGUFReader (same metadata and tensor infos),
    keeps every metadata key but general.file_type / quantization_version, keeps 1-D tensors
    byte for byte, and each matrix decodes (gguf.quants) close to the source: relative RMS error
    at most 1.25x the uniform-quantization estimate 4.4 / (2^bits - 1) / sqrt(12) of its type
    (the range of a block of normal values is about 4.4 standard deviations)."""
    dst = str(tmp_path / f"out-{type_name}.gguf")
    types = qz.quantize_gguf(src_f16, dst, type_name)
    assert files_in(tmp_path) == [os.path.basename(dst)]                # no temporary file left
    assert_same_as_gguf_package(dst)

    src_fields, dst_fields = fields(src_f16), fields(dst)
    assert dst_fields.pop("general.file_type") == ([gguf.GGUFValueType.UINT32],
                                                   qz.FILE_TYPES[type_name].ftype)
    assert dst_fields.pop("general.quantization_version") == ([gguf.GGUFValueType.UINT32], 2)
    src_fields.pop("general.file_type")
    assert dst_fields == src_fields                     # everything else, types included

    ours, src = GGUFFile(dst), GGUFFile(src_f16)
    assert list(ours.tensors) == list(src.tensors)      # same order
    src_values, dst_values = tensor_values(src_f16), tensor_values(dst)
    for name, info in ours.tensors.items():
        assert info.shape == src.tensors[name].shape and info.type_name == types[name]
        if len(info.shape) == 1:
            assert info.type_name == "F32"
            assert np.array_equal(ours.tensor_bytes(name), src.tensor_bytes(name))
            continue
        x, y = src_values[name].astype(np.float64), dst_values[name]
        # our own decoding of the output is gguf's, bit for bit
        assert np.array_equal(q.dequantize(info.type_id, ours.tensor_bytes(name), info.shape).view(np.uint32),
                              y.view(np.uint32))
        rel_rms = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
        bound = 1.25 * 4.4 / (2 ** TYPE_BITS[info.type_id] - 1) / np.sqrt(12)
        assert rel_rms <= bound, f"{name} ({info.type_name}): relative RMS error {rel_rms:.4f} > {bound:.4f}"
    # the default type covers most of the matrices
    default = q.TYPE_NAMES[qz.FILE_TYPES[type_name].default_type]
    assert sum(t == default for t in types.values()) >= 10


# -- per-tensor types: llama.cpp's rules --------------------------------------------------------

# Layers that llama.cpp's use_more_bits(i, n) picks for 16 layers: i < 16/8, i >= 7*16/8, or
# (i - 16/8) % 3 == 2, i.e. the first two, the last two and 4, 7, 10, 13.
MORE_BITS_16 = {0, 1, 4, 7, 10, 13, 14, 15}


def expected_types(file_type: str, n_layers=16, n_gqa=4) -> dict:
    """Per-tensor types of llama.cpp's src/llama-quant.cpp (llama_tensor_get_type_impl) for a
    llama model with 16 layers, untied output, rows of 256 values, no importance matrix, written
    out as a table from its rules (not from our code)."""
    default = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
               "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0", "Q8_0": "Q8_0",
               "Q6_K": "Q6_K"}[file_type]
    types = {"token_embd.weight": default, "output_norm.weight": "F32",
             "output.weight": "Q8_0" if file_type == "Q8_0" else "Q6_K"}
    for i in range(n_layers):
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{name}.weight"] = default
        attn_v = ffn_down = default
        if file_type in ("Q4_K_M", "Q5_K_M") and i in MORE_BITS_16:
            attn_v = ffn_down = "Q6_K"
        if file_type == "Q4_K_S":
            attn_v = "Q5_K" if i < 4 else default                  # i_attention_wv < 4
            ffn_down = "Q5_K" if i < n_layers // 8 else default
        if file_type in ("IQ4_XS", "IQ4_NL"):
            attn_v = "Q5_K" if n_gqa >= 4 else default
            ffn_down = "Q5_K" if i < n_layers // 8 else default
        types[f"blk.{i}.attn_v.weight"] = attn_v
        types[f"blk.{i}.ffn_down.weight"] = ffn_down
        types[f"blk.{i}.attn_norm.weight"] = types[f"blk.{i}.ffn_norm.weight"] = "F32"
    return types


@pytest.fixture(scope="module")
def src_16_layers(tmp_path_factory):
    """16 layers, 8 query heads per KV head: the mixes' layer rules and the GQA rule show."""
    return write_model(tmp_path_factory.mktemp("quantize") / "src-16.gguf", n_layers=16, dim=256,
                       ffn=256, n_heads=8, n_kv_heads=1, vocab=300)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q4_0",
                                       "Q8_0", "IQ4_XS", "IQ4_NL"])
def test_mix_chooses_llama_cpp_types(src_16_layers, file_type):
    plan = qz.plan_tensor_types(GGUFFile(src_16_layers), file_type)
    got = {name: q.TYPE_NAMES[t] for name, t in plan.items()}
    assert got == expected_types(file_type, n_gqa=8)


def test_mix_without_gqa_rule(tmp_path):
    """IQ4_XS gives attn_v more bits only when 4 or more query heads share a KV head."""
    path = write_model(tmp_path / "gqa2.gguf", n_layers=16, dim=256, ffn=256, n_heads=4, n_kv_heads=2,
                       vocab=300)
    got = {n: q.TYPE_NAMES[t] for n, t in qz.plan_tensor_types(GGUFFile(path), "IQ4_XS").items()}
    assert got == expected_types("IQ4_XS", n_gqa=2)


def test_pure_gives_every_matrix_the_type(src_16_layers):
    for file_type, type_name in (("Q4_K_M", "Q4_K"), ("Q4_0", "Q4_0"), ("IQ4_XS", "IQ4_XS")):
        plan = qz.plan_tensor_types(GGUFFile(src_16_layers), file_type, pure=True)
        for name, t in plan.items():
            assert q.TYPE_NAMES[t] == ("F32" if name.endswith("norm.weight") else type_name), name


def test_tied_embeddings_get_the_output_type(tmp_path):
    """Without output.weight, token_embd is also the output matrix: Q6_K as output would be."""
    path = write_model(tmp_path / "tied.gguf", n_layers=2, tied=True)
    plan = qz.plan_tensor_types(GGUFFile(path), "Q4_K_M")
    assert q.TYPE_NAMES[plan["token_embd.weight"]] == "Q6_K"
    plan = qz.plan_tensor_types(GGUFFile(path), "Q8_0")
    assert q.TYPE_NAMES[plan["token_embd.weight"]] == "Q8_0"


def test_rows_not_whole_super_blocks_fall_back(tmp_path):
    """Rows of 288 values (9 x 32, not a multiple of 256): Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0, IQ4_XS -> IQ4_NL (llama.cpp's tensor_type_fallback), the output matrix Q8_0;
    matrices whose rows are 256 long (ffn_down: rows of ffn = 512) keep the K type."""
    path = write_model(tmp_path / "288.gguf", n_layers=8, dim=288, ffn=512, n_heads=4, n_kv_heads=4,
                       vocab=300)
    warnings = []
    plan = {n: q.TYPE_NAMES[t] for n, t in
            qz.plan_tensor_types(GGUFFile(path), "Q4_K_M", warn=warnings.append).items()}
    assert plan["output.weight"] == "Q8_0" and plan["token_embd.weight"] == "Q5_0"
    assert plan["blk.3.attn_q.weight"] == "Q5_0"
    assert plan["blk.0.attn_v.weight"] == "Q8_0"               # Q6_K (more bits) -> Q8_0
    assert plan["blk.1.attn_v.weight"] == "Q5_0"
    assert plan["blk.0.ffn_down.weight"] == "Q6_K" and plan["blk.1.ffn_down.weight"] == "Q4_K"
    assert any("blk.3.attn_q.weight" in w and "Q5_0" in w for w in warnings)
    for file_type, fallback in (("Q5_K_S", "Q5_1"), ("Q6_K", "Q8_0"), ("IQ4_XS", "IQ4_NL")):
        plan = qz.plan_tensor_types(GGUFFile(path), file_type, pure=True)
        assert q.TYPE_NAMES[plan["blk.0.attn_q.weight"]] == fallback
    dst = str(tmp_path / "288-q4km.gguf")
    qz.quantize_gguf(path, dst, "Q4_K_M")
    assert_same_as_gguf_package(dst)


def test_file_type_names():
    assert qz.file_type("q4_k_m").name == "Q4_K_M"
    assert qz.file_type("Q4_K").name == "Q4_K_M"             # llama-quantize's alias
    assert qz.file_type(" iq4_xs ").ftype == int(gguf.LlamaFileType.MOSTLY_IQ4_XS)
    for name, ft in qz.FILE_TYPES.items():
        assert ft.ftype == int(gguf.LlamaFileType[("ALL_" if name == "F32" else "MOSTLY_") + name])


# -- inputs ------------------------------------------------------------------------------------

def test_f32_and_f16_sources_give_the_same_file_from_the_same_values(tmp_path):
    """An F32 source holding values that are exact halves quantizes to the same bytes as the
    F16 file of those values (F16 is widened exactly, as llama.cpp does)."""
    f16 = write_model(tmp_path / "a-f16.gguf", n_layers=1, seed=3)
    values = tensor_values(f16)
    hp = dict(n_layers=1, dim=256, ffn_dim=512, n_heads=4, n_kv_heads=2, rope_base=10000.0,
              norm_eps=1e-5, n_ctx=256, vocab_size=512)
    f32 = str(tmp_path / "a-f32.gguf")
    write_llama_gguf(f32, "llama", hp, values, "f32", byte_level_vocab(512))
    for src in (f16, f32):
        qz.quantize_gguf(src, src + ".q5km", "Q5_K_M")
    a, b = GGUFFile(f16 + ".q5km"), GGUFFile(f32 + ".q5km")
    for name in a.tensors:
        if len(a.tensors[name].shape) == 2:
            assert np.array_equal(a.tensor_bytes(name), b.tensor_bytes(name)), name


def test_requantize(src_f16, tmp_path):
    q4 = str(tmp_path / "q4km.gguf")
    qz.quantize_gguf(src_f16, q4, "Q4_K_M")
    with pytest.raises(qz.RequantizeError, match=r"token_embd.weight.*Q4_K.*--allow-requantize"):
        qz.quantize_gguf(q4, str(tmp_path / "q8.gguf"), "Q8_0")
    assert files_in(tmp_path) == ["q4km.gguf"]
    # the same file type: every tensor already has its type, so it is copied, no flag needed
    qz.quantize_gguf(q4, str(tmp_path / "again.gguf"), "Q4_K_M")
    a, b = GGUFFile(q4), GGUFFile(str(tmp_path / "again.gguf"))
    assert all(np.array_equal(a.tensor_bytes(n), b.tensor_bytes(n)) for n in a.tensors)
    # allowed: Q4_K_M -> Q8_0 decodes to (nearly) the Q4_K_M values
    qz.quantize_gguf(q4, str(tmp_path / "q8.gguf"), "Q8_0", allow_requantize=True)
    before, after = tensor_values(q4), tensor_values(str(tmp_path / "q8.gguf"))
    for name, x in before.items():
        assert np.abs(after[name] - x).max() <= np.abs(x).max() / 127 + 1e-6, name


def test_unknown_type(src_f16, tmp_path):
    with pytest.raises(qz.UnknownFileTypeError, match=r"'Q3_K_M'.*Q4_K_M"):
        qz.quantize_gguf(src_f16, str(tmp_path / "x.gguf"), "Q3_K_M")
    assert files_in(tmp_path) == []


def test_source_type_we_cannot_decode(tmp_path):
    """A source tensor in a type lmengine has no decoder for (IQ2_XXS): the error names the
    tensor and the type, before anything is written."""
    src = str(tmp_path / "iq2.gguf")
    w = gguf.GGUFWriter(src, "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 66), np.uint8), raw_dtype=GT.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedQuantTypeError, match=r"blk.0.attn_q.weight.*IQ2_XXS"):
        qz.quantize_gguf(src, str(tmp_path / "out.gguf"), "Q8_0", allow_requantize=True)
    assert files_in(tmp_path) == ["iq2.gguf"]


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        qz.quantize_gguf(str(bad), str(tmp_path / "out.gguf"), "Q8_0")


def test_non_finite_source_values(tmp_path):
    """NaN in a matrix: the error names the tensor and the rows; no DST."""
    rng = np.random.default_rng(1)
    tensors = model_tensors(rng, 1, 256, 256, 4, 4, 300)
    tensors["blk.0.ffn_up.weight"][70, 3] = np.nan
    src = str(tmp_path / "nan.gguf")
    hp = dict(n_layers=1, dim=256, ffn_dim=256, n_heads=4, n_kv_heads=4, rope_base=1e4, norm_eps=1e-5,
              n_ctx=64, vocab_size=300)
    write_llama_gguf(src, "llama", hp, tensors, "f32", byte_level_vocab(300))
    with pytest.raises(ConversionError, match=r"blk.0.ffn_up.weight.*rows 0..255.*Q4_K.*values\[70, 3\]"):
        qz.quantize_gguf(src, str(tmp_path / "out.gguf"), "Q4_K_M")
    assert files_in(tmp_path) == ["nan.gguf"]


def test_scales_that_overflow_f16(tmp_path):
    """Values so large that the block's f16 scale overflows to inf: a clear error, like
    llama.cpp's row validation, instead of a file that decodes to inf."""
    rng = np.random.default_rng(2)
    tensors = model_tensors(rng, 1, 256, 256, 4, 4, 300)
    tensors["blk.0.attn_k.weight"][9, :] = 1e9
    src = str(tmp_path / "big.gguf")
    hp = dict(n_layers=1, dim=256, ffn_dim=256, n_heads=4, n_kv_heads=4, rope_base=1e4, norm_eps=1e-5,
              n_ctx=64, vocab_size=300)
    write_llama_gguf(src, "llama", hp, tensors, "f32", byte_level_vocab(300))
    with pytest.raises(ConversionError, match=r"blk.0.attn_k.weight.*row 9.*Q8_0"):
        qz.quantize_gguf(src, str(tmp_path / "out.gguf"), "Q8_0")
    assert files_in(tmp_path) == ["big.gguf"]


def write_gguf_by_hand(path, kv: list, tensors: list, alignment: int) -> None:
    """A GGUF v3 file from raw parts: kv = [(key, value type, packed value bytes)], tensors =
    [(name, NumPy shape, ggml type id, raw bytes)] (gguf.GGUFWriter cannot write an empty array)."""
    import struct

    def string(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    head += b"".join(string(k) + struct.pack("<I", t) + v for k, t, v in kv)
    offset, data = 0, b""
    for name, shape, type_id, raw in tensors:
        ne = tuple(reversed(shape))
        head += string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, type_id, offset)
        padded = raw + bytes(-len(raw) % alignment)
        data += padded
        offset += len(padded)
    with open(path, "wb") as f:
        f.write(head + bytes(-len(head) % alignment) + data)


def test_alignment_and_odd_metadata_are_kept(tmp_path):
    """A source with general.alignment = 64, an empty array, arrays of floats and (non-ASCII)
    strings, scalars of several types and a 3-D tensor: kept as they are; tensor data offsets
    are 64-aligned."""
    import struct
    V = gguf.GGUFValueType
    rng = np.random.default_rng(4)
    a = rng.standard_normal((96, 256)).astype(np.float32)
    b = rng.standard_normal((2, 32, 256)).astype(np.float16)
    c = rng.standard_normal(100).astype(np.float32)
    src = str(tmp_path / "odd.gguf")
    write_gguf_by_hand(src, [
        ("general.architecture", V.STRING, struct.pack("<Q", 5) + b"llama"),
        ("general.alignment", V.UINT32, struct.pack("<I", 64)),
        ("llama.block_count", V.UINT32, struct.pack("<I", 1)),
        ("test.empty", V.ARRAY, struct.pack("<IQ", V.INT32, 0)),
        ("test.floats", V.ARRAY, struct.pack("<IQff", V.FLOAT32, 2, 0.5, 1.5)),
        ("test.strings", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + struct.pack("<Q", 1) + b"a"
         + struct.pack("<Q", 2) + "ü".encode()),
        ("test.i8", V.INT8, struct.pack("<b", -3)),
        ("test.f64", V.FLOAT64, struct.pack("<d", 1.0 / 3.0)),
        ("test.flag", V.BOOL, b"\x01"),
        ("general.file_type", V.UINT32, struct.pack("<I", 0)),
    ], [("blk.0.attn_q.weight", a.shape, q.F32, a.tobytes()),
        ("blk.0.ffn_down_exps.weight", b.shape, q.F16, b.tobytes()),
        ("blk.0.attn_norm.weight", c.shape, q.F32, c.tobytes())], alignment=64)
    assert_same_as_gguf_package(src)
    dst = str(tmp_path / "odd-q6k.gguf")
    types = qz.quantize_gguf(src, dst, "Q6_K")
    assert types == {"blk.0.attn_q.weight": "Q6_K", "blk.0.ffn_down_exps.weight": "Q6_K",
                     "blk.0.attn_norm.weight": "F32"}
    assert_same_as_gguf_package(dst)
    src_fields, dst_fields = fields(src), fields(dst)
    assert dst_fields["test.empty"] == ([V.ARRAY], [])
    # every other key/value entry is the source's, byte for byte (the empty array's item type too)
    src_raw = dict(qz._metadata_entries(GGUFFile(src)))
    dst_raw = dict(qz._metadata_entries(GGUFFile(dst)))
    assert dst_raw.pop("general.quantization_version").endswith(struct.pack("<II", V.UINT32, 2))
    assert dst_raw.pop("general.file_type") != src_raw.pop("general.file_type")
    assert dst_raw == src_raw
    assert dst_fields.pop("general.file_type")[1] == int(gguf.LlamaFileType.MOSTLY_Q6_K)
    assert dst_fields.pop("general.quantization_version")[1] == 2
    assert list(dst_fields) == [k for k in src_fields if k != "general.file_type"]   # same order
    src_fields.pop("general.file_type")
    assert dst_fields == src_fields
    out = GGUFFile(dst)
    assert all((i.offset % 64) == 0 for i in out.tensors.values())
    assert out.tensors["blk.0.ffn_down_exps.weight"].shape == (2, 32, 256)
    x = tensor_values(src)["blk.0.ffn_down_exps.weight"]
    y = tensor_values(dst)["blk.0.ffn_down_exps.weight"]
    assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)) < 0.025


# -- DST handling: exists, disk full, interruptions -----------------------------------------------

def test_destination_exists(src_f16, tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(qz.DestinationExistsError, match="already exists.*--force"):
        qz.quantize_gguf(src_f16, str(dst), "Q8_0")
    assert dst.read_bytes() == b"keep me"
    qz.quantize_gguf(src_f16, str(dst), "Q8_0", force=True)
    assert_same_as_gguf_package(str(dst))
    assert files_in(tmp_path) == ["out.gguf"]


def test_disk_too_small_is_found_before_writing(src_f16, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(qz.shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    with pytest.raises(qz.DiskFullError, match=r"needs [\d,]+ bytes but .* has only 100,000 free"):
        qz.quantize_gguf(src_f16, str(tmp_path / "out.gguf"), "Q8_0")
    assert files_in(tmp_path) == []


def _temp_on_full_disk(dst):
    """A temporary file whose writes fail with ENOSPC: a link to /dev/full."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), ".full.tmp")
    os.symlink("/dev/full", tmp)
    return tmp, open(tmp, "wb")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_while_writing(src_f16, tmp_path, monkeypatch):
    """ENOSPC in the middle of the file: DiskFullError, the temporary file removed, an existing
    DST (even with force) left as it was."""
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"old file")
    monkeypatch.setattr(qz, "_open_temp", _temp_on_full_disk)
    with pytest.raises(qz.DiskFullError, match="no space left"):
        qz.quantize_gguf(src_f16, str(dst), "Q4_K_M", force=True)
    assert files_in(tmp_path) == ["out.gguf"] and dst.read_bytes() == b"old file"


def test_interrupted_run_leaves_nothing(src_f16, tmp_path):
    def interrupt(p):
        if p.index == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qz.quantize_gguf(src_f16, str(tmp_path / "out.gguf"), "Q8_0", progress=interrupt)
    assert files_in(tmp_path) == []


# -- progress and the command line ----------------------------------------------------------------

def test_progress_reports(src_f16, tmp_path, monkeypatch):
    reports = []
    monkeypatch.setattr(qz, "SLAB_BYTES", 64 * 1024)     # several slabs per matrix
    qz.quantize_gguf(src_f16, str(tmp_path / "out.gguf"), "Q6_K", progress=reports.append)
    done = [r for r in reports if r.tensor_done]
    n = len(GGUFFile(src_f16).tensors)
    assert [r.index for r in done] == list(range(1, n + 1))
    assert len(reports) > len(done)                         # slabs inside big tensors too
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(reports, reports[1:]))
    last = reports[-1]
    assert last.bytes_done == last.bytes_total and last.index == n
    assert str(last).startswith("[" + "#" * 24 + "] 100%") and "output.weight" in str(last)
    assert "F16 -> Q6_K" in str(reports[0])


def test_cli(src_f16, tmp_path, capsys):
    dst = str(tmp_path / "cli.gguf")
    assert cli_main(["quantize", src_f16, dst, "q4_k_m"]) == 0
    err = capsys.readouterr().err
    assert "token_embd.weight" in err and f"wrote {dst}" in err and "Q6_K" in err
    assert cli_main(["quantize", src_f16, dst, "q4_k_m"]) == 1   # an lmengine error: exit status 1, the message on stderr
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["quantize", src_f16, dst, "q4_k_m", "--force", "--pure"]) == 0
    assert {i.type_name for i in GGUFFile(dst).tensors.values()} == {"Q4_K", "F32"}
    assert cli_main(["quantize", src_f16, dst, "Q9_9", "--force"]) == 1
    assert "unknown quantization type 'Q9_9'" in capsys.readouterr().err


# -- llama.cpp: same bytes, and it runs our files ---------------------------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no llama.cpp reference")


def llama_cpp_quantize(llama_cpp, src, dst, type_name, pure=False):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if type_name == 'F32' else 'MOSTLY'}_{type_name}")
    params.pure = pure
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) == 0


@pytest.mark.parametrize("type_name", OUTPUT_TYPES)
def test_same_tensor_bytes_as_llama_cpp(src_f16, src_f32, tmp_path, type_name):
    """llama.cpp's llama_model_quantize on the same source: every tensor has the same type and
    the same bytes (its file orders tensors by layer and name; ours keeps the source order)."""
    llama_cpp = _llama_cpp()
    for src in (src_f16, src_f32) if type_name in ("Q4_K_M", "Q6_K") else (src_f16,):
        ours, theirs = str(tmp_path / "ours.gguf"), str(tmp_path / "theirs.gguf")
        qz.quantize_gguf(src, ours, type_name, force=True)
        llama_cpp_quantize(llama_cpp, src, theirs, type_name)
        a, b = GGUFFile(ours), GGUFFile(theirs)
        assert set(a.tensors) == set(b.tensors)
        assert a.get("general.file_type") == b.get("general.file_type")
        for name, info in a.tensors.items():
            assert (info.type_name, info.shape) == (b.tensors[name].type_name, b.tensors[name].shape), name
            assert np.array_equal(a.tensor_bytes(name), b.tensor_bytes(name)), f"{name} ({info.type_name})"


def test_same_tensor_bytes_as_llama_cpp_pure(src_f16, tmp_path):
    llama_cpp = _llama_cpp()
    for type_name in ("Q4_K_M", "IQ4_XS"):
        ours, theirs = str(tmp_path / f"ours-{type_name}.gguf"), str(tmp_path / f"theirs-{type_name}.gguf")
        qz.quantize_gguf(src_f16, ours, type_name, pure=True)
        llama_cpp_quantize(llama_cpp, src_f16, theirs, type_name, pure=True)
        a, b = GGUFFile(ours), GGUFFile(theirs)
        for name, info in a.tensors.items():
            assert info.type_name == b.tensors[name].type_name, name
            assert np.array_equal(a.tensor_bytes(name), b.tensor_bytes(name)), name


def _top1(llama_cpp, path, tokens):
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return logits.argmax(axis=1), logits


def test_llama_cpp_runs_our_q4_k_m(tmp_path):
    """llama.cpp loads our Q4_K_M file and predicts the same top-1 token at every position of a
    short text as on its own Q4_K_M file of the same source (the logits are equal too: the
    tensor data is identical, see test_same_tensor_bytes_as_llama_cpp)."""
    llama_cpp = _llama_cpp()
    src = write_model(tmp_path / "src.gguf", n_layers=4, seed=11)
    ours, theirs = str(tmp_path / "ours.gguf"), str(tmp_path / "theirs.gguf")
    qz.quantize_gguf(src, ours, "Q4_K_M")
    llama_cpp_quantize(llama_cpp, src, theirs, "Q4_K_M")
    tokens = list(b"The quick brown fox jumps over the lazy dog, twice.")   # byte tokens 0..255
    top_ours, logits_ours = _top1(llama_cpp, ours, tokens)
    top_theirs, logits_theirs = _top1(llama_cpp, theirs, tokens)
    assert np.array_equal(top_ours, top_theirs)
    np.testing.assert_array_equal(logits_ours, logits_theirs)
