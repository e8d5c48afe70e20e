"""GPT-2 against Hugging Face transformers float32: a tiny random GPT2LMHeadModel converted with
`lmengine convert` (tests/encoder_models.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("USE_HUB_KERNELS", "0")   # transformers 5: no hub kernels (no network in tests)

from encoder_models import convert, make_gpt2_dir  # noqa: E402

from lmengine import LLM, SamplingParams  # noqa: E402

# float32 against float32 in another summation order (BLAS blocking, LayerNorm in float64):
# logits of this 2-layer model agree to ~1e-6; 1e-4 is the bound.
ATOL = 1e-4
PROMPTS = ["the cat", "hello there, the world", "x", "the the the the the the the the the the the"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    model = make_gpt2_dir(folder / "hf")
    path = convert(folder / "hf", folder / "gpt2.gguf")
    return model, LLM(path, n_threads=2, max_batch_size=4), path


def hf_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_logits_every_position_batch1(gpt2):
    model, llm, _ = gpt2
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        np.testing.assert_allclose(llm.logits(ids), hf_logits(model, ids), atol=ATOL, rtol=0)


def test_logits_batch4_different_lengths(gpt2):
    """Four sequences of different lengths in one padded HF batch vs our batched decode."""
    import torch
    model, llm, _ = gpt2
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.numpy()
    backend = llm.backend
    for slot, s in enumerate(seqs):                 # prompts: every position's logits
        got = backend.forward(slot, np.array(s[:1]), 0, all_logits=True)
        np.testing.assert_allclose(got[0], ref[slot, 0], atol=ATOL, rtol=0)
    for pos in range(1, width):                     # then one batched step per position
        live = [i for i, s in enumerate(seqs) if pos < len(s)]
        got = backend.forward_batch(np.array(live), np.array([seqs[i][pos] for i in live]), np.full(len(live), pos))
        for row, i in enumerate(live):
            np.testing.assert_allclose(got[row], ref[i, pos], atol=ATOL, rtol=0)


def test_greedy_text_equals_hf(gpt2):
    import torch
    model, llm, _ = gpt2
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                 pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref, prompt


def test_embed_last_and_mean(gpt2):
    import torch
    model, llm, _ = gpt2
    texts = ["the cat", "hello there, the world", "x"]
    for text, last, mean in zip(texts, llm.embed(texts, normalize=False),
                                llm.embed(texts, normalize=False, pooling="mean")):
        ids = llm.tokenizer.encode(text)
        with torch.no_grad():
            hidden = model.transformer(torch.tensor([ids])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(last, hidden[-1], atol=ATOL, rtol=0)
        np.testing.assert_allclose(mean, hidden.mean(0), atol=ATOL, rtol=0)


def test_context_past_learned_positions_is_refused(gpt2):
    from lmengine.errors import ContextLengthError
    with pytest.raises(ContextLengthError):
        LLM(gpt2[2], n_ctx=1000)


def test_llama_cpp_top1_agrees(gpt2):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, llm, path = gpt2
    try:
        ref = llama_cpp.Llama(model_path=path, logits_all=True, verbose=False, n_ctx=128)
    except Exception as e:      # noqa: BLE001
        pytest.skip(f"llama_cpp cannot load the converted gpt2 file: {e}")
    ids = llm.tokenizer.encode(PROMPTS[1])
    ref.eval(ids)
    theirs = np.array(ref.scores[:len(ids)], dtype=np.float32)
    ours = llm.logits(ids)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
