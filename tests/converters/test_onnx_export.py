"""ONNX export (converters/onnx_export.py) against independent references.

- Weight carry-over (GGUF blocks -> MatMulNBits) against the gguf package's dequantize.
- Tiny random llama / qwen2 models: the exported graph run by onnxruntime against the HF
  transformers model holding the same (GGUF) weights, at every position, for prefill, decode with
  the KV cache fed back, and a left-padded batch; both graph flavours (contrib / standard ops)
  and both weight kinds (f32 / int4).
- The bundled SmolLM2: the int4 export against the Numba backend on a 256-token text.
The graph is driven with plain onnxruntime sessions here; tests/test_ort_backend.py covers the
engine's backend on top of it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lmengine.converters import onnx_graph  # noqa: E402
from lmengine.converters.errors import ConversionError, UnsupportedArchitectureError  # noqa: E402
from lmengine.converters.gguf_file import GGUFFile  # noqa: E402
from lmengine.converters.onnx_export import (  # noqa: E402
    DATA_FILE, GENAI_CONFIG, MODEL_FILE, export_onnx, hf_rope_row_order)
from lmengine.converters.onnx_weights import (  # noqa: E402
    Q4_0, Q4_1, Q4_K, Q8_0, concat_nbits, quantize_4bit, to_nbits)
from lmengine.config import config_from_gguf  # noqa: E402
from tiny_models import hf_logits, make_tiny_model  # noqa: E402

# float32 graph vs float32 PyTorch on the same weights: both accumulate in float32 in different
# orders; over 2 layers the differences are ~1e-6 of the logit scale. 1e-4 (the bound)
# leaves room without hiding any real error (a wrong rope or mask moves logits by > 1e-1).
REL_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine torch's OpenMP team
    otherwise waits ~0.5 s per call for a busy core."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def session_options():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return so


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# -- weights: GGUF blocks -> MatMulNBits ------------------------------------------------------

def _gguf_dequant(raw, type_id, shape):
    return gguf.quants.dequantize(raw.reshape(shape[0], -1), gguf.GGMLQuantizationType(type_id)).reshape(shape)


def _random_q4_k(rng, n_rows, n_cols):
    """Random Q4_K blocks (any bytes are valid blocks once d and dmin are finite)."""
    blocks = rng.integers(0, 256, (n_rows, n_cols // 256, 144), dtype=np.uint8)
    halves = lambda v: np.frombuffer(np.asarray(v, np.float16).tobytes(), np.uint8).reshape(n_rows, -1, 2)
    blocks[:, :, 0:2] = halves(rng.uniform(0.001, 0.02, (n_rows, n_cols // 256)))
    blocks[:, :, 2:4] = halves(rng.uniform(0.0, 0.02, (n_rows, n_cols // 256)))
    return blocks.reshape(-1)


@pytest.mark.parametrize("type_id,bits", [(Q4_0, 4), (Q4_1, 4), (Q8_0, 8), (Q4_K, 4)])
def test_carried_blocks_equal_gguf_dequantize(type_id, bits):
    """The bits carry over: what MatMulNBits (+ block minimums) computes equals ggml's values."""
    rng = np.random.default_rng(type_id)
    shape = (48, 512)
    if type_id == Q4_K:
        raw = _random_q4_k(rng, *shape)
    else:
        w = rng.standard_normal(shape).astype(np.float32)
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType(type_id)).reshape(-1)
    m = to_nbits(raw, type_id, shape)
    assert m.bits == bits and m.packed.shape == (48, 512 // 32, 32 * bits // 8)
    expected = _gguf_dequant(raw, type_id, shape)
    # (q - 0) * d + m in float32 is the gguf package's d * q + m: the same two roundings
    np.testing.assert_array_equal(m.dequantize(), expected)


def test_other_formats_are_requantized_to_4_bits():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    raw = w.astype(np.float16).view(np.uint8).reshape(-1)     # F16 blocks: one f16 per value
    m = to_nbits(raw, 1, w.shape)
    assert m.bits == 4
    w16 = w.astype(np.float16).astype(np.float32)
    q4_1 = gguf.quants.quantize(w16, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(m.dequantize(), gguf.quants.dequantize(q4_1, gguf.GGMLQuantizationType.Q4_1))


def test_concat_nbits_stacks_rows_and_fills_defaults():
    rng = np.random.default_rng(2)
    a = quantize_4bit(rng.standard_normal((8, 64)).astype(np.float32))                 # zero points + mins
    raw = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    b = to_nbits(raw.reshape(-1), Q4_0, (4, 64))                                      # default zero point 8
    both = concat_nbits([a, b])
    np.testing.assert_array_equal(both.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))


@pytest.mark.parametrize("type_id", [Q4_0, Q4_1, Q8_0])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmulnbits_on_carried_blocks(type_id, accuracy_level):
    """onnxruntime's MatMulNBits reads the carried blocks as ggml defines them."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    n_rows, n_cols = 64, 256
    raw = gguf.quants.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32),
                               gguf.GGMLQuantizationType(type_id)).reshape(-1)
    m = to_nbits(raw, type_id, (n_rows, n_cols))
    inits = [numpy_helper.from_array(m.packed, "B"), numpy_helper.from_array(m.scales, "S")]
    inputs = ["A", "B", "S"]
    if m.zero_points is not None:
        inits.append(numpy_helper.from_array(m.zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=n_cols, N=n_rows,
                            bits=m.bits, block_size=32, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, n_cols])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), session_options(),
                             providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]
    w = m.dequantize().astype(np.float64)
    if m.block_mins is not None:
        w -= np.repeat(m.block_mins, 32, axis=1)    # the exporter adds these with a separate Gemm
    expected = x.astype(np.float64) @ w.T
    # level 0: float32 accumulation (~1e-6). level 4: activations rounded to int8 per block of 32,
    # a relative error up to 1/254 per value, which averages to well under 1e-2 over 256 terms.
    tol = 1e-5 if accuracy_level == 0 else 1e-2
    assert rel_err(y, expected) < tol


def test_hf_rope_row_order_undoes_llama_cpp_permutation():
    """llama.cpp's converter permutes attn_q/attn_k rows (converters/hf.py does the same);
    hf_rope_row_order takes them back to HF's order."""
    from lmengine.converters.hf import _permute_qk
    n_heads, head_dim = 3, 8
    w = np.arange(n_heads * head_dim * 2, dtype=np.float32).reshape(n_heads * head_dim, 2)
    gguf_rows = _permute_qk(w, n_heads)
    np.testing.assert_array_equal(gguf_rows[hf_rope_row_order(n_heads, head_dim, head_dim)], w)
    # partial rope: rows from rope_dim on are not rotated and stay in place
    order = hf_rope_row_order(1, 8, 4)
    np.testing.assert_array_equal(order, [0, 2, 1, 3, 4, 5, 6, 7])


# -- the graph on tiny random models ----------------------------------------------------------

class Runner:
    """Feeds an exported graph the way a caller with a KV cache does."""

    def __init__(self, model_dir, config):
        self.session = ort.InferenceSession(os.path.join(model_dir, MODEL_FILE), session_options(),
                                            providers=["CPUExecutionProvider"])
        self.c = config
        self.out_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch):
        return [np.zeros((batch, self.c.n_kv_heads, 0, self.c.head_dim), np.float32)] * (2 * self.c.n_layers)

    def run(self, ids, mask, positions, past):
        feeds = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                 "position_ids": np.asarray(positions, np.int64)}
        for i in range(self.c.n_layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = dict(zip(self.out_names, self.session.run(None, feeds)))
        present = [out[f"present.{i}.{kv}"] for i in range(self.c.n_layers) for kv in ("key", "value")]
        return out["logits"], present


TINY_CASES = [  # (arch, GGUF weight type, export weights, contrib ops, tied embeddings)
    ("llama", "f32", "f32", True, False),
    ("llama", "f32", "f32", False, True),
    ("llama", "q4_1", "int4", True, False),
    ("llama", "q4_1", "int4", False, False),
    ("llama", "q4_0", "int4", True, False),
    ("llama", "q4_1", "f32", True, False),
    ("qwen2", "f32", "f32", True, False),
    ("qwen2", "f32", "f32", False, False),
    ("qwen2", "q4_1", "int4", True, True),
]


@pytest.fixture(scope="module", params=TINY_CASES, ids=lambda c: "-".join(str(x) for x in c))
def tiny_export(request, tmp_path_factory):
    arch, gguf_type, weights, contrib, tied = request.param
    folder = tmp_path_factory.mktemp(f"tiny_{arch}_{gguf_type}")
    hf = make_tiny_model(folder / "model.gguf", arch=arch, weight_type=gguf_type, tied=tied, seed=7)
    f = GGUFFile(folder / "model.gguf")
    config = config_from_gguf(f)
    export_onnx(f, config, str(folder / "onnx"), weights=weights, use_contrib_ops=contrib, accuracy_level=0)
    return hf, config, Runner(str(folder / "onnx"), config)


def test_tiny_prefill_matches_transformers(tiny_export):
    hf, config, runner = tiny_export
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 20)
    logits, present = runner.run(ids[None], np.ones((1, 20)), np.arange(20)[None], runner.empty_past(1))
    assert logits.shape == (1, 20, config.vocab_size)
    assert present[0].shape == (1, config.n_kv_heads, 20, config.head_dim)
    assert rel_err(logits[0], hf_logits(hf, ids)) < REL_TOL


def test_tiny_decode_with_cache_matches_transformers(tiny_export):
    """Prefill 12 tokens, then 8 steps of one token each with present fed back as past."""
    hf, config, runner = tiny_export
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 20)
    expected = hf_logits(hf, ids)
    logits, past = runner.run(ids[None, :12], np.ones((1, 12)), np.arange(12)[None], runner.empty_past(1))
    rows = [logits[0]]
    for t in range(12, 20):
        logits, past = runner.run(ids[None, t:t + 1], np.ones((1, t + 1)), [[t]], past)
        rows.append(logits[0])
        assert past[0].shape[2] == t + 1
    assert rel_err(np.concatenate(rows), expected) < REL_TOL


def test_tiny_left_padded_batch_matches_transformers(tiny_export):
    """3 prompts of different lengths, left padded (mask 0, pad token 0), then 4 decode steps
    together: each row's real positions equal the sequence run alone."""
    hf, config, runner = tiny_export
    rng = np.random.default_rng(2)
    lengths = [9, 4, 13]
    seqs = [rng.integers(0, config.vocab_size, n + 4) for n in lengths]
    width = max(lengths)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    positions = np.zeros((3, width), np.int64)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = seqs[b][:n]
        mask[b, width - n:] = 1
        positions[b, width - n:] = np.arange(n)
    logits, past = runner.run(ids, mask, positions, runner.empty_past(3))
    got = [[logits[b, width - n:]] for b, n in enumerate(lengths)]
    for step in range(4):
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        step_ids = [[seqs[b][n + step]] for b, n in enumerate(lengths)]
        logits, past = runner.run(step_ids, mask, [[n + step] for n in lengths], past)
        for b in range(3):
            got[b].append(logits[b])
    for b in range(3):
        assert rel_err(np.concatenate(got[b]), hf_logits(hf, seqs[b])) < REL_TOL


def test_tiny_contrib_and_standard_graphs_agree(tmp_path):
    """The two graph flavours are the same function (up to float32 rounding)."""
    make_tiny_model(tmp_path / "m.gguf", arch="llama", weight_type="q4_1", seed=3)
    f = GGUFFile(tmp_path / "m.gguf")
    config = config_from_gguf(f)
    outs = []
    for contrib in (True, False):
        export_onnx(f, config, str(tmp_path / f"o{contrib}"), weights="int4", use_contrib_ops=contrib)
        runner = Runner(str(tmp_path / f"o{contrib}"), config)
        ids = np.arange(1, 16)[None] * 7 % config.vocab_size
        outs.append(runner.run(ids, np.ones((1, 15)), np.arange(15)[None], runner.empty_past(1))[0])
        ops = {n.op_type for n in onnx.load(str(tmp_path / f"o{contrib}" / MODEL_FILE)).graph.node}
        assert ("GroupQueryAttention" in ops) == contrib and ("RotaryEmbedding" in ops) == contrib
    assert rel_err(outs[0], outs[1]) < REL_TOL


def test_standard_graph_passes_onnx_checker(tmp_path):
    make_tiny_model(tmp_path / "m.gguf", arch="qwen2", weight_type="f32", seed=4)
    f = GGUFFile(tmp_path / "m.gguf")
    export_onnx(f, config_from_gguf(f), str(tmp_path / "o"), weights="f32", use_contrib_ops=False)
    onnx.checker.check_model(str(tmp_path / "o" / MODEL_FILE), full_check=True)


def test_genai_config(tmp_path):
    make_tiny_model(tmp_path / "m.gguf", arch="llama", n_layers=3, seed=5)
    f = GGUFFile(tmp_path / "m.gguf")
    config = config_from_gguf(f)
    export_onnx(f, config, str(tmp_path / "o"), max_positions=100)
    with open(tmp_path / "o" / GENAI_CONFIG) as fh:
        genai = json.load(fh)
    model = genai["model"]
    assert model["type"] == "llama" and model["vocab_size"] == config.vocab_size
    assert model["context_length"] == 100
    assert model["eos_token_id"] == f.get("tokenizer.ggml.eos_token_id")
    decoder = model["decoder"]
    sizes = (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"])
    assert sizes == (3, config.n_kv_heads, config.head_dim)
    assert decoder["inputs"]["past_key_names"] % 2 == "past_key_values.2.key"
    assert decoder["outputs"]["present_value_names"] % 0 == "present.0.value"
    assert genai["search"]["past_present_share_buffer"] is False


def test_external_data_over_the_limit(tmp_path, monkeypatch):
    """Past the 2 GiB protobuf limit the weights go to model.onnx.data (here: a 64 KiB limit)."""
    make_tiny_model(tmp_path / "m.gguf", arch="llama", seed=6)
    f = GGUFFile(tmp_path / "m.gguf")
    config = config_from_gguf(f)
    export_onnx(f, config, str(tmp_path / "inside"))
    monkeypatch.setattr(onnx_graph, "EMBED_LIMIT", 64 * 1024)
    export_onnx(f, config, str(tmp_path / "outside"))
    assert not (tmp_path / "inside" / DATA_FILE).exists()
    assert (tmp_path / "outside" / DATA_FILE).stat().st_size > (tmp_path / "outside" / MODEL_FILE).stat().st_size
    ids = np.arange(10)[None]
    runners = [Runner(str(tmp_path / d), config) for d in ("inside", "outside")]
    a, b = (r.run(ids, np.ones((1, 10)), ids, r.empty_past(1))[0] for r in runners)
    np.testing.assert_array_equal(a, b)


def test_export_errors(tmp_path):
    make_tiny_model(tmp_path / "m.gguf", arch="llama", seed=8)
    f = GGUFFile(tmp_path / "m.gguf")
    config = config_from_gguf(f)
    with pytest.raises(ConversionError, match="weights='int8'"):
        export_onnx(f, config, str(tmp_path / "o"), weights="int8")
    with pytest.raises(ConversionError, match="accuracy_level"):
        export_onnx(f, config, str(tmp_path / "o"), weights="int4", accuracy_level=7)

    class Gemma2Config:      # an architecture the ONNX export does not cover
        arch = "gemma2"
    with pytest.raises(UnsupportedArchitectureError, match="'gemma2'"):
        export_onnx(f, Gemma2Config(), str(tmp_path / "o"))


# -- the bundled SmolLM2, int4 ----------------------------------------------------------------


