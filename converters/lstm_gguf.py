"""The canonical GGUF layout of an LSTM language model (architecture `lstm`), and its writer.

This is the one place where the layout is defined; the Keras and PyTorch importers produce an
`LSTMWeights` in this layout, the engine reads it back (engine/models/lstm.py), and the ONNX
exporter turns it into the ONNX gate order.

The model
---------
    ids [n]  ->  token_embd          x_0 = E[id]                                  [n, emb_dim]
             ->  LSTM layer l = 0 .. L-1 (hidden size H_l; input x_l, output x_{l+1} = h)
                     gates = W_ih x_l + W_hh h_prev + b                           [4 H_l]
                     i = sigmoid(gates[0H:1H])    input gate
                     f = sigmoid(gates[1H:2H])    forget gate
                     g = tanh   (gates[2H:3H])    cell candidate
                     o = sigmoid(gates[3H:4H])    output gate
                     c = f * c_prev + i * g ;  h = o * tanh(c)
             ->  output              logits = W_out h_{L-1} + b_out               [n, vocab]

`logits` are the pre-activation values of the output layer. For a Keras model whose last Dense
has `activation="softmax"`, softmax(logits) is exactly the Keras output (the converter stores the
Dense kernel, not the probabilities); for a PyTorch model ending in nn.Linear they are its output.

Gate order
----------
Canonical (stored in the GGUF) = i, f, g, o, as blocks of H rows of W_ih, W_hh and b.
    Keras   LSTMCell: i, f, c, o  (c is g)     kernel [n_in, 4H] and recurrent_kernel [H, 4H]
                                               are stored transposed; one bias [4H]
    PyTorch nn.LSTM:  i, f, g, o               weight_ih_l{k} [4H, n_in], weight_hh_l{k} [4H, H],
                                               two biases bias_ih + bias_hh, summed here
    ONNX    LSTM op:  i, o, f, c               W [1, 4H, n_in], R [1, 4H, H], B [1, 8H] = Wb ++ Rb
`GATE_ORDERS` and `reorder_gates` convert between them.

Metadata keys (all written by `write_lstm_gguf`)
------------------------------------------------
    general.architecture      "lstm"
    lstm.vocab_size           u32   rows of token_embd and output
    lstm.embedding_length     u32   emb_dim
    lstm.block_count          u32   L, number of stacked LSTM layers
    lstm.hidden_sizes         u32[] H_l of each layer (Keras allows them to differ)
    lstm.gate_order           str   "ifgo" (checked on load)
    lstm.output_activation    str   what the source model applied to the logits: "softmax",
                                    "log_softmax" or "linear" (informational; see above)
    lstm.source               str   "keras" | "pytorch"
    tokenizer.ggml.model      str   "char" (one token per Unicode character, plus special tokens)
                                    or "word" (tokens are words; see engine/lstm_tokenizer.py)
    tokenizer.ggml.tokens     str[] the vocabulary, index = token id
    tokenizer.ggml.token_type i32[] 1 normal, 2 unknown, 3 control (special), 5 unused
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id   u32, when the vocabulary has them
    tokenizer.ggml.add_bos_token                        bool (False unless the vocabulary asks)
    tokenizer.word.lowercase  bool  word tokenizers: lowercase text before lookup
    tokenizer.word.pattern    str   word tokenizers: regex whose matches are the words
    tokenizer.word.separator  str   word tokenizers: text put between decoded words

Tensors (NumPy shape, rows first; matrices may be F32, F16 or Q8_0, vectors are F32)
-----------------------------------------------------------------------------------
    token_embd.weight         [vocab, emb_dim]
    blk.{l}.lstm_ih.weight    [4 H_l, n_in_l]     n_in_0 = emb_dim, n_in_l = H_{l-1}
    blk.{l}.lstm_hh.weight    [4 H_l, H_l]
    blk.{l}.lstm.bias         [4 H_l]             b_ih + b_hh (zeros for a bias-free model)
    output.weight             [vocab, H_{L-1}]
    output.bias               [vocab]             (zeros for a bias-free head)
Q8_0 needs rows whose length is a multiple of 32; a matrix that does not fit is written as F16.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .errors import ConversionError

ARCH = "lstm"
CANONICAL_GATE_ORDER = "ifgo"
# Gate order of each framework, in the canonical letters (Keras and ONNX call g "c").
GATE_ORDERS = {"keras": "ifgo", "pytorch": "ifgo", "onnx": "iofg", "canonical": "ifgo"}
OUTPUT_ACTIVATIONS = ("softmax", "log_softmax", "linear")
TOKENIZER_KINDS = ("char", "word")
OUT_TYPES = ("F32", "F16", "Q8_0")

# Metadata keys.
KEY_VOCAB_SIZE = "lstm.vocab_size"
KEY_EMBEDDING_LENGTH = "lstm.embedding_length"
KEY_BLOCK_COUNT = "lstm.block_count"
KEY_HIDDEN_SIZES = "lstm.hidden_sizes"
KEY_GATE_ORDER = "lstm.gate_order"
KEY_OUTPUT_ACTIVATION = "lstm.output_activation"
KEY_SOURCE = "lstm.source"
KEY_WORD_LOWERCASE = "tokenizer.word.lowercase"
KEY_WORD_PATTERN = "tokenizer.word.pattern"
KEY_WORD_SEPARATOR = "tokenizer.word.separator"

# Tensor names.
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
OUTPUT_BIAS = "output.bias"


def lstm_ih(layer: int) -> str:
    return f"blk.{layer}.lstm_ih.weight"


def lstm_hh(layer: int) -> str:
    return f"blk.{layer}.lstm_hh.weight"


def lstm_bias(layer: int) -> str:
    return f"blk.{layer}.lstm.bias"


# Token types (gguf.TokenType values).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_UNUSED = 1, 2, 3, 5

DEFAULT_WORD_PATTERN = r"\S+"


def reorder_gates(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Reorder the four gate blocks along axis 0 of `a` ([4H, ...] or [4H]) from gate order `src`
    to `dst` (strings of the letters i, f, g, o, or keys of GATE_ORDERS)."""
    src, dst = GATE_ORDERS.get(src, src), GATE_ORDERS.get(dst, dst)
    if sorted(src) != sorted("ifgo") or sorted(dst) != sorted("ifgo"):
        raise ValueError(f"gate orders must be permutations of 'ifgo', got {src!r} -> {dst!r}")
    if a.shape[0] % 4:
        raise ConversionError(f"gate axis of length {a.shape[0]} is not a multiple of 4")
    blocks = np.split(a, 4, axis=0)
    return np.concatenate([blocks[src.index(gate)] for gate in dst], axis=0)


# --- weights ----------------------------------------------------------------------------------

@dataclass
class LSTMLayerWeights:
    """One LSTM layer in canonical layout (gate order i, f, g, o), float32."""

    w_ih: np.ndarray    # [4H, n_in]
    w_hh: np.ndarray    # [4H, H]
    bias: np.ndarray    # [4H]  (b_ih + b_hh)

    @property
    def hidden_size(self) -> int:
        return self.w_hh.shape[1]


@dataclass
class LSTMWeights:
    """A whole LSTM language model in canonical layout, float32."""

    embedding: np.ndarray           # [vocab, emb_dim]
    layers: list                    # [LSTMLayerWeights]
    output_weight: np.ndarray       # [vocab, H_last]
    output_bias: np.ndarray         # [vocab]
    output_activation: str = "linear"
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def hidden_sizes(self) -> list:
        return [layer.hidden_size for layer in self.layers]

    def validate(self) -> None:
        """Raise ConversionError naming the tensor whose shape does not chain."""
        if self.embedding.ndim != 2:
            raise ConversionError(f"embedding must be 2-D [vocab, emb_dim], got shape {self.embedding.shape}")
        vocab, n_in = self.embedding.shape
        if not self.layers:
            raise ConversionError("an LSTM language model needs at least one LSTM layer")
        for l, layer in enumerate(self.layers):
            h = layer.w_hh.shape[1] if layer.w_hh.ndim == 2 else -1
            want = {"w_ih": (4 * h, n_in), "w_hh": (4 * h, h), "bias": (4 * h,)}
            for name, shape in want.items():
                got = getattr(layer, name).shape
                if h <= 0 or got != shape:
                    raise ConversionError(f"LSTM layer {l}: {name} has shape {got}, expected {shape} "
                                          f"(input size {n_in}, hidden size {h})")
            n_in = h
        if self.output_weight.shape != (vocab, n_in):
            raise ConversionError(f"output weight has shape {self.output_weight.shape}, expected {(vocab, n_in)} "
                                  f"(vocab {vocab}, last hidden size {n_in})")
        if self.output_bias.shape != (vocab,):
            raise ConversionError(f"output bias has shape {self.output_bias.shape}, expected {(vocab,)}")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ConversionError(f"output activation {self.output_activation!r} is not supported "
                                  f"(a language model head ends in one of {OUTPUT_ACTIVATIONS})")
        for name, a in self.named_tensors():
            if not np.all(np.isfinite(a)):
                raise ConversionError(f"tensor {name!r} holds NaN or infinite values")

    def named_tensors(self):
        """(GGUF tensor name, float32 array) in file order."""
        yield TOKEN_EMBD, self.embedding
        for l, layer in enumerate(self.layers):
            yield lstm_ih(l), layer.w_ih
            yield lstm_hh(l), layer.w_hh
            yield lstm_bias(l), layer.bias
        yield OUTPUT, self.output_weight
        yield OUTPUT_BIAS, self.output_bias


# --- vocabulary -------------------------------------------------------------------------------

SPECIAL_ROLES = ("bos", "eos", "unk", "pad")


@dataclass
class Vocabulary:
    """A character or word vocabulary: `tokens[i]` is the text of token id i."""

    kind: str                                   # "char" | "word"
    tokens: list
    special: dict = field(default_factory=dict)  # role ("bos", "eos", "unk", "pad") -> token id
    control_ids: set = field(default_factory=set)  # other special (control) token ids
    unused_ids: set = field(default_factory=set)   # placeholder ids (gaps in a token -> id map)
    add_bos: bool = False
    lowercase: bool = False                     # word only
    word_pattern: str = DEFAULT_WORD_PATTERN    # word only
    separator: str = " "                        # word only

    def token_types(self) -> list:
        types = [TOKEN_NORMAL] * len(self.tokens)
        for i in self.control_ids:
            types[i] = TOKEN_CONTROL
        for role, i in self.special.items():
            types[i] = TOKEN_UNKNOWN if role == "unk" else TOKEN_CONTROL
        for i in self.unused_ids:
            types[i] = TOKEN_UNUSED
        return types

    def validate(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ConversionError(f"vocabulary type {self.kind!r} is not one of {TOKENIZER_KINDS}")
        if not self.tokens:
            raise ConversionError("the vocabulary is empty")
        for i, t in enumerate(self.tokens):
            if not isinstance(t, str) or t == "":
                raise ConversionError(f"vocabulary token {i} is {t!r}; every token must be a non-empty string")
        seen: dict = {}
        for i, t in enumerate(self.tokens):
            if t in seen:
                raise ConversionError(f"vocabulary token {t!r} appears twice (ids {seen[t]} and {i})")
            seen[t] = i
        for role, i in self.special.items():
            if role not in SPECIAL_ROLES or not 0 <= i < len(self.tokens):
                raise ConversionError(f"special token {role}={i} is not a role of {SPECIAL_ROLES} "
                                      f"with an id in [0, {len(self.tokens)})")
        if self.kind == "word":
            import re
            try:
                re.compile(self.word_pattern)
            except re.error as e:
                raise ConversionError(f"word_pattern {self.word_pattern!r} is not a valid regex: {e}") from None
        if self.add_bos and "bos" not in self.special:
            raise ConversionError("add_bos is set but the vocabulary names no bos token")

    def fit_to(self, n_vocab: int, progress: Callable | None = None) -> "Vocabulary":
        """Check the vocabulary against the model's `n_vocab` rows: too many tokens is an error,
        too few are padded with unused placeholder tokens (a model may reserve rows)."""
        if len(self.tokens) > n_vocab:
            raise ConversionError(f"the vocabulary has {len(self.tokens)} tokens but the model has only {n_vocab} "
                                  f"embedding rows")
        if len(self.tokens) < n_vocab:
            extra = range(len(self.tokens), n_vocab)
            if progress:
                progress(f"vocabulary has {len(self.tokens)} tokens for {n_vocab} model rows: "
                         f"ids {extra.start}..{n_vocab - 1} become unused placeholders")
            return replace(self, tokens=list(self.tokens) + [f"<unused_{i}>" for i in extra],
                           unused_ids=set(self.unused_ids) | set(extra))
        return self


def load_vocabulary(source) -> Vocabulary:
    """A `Vocabulary` from a JSON file path or an already loaded object. Accepted forms:

    - {"type": "char"|"word", "tokens": [...] (or {token: id}), "bos_token": "<s>", "eos_token": ...,
       "unk_token": ..., "pad_token": ..., "special_tokens": [...], "add_bos": false,
       "lowercase": false, "word_pattern": "\\\\S+", "separator": " "}   (everything but tokens optional)
    - a list of token strings (index = id)
    - a {token: id} dict, as Keras `Tokenizer.word_index` or torchtext `stoi` give; ids missing from
      0..max become unused placeholders (Keras reserves id 0 for padding)
    Without "type", a vocabulary whose ordinary tokens are all single characters is "char", else "word".
    """
    if isinstance(source, Vocabulary):
        return source
    where = "vocabulary"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            with open(where, encoding="utf-8") as fh:
                source = json.load(fh)
        except FileNotFoundError:
            raise ConversionError(f"{where}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{where}: not a JSON vocabulary: {e}") from None
    is_spec = isinstance(source, dict) and isinstance(source.get("tokens"), (list, dict))
    spec = source if is_spec else {"tokens": source}
    unknown = set(spec) - {"type", "tokens", "bos_token", "eos_token", "unk_token", "pad_token",
                           "special_tokens", "add_bos", "lowercase", "word_pattern", "separator"}
    if unknown:
        raise ConversionError(f"{where}: unknown vocabulary keys {sorted(unknown)}")
    tokens, unused = _token_list(spec["tokens"], where)
    index = {t: i for i, t in enumerate(tokens)}
    special = {}
    for role in SPECIAL_ROLES:
        text = spec.get(role + "_token")
        if text is not None:
            if text not in index:
                raise ConversionError(f"{where}: {role}_token {text!r} is not in the vocabulary")
            special[role] = index[text]
    control = set()
    for text in spec.get("special_tokens", []):
        if text not in index:
            raise ConversionError(f"{where}: special token {text!r} is not in the vocabulary")
        control.add(index[text])
    kind = spec.get("type")
    if kind is None:
        ordinary = [t for i, t in enumerate(tokens) if i not in unused and i not in control
                    and i not in special.values()]
        kind = "char" if all(len(t) == 1 for t in ordinary) else "word"
    vocab = Vocabulary(kind=kind, tokens=tokens, special=special, control_ids=control, unused_ids=unused,
                       add_bos=bool(spec.get("add_bos", False)), lowercase=bool(spec.get("lowercase", False)),
                       word_pattern=spec.get("word_pattern", DEFAULT_WORD_PATTERN),
                       separator=spec.get("separator", " "))
    vocab.validate()
    return vocab


def _token_list(tokens, where: str):
    if isinstance(tokens, (list, tuple)):
        return list(tokens), set()
    if isinstance(tokens, dict):
        ids = list(tokens.values())
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConversionError(f"{where}: a token -> id map needs non-negative integer ids")
        if len(set(ids)) != len(ids):
            raise ConversionError(f"{where}: two tokens share an id in the token -> id map")
        n = max(ids) + 1
        out = [f"<unused_{i}>" for i in range(n)]
        for t, i in tokens.items():
            out[i] = t
        unused = set(range(n)) - set(ids)
        return out, unused
    raise ConversionError(f"{where}: tokens must be a list of strings or a token -> id map, "
                          f"got {type(tokens).__name__}")


# --- description (what a weights file does not say) ------------------------------------------

DESCRIPTION_KEYS = ("embedding", "lstm", "output", "batch_first", "num_layers", "output_activation", "vocab")


def load_description(description) -> dict:
    """The architecture description of a model file, as a dict, from a JSON file path, a dict, or
    None. Keys (all optional): "embedding" (tensor key), "lstm" and "output" (module prefixes),
    "batch_first", "num_layers" (checked), "output_activation", "vocab" (a vocabulary or the path of
    one, relative to the description file)."""
    if description is None:
        return {}
    if isinstance(description, (str, os.PathLike)):
        path = os.fspath(description)
        try:
            with open(path, encoding="utf-8") as fh:
                description = json.load(fh)
        except FileNotFoundError:
            raise ConversionError(f"{path}: description file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: not a JSON description: {e}") from None
        if isinstance(description, dict) and isinstance(description.get("vocab"), str) \
                and not os.path.isabs(description["vocab"]):
            description["vocab"] = os.path.join(os.path.dirname(os.path.abspath(path)), description["vocab"])
    if not isinstance(description, dict):
        raise ConversionError(f"the description must be a JSON object, got {type(description).__name__}")
    unknown = set(description) - set(DESCRIPTION_KEYS)
    if unknown:
        raise ConversionError(f"unknown description keys {sorted(unknown)} (known: {list(DESCRIPTION_KEYS)})")
    return dict(description)


# --- writer -----------------------------------------------------------------------------------

def print_progress(msg: str) -> None:
    """The converters' default progress callback: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def encode_tensor(a: np.ndarray, out_type: str):
    """float32 array -> (raw array for GGUFWriter.add_tensor, ggml type name actually used).
    Vectors stay F32; Q8_0 falls back to F16 when the row length is not a multiple of 32."""
    import gguf
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim == 1 or out_type == "F32":
        return a, "F32"
    if out_type == "Q8_0" and a.shape[-1] % 32 == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), "Q8_0"
    return a.astype(np.float16), "F16"


def write_lstm_gguf(path, weights: LSTMWeights, vocab: Vocabulary, out_type: str = "F32", name: str = "",
                    progress: Callable | None = print_progress) -> dict:
    """Write `weights` and `vocab` as a GGUF file of architecture `lstm`. Returns a summary dict
    (tensor name -> ggml type, bytes written). `progress` receives one line per step (None: silent)."""
    import gguf
    say = progress or (lambda msg: None)
    if out_type not in OUT_TYPES:
        raise ConversionError(f"output type {out_type!r} is not supported for LSTM models (choose one of {OUT_TYPES})")
    weights.validate()
    vocab = vocab.fit_to(weights.vocab_size, say)
    vocab.validate()
    path = os.fspath(path)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(name or os.path.splitext(os.path.basename(path))[0])
    writer.add_uint32(KEY_VOCAB_SIZE, weights.vocab_size)
    writer.add_uint32(KEY_EMBEDDING_LENGTH, weights.embedding.shape[1])
    writer.add_uint32(KEY_BLOCK_COUNT, len(weights.layers))
    writer.add_array(KEY_HIDDEN_SIZES, [int(h) for h in weights.hidden_sizes])
    writer.add_string(KEY_GATE_ORDER, CANONICAL_GATE_ORDER)
    writer.add_string(KEY_OUTPUT_ACTIVATION, weights.output_activation)
    if weights.source:
        writer.add_string(KEY_SOURCE, weights.source)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
    _add_vocabulary(writer, vocab)

    types = {}
    tensors = list(weights.named_tensors())
    for k, (tensor_name, a) in enumerate(tensors):
        raw, used = encode_tensor(a, out_type)
        raw_dtype = getattr(gguf.GGMLQuantizationType, used)
        writer.add_tensor(tensor_name, raw, raw_dtype=raw_dtype)
        types[tensor_name] = used
        note = f" (rows of {a.shape[-1]} are not a multiple of 32)" if used != out_type and a.ndim == 2 else ""
        say(f"[{k + 1}/{len(tensors)}] {tensor_name:24s} {str(tuple(a.shape)):14s} -> {used}{note}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = os.path.getsize(path)
    say(f"wrote {path}: lstm, {len(weights.layers)} layer(s), hidden {weights.hidden_sizes}, "
        f"vocab {weights.vocab_size} ({vocab.kind}), {size / 1e6:.2f} MB")
    return {"path": path, "types": types, "bytes": size}


def _add_vocabulary(writer, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model(vocab.kind)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types())
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for role, token_id in vocab.special.items():
        setters[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.kind == "word":
        writer.add_bool(KEY_WORD_LOWERCASE, vocab.lowercase)
        writer.add_string(KEY_WORD_PATTERN, vocab.word_pattern)
        writer.add_string(KEY_WORD_SEPARATOR, vocab.separator)


# --- one entry point for the CLI ----------------------------------------------------------------


def dequantized_tensor(f, name: str) -> np.ndarray:
    """Tensor `name` of an open GGUFFile as float32 in its NumPy shape (decoded by the gguf
    package), for exporters that re-encode the weights."""
    import gguf
    info = f.tensors.get(name)
    if info is None:
        raise ConversionError(f"{f.path}: tensor {name!r} is missing")
    raw = np.asarray(f.tensor_bytes(name))
    if info.type_name == "F32":
        return raw.view(np.float32).reshape(info.shape).copy()
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    values = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(info.type_id))
    return np.asarray(values, dtype=np.float32).reshape(info.shape)
