"""Every tensor of the bundled SmolLM2 decoded by our kernels, against the gguf package."""
import numpy as np
import pytest

from checks import assert_same_floats, ref_dequantize
from lmengine.converters.gguf_file import GGUFFile
from lmengine.kernels import quant as q


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """The bundled model, opened once (parsing its metadata takes seconds)."""
    return GGUFFile(smollm2_path)


def test_every_tensor_of_smollm2(smollm2):
    f = smollm2
    seen_types = set()
    for name, info in f.tensors.items():
        raw = f.tensor_bytes(name)
        ours = q.dequantize(info.type_id, raw, info.shape)
        assert_same_floats(ours, ref_dequantize(info.type_id, raw, info.shape))
        seen_types.add(info.type_name)
    assert seen_types == {"F32", "Q8_0", "Q4_1"}


def test_smollm2_q8_0_requantizes_to_the_same_bytes(smollm2):
    """ggml's Q8_0 maps each block's max |x| to +-127, so quantizing the decoded values again gives
    the file's bytes back: our quantizer agrees with the one that wrote the file."""
    f = smollm2
    info = f.tensors["token_embd.weight"]
    assert info.type_id == q.Q8_0
    raw = np.asarray(f.tensor_bytes("token_embd.weight")).reshape(info.shape[0], -1)
    values = q.dequantize(q.Q8_0, raw, info.shape)
    assert np.array_equal(q.quantize(q.Q8_0, values), raw)
