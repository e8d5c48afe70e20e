"""The bert encoder and LLM.embed against Hugging Face transformers (float32), on a tiny random
BertModel converted with `lmengine convert` (tests/encoder_models.py)."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

os.environ.setdefault("USE_HUB_KERNELS", "0")   # transformers 5: no hub kernels (no network in tests)

from encoder_models import convert, make_bert_dir  # noqa: E402

from lmengine import LLM  # noqa: E402
from lmengine.errors import InvalidParameterError, MetadataError  # noqa: E402

TEXTS = ["the cat sat on the mat.", "hello world!", "", "dogs running fast, embeds", "a b c d e f g h i " * 3,
         "The Cat", "zzz unknown ﬁ words", "the dog"]
# float32 against float32 in another summation order: the hidden states of a 2-layer model with
# unit-scale activations agree to ~1e-6; 1e-4 leaves room for BLAS blocking differences.
ATOL = 1e-4


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    model = make_bert_dir(folder / "hf", pooling="mean")
    path = convert(folder / "hf", folder / "bert.gguf")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "hf"))
    return model, tokenizer, LLM(path, n_threads=2), path


def hf_hidden(model, tokenizer, texts):
    import torch
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state.numpy()
    return out, batch["attention_mask"].numpy(), batch["input_ids"].numpy()


def test_tokens_equal_hf(bert):
    _, tokenizer, llm, _ = bert
    for text in TEXTS:
        assert llm.tokenizer.encode(text) == tokenizer(text)["input_ids"], text


def test_hidden_states_equal_hf_at_every_position(bert):
    model, tokenizer, llm, _ = bert
    ref, mask, ids = hf_hidden(model, tokenizer, TEXTS)
    ours = llm.backend.hidden(ids.astype(np.int64), mask.sum(1).astype(np.int64))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=ATOL, rtol=0)


def test_embed_mean_pooling_equals_hf(bert):
    model, tokenizer, llm, _ = bert
    ref, mask, _ = hf_hidden(model, tokenizer, TEXTS)
    pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(llm.embed(TEXTS, normalize=False), pooled, atol=ATOL, rtol=0)
    normed = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    ours = llm.embed(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, normed, atol=ATOL, rtol=0)


def test_cls_and_last_pooling(bert):
    model, tokenizer, llm, _ = bert
    ref, mask, _ = hf_hidden(model, tokenizer, TEXTS)
    np.testing.assert_allclose(llm.embed(TEXTS, normalize=False, pooling="cls"), ref[:, 0], atol=ATOL, rtol=0)
    last = ref[np.arange(len(TEXTS)), mask.sum(1) - 1]
    np.testing.assert_allclose(llm.embed(TEXTS, normalize=False, pooling="last"), last, atol=ATOL, rtol=0)


def test_batched_equals_one_by_one(bert):
    llm = bert[2]
    together = llm.embed(TEXTS, batch_size=3)
    alone = np.concatenate([llm.embed([t]) for t in TEXTS])
    # padding is masked out exactly; only BLAS blocking over a different row count differs
    np.testing.assert_allclose(together, alone, atol=1e-6, rtol=0)


def test_truncation_keeps_sep(bert):
    model, tokenizer, llm, _ = bert
    long_text = "the cat " * 100          # 200 pieces + [CLS] [SEP] > 64 positions
    ids = tokenizer(long_text, truncation=True, max_length=64)["input_ids"]
    assert len(ids) == 64 and ids[-1] == 3
    ref, _, _ = hf_hidden(model, tokenizer, [tokenizer.decode(ids[1:-1])])
    ours = llm.embed([long_text], normalize=False)
    np.testing.assert_allclose(ours[0], ref[0].mean(0), atol=ATOL, rtol=0)


def test_config_from_metadata(bert):
    llm = bert[2]
    c = llm.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.ffn_dim, c.pooling, c.n_ctx_train) == \
        ("bert", 2, 32, 4, 64, "mean", 64)


def test_missing_key_is_named(bert):
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.models.bert import config_from_gguf
    f = GGUFFile(bert[3])
    for key in ("bert.block_count", "bert.embedding_length", "bert.attention.head_count",
                "bert.attention.layer_norm_epsilon", "bert.context_length", "bert.feed_forward_length"):
        meta = {k: v for k, v in f.metadata.items() if k != key}
        fake = types.SimpleNamespace(path=f.path, tensors=f.tensors, get=lambda k, d=None, m=meta: m.get(k, d))
        with pytest.raises(MetadataError, match=key.replace(".", r"\.")):
            config_from_gguf(fake)


def test_bad_input(bert):
    llm = bert[2]
    with pytest.raises(InvalidParameterError, match="pooling"):
        llm.embed(["x"], pooling="max")
    with pytest.raises(InvalidParameterError):
        llm.embed([1, 2])
    with pytest.raises(InvalidParameterError, match="embeddings"):
        llm.generate("the cat")
    assert llm.embed([]).shape == (0, 32)


def test_llama_cpp_agrees(bert):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = bert[2]
    try:
        ref_model = llama_cpp.Llama(model_path=bert[3], embedding=True, verbose=False, n_ctx=64)
    except Exception as e:      # noqa: BLE001 - an old llama.cpp without this architecture
        pytest.skip(f"llama_cpp cannot load the converted bert file: {e}")
    texts = ["the cat sat on the mat.", "hello world!"]
    ref = np.array([ref_model.embed(t, normalize=True) for t in texts], dtype=np.float32)
    ours = llm.embed(texts)
    # llama.cpp runs F32 ggml kernels with its own summation order: agreement to ~1e-5
    cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.9999, cos
