"""Model files that must not load: a block with an inf or NaN scale, a weight type no kernel reads.
Both fail at load time with an lmengine error that names the file and the tensor, before any
token is sampled."""
import numpy as np
import pytest

from lmengine import LLM
from lmengine.converters.gguf_file import GGUFFile
from lmengine.errors import CorruptTensorError, LMEngineError
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("checks") / "q8.gguf"
    make_tiny_model(path, weight_type="q8_0", seed=3)
    return path


def _with_bytes(src, dst, offset, value: bytes):
    data = bytearray(src.read_bytes())
    data[offset: offset + len(value)] = value
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("bits", [b"\x00\x7c", b"\x00\xfe"], ids=["inf", "nan"])
def test_a_non_finite_block_scale_fails_at_load(q8_model, tmp_path, bits):
    info = GGUFFile(q8_model).tensors["blk.1.ffn_up.weight"]
    block = 5                                        # Q8_0 block: f16 d, then 32 int8
    bad = tmp_path / "bad.gguf"
    _with_bytes(q8_model, bad, info.offset + block * 34, bits)
    with pytest.raises(CorruptTensorError, match=r"blk\.1\.ffn_up\.weight.*block 5"):
        LLM(str(bad), warmup=False)


def test_a_nan_norm_weight_fails_at_load(q8_model, tmp_path):
    info = GGUFFile(q8_model).tensors["output_norm.weight"]   # F32
    bad = tmp_path / "bad.gguf"
    _with_bytes(q8_model, bad, info.offset + 4 * 7, np.float32(np.nan).tobytes())
    with pytest.raises(CorruptTensorError, match="output_norm.weight"):
        LLM(str(bad), warmup=False)


def test_the_clean_file_passes_the_checks(q8_model):
    from lmengine.config import config_from_gguf
    assert config_from_gguf(GGUFFile(q8_model)).n_layers == 2


def test_a_type_no_kernel_reads_names_the_tensor(q8_model, tmp_path):
    """The tensor's type id relabelled to IQ2_XXS (16), which no kernel reads (its byte count no
    longer matches either): the error names the tensor."""
    f = GGUFFile(q8_model)
    name = "blk.0.attn_k.weight"
    raw = q8_model.read_bytes()
    # the tensor info: name (u64 length + bytes), n_dims u32, dims u64 * n_dims, type u32, offset u64
    key = len(name).to_bytes(8, "little") + name.encode()
    at = raw.index(key) + len(key)
    n_dims = int.from_bytes(raw[at: at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(raw[type_at: type_at + 4], "little") == f.tensors[name].type_id
    bad = tmp_path / "bad.gguf"
    _with_bytes(q8_model, bad, type_at, (16).to_bytes(4, "little"))
    with pytest.raises(LMEngineError, match="attn_k.weight"):
        LLM(str(bad), warmup=False)
