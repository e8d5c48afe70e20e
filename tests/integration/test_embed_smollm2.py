"""LLM.embed and `lmengine embed` on the bundled SmolLM2 (Q4_1 / Q8_0, the default "mixed" int8
path): vectors finite and unit-norm, batch-invariant, and embedding leaves generation alone.
(Exactness against transformers is tests/engine/test_embed_llama.py, on the float32 path.)"""
from __future__ import annotations

import numpy as np
import pytest

from lmengine import LLM, SamplingParams
from lmengine.cli import main

TEXTS = ["The capital of France is Paris.", "hi", "", "用中文写一首关于秋天的诗：",
         "A much longer sentence about embeddings, batching and padding, " * 4]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with LLM(smollm2_path, n_ctx=512, max_batch_size=2) as model:
        yield model


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vectors_are_finite_unit_norm_and_batch_invariant(llm, pooling):
    texts = [t for t in TEXTS if t]   # SmolLM2's tokenizer adds no BOS: "" has no tokens (its own test)
    vectors = llm.embed(texts, pooling=pooling)
    assert vectors.shape == (len(texts), 576) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    # 1e-5: float32 rounding of a 576-value sum of squares and the division
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # each text runs alone through the cache slot: the same arithmetic, bit for bit
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(llm.embed([text], pooling=pooling)[0], vectors[i])
    assert len({v.tobytes() for v in vectors}) == len(texts)        # different texts, different vectors


def test_embed_does_not_disturb_generation(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = llm.generate("Once upon a time", params).token_ids
    got = []
    for chunk in llm.stream("Once upon a time", params):
        got += chunk.token_ids
        llm.embed("The capital of France is Paris.")
    assert got == ref


def test_empty_text_is_refused(llm):
    from lmengine.errors import InvalidParameterError
    with pytest.raises(InvalidParameterError, match="text 0 has no tokens"):
        llm.embed("")


def test_cli_embed_writes_npy(tmp_path, smollm2_path):
    out = tmp_path / "v.npy"
    assert main(["embed", "--model", smollm2_path, "hello world", "bonjour", "-o", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
