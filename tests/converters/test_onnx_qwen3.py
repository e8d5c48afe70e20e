"""ONNX export of qwen3 (q/k RMSNorm per head; YaRN RoPE): a tiny random HF Qwen3 model converted
by `lmengine convert` to GGUF, then to ONNX, run by onnxruntime against transformers' float32
forward at every position, in both graph flavours (contrib ops / standard ops).

Tolerance: 1e-4 of the logit range (as tests/converters/test_onnx_export.py): float32 on both
sides from the same weights, only the summation order differs (observed ~1e-6)."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lmengine.config import config_from_gguf                      # noqa: E402
from lmengine.convert import convert                              # noqa: E402
from lmengine.converters.gguf_file import GGUFFile                # noqa: E402
from lmengine.converters.onnx_export import MODEL_FILE, export_onnx  # noqa: E402
from tiny_arch_models import VOCAB, hf_logits, make_hf_model      # noqa: E402

REL_TOL = 1e-4


@pytest.mark.parametrize("name", ["qwen3", "qwen3-yarn"])
@pytest.mark.parametrize("contrib", [True, False], ids=["contrib", "standard"])
def test_qwen3_onnx_matches_transformers(tmp_path, name, contrib):
    folder = str(tmp_path / "hf")
    model = make_hf_model(name, folder, seed=11)
    gguf_path = str(tmp_path / "q.gguf")
    convert(folder, gguf_path)
    f = GGUFFile(gguf_path)
    config = config_from_gguf(f)
    export_onnx(f, config, str(tmp_path / "onnx"), weights="f32", use_contrib_ops=contrib)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(tmp_path, "onnx", MODEL_FILE), so, providers=["CPUExecutionProvider"])
    n = 70        # past the YaRN model's 64-token original context
    ids = np.random.default_rng(12).integers(0, VOCAB, n)
    feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    for i in range(config.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, config.n_kv_heads, 0, config.head_dim), np.float32)
    logits = session.run(["logits"], feeds)[0][0]
    ref = hf_logits(model, ids)
    assert np.abs(logits - ref).max() <= REL_TOL * np.abs(ref).max()
