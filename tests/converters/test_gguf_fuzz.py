"""Seeded mutations of small valid GGUF files: every outcome is a clean load or an lmengine error.

The files: tiny llama and qwen2 models written by our converter (`converters/hf.py`, as
tests/tiny_models.py writes them, but from NumPy weights: building the HF reference model takes
tens of seconds), a tiny LSTM written by `converters/lstm_gguf.py`, a `lmengine quantize` output
(our own GGUF writer, `converters/quantize.py`), and a file written directly by the `gguf`
package's GGUFWriter.

The mutations know the file's structure: a walker (below, independent of `GGUFFile`) lists every
header field with its position, so that length fields, counts, type ids and offsets are hit on
purpose, besides random bit flips, byte overwrites and truncations. Each case runs the loader's
whole metadata path (GGUFFile -> config_from_gguf -> tokenizer -> chat template); a smaller set
also loads the model with `LLM` and generates two tokens. Each case must end in a clean load or an
`LMEngineError`, within CASE_SECONDS; the process must not grow by more than MAX_RSS_GROWTH.
"""
from __future__ import annotations

import dataclasses
import resource
import struct
import time
import traceback

import gguf
import numpy as np
import pytest

from lmengine.chat import ChatTemplate
from lmengine.config import config_from_gguf
from lmengine.converters.gguf_file import GGUFFile
from lmengine.errors import LMEngineError
from lmengine.lstm_tokenizer import tokenizer_from_gguf as lstm_tokenizer_from_gguf
from lmengine.tokenizer import Tokenizer

SEED = 20240607
N_META_CASES = 3000            # cases through the metadata path, over all files
N_LLM_CASES = 500              # cases through a full LLM load and 2 generated tokens
CASE_SECONDS = 2.0             # one case, including a full model load
MAX_RSS_GROWTH = 1 << 30       # bytes the process's peak resident size may grow by in one test

MODEL_ARCHS = ("llama", "qwen2", "lstm")
INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_32 = (0, 1, 2, 3, 31, 32, 33, 64, 255, 256, 4096, 65535, 65536, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFE, 0xFFFFFFFF, 33554433)
INTERESTING_64 = INTERESTING_32 + (1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


# -- the files ------------------------------------------------------------------------------------

def _llama_tensors(rng, arch: str, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn=96, vocab=300,
                   tied=False) -> dict:
    """Random GGUF tensors {name: float32 array} of a llama-family model (NumPy order)."""
    head_dim = dim // n_heads
    w = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)   # noqa: E731
    t = {"token_embd.weight": w(vocab, dim), "output_norm.weight": 1 + w(dim)}
    if not tied:
        t["output.weight"] = w(vocab, dim)
    for i in range(n_layers):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": 1 + w(dim), b + "attn_q.weight": w(n_heads * head_dim, dim),
                  b + "attn_k.weight": w(n_kv_heads * head_dim, dim),
                  b + "attn_v.weight": w(n_kv_heads * head_dim, dim),
                  b + "attn_output.weight": w(dim, n_heads * head_dim), b + "ffn_norm.weight": 1 + w(dim),
                  b + "ffn_gate.weight": w(ffn, dim), b + "ffn_up.weight": w(ffn, dim),
                  b + "ffn_down.weight": w(dim, ffn)})
        if arch == "qwen2":
            t.update({b + "attn_q.bias": w(n_heads * head_dim), b + "attn_k.bias": w(n_kv_heads * head_dim),
                      b + "attn_v.bias": w(n_kv_heads * head_dim)})
    return t


def _with_merges(vocab: dict) -> dict:
    """byte_level_vocab's tokens with "ab" and "abc" as ordinary tokens 256, 257 and their merges
    (a BPE tokenizer needs tokenizer.ggml.merges, and the writer drops an empty array)."""
    vocab["tokens"][256:258] = ["ab", "abc"]
    vocab["token_types"][256:258] = [1, 1]
    vocab["merges"] = ["a b", "ab c"]
    return vocab


def write_llama(path, arch="llama", weight_type="q8_0", tied=False, seed=0, chat_template=None):
    from lmengine.converters.hf import write_llama_gguf
    from tiny_models import byte_level_vocab
    rng = np.random.default_rng(seed)
    hparams = dict(n_layers=2, dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2, rope_base=10000.0,
                   norm_eps=1e-5, n_ctx=256, vocab_size=300, name="fuzz")
    vocab = _with_merges(byte_level_vocab(300))
    if chat_template:
        vocab["chat_template"] = chat_template
    write_llama_gguf(str(path), arch, hparams, _llama_tensors(rng, arch, tied=tied), weight_type, vocab)


def write_lstm(path, seed=0):
    from lmengine.converters.lstm_gguf import (LSTMLayerWeights, LSTMWeights, Vocabulary,
                                               write_lstm_gguf)
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)   # noqa: E731
    vocab, emb, hidden = 40, 16, 32
    layers = [LSTMLayerWeights(w(4 * hidden, emb), w(4 * hidden, hidden), w(4 * hidden)),
              LSTMLayerWeights(w(4 * hidden, hidden), w(4 * hidden, hidden), w(4 * hidden))]
    weights = LSTMWeights(w(vocab, emb), layers, w(vocab, hidden), w(vocab), source="pytorch")
    tokens = [chr(ord("a") + i) for i in range(26)] + [str(i) for i in range(10)] + [" ", ".", "<s>", "</s>"]
    write_lstm_gguf(str(path), weights, Vocabulary("char", tokens, special={"bos": 38, "eos": 39}),
                    out_type="Q8_0", progress=None)


def write_with_gguf_writer(path):
    """A tiny tied llama written straight by gguf.GGUFWriter: F16 matrices, a string array, a
    nested array, a chat template."""
    from tiny_models import byte_level_vocab
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("context_length", 128), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2),
                       ("attention.head_count_kv", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("fuzz.nested", [[1, 2], [3]])
    vocab = _with_merges(byte_level_vocab(260))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    w.add_token_merges(vocab["merges"])
    w.add_eos_token_id(259)
    w.add_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    for name, arr in _llama_tensors(rng, "llama", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn=64,
                                    vocab=260, tied=True).items():
        w.add_tensor(name, arr.astype(np.float16) if arr.ndim == 2 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_quantized(path, tmp_path):
    from lmengine.converters.quantize import quantize_gguf
    src = tmp_path / "quantize_src.gguf"
    write_llama(src, weight_type="f32", seed=5)
    quantize_gguf(str(src), str(path), "Q4_0", progress=None)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """name -> bytes of each valid seed file."""
    d = tmp_path_factory.mktemp("fuzz_seeds")
    writers = {"llama_q8": lambda p: write_llama(p, weight_type="q8_0"),
               "qwen2_q4_1": lambda p: write_llama(p, arch="qwen2", weight_type="q4_1", tied=True,
                                                   chat_template="{{ messages[0].content }}"),
               "lstm_q8": write_lstm,
               "gguf_writer_f16": write_with_gguf_writer,
               "quantized_q4_0": lambda p: write_quantized(p, d)}
    out = {}
    for name, write in writers.items():
        path = d / f"{name}.gguf"
        write(path)
        out[name] = path.read_bytes()
    return out


# -- an independent walk over the header -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Field:
    kind: str       # "n_tensors", "n_kv", "str_len", "vtype", "arr_type", "arr_count", "scalar",
                    # "n_dims", "dim", "ttype", "offset"
    pos: int        # byte offset in the file
    size: int       # bytes: 4 or 8 (1, 2 for small scalars)
    where: str      # the key or tensor it belongs to


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def walk_header(raw: bytes):
    """(fields, data_start, alignment, [Tensor]) of a valid GGUF, tensors in the order of their infos."""
    fields = [Field("n_tensors", 8, 8, "header"), Field("n_kv", 16, 8, "header")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos = 24

    def string(pos, where):
        (n,) = struct.unpack_from("<Q", raw, pos)
        fields.append(Field("str_len", pos, 8, where))
        return raw[pos + 8: pos + 8 + n].decode(), pos + 8 + n

    def value(vtype, pos, where):
        if vtype in _SCALAR_SIZES:
            fields.append(Field("scalar", pos, _SCALAR_SIZES[vtype], where))
            return pos + _SCALAR_SIZES[vtype]
        if vtype == 8:
            return string(pos, where)[1]
        item_type, n = struct.unpack_from("<IQ", raw, pos)
        fields.append(Field("arr_type", pos, 4, where))
        fields.append(Field("arr_count", pos + 4, 8, where))
        pos += 12
        for _ in range(n):
            pos = value(item_type, pos, where)
        return pos

    alignment = 32
    for _ in range(n_kv):
        key, pos = string(pos, "key")
        (vtype,) = struct.unpack_from("<I", raw, pos)
        fields.append(Field("vtype", pos, 4, key))
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", raw, pos + 4)[0]
        pos = value(vtype, pos + 4, key)
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos, "tensor name")
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        fields.append(Field("n_dims", pos, 4, name))
        pos += 4
        for _ in range(n_dims):
            fields.append(Field("dim", pos, 8, name))
            pos += 8
        fields.append(Field("ttype", pos, 4, name))
        fields.append(Field("offset", pos + 4, 8, name))
        type_id, offset = struct.unpack_from("<IQ", raw, pos)
        tensors.append(Tensor(name, pos + 4, type_id, offset))
        pos += 12
    data_start = (pos + alignment - 1) // alignment * alignment
    return fields, data_start, alignment, tensors


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    offset_pos: int     # where its offset field is
    type_id: int
    offset: int         # from the start of the data section


# -- the mutations ----------------------------------------------------------------------------------

def _set(data: bytearray, pos: int, size: int, value: int) -> None:
    data[pos: pos + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _get(data, pos: int, size: int) -> int:
    return int.from_bytes(data[pos: pos + size], "little")


def _pick_field(fields, rng, wanted):
    """A field for which wanted(field) holds, or None: first a (kind, key or tensor) group, then a
    field in it, so that the 300 items of a token array do not crowd out the single fields."""
    groups: dict = {}
    for f in fields:
        if wanted(f):
            groups.setdefault((f.kind, f.where), []).append(f)
    if not groups:
        return None
    group = list(groups.values())[int(rng.integers(len(groups)))]
    return group[int(rng.integers(len(group)))]


# mutation kind -> weight: headers (for the metadata path) ...
HEADER_MIX = {"bit_header": 12, "two_bits": 4, "byte_header": 8, "field_value": 12, "field_inflate": 12,
              "truncate": 5, "type_id": 10, "offset": 10, "vtype": 5, "scalar_value": 6, "model_key": 8,
              "bit_data": 4, "data_special": 2, "data_scale": 2}
# ... and more data and model sizes for the cases that run the model
MODEL_MIX = {"bit_header": 6, "two_bits": 2, "byte_header": 4, "field_value": 4, "field_inflate": 4,
             "truncate": 2, "type_id": 4, "offset": 2, "vtype": 2, "scalar_value": 8, "model_key": 16,
             "bit_data": 12, "data_special": 12, "data_scale": 22}


def mutate(raw: bytes, walk, rng, mix=HEADER_MIX) -> tuple:
    """(mutated bytes, description) of one seeded mutation of raw, of a kind drawn from mix."""
    fields, data_start, alignment, tensors = walk
    data = bytearray(raw)
    kinds = sorted(mix)
    weights = np.array([mix[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind in ("bit_header", "two_bits"):
        what = []
        for _ in range(1 if kind == "bit_header" else 2):
            pos, bit = int(rng.integers(4, data_start)), int(rng.integers(8))
            data[pos] ^= 1 << bit
            what.append(f"byte {pos} bit {bit}")
        return bytes(data), f"{kind}: flip {', '.join(what)}"
    if kind == "bit_data":
        pos, bit = int(rng.integers(data_start, len(raw))), int(rng.integers(8))
        data[pos] ^= 1 << bit
        return bytes(data), f"bit_data: flip byte {pos} bit {bit}"
    if kind == "byte_header":
        pos, v = int(rng.integers(4, data_start)), int(rng.choice(INTERESTING_8))
        data[pos] = v
        return bytes(data), f"byte_header: byte {pos} = {v:#x}"
    if kind == "truncate":
        cut = int(rng.integers(0, len(raw)))
        return bytes(data[:cut]), f"truncate: at byte {cut} of {len(raw)}"
    if kind == "data_scale":       # an extreme value in a tensor's first float: an F32 / F16 value, a block's d
        t = tensors[int(rng.integers(len(tensors)))]
        pos = data_start + t.offset
        if t.type_id == 0:
            v = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\xff", b"\xff\xff\x7f\x7f",
                            b"\xff\xff\x7f\xff", b"\xca\xf2\x49\x71"])       # NaN, -inf, +-max, 1e30
        else:           # F16 value, or the f16 d at byte 0 of a Q8_0 / Q4_0 / Q4_1 block
            v = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\xff\x7b", b"\xff\xfb"])  # NaN, inf, +-65504
        data[pos: pos + len(v)] = bytes(v)
        return bytes(data), f"data_scale: first value of {t.name!r} = {bytes(v).hex()}"
    if kind == "data_special":     # a NaN / inf / huge value in the tensor data
        pos = data_start + 2 * int(rng.integers(0, (len(raw) - data_start) // 2))
        v = bytes(rng.choice([b"\x00\x7c", b"\x00\xfe", b"\xff\x7b", b"\x00\x00\x80\x7f",
                              b"\x00\x00\xc0\x7f", b"\xff\xff\x7f\x7f"]))
        data[pos: pos + len(v)] = v
        return bytes(data), f"data_special: bytes {pos}.. = {v.hex()}"
    if kind == "model_key":         # a size the config reads: 0, 1, huge, off by one, a flipped bit
        f = _pick_field(fields, rng, lambda f: f.kind == "scalar" and f.where.split(".")[0] in MODEL_ARCHS
                        and f.size in (4, 8))
        if f is not None:
            old = _get(data, f.pos, f.size)
            new = int(rng.choice([0, 1, old - 1, old + 1, old * 2, 33554433, 0xFFFFFFFF,
                                  old ^ (1 << int(rng.integers(8 * f.size)))]))
            _set(data, f.pos, f.size, new)
            return bytes(data), f"model_key: {f.where!r} at byte {f.pos}: {old} -> {new % (1 << (8 * f.size))}"
        kind = "field_value"
    pick = {"field_value": None, "field_inflate": ("str_len", "arr_count", "n_tensors", "n_kv", "dim",
                                                    "n_dims", "scalar"),
            "type_id": ("ttype", "arr_type"), "offset": ("offset",), "vtype": ("vtype",),
            "scalar_value": ("scalar",)}[kind]
    f = _pick_field(fields, rng, lambda f: pick is None or f.kind in pick)
    old = _get(data, f.pos, f.size)
    if kind == "field_value":
        table = {1: INTERESTING_8, 2: (0, 1, 0x7C00, 0xFFFF)}.get(f.size, INTERESTING_32 if f.size == 4
                                                                   else INTERESTING_64)
        new = int(rng.choice(table))
    elif kind == "field_inflate":
        how = rng.choice(["double", "plus_one", "bit"])
        new = {"double": old * 2 + 1, "plus_one": old + 1,
               "bit": old ^ (1 << int(rng.integers(8 * f.size)))}[how]
    elif kind == "type_id":
        new = int(rng.integers(0, 45)) if rng.random() < 0.8 else int(rng.choice(INTERESTING_32))
    elif kind == "offset":
        i = [t.name for t in tensors].index(f.where)
        prev = tensors[i - 1].offset if i else 0
        new = int(rng.choice([0, prev, old + alignment, max(0, old - alignment), old + 1, old + 4,
                              old * 2, int(rng.integers(0, len(raw)))]))
    elif kind == "vtype":
        new = int(rng.integers(0, 14))
    else:   # scalar_value: a special float or integer in a scalar's bytes
        new = int(rng.choice([0, 1, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000, 0x7FC00000, 0xFF800000,
                              0x00000001, 0x3F800000]))
    if new % (1 << (8 * f.size)) == old:
        new = old ^ 1           # never a no-op
    _set(data, f.pos, f.size, new)
    return bytes(data), f"{kind}: {f.kind} of {f.where!r} at byte {f.pos}: {old} -> {new % (1 << (8 * f.size))}"


# -- the checks -------------------------------------------------------------------------------------

def load_metadata_path(path: str):
    """GGUFFile -> config -> tokenizer -> chat template, as `LLM` does before building the backend."""
    f = GGUFFile(path)
    config = config_from_gguf(f)
    if config.arch == "lstm":
        lstm_tokenizer_from_gguf(f)
        return
    Tokenizer.from_gguf(f)
    ChatTemplate.from_gguf(f)


def load_and_generate(path: str):
    """Load with LLM, generate 2 tokens greedily (ids must be in the vocabulary), and return the
    logits of a 2-token prompt (the caller counts non-finite ones)."""
    from lmengine import LLM, SamplingParams
    llm = LLM(path, warmup=False, n_ctx=64, n_threads=1, seed=0)
    try:
        prompt = [1, 2]
        out = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert all(0 <= t < llm.vocab_size for t in out.token_ids), out.token_ids
        return llm.logits(prompt)
    finally:
        llm.close()


def run_cases(seeds, tmp_path, n_cases, check, seed, mix=HEADER_MIX):
    """Run n_cases mutations through `check`. Returns (failures, outcome counts, slowest case,
    cases that loaded but gave non-finite logits)."""
    rng = np.random.default_rng(seed)
    walks = {name: walk_header(raw) for name, raw in seeds.items()}
    names = sorted(seeds)
    failures, outcomes, slowest, non_finite = [], {}, (0.0, ""), []
    for case in range(n_cases):
        name = names[case % len(names)]
        data, what = mutate(seeds[name], walks[name], rng, mix)
        path = tmp_path / f"case{case % 4}.gguf"
        path.write_bytes(data)
        desc = f"case {case} ({name}): {what}"
        t0 = time.perf_counter()
        try:
            result = check(str(path))
            outcome = "loaded"
            if isinstance(result, np.ndarray) and not np.all(np.isfinite(result)):
                non_finite.append(desc)
        except LMEngineError as e:
            outcome = type(e).__name__
            if outcome == "NonFiniteLogitsError":
                non_finite.append(desc)
            if str(path) not in str(e) and outcome not in ERRORS_WITHOUT_PATH:
                failures.append(f"{desc}: {outcome} does not name the file: {e}")
        except Exception:       # noqa: BLE001  (any other exception is the failure being looked for)
            outcome = "CRASH"
            failures.append(f"{desc}:\n{traceback.format_exc(limit=-6)}")
        seconds = time.perf_counter() - t0
        if seconds > slowest[0]:
            slowest = (seconds, desc)
        if seconds > CASE_SECONDS:
            failures.append(f"{desc}: took {seconds:.2f} s (limit {CASE_SECONDS} s)")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return failures, outcomes, slowest, non_finite


# errors raised after loading, about a request rather than the file (a prompt token the
# tokenizer of a mutated vocabulary does not have, a context too short for it), and the request-level
# error for NaN / inf logits (finite but extreme weights, e.g. a norm weight of 3.4e38, overflow)
ERRORS_WITHOUT_PATH = ("TokenIdError", "ContextLengthError", "InvalidParameterError", "NonFiniteLogitsError")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: kilobytes


def test_the_seed_files_load(seeds, tmp_path):
    for name, raw in seeds.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(raw)
        load_metadata_path(str(path))


def _report(n_cases, outcomes, slowest, non_finite) -> None:
    print(f"\n{n_cases} cases: {outcomes}; slowest {slowest[0] * 1e3:.1f} ms: {slowest[1]}")
    # the mutations must reach the checks: most cases fail to load, in many different ways
    assert outcomes.get("loaded", 0) < n_cases // 2 and len(outcomes) >= 6, outcomes
    if non_finite:
        print(f"{len(non_finite)} loaded but gave NaN or inf logits (NonFiniteLogitsError, or returned by "
              f"LLM.logits):\n  " + "\n  ".join(non_finite))


def test_mutated_headers_load_or_raise_lmengine_errors(seeds, tmp_path):
    rss0 = _peak_rss()
    failures, outcomes, slowest, non_finite = run_cases(seeds, tmp_path, N_META_CASES, load_metadata_path, SEED)
    _report(N_META_CASES, outcomes, slowest, non_finite)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    assert _peak_rss() - rss0 < MAX_RSS_GROWTH


def test_mutated_models_load_and_generate_or_raise(seeds, tmp_path):
    # the seed files first, untimed: the forward passes are compiled (or loaded from Numba's
    # cache) here, not inside a timed case
    for name, raw in seeds.items():
        path = tmp_path / f"seed_{name}.gguf"
        path.write_bytes(raw)
        assert np.all(np.isfinite(load_and_generate(str(path)))), name
    rss0 = _peak_rss()
    failures, outcomes, slowest, non_finite = run_cases(seeds, tmp_path, N_LLM_CASES, load_and_generate, SEED + 1,
                                                        MODEL_MIX)
    _report(N_LLM_CASES, outcomes, slowest, non_finite)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    assert _peak_rss() - rss0 < MAX_RSS_GROWTH
