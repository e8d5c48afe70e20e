"""ONNX export of LSTM language models (the ONNX LSTM op, state as graph inputs/outputs), run by
onnxruntime, against the Numba backend on the same GGUF.

Tolerance 1e-5 absolute on logits: both run float32 from the same weights (the export dequantizes
the GGUF blocks exactly), so they differ only in summation order and the last bits of sigmoid/tanh.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lmengine.converters.onnx_lstm import export_lstm_onnx, read_lstm_onnx_metadata
from lmengine.converters.torch_lstm import convert_torch_lstm
from lmengine.backends.lstm_backend import LSTMBackend, OrtLSTMBackend
from lmengine.lstm_tokenizer import VocabTokenizer

TOL = 1e-5


def make_state_dict(vocab, emb, hidden, n_layers, seed):
    torch.manual_seed(seed)
    modules = {"embed": torch.nn.Embedding(vocab, emb), "rnn": torch.nn.LSTM(emb, hidden, num_layers=n_layers),
               "fc": torch.nn.Linear(hidden, vocab)}
    sd = {}
    for prefix, module in modules.items():
        for name, p in module.state_dict().items():
            sd[f"{prefix}.{name}"] = torch.randn(p.shape) * 0.3
    return sd


@pytest.fixture(scope="module", params=[(50, 16, 32, 2, "F32"), (5000, 32, 64, 1, "F32"), (300, 32, 64, 2, "Q8_0")],
                ids=["v50-2layers", "v5000-1layer", "q8_0"])
def exported(request, tmp_path_factory):
    vocab, emb, hidden, n_layers, out_type = request.param
    tmp = tmp_path_factory.mktemp("onnx")
    tokens = [f"w{i}" for i in range(vocab)]
    convert_torch_lstm(make_state_dict(vocab, emb, hidden, n_layers, seed=vocab), tmp / "m.gguf", tokens,
                       out_type=out_type, progress=None)
    export_lstm_onnx(tmp / "m.gguf", tmp / "onnx", progress=None)
    return vocab, n_layers, tmp


def test_graph_uses_the_onnx_lstm_op(exported):
    vocab, n_layers, tmp = exported
    model = onnx.load(tmp / "onnx" / "model.onnx")
    assert [n.op_type for n in model.graph.node].count("LSTM") == n_layers
    names = {i.name for i in model.graph.input}
    assert {"input_ids", "sequence_lens", "past_h.0", "past_c.0"} <= names
    config, tokenizer = read_lstm_onnx_metadata(tmp / "onnx")
    assert config["vocab_size"] == vocab and len(config["hidden_sizes"]) == n_layers
    tok = VocabTokenizer.from_metadata(tokenizer, "onnx")
    assert tok.encode("w1 w2 w0") == [1, 2, 0]


def test_onnxruntime_equals_numba(exported):
    vocab, _, tmp = exported
    numba_be = LSTMBackend(tmp / "m.gguf", n_ctx=64, n_slots=4, fast=False)
    ort_be = OrtLSTMBackend(tmp / "onnx", n_ctx=64, n_slots=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, size=n) for n in (9, 1, 5, 12)]       # ragged: sequence_lens
    ours = numba_be.forward_sequences([0, 1, 2, 3], prompts, [0] * 4, all_logits=True)
    theirs = ort_be.forward_sequences([0, 1, 2, 3], prompts, [0] * 4, all_logits=True)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(b, a, rtol=0, atol=TOL)
    for _ in range(4):                                                    # stepping the state
        tokens = rng.integers(0, vocab, size=4)
        a = numba_be.forward_batch([0, 1, 2, 3], tokens, numba_be.lengths.copy())
        b = ort_be.forward_batch([0, 1, 2, 3], tokens, ort_be.lengths.copy())
        np.testing.assert_allclose(b, a, rtol=0, atol=TOL)
    np.testing.assert_allclose(ort_be.state_h, numba_be.state_h, rtol=0, atol=TOL)
    np.testing.assert_allclose(ort_be.state_c, numba_be.state_c, rtol=0, atol=TOL)
