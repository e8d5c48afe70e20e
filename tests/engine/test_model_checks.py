"""Model files that must not load: a block with an inf or NaN scale, a weight type no kernel reads,
a vector (norm, bias) stored in a block type, biases in some layers only. Each fails at load time
with an lmengine error that names the file and the tensor, before any token is sampled."""
import gguf
import numpy as np
import pytest

from lmengine import LLM
from lmengine.config import config_from_gguf
from lmengine.converters.gguf_file import GGUFFile
from lmengine.errors import (CorruptTensorError, LMEngineError, TensorShapeError,
                             UnsupportedQuantTypeError)
from tiny_models import byte_level_vocab, make_tiny_model


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


# -- files written tensor by tensor with gguf.GGUFWriter: a type chosen per tensor ------------------

DIM, N_HEADS, N_KV_HEADS, FFN, VOCAB = 256, 4, 2, 256, 260


def _tensors(rng, n_layers=2, biases=()) -> dict:
    """Random float32 tensors of a tiny llama (NumPy order); `biases`: layers given q/k/v biases."""
    w = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)   # noqa: E731
    head_dim = DIM // N_HEADS
    q, kv = N_HEADS * head_dim, N_KV_HEADS * head_dim
    t = {"token_embd.weight": w(VOCAB, DIM), "output_norm.weight": 1 + w(DIM)}
    for i in range(n_layers):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": 1 + w(DIM), b + "attn_q.weight": w(q, DIM), b + "attn_k.weight": w(kv, DIM),
                  b + "attn_v.weight": w(kv, DIM), b + "attn_output.weight": w(DIM, q),
                  b + "ffn_norm.weight": 1 + w(DIM), b + "ffn_gate.weight": w(FFN, DIM),
                  b + "ffn_up.weight": w(FFN, DIM), b + "ffn_down.weight": w(DIM, FFN)})
        if i in biases:
            t.update({b + "attn_q.bias": w(q), b + "attn_k.bias": w(kv), b + "attn_v.bias": w(kv)})
    return t


def _write_model(path, types=None, n_layers=2, biases=()):
    """A tied llama of n_layers; types: tensor name -> gguf.GGMLQuantizationType. A type the gguf
    package cannot quantize to gets random blocks with f16 scales of 1.0 wherever a scale sits."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", n_layers), ("context_length", 128), ("embedding_length", DIM),
                       ("feed_forward_length", FFN), ("attention.head_count", N_HEADS),
                       ("attention.head_count_kv", N_KV_HEADS)):
        w.add_uint32(f"llama.{key}", value)
    vocab = byte_level_vocab(VOCAB)
    vocab["tokens"][256], vocab["token_types"][256] = "\u0120\u0120", 1   # two spaces: one merge, so the
    w.add_tokenizer_model("gpt2")                                          # tokenizer can be built
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    w.add_token_merges(["\u0120 \u0120"])
    for name, arr in _tensors(rng, n_layers, biases).items():
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, arr.astype(np.float16) if arr.ndim == 2 else arr)
            continue
        try:
            blocks = gguf.quants.quantize(arr, qtype)
        except NotImplementedError:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            blocks = np.zeros((*arr.shape[:-1], arr.shape[-1] // block_size, type_size), dtype=np.uint8)
            blocks[..., :] = rng.integers(0, 256, size=type_size, dtype=np.uint8)
            blocks = blocks.reshape(*arr.shape[:-1], -1)
        w.add_tensor(name, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_the_written_model_loads(tmp_path):
    path = _write_model(tmp_path / "ok.gguf", {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0})
    cfg = config_from_gguf(GGUFFile(path))
    assert (cfg.n_layers, cfg.dim, cfg.tensor_types) == (2, DIM, {"F32": 5, "F16": 14, "Q8_0": 1})


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.IQ3_S, gguf.GGMLQuantizationType.TQ2_0,
                                   gguf.GGMLQuantizationType.Q8_1, gguf.GGMLQuantizationType.I8])
def test_a_well_laid_out_type_no_kernel_reads_names_the_tensor(tmp_path, qtype):
    """A type the format knows (its byte count fits the layout) but no kernel reads."""
    path = _write_model(tmp_path / "m.gguf", {"blk.1.ffn_up.weight": qtype})
    assert GGUFFile(path).tensors["blk.1.ffn_up.weight"].type_name == qtype.name
    with pytest.raises(UnsupportedQuantTypeError, match=f"tensor 'blk.1.ffn_up.weight' has type {qtype.name}"):
        LLM(path, warmup=False)


@pytest.mark.parametrize("name", ["output_norm.weight", "blk.1.attn_norm.weight"])
def test_a_norm_stored_as_blocks_is_rejected(tmp_path, name):
    """Norm weights and biases are stored values (F32 / F16 / BF16), never blocks."""
    path = _write_model(tmp_path / "m.gguf", {name: gguf.GGMLQuantizationType.Q8_0})
    with pytest.raises(UnsupportedQuantTypeError, match=f"tensor '{name}' is a vector .* stored as Q8_0"):
        config_from_gguf(GGUFFile(path))


def test_llama_biases_are_checked_when_present(tmp_path):
    """The forward pass reads q/k/v biases whenever blk.0 has them: then every layer needs them,
    in a type for vectors (these once reached the forward pass unchecked: a plain ValueError
    without the tensor's name from the dequantizer)."""
    only_first = _write_model(tmp_path / "a.gguf", biases=(0,))
    with pytest.raises(TensorShapeError, match="tensor 'blk.1.attn_q.bias' is missing"):
        LLM(only_first, warmup=False)
    quantized = _write_model(tmp_path / "b.gguf", {"blk.1.attn_k.bias": gguf.GGMLQuantizationType.Q8_0}, biases=(0, 1))
    with pytest.raises(UnsupportedQuantTypeError, match="'blk.1.attn_k.bias' is a vector"):
        LLM(quantized, warmup=False)
    both = _write_model(tmp_path / "c.gguf", biases=(0, 1))
    assert config_from_gguf(GGUFFile(both)).qkv_bias


def test_n_ctx_is_checked_against_the_training_context_and_memory(tmp_path):
    """The file says context_length 128: the default n_ctx is that, a larger one needs
    allow_long_context=True, and a KV cache that cannot fit this machine's memory is refused
    before anything is allocated (10**9 positions x 3 slots x 2 layers x 128 kv values x 2 bytes
    x (k + v) = 3 TB)."""
    from lmengine import LLM
    from lmengine.errors import ContextLengthError, InvalidParameterError
    path = _write_model(tmp_path / "ctx.gguf")
    with LLM(path, warmup=False) as llm:
        assert llm.n_ctx == 128
    with pytest.raises(ContextLengthError, match="n_ctx=256 is beyond the training context .*128 positions"):
        LLM(path, n_ctx=256, warmup=False)
    with LLM(path, n_ctx=256, allow_long_context=True, warmup=False) as llm:
        assert llm.n_ctx == 256
    with pytest.raises(InvalidParameterError, match=r"n_ctx=1000000000 .* needs a KV cache of .* GiB"):
        LLM(path, n_ctx=10**9, max_batch_size=2, allow_long_context=True, warmup=False)
    with pytest.raises(InvalidParameterError, match="model must be a path"):
        LLM(123)
