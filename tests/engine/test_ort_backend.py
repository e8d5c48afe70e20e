"""engine/backends/ort_backend.py: the onnxruntime backend on ONNX exports.

References: HF transformers on tiny random models (the same GGUF weights), the Numba backend
(exact float32 path) on the same GGUF, the transformers outputs stored for SmolLM2 in
../shared/reference/, and onnxruntime-genai running the same export directory.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from lmengine.converters.gguf_file import GGUFFile  # noqa: E402
from lmengine.converters.onnx_export import GENAI_CONFIG, MODEL_FILE, export_onnx  # noqa: E402
from lmengine.backends import ort_backend  # noqa: E402
from lmengine.backends.ort_backend import OrtBackend  # noqa: E402
from lmengine.config import config_from_gguf  # noqa: E402
from lmengine.errors import BackendError, ContextLengthError, InvalidParameterError, TokenIdError  # noqa: E402
from references import reference_file  # noqa: E402
from tiny_models import hf_logits, make_tiny_model  # noqa: E402
from checks import rel_err  # noqa: E402

# float32 onnxruntime vs float32 references on the same weights: differences come from summation
# order only (~1e-6 relative on tiny models, ~5e-6 on SmolLM2's 30 layers). 1e-4 is the issue's
# bound; a wrong mask, rope position or cache row moves logits by far more.
REL_TOL = 1e-4
REFERENCE = reference_file("smollm2_reference.json")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (a shared 2-core machine otherwise makes torch's
    OpenMP team wait for a busy core on every call)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- tiny random models -----------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("llama", "q4_1", "int4", True), ("llama", "f32", "f32", False),
                                        ("qwen2", "f32", "f32", True)],
                ids=lambda p: "-".join(str(x) for x in p))
def tiny(request, tmp_path_factory):
    arch, gguf_type, weights, contrib = request.param
    folder = tmp_path_factory.mktemp(f"ort_{arch}")
    hf = make_tiny_model(folder / "m.gguf", arch=arch, weight_type=gguf_type, seed=11)
    f = GGUFFile(folder / "m.gguf")
    config = config_from_gguf(f)
    export_onnx(f, config, str(folder / "onnx"), weights=weights, use_contrib_ops=contrib, max_positions=128)
    cache = {}

    def reference(ids):
        key = tuple(int(t) for t in ids)
        if key not in cache:
            cache[key] = hf_logits(hf, key)
        return cache[key]
    return {"dir": str(folder / "onnx"), "gguf": f, "config": config, "ref": reference}


def backend(tiny, **kw):
    kw.setdefault("n_ctx", 128)
    kw.setdefault("n_slots", 6)
    return OrtBackend(tiny["dir"], n_threads=1, **kw)


def test_forward_all_positions(tiny):
    be = backend(tiny)
    ids = np.random.default_rng(0).integers(0, tiny["config"].vocab_size, 25)
    assert be.vocab_size == tiny["config"].vocab_size
    logits = be.forward(0, ids, 0, all_logits=True)
    assert logits.shape == (25, be.vocab_size) and logits.dtype == np.float32
    assert rel_err(logits, tiny["ref"](ids)) < REL_TOL
    last = be.forward(1, ids, 0)
    assert last.shape == (1, be.vocab_size)
    np.testing.assert_array_equal(last[0], logits[-1])


def test_chunked_prefill_equals_one_run(tiny, monkeypatch):
    ids = np.random.default_rng(1).integers(0, tiny["config"].vocab_size, 23)
    whole = backend(tiny).forward(0, ids, 0, all_logits=True)
    monkeypatch.setattr(ort_backend, "PREFILL_CHUNK", 5)
    be = backend(tiny)
    chunked = be.forward(0, ids, 0, all_logits=True)
    assert rel_err(chunked, whole) < REL_TOL
    np.testing.assert_array_equal(be.forward(1, ids, 0)[0], chunked[-1])


def test_batched_decode_ragged_slots(tiny):
    """4 prompts of different lengths decode together (left padding inside the backend); slots
    leave, come back in another order, and the results stay those of each sequence alone."""
    be = backend(tiny)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, be.vocab_size, n) for n in (7, 12, 3, 9)]
    tails = [rng.integers(0, be.vocab_size, 6) for _ in prompts]
    full = [np.concatenate([p, t]) for p, t in zip(prompts, tails)]
    for s, p in enumerate(prompts):
        be.forward(s, p, 0)
    done = [0, 0, 0, 0]
    for order in ([0, 1, 2, 3], [0, 1, 2, 3], [3, 1, 0], [3, 1, 0], [2, 0, 3, 1], [2, 0, 3, 1], [1, 2]):
        order = [s for s in order if done[s] < 6]
        tokens = np.array([tails[s][done[s]] for s in order])
        positions = np.array([len(prompts[s]) + done[s] for s in order])
        logits = be.forward_batch(np.array(order), tokens, positions)
        for row, s in enumerate(order):
            expected = tiny["ref"](full[s])[positions[row]]
            assert rel_err(logits[row], expected) < REL_TOL, (order, s)
            done[s] += 1


def test_rewind_and_copy_slot(tiny):
    be = backend(tiny)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, be.vocab_size, 16)
    other = rng.integers(0, be.vocab_size, 6)
    be.forward(0, ids, 0)
    # rewind: positions from 10 on are overwritten with other tokens
    logits = be.forward(0, other, 10, all_logits=True)
    assert rel_err(logits, tiny["ref"](np.concatenate([ids[:10], other]))[10:]) < REL_TOL
    # copy the first 12 positions of slot 0 (ids[:10] + other[:2]) to slot 3, continue there
    be.copy_slot(0, 3, 12)
    logits = be.forward(3, ids[:4], 12, all_logits=True)
    assert rel_err(logits, tiny["ref"](np.concatenate([ids[:10], other[:2], ids[:4]]))[12:]) < REL_TOL
    # slot 0 is untouched by what slot 3 did
    logits = be.forward_batch(np.array([0]), other[5:6], np.array([16]))
    assert rel_err(logits[0], tiny["ref"](np.concatenate([ids[:10], other, other[5:6]]))[16]) < REL_TOL


def test_matches_numba_backend(tiny):
    """The issue's check on tiny models: every position of a prefill, then 32 decode steps for
    batch 1 and for batch 4 (different lengths: left padding), against the Numba backend's exact
    float32 path; greedy tokens identical."""
    from lmengine.backends.numba_backend import NumbaLlamaBackend
    if tiny["config"].arch != "llama":
        pytest.skip("the issue's check is on llama models (qwen2 is checked against transformers above)")
    numba = NumbaLlamaBackend(tiny["gguf"], tiny["config"], n_ctx=128, n_slots=4, activations="f32")
    be = backend(tiny, n_slots=4)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, be.vocab_size, n) for n in (11, 5, 17, 8)]
    for s, p in enumerate(prompts):
        a, b = numba.forward(s, p, 0, all_logits=True), be.forward(s, p, 0, all_logits=True)
        assert rel_err(b, a) < REL_TOL
    for batch in (1, 4):
        slots = np.arange(batch)
        if batch == 4:   # start batch 4 from the prompts again (slot 0 moved on in the batch-1 run)
            for s, p in enumerate(prompts):
                numba.forward(s, p, 0)
                be.forward(s, p, 0)
        positions = np.array([len(prompts[s]) for s in slots])
        tokens = np.array([prompts[s][-1] for s in slots])
        tokens = numba.forward_batch(slots, tokens, positions - 1).argmax(axis=1)   # re-run the last prompt token
        be.forward_batch(slots, np.array([prompts[s][-1] for s in slots]), positions - 1)
        for step in range(32):
            a = numba.forward_batch(slots, tokens, positions)
            b = be.forward_batch(slots, tokens, positions)
            assert rel_err(b, a) < REL_TOL, (batch, step)
            np.testing.assert_array_equal(b.argmax(axis=1), a.argmax(axis=1))
            tokens, positions = a.argmax(axis=1), positions + 1


# -- errors -----------------------------------------------------------------------------------

def test_missing_provider_lists_available(tiny):
    missing = "CUDAExecutionProvider" if "CUDAExecutionProvider" not in ort.get_available_providers() \
        else "NoSuchExecutionProvider"
    with pytest.raises(BackendError, match=f"{missing}.*available: .*CPUExecutionProvider"):
        OrtBackend(tiny["dir"], providers=[missing])


def test_directory_errors(tiny, tmp_path):
    with pytest.raises(BackendError, match="not a directory"):
        OrtBackend(str(tmp_path / "nowhere"))
    with pytest.raises(BackendError, match=GENAI_CONFIG):
        OrtBackend(str(tmp_path))
    config = json.load(open(os.path.join(tiny["dir"], GENAI_CONFIG)))
    (tmp_path / GENAI_CONFIG).write_text(json.dumps(config))
    with pytest.raises(BackendError, match="model file 'model.onnx'"):
        OrtBackend(str(tmp_path))
    del config["model"]["decoder"]["head_size"]
    (tmp_path / GENAI_CONFIG).write_text(json.dumps(config))
    with pytest.raises(BackendError, match="head_size"):
        OrtBackend(str(tmp_path))
    (tmp_path / GENAI_CONFIG).write_text("{not json")
    with pytest.raises(BackendError, match="JSON"):
        OrtBackend(str(tmp_path))


def test_graph_without_the_inputs(tiny, tmp_path):
    """A model.onnx that is not a decoder with KV inputs: named in the error."""
    from onnx import TensorProto, helper, save
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / MODEL_FILE))
    (tmp_path / GENAI_CONFIG).write_text(open(os.path.join(tiny["dir"], GENAI_CONFIG)).read())
    with pytest.raises(BackendError, match="no input 'attention_mask'"):
        OrtBackend(str(tmp_path))


def test_inputs_the_graph_cannot_take(tiny):
    with pytest.raises(ContextLengthError, match="context_length 128"):
        OrtBackend(tiny["dir"], n_ctx=129)
    be = backend(tiny, n_ctx=32, n_slots=2)
    with pytest.raises(TokenIdError, match=str(be.vocab_size)):
        be.forward(0, np.array([1, be.vocab_size]), 0)
    with pytest.raises(TokenIdError):
        be.forward(0, np.array([-1]), 0)
    n = be.vocab_size
    for bad in (True, np.True_, np.False_):   # True is not token 1
        message = re.escape(f"token id {bool(bad)} is a bool, not an integer in the vocabulary [0, {n})")
        with pytest.raises(TokenIdError, match=message):
            be.forward(0, [1, bad], 0)
        with pytest.raises(TokenIdError, match=message):
            be.forward(0, np.array([bad]), 0)
        with pytest.raises(TokenIdError, match=message):
            be.forward_batch(np.array([0]), np.array([bad]), np.array([0]))
    with pytest.raises(TokenIdError, match=re.escape(f"token id -1 is outside the vocabulary [0, {n})")):
        be.forward_batch(np.array([0, 1]), np.array([3, -1]), np.array([0, 0]))
    with pytest.raises(ContextLengthError, match="32"):
        be.forward(0, np.arange(33) % be.vocab_size, 0)
    with pytest.raises(InvalidParameterError, match="slot 2"):
        be.forward(2, np.array([1]), 0)
    with pytest.raises(InvalidParameterError, match="start_pos 3"):
        be.forward(0, np.array([1]), 3)          # nothing cached yet
    be.forward(0, np.array([1, 2, 3]), 0)
    with pytest.raises(InvalidParameterError, match="twice"):
        be.forward_batch(np.array([0, 0]), np.array([1, 2]), np.array([3, 3]))
    with pytest.raises(InvalidParameterError, match="position 5"):
        be.forward_batch(np.array([0]), np.array([1]), np.array([5]))
    with pytest.raises(InvalidParameterError, match="holds 3"):
        be.copy_slot(0, 1, 4)


# -- the bundled SmolLM2, float32 export ------------------------------------------------------


def test_device_check_script_cpu_part(tmp_path):
    """bench/ort_device_check.py (the GPU script) runs end to end with the CPU standing in for
    the device: export, logits check, decode rates."""
    from lmengine.bench import ort_device_check as script
    make_tiny_model(tmp_path / "m.gguf", arch="llama", weight_type="q4_1", seed=12)
    f = GGUFFile(tmp_path / "m.gguf")     # exported here: the tiny GGUF has no tokenizer merges
    export_onnx(f, config_from_gguf(f), str(tmp_path / "exports" / "int4_contrib"), weights="int4")
    out = tmp_path / "results.json"
    status = script.main(["--cpu-only", "--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "exports"),
                          "--steps", "3", "--batch", "1", "3", "--weights", "int4", "--contrib", "1",
                          "--json", str(out)])
    assert status == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["logits_ok"] and row["greedy_equal"] and row["decode_tok_s_b3"] > 0


@pytest.mark.parametrize("contrib", [True, False])
def test_partial_rope_matches_numba(tmp_path, contrib):
    """rope.dimension_count < head_dim (only the first rope_dim dims of a head rotate, in ggml's
    adjacent-pair order for llama): the export against the Numba backend's exact path."""
    from lmengine.converters.hf import write_llama_gguf
    from lmengine.backends.numba_backend import NumbaLlamaBackend
    rng = np.random.default_rng(13)
    n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab = 2, 64, 4, 2, 96, 200
    head_dim = dim // n_heads
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.attn_q.weight": (dim, dim),
                       f"blk.{i}.attn_k.weight": (n_kv_heads * head_dim, dim),
                       f"blk.{i}.attn_v.weight": (n_kv_heads * head_dim, dim),
                       f"blk.{i}.attn_output.weight": (dim, dim), f"blk.{i}.ffn_norm.weight": (dim,),
                       f"blk.{i}.ffn_gate.weight": (ffn_dim, dim), f"blk.{i}.ffn_up.weight": (ffn_dim, dim),
                       f"blk.{i}.ffn_down.weight": (dim, ffn_dim)})
    tensors = {name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else
                      0.3 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    hparams = dict(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                   rope_base=10000.0, norm_eps=1e-5, n_ctx=64, vocab_size=vocab, rope_dim=head_dim // 2)
    write_llama_gguf(str(tmp_path / "m.gguf"), "llama", hparams, tensors)
    f = GGUFFile(tmp_path / "m.gguf")
    config = config_from_gguf(f)
    assert config.rope_dim == 8 and config.head_dim == 16
    export_onnx(f, config, str(tmp_path / "onnx"), use_contrib_ops=contrib)
    ids = rng.integers(0, vocab, 30)
    expected = NumbaLlamaBackend(f, config, n_ctx=64, activations="f32").forward(0, ids, 0, all_logits=True)
    got = OrtBackend(str(tmp_path / "onnx"), n_ctx=64, n_threads=1).forward(0, ids, 0, all_logits=True)
    assert rel_err(got, expected) < REL_TOL
