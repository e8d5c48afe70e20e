"""The public API on the bundled SmolLM2: generate / stream / chat / logits / Generator,
cache reuse and rewind, batching, errors, and `lmengine convert` (the other CLI verbs: test_cli.py)."""

import numpy as np
import pytest

from lmengine import LLM, SamplingParams
from lmengine.errors import ContextLengthError, InvalidParameterError, LMEngineError, TokenIdError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, n_ctx=256, max_batch_size=16)


def test_generate_returns_completion(llm):
    out = llm.generate("The capital of France is", GREEDY)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 12 and out.n_completion_tokens == 12
    assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is")
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_prompt_as_token_ids_equals_text(llm):
    ids = llm.tokenizer.encode("Hello there")
    assert llm.generate(ids, GREEDY).token_ids == llm.generate("Hello there", GREEDY).token_ids


@pytest.mark.parametrize("prompt", ["Once upon a time", "用中文写一首关于秋天的诗：", "Emoji test: 🎉🎉"])
def test_stream_concatenation_equals_generate(llm, prompt):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    chunks = list(llm.stream(prompt, params))
    out = llm.generate(prompt, params)
    assert "".join(c.text for c in chunks) == out.text
    assert [t for c in chunks for t in c.token_ids] == out.token_ids
    assert chunks[-1].finish_reason == out.finish_reason == "length"
    assert all("\ufffd" not in c.text for c in chunks) or "\ufffd" in out.text


def test_seeded_sampling_stream_equals_generate(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    streamed = "".join(c.text for c in llm.stream("Tell me a story", params))
    assert streamed == llm.generate("Tell me a story", params).text


def test_stop_string_spanning_tokens(llm):
    free = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    words = free.text.split()
    assert len(words) >= 4
    stop = words[2][1:] + " " + words[3][:2]  # spans a word boundary, hence several tokens
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    out = llm.generate("The quick brown fox", params)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    streamed = "".join(c.text for c in llm.stream("The quick brown fox", params))
    assert streamed == out.text
    kept = llm.generate("The quick brown fox", params.replace(include_stop_str_in_output=True))
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]


def test_stop_token_ids_and_eos(llm):
    free = llm.generate("One, two, three,", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stop_id = free.token_ids[3]
    out = llm.generate("One, two, three,", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                           stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]


def test_chat_uses_the_template_and_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is 2 + 2?"}], SamplingParams(temperature=0, max_tokens=64))
    rendered = llm.render_chat([{"role": "user", "content": "What is 2 + 2?"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered)
    assert "4" in out.text
    assert out.finish_reason == "stop" and out.stop_reason in llm.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_logits_shape_and_consistency(llm):
    ids = llm.tokenizer.encode("a b c d e f")
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.vocab_size) and logits.dtype == np.float32
    prefix = llm.logits(ids[:3])
    np.testing.assert_allclose(prefix, logits[:3], rtol=0, atol=1e-3)


def test_cache_reuse_equals_fresh_run(smollm2_path):
    """Two calls sharing a prefix (the second reuses the cached prefix) give the same tokens as
    a fresh LLM that computes everything."""
    a = LLM(smollm2_path, n_ctx=128, max_batch_size=1)
    b = LLM(smollm2_path, n_ctx=128, max_batch_size=1)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a.generate("The history of the Roman empire", params)
    reused = a.generate("The history of the Roman empire is long", params)
    assert a.slots.tokens[0][:6] == a.tokenizer.encode("The history of the Roman empire")[:6]
    fresh = b.generate("The history of the Roman empire is long", params)
    assert reused.token_ids == fresh.token_ids
    ids = a.tokenizer.encode("The history of the Roman empire is long")
    np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-4)


def test_generator_rewind_regenerates_the_same_tokens(llm):
    g = llm.generator("In the beginning", SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True))
    try:
        while not g.is_done():
            g.step()
        first = list(g.generated)
        g.rewind_to(g.n_prompt + 5)
        assert g.generated == first[:5]
        while not g.is_done():
            g.step()
        assert g.generated == first
    finally:
        g.close()


def test_batched_greedy_equals_one_by_one(llm):
    prompts = [f"Fact number {i}: the" for i in range(8)] + \
              ["Hello", "def f(x):", "1, 1, 2, 3, 5,", "Paris is", "The moon", "Water boils at", "I think", "Rain"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batched = llm.generate(prompts, params)
    assert len(batched) == 16
    for prompt, out in zip(prompts, batched):
        single = llm.generate(prompt, params)
        if single.token_ids != out.token_ids:
            # float summation order differs between batch sizes: report and bound the difference
            ids = llm.tokenizer.encode(prompt)
            k = next(i for i, (x, y) in enumerate(zip(single.token_ids, out.token_ids)) if x != y)
            la = llm.logits(ids + single.token_ids[:k])[-1]
            top2 = np.sort(la)[-2:]
            pytest.fail(f"prompt {prompt!r} diverges at token {k}; top-2 logit gap {top2[1] - top2[0]:.2e}")


def test_seed_reproducible_across_batch_compositions(llm):
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate("Write a haiku", params)
    in_batch = llm.generate(["Something else", "Write a haiku", "A third prompt"], params)[1]
    assert alone.token_ids == in_batch.token_ids


def test_n_samples(llm):
    out = llm.generate("Colors:", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.text == out.outputs[0].text


def test_logprobs(llm):
    out = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))
    assert len(out.logprobs) == 4
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.rank == 1 and lp.top_token_ids[0] == tok
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3


def test_stream_cancel_frees_the_slot(llm):
    busy_before = sum(llm.slots.busy)
    it = llm.stream("Count to one hundred:", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    llm.generate("x", SamplingParams(max_tokens=1))  # a step retires the cancelled request
    assert sum(llm.slots.busy) == busy_before


def test_errors(llm):
    with pytest.raises(ContextLengthError, match="300 tokens.*256"):
        llm.generate(list(range(300)), GREEDY)
    with pytest.raises(TokenIdError, match="49152"):
        llm.generate([1, 2, 49152], GREEDY)
    with pytest.raises(TokenIdError):
        llm.logits([-1])
    with pytest.raises(InvalidParameterError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidParameterError):
        llm.generate(3.5, GREEDY)
    with pytest.raises(LMEngineError, match="not found"):
        LLM("/nonexistent/model.gguf")
    with pytest.raises(InvalidParameterError, match="n_ctx"):
        LLM("smollm2", n_ctx=0)


def test_generation_stops_at_full_context(smollm2_path):
    small = LLM(smollm2_path, n_ctx=16, max_batch_size=1)
    ids = small.tokenizer.encode("one two three four five six seven eight")
    out = small.generate(ids, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length" and len(ids) + len(out.token_ids) == 16


def test_beam_search(llm):
    prompt = llm.tokenizer.encode("The best way to learn a language is")
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    beam1 = llm.generate(prompt, SamplingParams(temperature=0, beam_width=1, max_tokens=8, ignore_eos=True))
    assert beam1.token_ids == greedy.token_ids

    def total_logprob(tokens):
        logits = llm.logits(prompt + tokens)[len(prompt) - 1:-1].astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        lp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        return lp[np.arange(len(tokens)), tokens].sum()

    beam = llm.generate(prompt, SamplingParams(temperature=0, beam_width=4, n=2, max_tokens=8, ignore_eos=True))
    assert len(beam.outputs) == 2 and len(beam.token_ids) == 8
    assert total_logprob(beam.token_ids) >= total_logprob(greedy.token_ids) - 1e-3
    assert sum(llm.slots.busy) == 0


def test_concurrent_streams_from_threads_share_the_scheduler(llm):
    import threading
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = ["First thread says", "Second thread says", "Third thread says"]
    expected = {p: llm.generate(p, params).text for p in prompts}
    got = {}

    def run(p):
        got[p] = "".join(c.text for c in llm.stream(p, params))

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == expected


def test_convert_hf_directory_to_gguf(tmp_path):
    """`lmengine convert HF_DIR out.gguf`: the converted model's logits equal the HF model's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmengine.cli import main
    from tiny_models import hf_logits
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "tiny.gguf"), "--weights", "f32"]) == 0
    from lmengine.converters.gguf_file import GGUFFile
    from lmengine.backends.numba_backend import NumbaLlamaBackend
    from lmengine.config import config_from_gguf
    f = GGUFFile(tmp_path / "tiny.gguf")
    backend = NumbaLlamaBackend(f, config_from_gguf(f), n_ctx=64, activations="f32")
    ids = np.arange(5, 45)
    ours = backend.forward(0, ids, 0, all_logits=True)
    ref = hf_logits(model, ids)
    assert np.abs(ours - ref).max() <= 1e-4 * (ref.max() - ref.min())
