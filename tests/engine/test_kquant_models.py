"""Whole models whose matrices are K-quants (and IQ4_XS), as people download them: a tiny random
llama (dims multiples of 256, so every matrix takes the K-quant kernels), quantized by
`lmengine quantize` into llama.cpp's mixes, then run by the Numba backend. Also the 32-value
types with their own int8 kernels (Q5_0, Q5_1, IQ4_NL), quantized `--pure` so that every matrix
has that type.

References:
- the exact path (activations="f32": float32 activations against the same blocks decoded on the
  fly) for the integer paths' accuracy;
- HF transformers on the same dequantized weights, for the exact path itself;
- the same backend one sequence at a time, for batched decode (bit for bit).
"""
import copy

import numpy as np
import pytest

from lmengine.backends.numba_backend import NumbaLlamaBackend
from lmengine.config import config_from_gguf
from lmengine.converters.gguf_file import GGUFFile
from lmengine.converters.quantize import quantize_gguf
from lmengine.kernels import native
from lmengine.kernels.quant import IQ4_XS, Q4_K, Q5_K, Q6_K
from tiny_models import _load_back, hf_logits, make_tiny_model

MIXES = ["Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS"]
PURE = ["Q5_0", "Q5_1", "IQ4_NL"]            # every matrix of the file of this type
PROMPT = np.array([5, 17, 99, 3, 250, 41, 7, 120, 64, 33], dtype=np.int64)


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kq") / "f32.gguf"
    hf = make_tiny_model(path, n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=300,
                         weight_type="f32", seed=11)
    return path, hf


def _quantized(f32_model, tmp_path_factory, name):
    """(name, GGUFFile, config) of the f32 model quantized by `lmengine quantize` to `name`."""
    dst = tmp_path_factory.mktemp("kq") / f"{name}.gguf"
    quantize_gguf(str(f32_model[0]), str(dst), name, pure=name in PURE)
    f = GGUFFile(dst)
    return name, f, config_from_gguf(f)


@pytest.fixture(scope="module", params=MIXES + PURE)
def k_model(request, f32_model, tmp_path_factory):
    return _quantized(f32_model, tmp_path_factory, request.param)


@pytest.fixture(scope="module", params=MIXES)
def mix_model(request, f32_model, tmp_path_factory):
    """The mixes only: their K-quant and IQ4_XS matrices have a packed layout."""
    return _quantized(f32_model, tmp_path_factory, request.param)


def _backend(k_model, activations, n_slots=1):
    _, f, config = k_model
    return NumbaLlamaBackend(f, config, n_ctx=64, n_slots=n_slots, activations=activations)


def test_the_mix_holds_k_types(k_model):
    name, f, _ = k_model
    types = {info.type_name for n, info in f.tensors.items() if n.endswith(".weight") and len(info.shape) == 2}
    if name in PURE:
        assert types == {name}, types
        return
    expected = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}}.get(name)
    if expected is not None:
        assert expected <= types, types
    assert types & {"Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}


def test_exact_path_matches_transformers(k_model, f32_model):
    """The float path over the K blocks equals HF transformers run on the same weights, decoded by
    the gguf package (relative to the logit range, 1e-4: float32 summation order only)."""
    _, f, _ = k_model
    hf = copy.deepcopy(f32_model[1])
    _load_back(hf, str(f.path), "llama", 4, 2, 2, False)
    reference = hf_logits(hf, PROMPT)
    ours = _backend(k_model, "f32").forward(0, PROMPT, 0, all_logits=True)
    assert np.abs(ours - reference).max() <= 1e-4 * (reference.max() - reference.min())


@pytest.mark.parametrize("activations", ["int8", "mixed", "int8x2"])
def test_integer_paths_track_the_exact_path(k_model, activations):
    """Q8_K activations (one int8 term per 256 values, llama.cpp's arithmetic) move the logits by
    under 1% of their range on these random weights; two terms by about 1e-4. Measured over the
    four mixes (max |fast - exact| / logit range): int8 0.85-0.89%, mixed (two terms for k and v)
    0.66-0.78%, int8x2 0.012-0.013%; over the pure Q5_0 / Q5_1 / IQ4_NL files (32-value activation
    blocks): int8 0.55-0.65%, mixed 0.47-0.57%, int8x2 0.011-0.012%. Bounds: 2%, 2% and 0.05%,
    2-4x those, so that a changed rounding passes and a wrong scale or sub-block (errors of tens of
    percent) does not."""
    exact = _backend(k_model, "f32").forward(0, PROMPT, 0, all_logits=True)
    fast = _backend(k_model, activations).forward(0, PROMPT, 0, all_logits=True)
    assert not np.array_equal(fast, exact)            # the integer path was taken, not the float one
    bound = {"int8": 0.02, "mixed": 0.02, "int8x2": 5e-4}[activations]
    assert np.abs(fast - exact).max() <= bound * (exact.max() - exact.min())
    assert (fast.argmax(axis=1) == exact.argmax(axis=1)).mean() >= 0.8


def test_batched_decode_equals_one_by_one(k_model):
    """Three sequences decoded in one forward_batch give the same bits as each one alone."""
    prompts = [PROMPT[:4], PROMPT[2:9], PROMPT[5:]]
    together = _backend(k_model, "mixed", n_slots=3)
    alone = _backend(k_model, "mixed", n_slots=1)
    tokens = []
    for slot, p in enumerate(prompts):
        together.forward(slot, p, 0)
        tokens.append(int(p[-1]))
    batch = together.forward_batch(np.arange(3), np.array(tokens), np.array([len(p) for p in prompts]))
    for i, p in enumerate(prompts):
        alone.forward(0, p, 0)
        single = alone.forward_batch(np.array([0]), np.array([tokens[i]]), np.array([len(p)]))
        assert np.array_equal(batch[i], single[0])


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


# rms(packed - exact) / rms(row-major - exact), measured over the four mixes: int8 0.65-0.79,
# mixed 0.71-0.79 (finer activation scales: the packed path is more accurate), int8x2 0.93-1.11
# (both at the two-term floor, ~1e-4 of the logit range, where float32 order decides). Bounds: 1.0,
# 1.0 and 1.25: a lost term or a wrong group scale multiplies the error many times.
PACKED_K_RMS_RATIO = {"int8": 1.0, "mixed": 1.0, "int8x2": 1.25}


@pytest.mark.parametrize("activations", ["int8", "mixed", "int8x2"])
def test_packed_k_matrices_track_the_exact_path_as_well(mix_model, activations):
    """The mixes' Q4_K, Q5_K, Q6_K and IQ4_XS matrices in the packed layout (kernels/csrc/packed.c:
    32-value activation blocks) against the same file on the row-major K kernels (Q8_K: one activation
    scale per 256 values): the packed model is at least as close to the exact path
    (PACKED_K_RMS_RATIO)."""
    name, f, config = mix_model
    if not native.HAVE_NATIVE:
        pytest.skip("packing needs the C extension")
    packed = NumbaLlamaBackend(f, config, n_ctx=64, activations=activations, pack=True)
    row_major = NumbaLlamaBackend(f, config, n_ctx=64, activations=activations, pack=False)
    packed_types = {int(t) for name in ("attn_q", "ffn_gate", "ffn_up")
                    for t in getattr(packed.weights.model, name).w_type}
    assert packed_types & {Q4_K, Q5_K, Q6_K, IQ4_XS} and packed.weights.n_packed > 0 and row_major.weights.n_packed == 0
    exact = _backend(mix_model, "f32").forward(0, PROMPT, 0, all_logits=True)
    got = packed.forward(0, PROMPT, 0, all_logits=True)
    ref = row_major.forward(0, PROMPT, 0, all_logits=True)
    assert _rms(got - exact) <= PACKED_K_RMS_RATIO[activations] * _rms(ref - exact)
