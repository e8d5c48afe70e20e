"""Frozen model configs built from GGUF metadata: the only reader of architecture keys.

`config_from_gguf(gguf_file)` looks at `general.architecture` and returns the dataclass for that
family. Each dataclass also checks the tensors it needs against its sizes, so a file whose
tensors disagree with its metadata fails at load time with the tensor's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from converters.gguf_file import GGUFFile

from .errors import MetadataError, TensorShapeError, UnsupportedArchitectureError

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


# --- LSTM language models (section owned by the LSTM work; see engine/models/lstm.py) ---------

def lstm_config(f: GGUFFile):
    from .models.lstm import LSTMConfig  # the LSTM module defines its own dataclass
    return LSTMConfig.from_gguf(f)
