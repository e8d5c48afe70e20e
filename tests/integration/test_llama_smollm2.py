"""The bundled SmolLM2 end to end: llama.cpp and transformers reference outputs, zen.txt quality."""
import json

import numpy as np
import pytest

from lmengine import LLM, SamplingParams
from lmengine.bench.quality import logit_quality
from references import reference_file


@pytest.fixture(scope="module")
def reference():
    with open(reference_file("smollm2_reference.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _zen_stats(llm_ref, llm_test, ids):
    """(mean KL(ref || test), top-1 agreement, test perplexity) over every position of ids."""
    q = logit_quality(llm_ref.logits(ids), llm_test.logits(ids), ids)
    return q.mean_kl, q.top1_agree, q.ppl


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
