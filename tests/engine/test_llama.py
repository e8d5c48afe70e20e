"""The llama forward pass against HF transformers, and the bundled SmolLM2 against the
reference outputs in ../shared/reference/.

Tolerances:
- Tiny models, exact path (float32 activations): 1e-4 of the logit range. Both sides compute in
  float32 from the same weights; only summation order differs (observed ~1e-7).
- SmolLM2 exact path vs transformers' float32 top-10 logits: 0.01 absolute (the issue's bound;
  30 layers of float32 rounding in a different order, observed ~1e-4).
- Fast paths: judged like llama.cpp, by KL divergence and top-1 agreement against the float32
  reference over the Zen of Python (203 predicted tokens; the fast paths with their default f16
  KV cache, as llama.cpp runs). The default "mixed" activations must be at least as good as llama.cpp's
  figures (the issue's bar); "int8x2" must be float-accurate (KL <= 0.001, top-1
  >= 99%: observed 0.0000 and 100%); "int8" (llama.cpp's own arithmetic) must stay within 2x of
  its KL: the two compute the same thing up to rounding details, and a broken kernel is off by
  far more.
"""

import numpy as np
import pytest

from lmengine.converters.gguf_file import GGUFFile
from lmengine import LLM
from lmengine.backends.numba_backend import NumbaLlamaBackend
from lmengine.config import config_from_gguf
from tiny_models import hf_logits, make_tiny_model


TINY_SHAPES = [
    # (arch, n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab, tied, weight_type)
    ("llama", 2, 64, 4, 2, 96, 300, False, "f32"),      # GQA, untied
    ("llama", 2, 64, 4, 4, 96, 300, True, "f32"),       # MHA, tied
    ("llama", 1, 96, 3, 1, 64, 260, False, "q8_0"),     # odd head count, MQA
    ("llama", 2, 160, 5, 5, 128, 300, True, "q4_0"),    # odd head count, MHA, tied
    ("llama", 2, 64, 4, 2, 96, 300, False, "q4_1"),
    ("llama", 2, 64, 2, 1, 96, 300, False, "f16"),
    ("qwen2", 2, 64, 4, 2, 96, 300, False, "q8_0"),     # q/k/v biases, NEOX rope
]


@pytest.fixture(scope="module", params=TINY_SHAPES, ids=lambda s: "-".join(map(str, s)))
def tiny(request, tmp_path_factory):
    arch, n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab, tied, wtype = request.param
    path = tmp_path_factory.mktemp("tiny") / "model.gguf"
    model = make_tiny_model(path, arch=arch, n_layers=n_layers, dim=dim, n_heads=n_heads,
                            n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, vocab_size=vocab, tied=tied,
                            weight_type=wtype, seed=len(request.param[0]) + dim)
    f = GGUFFile(path)
    return model, f, config_from_gguf(f)


def test_tiny_logits_match_transformers_at_every_position(tiny):
    model, f, config = tiny
    backend = NumbaLlamaBackend(f, config, n_ctx=128, n_slots=1, activations="f32")
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 33, 64):
        ids = rng.integers(0, config.vocab_size, n)
        ours = backend.forward(0, ids, 0, all_logits=True)
        ref = hf_logits(model, ids)
        scale = ref.max() - ref.min()
        assert ours.shape == ref.shape == (n, config.vocab_size)
        assert np.abs(ours - ref).max() <= 1e-4 * scale, f"prompt length {n}"


def test_tiny_incremental_decode_equals_one_pass(tiny):
    """Prefill + token-by-token decode through the KV cache == one pass over the whole sequence."""
    model, f, config = tiny
    backend = NumbaLlamaBackend(f, config, n_ctx=64, n_slots=2, activations="f32")
    ids = np.random.default_rng(2).integers(0, config.vocab_size, 24)
    full = backend.forward(0, ids, 0, all_logits=True)
    first = backend.forward(1, ids[:10], 0, all_logits=True)
    steps = [backend.forward_batch(np.array([1]), ids[i:i + 1], np.array([i]))[0] for i in range(10, 24)]
    got = np.concatenate([first, np.stack(steps)])
    scale = full.max() - full.min()
    assert np.abs(got - full).max() <= 1e-5 * scale


def test_tiny_fast_paths_close_to_exact(tiny):
    """int8 activations: within 5% of the logit range of the exact path (one 8-bit rounding per
    activation, through every layer). int8x2: the residual term cuts the activation error ~250x,
    so within 0.1% of the range."""
    model, f, config = tiny
    ids = np.random.default_rng(3).integers(0, config.vocab_size, 32)
    exact = NumbaLlamaBackend(f, config, n_ctx=64, n_slots=1, activations="f32").forward(0, ids, 0, all_logits=True)
    scale = exact.max() - exact.min()
    for activations, bound in (("int8", 0.05), ("mixed", 0.05), ("int8x2", 1e-3)):
        fast = NumbaLlamaBackend(f, config, n_ctx=64, n_slots=1, activations=activations)
        assert np.abs(fast.forward(0, ids, 0, all_logits=True) - exact).max() <= bound * scale, activations


def test_batched_decode_equals_single(tiny):
    """forward_batch over 3 slots == three separate decodes."""
    model, f, config = tiny
    backend = NumbaLlamaBackend(f, config, n_ctx=64, n_slots=3, activations="f32")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, config.vocab_size, n) for n in (5, 9, 3)]
    nxt = rng.integers(0, config.vocab_size, 3)
    singles = []
    for s, p in enumerate(prompts):
        backend.forward(s, p, 0)
        singles.append(hf_logits(model, np.concatenate([p, nxt[s:s + 1]]))[-1])
    batched = backend.forward_batch(np.arange(3), nxt, np.array([len(p) for p in prompts]))
    ref = np.stack(singles)
    assert np.abs(batched - ref).max() <= 1e-4 * (ref.max() - ref.min())


def test_forward_mixed_equals_separate_calls(tiny):
    """forward_mixed (one compiled call for decode rows and prompt chunks of several slots) gives
    bit for bit the logits and cache contents of the separate forward / forward_batch calls
    (the batch invariance of the kernels), and the f32 path matches transformers."""
    from lmengine.errors import ContextLengthError, InvalidParameterError
    model, f, config = tiny
    rng = np.random.default_rng(6)
    seq = [rng.integers(0, config.vocab_size, n) for n in (6, 9, 10)]
    for activations in ("f32", "mixed"):
        joined = NumbaLlamaBackend(f, config, n_ctx=64, n_slots=3, activations=activations)
        alone = NumbaLlamaBackend(f, config, n_ctx=64, n_slots=3, activations=activations)
        for b in (joined, alone):
            b.forward(0, seq[0][:5], 0)                 # slot 0 decodes its 6th token
            b.forward(2, seq[2][:4], 0)                 # slot 2 gets a chunk of 6 (no logits)
        parts = [(0, seq[0][5:], 5, True), (1, seq[1], 0, True), (2, seq[2][4:], 4, False)]
        got = joined.forward_mixed(parts)
        want_1 = alone.forward(1, seq[1], 0)[-1]
        alone.forward(2, seq[2][4:], 4)
        want_0 = alone.forward_batch(np.array([0]), seq[0][5:], np.array([5]))[0]
        assert got[2] is None
        assert np.array_equal(got[0], want_0) and np.array_equal(got[1], want_1), activations
        nxt = np.array([7])                             # slot 2's cache: the same next logits
        assert np.array_equal(joined.forward(2, nxt, 10), alone.forward(2, nxt, 10)), activations
        if activations == "f32":
            for i in (0, 1):
                ref = hf_logits(model, seq[i])[-1]
                assert np.abs(got[i] - ref).max() <= 1e-4 * (ref.max() - ref.min())
    with pytest.raises(InvalidParameterError, match="slot 0 appears in two parts"):
        joined.forward_mixed([(0, seq[0][:1], 0, True), (0, seq[0][1:2], 1, True)])
    with pytest.raises(ContextLengthError):
        joined.forward_mixed([(0, seq[0][:2], 63, True), (1, seq[1][:2], 0, True)])
    with pytest.raises(InvalidParameterError, match="at most"):
        joined.forward_mixed([(0, np.zeros(joined.mixed_tokens, dtype=np.int64), 0, True),
                              (1, seq[1][:1], 0, True)])
    with pytest.raises(InvalidParameterError):
        joined.forward_mixed([(0, np.array([config.vocab_size]), 0, True), (1, seq[1][:1], 0, True)])


def test_kv_cache_dtype(tiny):
    """kv_cache_dtype: "auto" is float32 on the exact path and f16 on the int8 ones; an f16 cache
    changes the exact path's logits by at most 2e-3 of their range at every position of a
    20-token prompt. (f16 keeps 11 significant bits: every key and value is off by up to
    2^-11 = 4.9e-4 of itself, and the logits move by the same order; observed ~1e-4.)"""
    from lmengine.errors import InvalidParameterError
    model, f, config = tiny
    prompt = np.random.default_rng(5).integers(0, config.vocab_size, 20)
    exact = NumbaLlamaBackend(f, config, n_ctx=32, activations="f32")
    assert exact.kv_cache_dtype == "f32" and exact.k_cache.dtype == exact.v_cache.dtype == np.float32
    half = NumbaLlamaBackend(f, config, n_ctx=32, activations="f32", kv_cache_dtype="f16")
    assert half.k_cache.dtype == half.v_cache.dtype == np.uint16          # f16 bits
    assert NumbaLlamaBackend(f, config, n_ctx=32, activations="int8").kv_cache_dtype == "f16"
    ref = exact.forward(0, prompt, 0, all_logits=True)
    got = half.forward(0, prompt, 0, all_logits=True)
    assert np.abs(got - ref).max() <= 2e-3 * (ref.max() - ref.min())
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        NumbaLlamaBackend(f, config, n_ctx=32, kv_cache_dtype="bf16")
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        LLM("no-such-model.gguf", kv_cache_dtype="q8_0")


# --- the bundled SmolLM2 against the reference outputs ---------------------------------------


