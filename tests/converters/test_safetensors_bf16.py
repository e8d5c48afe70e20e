"""converters/hf.py reads bfloat16 safetensors (most Hugging Face checkpoints), which
safetensors.numpy refuses: `read_safetensors_widened` against PyTorch's own reading of the file."""
import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lmengine.converters.errors import ConversionError
from lmengine.converters.hf import load_hf_state_dict, read_safetensors_widened


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.up_proj.weight": (torch.randn(48, 32, generator=g) * 3).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(10, 32, generator=g).to(torch.float16),
        "lm_head.weight": torch.randn(10, 32, generator=g),
        "position_ids": torch.arange(7, dtype=torch.int64),
    }


def test_bf16_file_reads_exactly_as_torch_does(tmp_path):
    tensors = _tensors()
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    # (safetensors.numpy refuses this file with a TypeError unless ml_dtypes, which registers a
    # NumPy bfloat16, was imported before -- by onnx or keras, say: the converter must work both ways)
    got = read_safetensors_widened(str(tmp_path / "model.safetensors"))
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        assert got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want, err_msg=name)   # bf16/f16 -> f32: exact widenings
    state = load_hf_state_dict(str(tmp_path))      # the converter's entry point: every tensor float32
    assert all(v.dtype == np.float32 for v in state.values())
    np.testing.assert_array_equal(state["model.norm.weight"], tensors["model.norm.weight"].float().numpy())


def test_bf16_file_reads_the_same_when_ml_dtypes_is_loaded(tmp_path):
    """With ml_dtypes imported, safetensors.numpy reads bf16 itself: the same float32 values."""
    pytest.importorskip("ml_dtypes")
    tensors = _tensors()
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    state = load_hf_state_dict(str(tmp_path))
    for name, t in tensors.items():
        np.testing.assert_array_equal(state[name], t.float().numpy(), err_msg=name)


def _write(path, header: dict, body: bytes, header_len=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + body)


@pytest.mark.parametrize("header, body, header_len, needle", [
    ({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 6, None, "data offsets"),
    ({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "data offsets"),
    ({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, None, "F8_E4M3"),
    ({"w": {"dtype": "BF16", "shape": [4]}}, b"\0" * 8, None, "malformed"),
    ({"w": {}}, b"", 1 << 40, "header length"),
])
def test_malformed_files_are_named_errors(tmp_path, header, body, header_len, needle):
    path = tmp_path / "bad.safetensors"
    _write(path, header, body, header_len)
    with pytest.raises(ConversionError, match=needle):
        read_safetensors_widened(str(path))
