"""`lmengine warmup`: compile every kernel ahead of the first request, and bake the result into a
wheel.

A first start compiles the Numba code (the model forward, the samplers, the load-time block
checks: about 150 functions) and caches it on disk; later starts load it in a second or two. Where
that first compile should not happen in front of a user (a container image, a fleet of machines,
a CI job), `warmup()` does it ahead:

  1. a tiny random llama model (2 layers, F16 matrices, a byte-level vocabulary; written to a
     temporary folder) runs through what a user's requests run: a greedy and a sampled
     generation, a batch of two, a stream, logits and perplexity. The compiled code does not
     depend on the sizes or the matrix types (those are run-time values), so this compiles what
     any llama/qwen2 GGUF needs with the default options (`kv_cache_dtype` other than the
     default, or another backend, compile a little more on first use);
  2. each model named with `models=` loads and generates two tokens, for anything else it needs.

`portable=True` compiles for the x86-64-v3 CPU level instead of this CPU (kernels/jit_cache.py),
so that the cache is valid on every AVX2 machine; `bake_wheel` then copies that cache into a
wheel, whose users start without compiling (.ci/wheel does both; docs/FIRST_START.md).
"""
from __future__ import annotations

import base64
import csv
import glob
import hashlib
import io
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import InvalidParameterError
from .kernels import jit_cache


@dataclass
class WarmupReport:
    seconds: float          # wall time of the whole warmup
    n_compiled: int         # functions Numba compiled (0: everything came from the cache)
    portable: bool          # compiled for the x86-64-v3 level rather than this CPU
    cache_files: int        # *.nbi/*.nbc files in the package's cache afterwards


# -- the tiny model -------------------------------------------------------------------------------

def byte_level_vocab(vocab_size: int) -> dict:
    """A gpt2-style vocabulary: the 256 byte tokens (no merges), then control tokens up to
    vocab_size; the last one is EOS (and BOS) when there are more than 256."""
    from .tokenizer import _gpt2_byte_to_char   # GPT-2's byte -> printable character table
    byte_chars = _gpt2_byte_to_char()
    tokens = [byte_chars[b] for b in range(min(vocab_size, 256))]
    types = [1] * len(tokens)
    while len(tokens) < vocab_size:
        tokens.append(f"<|extra_{len(tokens)}|>")
        types.append(3)
    eos = vocab_size - 1 if vocab_size > 256 else None
    return {"model": "gpt2", "pre": "gpt2", "tokens": tokens, "token_types": types, "merges": [],
            "eos_id": eos, "bos_id": eos}


def write_tiny_llama(path: str, weight_type: str = "f16", seed: int = 0) -> None:
    """A random 2-layer llama GGUF (dim 64, 4 heads, 2 KV heads, vocab 288) at `path`."""
    from .converters.hf import write_llama_gguf
    n_layers, dim, ffn, n_heads, n_kv, vocab = 2, 64, 96, 4, 2, 288
    kv_dim = dim // n_heads * n_kv
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    tensors = {"token_embd.weight": w(vocab, dim)}
    for i in range(n_layers):
        tensors.update({
            f"blk.{i}.attn_norm.weight": 1.0 + w(dim), f"blk.{i}.attn_q.weight": w(dim, dim),
            f"blk.{i}.attn_k.weight": w(kv_dim, dim), f"blk.{i}.attn_v.weight": w(kv_dim, dim),
            f"blk.{i}.attn_output.weight": w(dim, dim), f"blk.{i}.ffn_norm.weight": 1.0 + w(dim),
            f"blk.{i}.ffn_gate.weight": w(ffn, dim), f"blk.{i}.ffn_up.weight": w(ffn, dim),
            f"blk.{i}.ffn_down.weight": w(dim, ffn)})
    tensors.update({"output_norm.weight": 1.0 + w(dim), "output.weight": w(vocab, dim)})
    hparams = {"n_layers": n_layers, "dim": dim, "ffn_dim": ffn, "n_heads": n_heads, "n_kv_heads": n_kv,
               "rope_base": 10000.0, "norm_eps": 1e-5, "n_ctx": 256, "vocab_size": vocab,
               "name": "lmengine warmup model"}
    tokenizer = byte_level_vocab(vocab)
    tokenizer["tokens"][256], tokenizer["token_types"][256] = "\u0120\u0120", 1   # "  ": one merge, so
    tokenizer["merges"] = ["\u0120 \u0120"]        # the GGUF has the merges key a BPE tokenizer needs
    write_llama_gguf(path, "llama", hparams, tensors, weight_type, tokenizer)


# -- warmup -----------------------------------------------------------------------------------------

def _exercise(llm) -> None:
    """What requests run: greedy, sampled with every filter, a batch of two (the batched decode),
    a stream, logits, perplexity."""
    llm.generate("warm up", max_tokens=3, temperature=0)
    llm.generate("warm up", max_tokens=3, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01,
                 repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1, logprobs=2, seed=0, n=2)
    for _ in llm.stream("warm up", max_tokens=2, temperature=0):
        pass
    llm.logits(llm.tokenizer.encode("warm up"))
    llm.perplexity("warm up the kernels")


def warmup(models=(), *, portable: bool = False, progress: bool = True, stream=None) -> WarmupReport:
    """Compile (or load from the cache) everything a request needs, for the tiny llama model and
    for each of `models` (paths or names, as `LLM` takes them). portable: the cache is for the
    x86-64-v3 level (to bake into a wheel): this process must have been started with
    LMENGINE_NUMBA_TARGET=portable (the level is chosen when lmengine is imported; `lmengine
    warmup --portable` starts such a process), else InvalidParameterError."""
    from . import COMPILED_SOURCE_DIRS
    from .llm import LLM

    if portable and not jit_cache.portable_target_active():
        raise InvalidParameterError(
            "warmup: portable=True needs a process started with LMENGINE_NUMBA_TARGET=portable, on a "
            "CPU with the x86-64-v3 level (AVX2, FMA, F16C, BMI2) and without NUMBA_CPU_NAME set")
    t0 = time.perf_counter()
    counter = jit_cache.CompileProgress(stream=stream if progress else io.StringIO())
    with counter, tempfile.TemporaryDirectory(prefix="lmengine-warmup-") as tmp:
        tiny = os.path.join(tmp, "tiny-llama.gguf")
        write_tiny_llama(tiny)
        with LLM(tiny, n_ctx=64) as llm:
            _exercise(llm)
        for model in models:
            with LLM(model) as llm:
                llm.generate("warm up", max_tokens=2, temperature=0)
    if portable:
        jit_cache.write_target_file(COMPILED_SOURCE_DIRS[0])
    n_files = sum(len(glob.glob(os.path.join(d, "__pycache__", "*.nb[ic]"))) for d in COMPILED_SOURCE_DIRS)
    return WarmupReport(time.perf_counter() - t0, counter.n_compiled, portable, n_files)


# -- baking the cache into a wheel --------------------------------------------------------------------

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def cache_files() -> dict:
    """{path inside a wheel ("lmengine/kernels/__pycache__/..."): path on disk} of this installed
    package's compiled cache: the Numba files, the fingerprint and the target record."""
    from . import COMPILED_SOURCE_DIRS
    package_root = os.path.dirname(os.path.abspath(__file__))
    names = ("*.nbi", "*.nbc", jit_cache.FINGERPRINT_FILE, jit_cache.TARGET_FILE)
    files = {}
    for d in COMPILED_SOURCE_DIRS:
        for pattern in names:
            for path in glob.glob(os.path.join(d, "__pycache__", pattern)):
                rel = os.path.relpath(path, package_root).replace(os.sep, "/")
                files["lmengine/" + rel] = path
    return files


def bake_wheel(wheel_path: str) -> int:
    """Add this installed package's compiled cache to `wheel_path` (rewritten in place, RECORD
    updated). The wheel must hold the same sources as this installation: its compiled sources
    are compared with the installed ones first. Returns the number of files added."""
    from . import COMPILED_SOURCE_DIRS
    files = cache_files()
    if not any(name.endswith(jit_cache.TARGET_FILE) for name in files):
        raise InvalidParameterError("bake_wheel: this installation has no portable cache; run "
                                    "`lmengine warmup --portable` in it first")
    package_root = os.path.dirname(os.path.abspath(__file__))
    with zipfile.ZipFile(wheel_path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    by_name = {info.filename: data for info, data in entries}
    for d in COMPILED_SOURCE_DIRS:       # the wheel's compiled sources must be the installed ones
        for path in jit_cache._source_files([d]):
            name = "lmengine/" + os.path.relpath(path, package_root).replace(os.sep, "/")
            with open(path, "rb") as fh:
                if by_name.get(name) != fh.read():
                    raise InvalidParameterError(f"bake_wheel: {name} differs between {wheel_path} and "
                                                f"the installed package: install this wheel, warm it up, bake")
    record_name = next(n for n in by_name if n.endswith(".dist-info/RECORD"))
    rows = [row for row in csv.reader(io.StringIO(by_name[record_name].decode())) if row and row[0] not in files]
    tmp = wheel_path + ".baking"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in entries:
            if info.filename == record_name or info.filename in files:
                continue
            zout.writestr(info, data)
        for name, path in sorted(files.items()):
            with open(path, "rb") as fh:
                data = fh.read()
            zout.writestr(name, data)
            rows.append([name, _record_hash(data), str(len(data))])
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows + [[record_name, "", ""]])
        zout.writestr(record_name, out.getvalue())
    os.replace(tmp, wheel_path)
    return len(files)
