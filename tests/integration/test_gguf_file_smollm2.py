"""The bundled SmolLM2 GGUF read by our reader, against the gguf package."""
import numpy as np

from checks import assert_same_as_gguf_package
from lmengine.config import config_from_gguf
from lmengine.converters.gguf_file import GGUFFile


def test_bundled_model_matches_gguf_package(smollm2_path):
    assert_same_as_gguf_package(smollm2_path)


def test_bundled_model_config(smollm2_path):
    c = config_from_gguf(GGUFFile(smollm2_path))
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert (c.ffn_dim, c.head_dim, c.rope_dim, c.rope_base) == (1536, 64, 64, 100000.0)
    assert c.tied_output and c.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_tensor_views_are_zero_copy(smollm2_path):
    f = GGUFFile(smollm2_path)
    view = f.tensor_bytes("token_embd.weight")
    assert np.shares_memory(view, f.data)
