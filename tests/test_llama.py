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
import json
import math
import os

import numpy as np
import pytest

from converters.gguf_file import GGUFFile
from engine import LLM, SamplingParams
from engine.backends.numba_backend import NumbaLlamaBackend
from engine.config import config_from_gguf
from tiny_models import hf_logits, make_tiny_model

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


def reference_file(name):
    path = os.path.join(REFERENCE, name)
    if not os.path.exists(path):
        pytest.fail(f"reference file {path} is missing (../shared/reference beside the repository)")
    return path


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


def test_kv_cache_dtype(tiny):
    """kv_cache_dtype: "auto" is float32 on the exact path and f16 on the int8 ones; an f16 cache
    changes the exact path's logits by at most 2e-3 of their range at every position of a
    20-token prompt. (f16 keeps 11 significant bits: every key and value is off by up to
    2^-11 = 4.9e-4 of itself, and the logits move by the same order; observed ~1e-4.)"""
    from engine.errors import InvalidParameterError
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

@pytest.fixture(scope="module")
def reference():
    with open(reference_file("smollm2_reference.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def exact_llm(smollm2_path):
    return LLM(smollm2_path, n_ctx=512, activations="f32", max_batch_size=2)


@pytest.fixture(scope="module")
def fast_llm(smollm2_path):
    return LLM(smollm2_path, n_ctx=512, max_batch_size=2)  # the default: "mixed" activations


@pytest.fixture(scope="module")
def int8x2_llm(smollm2_path):
    return LLM(smollm2_path, n_ctx=512, activations="int8x2", max_batch_size=2)


@pytest.fixture(scope="module")
def int8_llm(smollm2_path):
    return LLM(smollm2_path, n_ctx=512, activations="int8", max_batch_size=2)


def test_smollm2_last_position_matches_transformers(exact_llm, reference):
    for prompt in reference["prompts"]:
        ids = prompt["llama_cpp"]["ids"]
        tr = prompt["transformers"]
        top10 = tr.get("top10_last_on_llama_ids") or tr["top10_last"]
        logits = exact_llm.logits(ids)[-1]
        ref_ids = [t for t, _ in top10]
        ref_values = np.array([v for _, v in top10])
        assert int(np.argmax(logits)) == ref_ids[0], prompt["name"]
        assert np.abs(logits[ref_ids] - ref_values).max() <= 0.01, prompt["name"]


def test_smollm2_greedy_continuation(exact_llm, reference):
    """32 greedy tokens (EOS ignored) on the exact path equal transformers' float32 continuation
    for the plain English prompt, and read as the same text."""
    prompt = reference["prompts"][0]
    out = exact_llm.generate(prompt["llama_cpp"]["ids"],
                             SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert out.token_ids == prompt["transformers"]["greedy32_on_llama_ids"]
    assert out.finish_reason == "length"


def _zen_stats(llm_ref, llm_test, ids):
    ref = llm_ref.logits(ids)[:-1].astype(np.float64)
    test = llm_test.logits(ids)[:-1].astype(np.float64)
    def log_softmax(x):
        m = x.max(axis=1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    top1 = (ref.argmax(axis=1) == test.argmax(axis=1)).mean()
    targets = np.array(ids[1:])
    ppl = math.exp(-lq[np.arange(len(targets)), targets].mean())
    return kl.mean(), top1, ppl


def test_smollm2_perplexity_and_fast_path_quality(exact_llm, fast_llm, int8x2_llm, int8_llm):
    with open(reference_file("zen_quality.json"), encoding="utf-8") as fh:
        quality = json.load(fh)
    with open(reference_file("zen.txt"), encoding="utf-8") as fh:
        text = fh.read()
    ids = exact_llm.tokenizer.encode(text)
    assert len(ids) == quality["n_tokens"]
    ppl = exact_llm.perplexity(text)
    assert abs(ppl / quality["reference"]["ppl"] - 1) <= 0.01, ppl
    llama_cpp = quality["llama_cpp"]
    stats = {name: _zen_stats(exact_llm, llm, ids)
             for name, llm in (("mixed", fast_llm), ("int8x2", int8x2_llm), ("int8", int8_llm))}
    print(f"exact ppl {ppl:.3f} (reference {quality['reference']['ppl']:.3f}); "
          + "; ".join(f"{name}: KL {kl:.4f} top-1 {top1:.3f} ppl {p:.3f}" for name, (kl, top1, p) in stats.items())
          + f"; llama.cpp: KL {llama_cpp['mean_kl']:.4f} top-1 {llama_cpp['top1_agree']:.3f} ppl {llama_cpp['ppl']:.3f}")
    kl, top1, _ = stats["mixed"]
    assert kl <= llama_cpp["mean_kl"] and top1 >= llama_cpp["top1_agree"]
    kl, top1, _ = stats["int8x2"]
    assert kl <= 0.001 and top1 >= 0.99
    kl, _, _ = stats["int8"]
    assert kl <= 2 * llama_cpp["mean_kl"]
