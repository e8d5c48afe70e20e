"""The bundled SmolLM2 on onnxruntime (and onnxruntime-genai) against the Numba backend and the references."""
from __future__ import annotations

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from checks import rel_err  # noqa: E402
from lmengine.backends.ort_backend import OrtBackend  # noqa: E402
from lmengine.config import config_from_gguf  # noqa: E402
from lmengine.converters.gguf_file import GGUFFile  # noqa: E402
from references import reference_file  # noqa: E402

REL_TOL = 1e-4
REFERENCE = reference_file("smollm2_reference.json")


@pytest.fixture(scope="module")
def reference():
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)["prompts"]


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path, tmp_path_factory):
    from lmengine.export import export_onnx_model
    out = tmp_path_factory.mktemp("smollm2_f32")
    export_onnx_model(smollm2_path, out, weights="f32")
    return str(out)


def test_smollm2_matches_transformers_reference(smollm2_f32, reference):
    """All six reference prompts decoded together (left padded, one forward_batch per step):
    the last-prompt-position top-10 logits and 32 greedy tokens equal transformers' float32 run
    of the same GGUF. The top-10 values are compared to 1e-4 of the logit scale (~20)."""
    be = OrtBackend(smollm2_f32, n_ctx=256, n_slots=6, n_threads=1)
    tokens, positions = [], []
    for s, prompt in enumerate(reference):
        ids = prompt["llama_cpp"]["ids"]
        last = be.forward(s, np.array(ids), 0)[0]
        top = prompt["transformers"]["top10_last_on_llama_ids"]
        values = np.array([v for _, v in top])
        assert rel_err(last[[t for t, _ in top]], values) < REL_TOL, prompt["name"]
        tokens.append(int(last.argmax()))
        positions.append(len(ids))
    generated = [[t] for t in tokens]
    slots = np.arange(len(reference))
    for _ in range(31):
        logits = be.forward_batch(slots, np.array(tokens), np.array(positions))
        tokens, positions = logits.argmax(axis=1), [p + 1 for p in positions]
        for g, t in zip(generated, tokens):
            g.append(int(t))
    for g, prompt in zip(generated, reference):
        assert g == prompt["transformers"]["greedy32_on_llama_ids"], prompt["name"]


def test_llm_api_on_the_export(smollm2_f32, reference):
    """LLM(dir, backend="onnxruntime"): generate (one and batched), stream and chat."""
    from lmengine import LLM, SamplingParams
    llm = LLM(smollm2_f32, backend="onnxruntime", n_ctx=256, n_threads=1, max_batch_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [p["llama_cpp"]["ids"] for p in reference[:3]]
    alone = [llm.generate(p, greedy).token_ids for p in prompts]
    for got, prompt in zip(alone, reference):
        assert got == prompt["transformers"]["greedy32_on_llama_ids"][:12]
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == alone
    text = "".join(chunk.text for chunk in llm.stream(prompts[0], greedy))
    assert text == llm.tokenizer.decode(alone[0])
    reply = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0, max_tokens=16))
    assert "4" in reply.text


def test_onnxruntime_genai_runs_the_export(smollm2_f32, reference):
    """onnxruntime-genai loads the directory unchanged (model, config, tokenizer) and greedy-
    generates the same 32 tokens as this backend."""
    og = pytest.importorskip("onnxruntime_genai")
    prompt = reference[0]["llama_cpp"]["ids"]
    model = og.Model(smollm2_f32)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 32)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))

    be = OrtBackend(smollm2_f32, n_ctx=256, n_threads=1)
    token = int(be.forward(0, np.array(prompt), 0)[0].argmax())
    ours = [token]
    for pos in range(len(prompt), len(prompt) + 31):
        token = int(be.forward(0, np.array([token]), pos)[0].argmax())
        ours.append(token)
    assert theirs == ours
    text = "The quick brown fox jumps over 12345 lazy dogs. 你好"
    from lmengine.tokenizer import Tokenizer
    assert list(og.Tokenizer(model).encode(text)) == Tokenizer.from_pretrained_dir(smollm2_f32).encode(text)


@pytest.mark.slow
def test_smollm2_matches_numba_backend(smollm2_path, smollm2_f32, reference):
    """The issue's check on SmolLM2: onnxruntime logits equal the Numba backend's exact float32
    path within 1e-4 relative at every prefill position and for 32 decode steps, batch 1 and
    batch 4 (left padded); greedy tokens identical."""
    from lmengine.backends.numba_backend import NumbaLlamaBackend
    f = GGUFFile(smollm2_path)
    numba = NumbaLlamaBackend(f, config_from_gguf(f), n_ctx=128, n_slots=4, activations="f32")
    be = OrtBackend(smollm2_f32, n_ctx=128, n_slots=4, n_threads=1)
    prompts = [np.array(p["llama_cpp"]["ids"]) for p in reference[:4]]       # 17, 41, 29, 47 tokens
    for s, p in enumerate(prompts):
        assert rel_err(be.forward(s, p, 0, all_logits=True), numba.forward(s, p, 0, all_logits=True)) < REL_TOL
    for batch in (1, 4):
        slots = np.arange(batch)
        positions = np.array([len(prompts[s]) for s in slots])
        if batch == 4:
            for s in slots:
                numba.forward(s, prompts[s], 0)
                be.forward(s, prompts[s], 0)
        last = np.array([prompts[s][-1] for s in slots])
        tokens = numba.forward_batch(slots, last, positions - 1).argmax(axis=1)
        be.forward_batch(slots, last, positions - 1)
        for step in range(32):
            a = numba.forward_batch(slots, tokens, positions)
            b = be.forward_batch(slots, tokens, positions)
            assert rel_err(b, a) < REL_TOL, (batch, step)
            np.testing.assert_array_equal(b.argmax(axis=1), a.argmax(axis=1))
            tokens, positions = a.argmax(axis=1), positions + 1
