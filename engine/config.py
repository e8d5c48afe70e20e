"""Frozen model configs built from GGUF metadata: the only reader of architecture keys.

`config_from_gguf(gguf_file)` looks at `general.architecture` and returns the dataclass for that
family. Each dataclass also checks the tensors it needs against its sizes, so a file whose
tensors disagree with its metadata fails at load time with the tensor's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmengine.converters import lstm_gguf as layout
from lmengine.converters.gguf_file import GGUFFile
from lmengine.kernels import quant
from lmengine.kernels.blockcheck import check_finite_scales

from .errors import (CorruptTensorError, MetadataError, TensorShapeError, UnsupportedArchitectureError,
                     UnsupportedQuantTypeError)

TRANSFORMER_ARCHS = ("llama", "qwen2")


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer of the llama family (llama, qwen2)."""

    arch: str                 # "llama" | "qwen2"
    n_layers: int             # {arch}.block_count
    dim: int                  # {arch}.embedding_length (model width)
    ffn_dim: int              # {arch}.feed_forward_length
    n_heads: int              # {arch}.attention.head_count
    n_kv_heads: int           # {arch}.attention.head_count_kv (== n_heads without GQA)
    head_dim: int             # dim // n_heads (or {arch}.attention.key_length)
    rope_base: float          # {arch}.rope.freq_base
    rope_dim: int             # {arch}.rope.dimension_count (rotated dims per head)
    norm_eps: float           # {arch}.attention.layer_norm_rms_epsilon
    n_ctx_train: int          # {arch}.context_length
    vocab_size: int           # {arch}.vocab_size or the tokenizer's token count
    tied_output: bool         # True when output.weight is absent (token_embd is reused)
    qkv_bias: bool            # qwen2: attn_q/k/v carry biases
    name: str = ""            # general.name
    tensor_types: dict = field(default_factory=dict, compare=False)  # type name -> count

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def expected_shapes(self) -> dict:
        """Tensor name -> NumPy-order shape that the forward pass needs."""
        shapes = {"token_embd.weight": (self.vocab_size, self.dim), "output_norm.weight": (self.dim,)}
        if not self.tied_output:
            shapes["output.weight"] = (self.vocab_size, self.dim)
        for i in range(self.n_layers):
            b = f"blk.{i}."
            shapes.update({
                b + "attn_norm.weight": (self.dim,),
                b + "attn_q.weight": (self.q_dim, self.dim),
                b + "attn_k.weight": (self.kv_dim, self.dim),
                b + "attn_v.weight": (self.kv_dim, self.dim),
                b + "attn_output.weight": (self.dim, self.q_dim),
                b + "ffn_norm.weight": (self.dim,),
                b + "ffn_gate.weight": (self.ffn_dim, self.dim),
                b + "ffn_up.weight": (self.ffn_dim, self.dim),
                b + "ffn_down.weight": (self.dim, self.ffn_dim),
            })
            if self.qkv_bias:
                shapes.update({b + "attn_q.bias": (self.q_dim,), b + "attn_k.bias": (self.kv_dim,),
                               b + "attn_v.bias": (self.kv_dim,)})
        return shapes


def _int(f: GGUFFile, key: str, default=None) -> int:
    value = f.get(key, default)
    if value is None:
        raise MetadataError(f"{f.path}: required metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise MetadataError(f"{f.path}: metadata key {key!r} should be a non-negative integer, found {value!r}")
    return int(value)


def _float(f: GGUFFile, key: str, default=None) -> float:
    value = f.get(key, default)
    if value is None:
        raise MetadataError(f"{f.path}: required metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetadataError(f"{f.path}: metadata key {key!r} should be a number, found {value!r}")
    return float(value)


def transformer_config(f: GGUFFile) -> TransformerConfig:
    arch = f.require("general.architecture", str)
    a = arch + "."
    n_heads = _int(f, a + "attention.head_count")
    dim = _int(f, a + "embedding_length")
    if n_heads == 0 or dim % n_heads:
        raise MetadataError(f"{f.path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    n_kv_heads = _int(f, a + "attention.head_count_kv", n_heads)
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise MetadataError(f"{f.path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    head_dim = _int(f, a + "attention.key_length", dim // n_heads)
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise TensorShapeError(f"{f.path}: tensor 'token_embd.weight' is missing")
    tokens = f.get("tokenizer.ggml.tokens")
    vocab_size = _int(f, a + "vocab_size", len(tokens) if tokens is not None else embd.shape[0])
    cfg = TransformerConfig(
        arch=arch,
        n_layers=_int(f, a + "block_count"),
        dim=dim,
        ffn_dim=_int(f, a + "feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_base=_float(f, a + "rope.freq_base", 10000.0),
        rope_dim=_int(f, a + "rope.dimension_count", head_dim),
        norm_eps=_float(f, a + "attention.layer_norm_rms_epsilon", 1e-5),
        n_ctx_train=_int(f, a + "context_length", 2048),
        vocab_size=vocab_size,
        tied_output="output.weight" not in f.tensors,
        qkv_bias=arch == "qwen2",
        name=str(f.get("general.name", "")),
        tensor_types=_count_types(f),
    )
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise MetadataError(f"{f.path}: rope.dimension_count {cfg.rope_dim} must be even and <= head_dim {cfg.head_dim}")
    check_shapes(f, cfg.expected_shapes())
    for name in cfg.expected_shapes():
        _check_blocks(f, name)      # every weight's type is one the kernels read: fail at load, naming it
    return cfg


def check_shapes(f: GGUFFile, expected: dict) -> None:
    for name, shape in expected.items():
        info = f.tensors.get(name)
        if info is None:
            raise TensorShapeError(f"{f.path}: tensor {name!r} is missing (expected shape {shape})")
        if tuple(info.shape) != tuple(shape):
            raise TensorShapeError(
                f"{f.path}: tensor {name!r} has shape {tuple(info.shape)}, the config says {tuple(shape)}")


def _count_types(f: GGUFFile) -> dict:
    counts: dict = {}
    for info in f.tensors.values():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
    return counts


def config_from_gguf(f: GGUFFile):
    """The config dataclass for the file's architecture."""
    arch = f.require("general.architecture", str)
    if arch in TRANSFORMER_ARCHS:
        return transformer_config(f)
    if arch == "lstm":
        return lstm_config(f)
    raise UnsupportedArchitectureError(
        f"{f.path}: architecture {arch!r} is not supported (supported: {', '.join(TRANSFORMER_ARCHS + ('lstm',))})")


# --- LSTM language models (the layout: converters/lstm_gguf.py; the weights: models/lstm.py) ---

@dataclass(frozen=True)
class LSTMConfig:
    """An LSTM language model: Embedding -> n_layers stacked LSTM layers -> Linear head."""

    vocab_size: int             # lstm.vocab_size (rows of token_embd and output)
    emb_dim: int                # lstm.embedding_length
    hidden_sizes: tuple         # lstm.hidden_sizes: H of each layer
    output_activation: str      # lstm.output_activation of the source model ("softmax", ...)
    source: str = ""            # lstm.source: "keras" | "pytorch"
    name: str = ""              # general.name
    tokenizer_kind: str = ""    # tokenizer.ggml.model: "char" | "word"
    tensor_types: dict = field(default_factory=dict, compare=False)  # type name -> count
    arch: str = "lstm"

    @property
    def n_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def state_size(self) -> int:
        """Floats of h (and of c) per sequence: all layers side by side."""
        return int(sum(self.hidden_sizes))

    @property
    def state_offsets(self) -> np.ndarray:
        """int64 [n_layers + 1]: layer l's state is at columns offsets[l] .. offsets[l+1]."""
        return np.concatenate([[0], np.cumsum(self.hidden_sizes)]).astype(np.int64)

    def layer_inputs(self) -> list:
        """Input width of each layer."""
        return [self.emb_dim] + list(self.hidden_sizes[:-1])

    def expected_shapes(self) -> dict:
        """Tensor name -> NumPy-order shape that the forward pass needs."""
        shapes = {layout.TOKEN_EMBD: (self.vocab_size, self.emb_dim)}
        for l, (n_in, hidden) in enumerate(zip(self.layer_inputs(), self.hidden_sizes)):
            shapes[layout.lstm_ih(l)] = (4 * hidden, n_in)
            shapes[layout.lstm_hh(l)] = (4 * hidden, hidden)
            shapes[layout.lstm_bias(l)] = (4 * hidden,)
        shapes[layout.OUTPUT] = (self.vocab_size, self.hidden_sizes[-1])
        shapes[layout.OUTPUT_BIAS] = (self.vocab_size,)
        return shapes

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "LSTMConfig":
        arch = f.require("general.architecture", str)
        if arch != layout.ARCH:
            raise MetadataError(f"{f.path}: architecture is {arch!r}, not {layout.ARCH!r}")
        n_layers = _int(f, layout.KEY_BLOCK_COUNT)
        hidden = f.get(layout.KEY_HIDDEN_SIZES)
        if not isinstance(hidden, list) or len(hidden) != n_layers or n_layers == 0 or \
                not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise MetadataError(f"{f.path}: {layout.KEY_HIDDEN_SIZES!r} should list {n_layers} positive hidden "
                                f"sizes (one per layer of {layout.KEY_BLOCK_COUNT}), found {hidden!r}")
        gate_order = f.get(layout.KEY_GATE_ORDER, layout.CANONICAL_GATE_ORDER)
        if gate_order != layout.CANONICAL_GATE_ORDER:
            raise MetadataError(f"{f.path}: {layout.KEY_GATE_ORDER!r} is {gate_order!r}; this engine reads "
                                f"{layout.CANONICAL_GATE_ORDER!r} (see converters/lstm_gguf.py)")
        activation = f.get(layout.KEY_OUTPUT_ACTIVATION, "linear")
        if activation not in layout.OUTPUT_ACTIVATIONS:
            raise MetadataError(f"{f.path}: {layout.KEY_OUTPUT_ACTIVATION!r} is {activation!r}, "
                                f"expected one of {layout.OUTPUT_ACTIVATIONS}")
        cfg = cls(
            vocab_size=_int(f, layout.KEY_VOCAB_SIZE),
            emb_dim=_int(f, layout.KEY_EMBEDDING_LENGTH),
            hidden_sizes=tuple(int(h) for h in hidden),
            output_activation=activation,
            source=str(f.get(layout.KEY_SOURCE, "")),
            name=str(f.get("general.name", "")),
            tokenizer_kind=str(f.get("tokenizer.ggml.model", "")),
            tensor_types=_count_types(f),
        )
        check_shapes(f, cfg.expected_shapes())
        for name in cfg.expected_shapes():
            _check_blocks(f, name)
        return cfg


def _check_blocks(f: GGUFFile, name: str) -> None:
    """The tensor's type is one the kernels decode, its byte count matches its shape, and no block
    holds a NaN or inf scale (kernels/blockcheck.py: ~0.2 s per GB, once at load)."""
    info = f.tensors[name]
    if info.type_id not in quant.TYPE_NAMES:
        raise UnsupportedQuantTypeError(f"{f.path}: tensor {name!r} has type {info.type_name}, which lmengine's "
                                        f"kernels do not read (supported: {sorted(quant.TYPE_IDS)})")
    n_cols = info.shape[-1]
    if n_cols % quant.BLOCK_SIZE[info.type_id]:
        raise TensorShapeError(f"{f.path}: tensor {name!r} rows of {n_cols} values are not whole "
                               f"{info.type_name} blocks")
    n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    want = n_rows * quant.row_bytes(info.type_id, n_cols)
    if info.n_bytes != want:
        raise TensorShapeError(f"{f.path}: tensor {name!r} ({info.type_name}, shape {info.shape}) holds "
                               f"{info.n_bytes} bytes, expected {want}")
    problem = check_finite_scales(info.type_id, f.tensor_bytes(name), n_rows, n_cols, name)
    if problem is not None:      # a NaN or inf scale: every product with that row would be garbage
        raise CorruptTensorError(f"{f.path}: {problem}")


def lstm_config(f: GGUFFile) -> LSTMConfig:
    return LSTMConfig.from_gguf(f)
