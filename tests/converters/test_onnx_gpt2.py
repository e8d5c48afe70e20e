"""ONNX export of gpt2 (learned positions, LayerNorm with bias, tanh GELU, fused q|k|v with bias):
a tiny random HF GPT2LMHeadModel converted by `lmengine convert` to GGUF, exported to ONNX, run by
onnxruntime against transformers' float32 forward at every position (both graph flavours:
contrib ops / standard ops), and run through our onnxruntime backend (`LLM(onnx_dir)`: KV cache
inputs/outputs, left-padded batches) for greedy text equal to transformers' greedy.

Tolerance: 1e-4 of the logit range (as tests/converters/test_onnx_qwen3.py): float32 on both
sides from the same weights, only the summation order differs (observed ~1e-6 of the range)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("USE_HUB_KERNELS", "0")   # transformers 5: no hub kernels (no network in tests)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from encoder_models import convert, make_gpt2_dir                 # noqa: E402

from lmengine import LLM, SamplingParams                          # noqa: E402
from lmengine.config import config_from_gguf                      # noqa: E402
from lmengine.converters.errors import ConversionError            # noqa: E402
from lmengine.converters.gguf_file import GGUFFile                # noqa: E402
from lmengine.converters.onnx_export import MODEL_FILE, export_onnx  # noqa: E402

REL_TOL = 1e-4
N_POSITIONS = 128          # the HF model's learned positions (gpt2.context_length)
PROMPTS = ["the cat", "hello there, the world", "x", "the the the the the the the the the the the"]


def _make(tmp_path_factory, dim):
    """(HF model, converted GGUF path, folder) of a 3-layer, 4-head GPT-2 of width dim."""
    folder = tmp_path_factory.mktemp("gpt2_onnx")
    model = make_gpt2_dir(folder / "hf", n_layers=3, dim=dim, n_heads=4, n_positions=N_POSITIONS, seed=5)
    with torch.no_grad():      # larger weights than HF's init (std 0.02): logits that differ visibly by token
        for name, p in model.named_parameters():
            if name.endswith("weight") and "ln_" not in name:
                p.mul_(8.0)
    model.save_pretrained(folder / "hf")
    path = convert(folder / "hf", folder / "gpt2.gguf")
    return model, path, folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """head_dim 16: onnxruntime's GroupQueryAttention runs it (as gpt2's 64)."""
    return _make(tmp_path_factory, 64)


@pytest.fixture(scope="module")
def gpt2_head12(tmp_path_factory):
    """head_dim 12: GroupQueryAttention refuses head sizes that are not multiples of 8, so the
    contrib export falls back to standard-op attention."""
    return _make(tmp_path_factory, 48)


def _export(path, out_dir, contrib, **kw):
    f = GGUFFile(path)
    try:
        config = config_from_gguf(f)
        export_onnx(f, config, str(out_dir), weights="f32", use_contrib_ops=contrib, **kw)
    finally:
        f.close()
    return config


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


@pytest.mark.parametrize("model_name, contrib", [("gpt2", True), ("gpt2", False), ("gpt2_head12", True)],
                         ids=["contrib", "standard", "contrib-head12"])
def test_gpt2_onnx_logits_match_transformers(request, tmp_path, model_name, contrib):
    """Every position of a 100-token prompt in one run, then 5 decode steps fed the present KV
    back as past: logits equal transformers' on the whole sequence."""
    model, path, _ = request.getfixturevalue(model_name)
    config = _export(path, tmp_path / "onnx", contrib)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "onnx" / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    n, extra = 100, 5
    ids = np.random.default_rng(12).integers(0, config.vocab_size, n + extra)
    ref = _hf_logits(model, ids)
    tol = REL_TOL * np.abs(ref).max()
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, config.n_heads, 0, config.head_dim), np.float32)
            for i in range(config.n_layers) for kv in ("key", "value")}
    outputs = [o.name for o in session.get_outputs()]
    assert outputs[0] == "logits"
    start, width = 0, n
    while start < n + extra:
        feeds = {"input_ids": ids[None, start: start + width].astype(np.int64),
                 "attention_mask": np.ones((1, start + width), np.int64),
                 "position_ids": np.arange(start, start + width, dtype=np.int64)[None], **past}
        results = dict(zip(outputs, session.run(outputs, feeds)))
        assert results["present.0.key"].shape == (1, config.n_heads, start + width, config.head_dim)
        got = results["logits"][0]
        assert np.abs(got - ref[start: start + width]).max() <= tol, f"positions {start}..{start + width - 1}"
        past = {name.replace("present", "past_key_values"): value for name, value in results.items()
                if name.startswith("present")}
        start, width = start + width, 1


def test_gpt2_onnx_greedy_through_ort_backend(gpt2, tmp_path):
    """LLM(onnx_dir) (engine/backends/ort_backend.py: KV stores, left-padded batch of 4 prompts
    of different lengths) generates transformers' greedy tokens over 24 steps."""
    model, path, _ = gpt2
    from lmengine.export import export_onnx_model
    export_onnx_model(path, tmp_path / "onnx")             # what `lmengine convert X.gguf DIR --to onnx` runs
    llm = LLM(str(tmp_path / "onnx"), max_batch_size=4, n_threads=1)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        for prompt, out in zip(PROMPTS, outs):
            ids = llm.tokenizer.encode(prompt)
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                     pad_token_id=0)[0, len(ids):].tolist()
            assert out.token_ids == ref, prompt
    finally:
        llm.close()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gpt2_int4_export_equals_our_backend(gpt2, tmp_path, qtype):
    """`lmengine quantize` to 4-bit blocks, then the int4 export (the blocks carried over bit for
    bit into MatMulNBits, accuracy_level 0: float32 activations) against our gpt2 backend on the
    same file (float32 activations on the same blocks): 1e-4 of the logit range (observed ~1e-6)."""
    from lmengine.converters.quantize import quantize_gguf
    _, path, _ = gpt2
    qpath = str(tmp_path / f"{qtype}.gguf")
    quantize_gguf(path, qpath, qtype, pure=True)
    f = GGUFFile(qpath)
    try:
        config = config_from_gguf(f)
        assert f.tensors["blk.0.attn_qkv.weight"].type_name == qtype
        export_onnx(f, config, str(tmp_path / "onnx"), weights="int4", use_contrib_ops=True, accuracy_level=0)
    finally:
        f.close()
    session = ort.InferenceSession(str(tmp_path / "onnx" / MODEL_FILE), providers=["CPUExecutionProvider"])
    n = 40
    ids = np.random.default_rng(13).integers(0, config.vocab_size, n)
    feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    for i in range(config.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, config.n_heads, 0, config.head_dim), np.float32)
    got = session.run(["logits"], feeds)[0][0]
    llm = LLM(qpath, n_ctx=64, warmup=False)
    try:
        ref = llm.logits(ids.tolist())
    finally:
        llm.close()
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()


def test_gpt2_positions_past_learned_table_are_refused(gpt2, tmp_path):
    _, path, _ = gpt2
    with pytest.raises(ConversionError, match="learned positions"):
        _export(path, tmp_path / "onnx", True, max_positions=N_POSITIONS + 1)
