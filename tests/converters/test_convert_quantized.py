"""`lmengine convert HF_DIR out.gguf --weights Q4_K_M` (any `lmengine quantize` type): the HF
directory is converted to F32 and quantized with llama.cpp's per-tensor mix in one command.

The reference is the two steps run by hand (`convert --weights f32`, then `quantize_gguf`): the
tensor bytes must be identical, since the one-command route is meant to be exactly that. The
quantizer's own encodings are checked against `gguf.quants` and llama.cpp in test_quantize.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmengine.convert import convert                                          # noqa: E402
from lmengine.converters.errors import DestinationExistsError, UnknownFileTypeError  # noqa: E402
from lmengine.converters.gguf_file import GGUFFile                            # noqa: E402
from lmengine.converters.quantize import quantize_gguf                        # noqa: E402
from tiny_arch_models import VOCAB, _write_tokenizer                          # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A random llama wide enough (256 columns) for the 256-value K-quant super-blocks."""
    folder = str(tmp_path_factory.mktemp("hf"))
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=None, eos_token_id=VOCAB - 1,
                                      pad_token_id=None, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    _write_tokenizer(folder)
    return folder


def _tensors(path: str) -> dict:
    f = GGUFFile(path)
    out = {name: (info.type_id, bytes(np.asarray(f.tensor_bytes(name)))) for name, info in f.tensors.items()}
    f.close()
    return out


def test_one_command_equals_convert_then_quantize(hf_dir, tmp_path):
    messages = []
    one = str(tmp_path / "one.gguf")
    convert(hf_dir, one, weights="Q4_K_M", progress=messages.append)
    f32 = str(tmp_path / "f32.gguf")
    convert(hf_dir, f32, weights="f32")
    two = str(tmp_path / "two.gguf")
    quantize_gguf(f32, two, "Q4_K_M")

    ours, ref = _tensors(one), _tensors(two)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] == ref[name], name
    types = {GGUFFile(one).tensors[n].type_name for n in ours}
    assert {"Q4_K", "Q6_K"} <= types                      # the mix: Q6_K for output and some ffn_down/attn_v
    assert GGUFFile(one).get("general.file_type") == GGUFFile(two).get("general.file_type")
    assert any("quantize Q4_K_M" in m for m in messages)   # progress reaches the caller
    assert sorted(os.listdir(tmp_path)) == ["f32.gguf", "one.gguf", "two.gguf"]   # no staging file left


def test_unknown_type_and_existing_destination(hf_dir, tmp_path):
    dest = str(tmp_path / "out.gguf")
    with pytest.raises(UnknownFileTypeError, match="Q3_X"):
        convert(hf_dir, dest, weights="Q3_X")
    assert os.listdir(tmp_path) == []
    open(dest, "wb").close()
    with pytest.raises(DestinationExistsError, match="out.gguf"):
        convert(hf_dir, dest, weights="Q6_K")
    assert sorted(os.listdir(tmp_path)) == ["out.gguf"] and os.path.getsize(dest) == 0


def test_failed_quantize_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    """A failure in the quantizing step removes the staging F32 file and writes no DEST."""
    import lmengine.converters.quantize as quantize

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(quantize, "_write_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_dir, str(tmp_path / "out.gguf"), weights="Q5_K_M")
    assert os.listdir(tmp_path) == []


def test_cli(hf_dir, tmp_path):
    out = str(tmp_path / "q.gguf")
    run = subprocess.run([sys.executable, "-m", "lmengine", "convert", hf_dir, out, "--weights", "IQ4_XS"],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "quantize IQ4_XS" in run.stderr
    f = GGUFFile(out)
    assert "IQ4_XS" in {info.type_name for info in f.tensors.values()}
