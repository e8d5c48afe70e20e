"""LLM.embed on llama-family decoders (engine/backends/numba_backend.py `hidden`): tiny random HF
llama and qwen2 models converted by `lmengine convert`, against transformers' float32 base model
(`AutoModel`, whose last_hidden_state is after the final RMSNorm for LlamaModel / Qwen2Model),
pooled the same way; batch invariance; and generation sharing the cache with embeddings.

Tolerance: the exact path (activations="f32", float32 KV cache) against PyTorch float32 on the
same weights: only the summation order differs. The hidden states are O(1) (RMSNorm output times
weights near 1); observed differences are ~1e-6, and 1e-4 is the issue's bound for logits, which
come from these vectors through one more product."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("USE_HUB_KERNELS", "0")   # transformers 5: no hub kernels (no network in tests)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmengine import LLM, SamplingParams                        # noqa: E402
from lmengine.backends import numba_backend                     # noqa: E402
from lmengine.convert import convert                            # noqa: E402
from lmengine.errors import InvalidParameterError               # noqa: E402
from tiny_arch_models import COMMON, _write_tokenizer           # noqa: E402

ATOL = 1e-4
TEXTS = ["the cat", "x", "hello there, the world is wide and the sea is deep",
         "the the the the the the the the the the the the the the the the the the the the", "Ünïcödé ✓ 🎉"]
CONFIGS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    """(name, HF folder, our LLM on the converted GGUF, exact path)."""
    name = request.param
    folder = str(tmp_path_factory.mktemp(name))
    config_cls, model_cls = CONFIGS[name]
    torch.manual_seed(len(name))
    config = getattr(transformers, config_cls)(**COMMON, num_hidden_layers=2)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():      # norms away from 1 and random q/k/v biases (qwen2), so both are tested
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    _write_tokenizer(folder)
    path = os.path.join(folder, "model.gguf")
    convert(folder, path)                     # what `lmengine convert HF_DIR out.gguf` runs
    llm = LLM(path, activations="f32", n_ctx=256, max_batch_size=1, warmup=False)
    yield name, folder, llm
    llm.close()


def _hf_hidden(folder, ids) -> np.ndarray:
    """float32 [n, dim]: transformers' last_hidden_state of the base model (after the final norm)."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0].numpy()


@pytest.mark.parametrize("normalize", [False, True])
def test_embed_equals_transformers_last_and_mean(tiny, normalize):
    name, folder, llm = tiny
    last = llm.embed(TEXTS, normalize=normalize)                 # default pooling: last token
    mean = llm.embed(TEXTS, normalize=normalize, pooling="mean")
    assert last.dtype == mean.dtype == np.float32 and last.shape == (len(TEXTS), COMMON["hidden_size"])
    for i, text in enumerate(TEXTS):
        hidden = _hf_hidden(folder, llm.tokenizer.encode(text))
        ref_last, ref_mean = hidden[-1], hidden.mean(0)
        if normalize:
            ref_last, ref_mean = ref_last / np.linalg.norm(ref_last), ref_mean / np.linalg.norm(ref_mean)
        np.testing.assert_allclose(last[i], ref_last, atol=ATOL, rtol=0, err_msg=f"{name} last: {text!r}")
        np.testing.assert_allclose(mean[i], ref_mean, atol=ATOL, rtol=0, err_msg=f"{name} mean: {text!r}")


def test_embed_is_batch_invariant(tiny):
    """A text's vector does not depend on the other texts of the call, nor on batch_size: each
    text runs alone through the cache slot, so the arithmetic is the same, bit for bit."""
    _, _, llm = tiny
    together = llm.embed(TEXTS, pooling="mean")
    for i, text in enumerate(TEXTS):
        np.testing.assert_array_equal(llm.embed([text], pooling="mean")[0], together[i])
    np.testing.assert_array_equal(llm.embed(TEXTS[::-1], pooling="mean", batch_size=2)[::-1], together)


def test_long_text_runs_in_chunks(tiny, monkeypatch):
    """A text longer than the prefill chunk runs as several compiled calls (positions continue in
    the slot): the same vectors as transformers' single pass."""
    _, folder, llm = tiny
    monkeypatch.setattr(numba_backend, "PREFILL_CHUNK", 7)
    text = TEXTS[3]
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 2 * 7
    hidden = _hf_hidden(folder, ids)
    np.testing.assert_allclose(llm.embed(text, normalize=False, pooling="mean")[0], hidden.mean(0), atol=ATOL, rtol=0)
    np.testing.assert_allclose(llm.embed(text, normalize=False)[0], hidden[-1], atol=ATOL, rtol=0)


def test_embed_between_decode_steps_leaves_generation_alone(tiny):
    """Embeddings borrow a free cache slot: a stream paused between tokens (its slot busy) and
    the prefix cache of a finished request give the same tokens as without embeddings."""
    _, _, llm = tiny
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [5, 17, 256, 99, 3, 40, 41]
    ref = llm.generate(prompt, params).token_ids
    got = []
    for chunk in llm.stream(prompt, params):
        got += chunk.token_ids
        llm.embed(TEXTS[:2])                       # the stream holds one of the two slots
    assert got == ref
    llm.embed(TEXTS)                               # the finished stream's slot keeps its cached prompt
    assert llm.generate(prompt, params).token_ids == ref


def test_bad_pooling_and_empty_text(tiny):
    _, _, llm = tiny
    with pytest.raises(InvalidParameterError, match="pooling"):
        llm.embed("x", pooling="max")
    with pytest.raises(InvalidParameterError, match="text 1 has no tokens"):
        llm.embed(["a", ""])
    assert llm.embed([]).shape == (0, COMMON["hidden_size"])
