"""The llama family's newer architectures (qwen3, gemma2, gemma3, phi3) and RoPE scalings (Llama 3,
linear, YaRN, phi3 long-rope) against HF transformers, end to end: a tiny random HF model made here
from its transformers config, saved with save_pretrained, converted by `lmengine convert`, run by
the engine and compared with transformers' float32 forward; the converted file is also loaded by
llama.cpp (llama_cpp) where it is installed.

Tolerances:
- Logits, exact path (activations="f32", f32 KV cache, float32 weights): 1e-4 absolute. Both sides
  compute in float32 from the same weights; only the summation order differs, and RoPE angles
  (ours float64, HF float32: at position 100 a relative 6e-8 error of the angle is 6e-6 rad).
  Observed ~1e-6.
- Greedy text: the same 32 tokens (the logits agree to ~1e-6, far below the random models' gaps
  between the two best tokens; the weights are drawn with a wide spread so that gaps are large).
- llama.cpp: the same top-1 token at every position where our own top-2 gap exceeds 1e-2
  (llama.cpp computes with its own kernels; a near-tie may go either way).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmengine import LLM                                                  # noqa: E402
from lmengine.backends.numba_backend import NumbaLlamaBackend             # noqa: E402
from lmengine.config import config_from_gguf                              # noqa: E402
from lmengine.convert import convert                                      # noqa: E402
from lmengine.converters.gguf_file import GGUFFile                        # noqa: E402
from lmengine.errors import MetadataError, UnsupportedArchitectureError   # noqa: E402
from tiny_arch_models import MODELS, VOCAB, hf_logits, make_hf_model       # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tmp_path_factory):
    """(name, HF model, path of the GGUF `lmengine convert` made of it)."""
    folder = str(tmp_path_factory.mktemp(request.param))
    model = make_hf_model(request.param, folder, seed=len(request.param))
    out = os.path.join(folder, "model.gguf")
    convert(folder, out)                       # what `lmengine convert HF_DIR out.gguf` runs
    return request.param, model, out


def _backend(path, n_ctx=256, n_slots=1):
    f = GGUFFile(path)
    return NumbaLlamaBackend(f, config_from_gguf(f), n_ctx=n_ctx, n_slots=n_slots, activations="f32")


LENGTHS = (5, 17, 40, 70)   # past gemma's 16-token window and the 32-token original contexts


def test_logits_equal_transformers_batch_1_and_4(converted):
    """Each prompt alone (batch 1, every position), then 6 decode steps of the 4 sequences of
    different lengths in one batch, against transformers on the whole sequences."""
    name, model, path = converted
    backend = _backend(path, n_slots=4)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, VOCAB, n + 6) for n in LENGTHS]
    for slot, (n, seq) in enumerate(zip(LENGTHS, seqs)):
        ours = backend.forward(slot, seq[:n], 0, all_logits=True)
        ref = hf_logits(model, seq[:n])
        assert np.abs(ours - ref).max() <= ATOL, f"{name}: prompt of {n} tokens"
    refs = [hf_logits(model, seq) for seq in seqs]
    for step in range(6):
        positions = np.array([n + step for n in LENGTHS], dtype=np.int64)
        tokens = np.array([seq[p] for seq, p in zip(seqs, positions)], dtype=np.int64)
        ours = backend.forward_batch(np.arange(4, dtype=np.int64), tokens, positions)
        for b in range(4):
            assert np.abs(ours[b] - refs[b][positions[b]]).max() <= ATOL, f"{name}: batch row {b}, step {step}"


def test_greedy_text_equals_transformers(converted):
    """32 greedy tokens after each of 4 prompts of different lengths (generated as one batch)."""
    name, model, path = converted
    llm = LLM(path, activations="f32", n_ctx=256, max_batch_size=4, warmup=False)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 12, 20, 40)]
    got = llm.generate(prompts, max_tokens=32, temperature=0.0, ignore_eos=True)
    for prompt, completion in zip(prompts, got):
        ids = list(prompt)
        for _ in range(32):
            ids.append(int(hf_logits(model, ids)[-1].argmax()))
        assert completion.token_ids == ids[len(prompt):], name
    llm.close()


def test_phi3_long_and_short_factors(tmp_path):
    """phi3 long-rope: with n_ctx past the original 32-token context the long factors apply (as
    llama.cpp chooses), and transformers uses them for a sequence past 32 tokens; within it, the
    short ones on both sides."""
    folder = str(tmp_path)
    model = make_hf_model("phi3-longrope", folder, seed=5)
    out = os.path.join(folder, "model.gguf")
    convert(folder, out)
    ids = np.random.default_rng(6).integers(0, VOCAB, 60)
    ours = _backend(out, n_ctx=128).forward(0, ids, 0, all_logits=True)
    assert np.abs(ours - hf_logits(model, ids)).max() <= ATOL
    ours = _backend(out, n_ctx=32).forward(0, ids[:30], 0, all_logits=True)
    assert np.abs(ours - hf_logits(model, ids[:30])).max() <= ATOL


def test_llama_cpp_agrees_on_top1(converted, capfd):
    llama_cpp = pytest.importorskip("llama_cpp")
    name, model, path = converted
    try:
        ref = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=True, n_threads=2)
    except ValueError:
        log = capfd.readouterr().err
        if "unknown model architecture" in log:
            pytest.skip(f"this build of llama.cpp lacks the architecture of {name}")
        pytest.fail(f"llama.cpp refused our {name} file: {log[-2000:]}")
    capfd.readouterr()
    ids = np.random.default_rng(8).integers(0, 256, 70).tolist()
    ref.eval(ids)
    theirs = np.array(ref.scores[: len(ids)], dtype=np.float32)
    ours = _backend(path, n_ctx=128).forward(0, np.array(ids), 0, all_logits=True)
    top2 = np.sort(ours, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-2
    assert clear.sum() >= len(ids) // 2
    assert (ours.argmax(1) == theirs.argmax(1))[clear].all(), name
    ref.close()


@pytest.mark.parametrize("name", ["gemma2", "phi3", "qwen3"])
def test_quantized_fast_path_close_to_exact(tmp_path, name):
    """A Q8_0 file on the default fast path (int8 activations, f16 KV cache) against the exact
    path on the same file: within 5% of the logit range (one 8-bit rounding per activation and
    per weight through every layer; a wrong split of phi3's fused tensors or a missing norm is off
    by far more)."""
    folder = str(tmp_path / "hf")
    make_hf_model(name, folder, seed=9)
    out = str(tmp_path / "q8.gguf")
    convert(folder, out, weights="q8_0")
    f = GGUFFile(out)
    config = config_from_gguf(f)
    assert config.tensor_types.get("Q8_0", 0) > 0
    ids = np.random.default_rng(10).integers(0, VOCAB, 40)
    exact = _backend(out, n_ctx=64).forward(0, ids, 0, all_logits=True)
    fast = NumbaLlamaBackend(f, config, n_ctx=64, activations="mixed").forward(0, ids, 0, all_logits=True)
    assert np.abs(fast - exact).max() <= 0.05 * (exact.max() - exact.min())


def test_cli_convert_runs(tmp_path):
    """`lmengine convert HF_DIR out.gguf` from the command line."""
    folder = str(tmp_path / "hf")
    make_hf_model("qwen3", folder, seed=1)
    out = str(tmp_path / "q.gguf")
    run = subprocess.run([sys.executable, "-m", "lmengine", "convert", folder, out], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    cfg = config_from_gguf(GGUFFile(out))
    assert (cfg.arch, cfg.qk_norm, cfg.head_dim, cfg.neox) == ("qwen3", True, 32, True)


# -- bad input -----------------------------------------------------------------------------------

def _rewrite(src: str, dst: str, drop_key: str | None = None, arch: str | None = None) -> None:
    """A copy of GGUF `src` without metadata key `drop_key` and/or with another architecture name
    (its keys renamed along)."""
    import gguf
    reader = gguf.GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    new = arch or old
    writer = gguf.GGUFWriter(dst, new)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", drop_key):
            continue
        name = new + field.name[len(old):] if field.name.startswith(old + ".") else field.name
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=[int(d) for d in reversed(list(t.shape))],
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture_and_missing_key(tmp_path):
    folder = str(tmp_path / "hf")
    make_hf_model("gemma2", folder, seed=2)
    src = str(tmp_path / "g.gguf")
    convert(folder, src)
    bad_arch = str(tmp_path / "mamba.gguf")
    _rewrite(src, bad_arch, arch="mamba")
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba'.*qwen3.*gemma2.*gemma3.*phi3"):
        config_from_gguf(GGUFFile(bad_arch))
    no_window = str(tmp_path / "nowindow.gguf")
    _rewrite(src, no_window, drop_key="gemma2.attention.sliding_window")
    with pytest.raises(MetadataError, match="gemma2.attention.sliding_window"):
        config_from_gguf(GGUFFile(no_window))


def test_unknown_hf_architecture_is_named(tmp_path):
    from lmengine.converters.errors import ConversionError
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "num_hidden_layers": 1,
                                                    "hidden_size": 8, "intermediate_size": 8,
                                                    "num_attention_heads": 1, "vocab_size": 8}))
    with pytest.raises(ConversionError, match="MambaForCausalLM.*Qwen3ForCausalLM"):
        convert(str(folder), str(tmp_path / "x.gguf"))
