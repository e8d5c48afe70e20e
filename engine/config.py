"""Frozen model configs built from GGUF metadata: the only reader of architecture keys.

`config_from_gguf(gguf_file)` looks at `general.architecture` and returns the dataclass for that
family. Each dataclass also checks the tensors it needs against its sizes, so a file whose
tensors disagree with its metadata fails at load time with the tensor's name.

Order of the checks, so that a corrupt file costs nothing: every size is read with its range
(the caps of converters/gguf_file.py: a flipped bit in block_count must not build 33 million
layers' worth of expected shapes) and the layer count is compared with the file's tensor count;
only then are the expected shapes listed and compared with the tensor infos; then each tensor's
type is checked for its role (vectors are stored values: F32, F16, BF16; matrices any type the
kernels read) and its blocks scanned for NaN / inf (kernels/blockcheck.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmengine.converters import lstm_gguf as layout
from lmengine.converters.gguf_file import (MAX_CONTEXT, MAX_EMBEDDING, MAX_FFN, MAX_HEAD_DIM, MAX_HEADS,
                                           MAX_LAYERS, MAX_LSTM_WIDTH, MAX_VOCAB, GGUFFile)
from lmengine.kernels import quant
from lmengine.kernels.blockcheck import check_finite_scales

from .errors import (CorruptTensorError, MetadataError, TensorShapeError, UnsupportedArchitectureError,
                     UnsupportedQuantTypeError)

TRANSFORMER_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

# Metadata keys each architecture must state ("{a}." is the architecture's prefix); the others
# have llama.cpp's defaults. A missing one is named in the error.
REQUIRED_KEYS = {
    "llama": ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"),
    "qwen2": ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"),
    "qwen3": ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"),
    "gemma2": ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.sliding_window"),
    "gemma3": ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.sliding_window"),
    "phi3": ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "rope.dimension_count"),
}
# Sliding-window layer pattern when the file does not list it (llama.cpp's set_swa_pattern):
# layer i is a sliding-window layer when i % n < n - 1.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
ROPE_SCALINGS = ("none", "linear", "yarn", "longrope")


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer of the llama family (llama, qwen2, qwen3, gemma2, gemma3, phi3).
    The fields after `name` have the values of a plain llama, so a config that does not mention
    them is one."""

    arch: str                 # one of TRANSFORMER_ARCHS
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
    qkv_bias: bool            # attn_q/k/v carry biases (qwen2; llama files that have them)
    name: str = ""            # general.name
    tensor_types: dict = field(default_factory=dict, compare=False)  # type name -> count
    neox: bool = False        # rope pairs (i, i + rope_dim/2): every arch but llama (llama.cpp's rope type)
    qk_norm: bool = False     # blk.N.attn_q_norm / attn_k_norm [head_dim] (qwen3, gemma3)
    post_norms: bool = False  # blk.N.post_attention_norm / post_ffw_norm [dim] (gemma2, gemma3)
    fused_qkv_tensor: bool = False      # blk.N.attn_qkv holds q | k | v (phi3)
    fused_gate_up_tensor: bool = False  # blk.N.ffn_up holds gate | up, no ffn_gate (phi3)
    ffn_act: str = "silu"     # "silu" (SwiGLU) | "gelu" (GeGLU with gelu_tanh: gemma)
    embd_scale: float = 1.0   # token embeddings times this (gemma: sqrt(dim))
    attn_scale: float = 0.0   # scale of q . k ({arch}.attention.scale); 0.0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0   # {arch}.attn_logit_softcapping (gemma2); 0.0: off
    final_softcap: float = 0.0  # {arch}.final_logit_softcapping (gemma2); 0.0: off
    sliding_window: int = 0   # {arch}.attention.sliding_window: keys per query in SWA layers
    swa_layers: tuple = ()    # bool per layer: a sliding-window layer (empty: none)
    rope_base_swa: float = 0.0  # {arch}.rope.freq_base_swa: RoPE base of SWA layers (gemma3); 0.0: rope_base
    rope_freqs: bool = False  # rope_freqs.weight: per-pair frequency divisors (Llama 3's scaling)
    rope_scaling: str = "none"  # {arch}.rope.scaling.type: one of ROPE_SCALINGS
    rope_scaling_factor: float = 1.0   # {arch}.rope.scaling.factor
    rope_orig_ctx: int = 0    # {arch}.rope.scaling.original_context_length
    rope_attn_factor: float = 1.0      # cos/sin multiplier: YaRN's 0.1 ln(factor) + 1, phi3's attn_factor
    yarn_beta_fast: float = 32.0       # {arch}.rope.scaling.yarn_beta_fast
    yarn_beta_slow: float = 1.0        # {arch}.rope.scaling.yarn_beta_slow

    def __post_init__(self):
        if not self.swa_layers:
            object.__setattr__(self, "swa_layers", (False,) * self.n_layers)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", 1.0 / float(np.sqrt(self.head_dim)))

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
        half = self.rope_dim // 2
        if self.rope_freqs:
            shapes["rope_freqs.weight"] = (half,)
        if self.rope_scaling == "longrope":
            shapes.update({"rope_factors_long.weight": (half,), "rope_factors_short.weight": (half,)})
        for i in range(self.n_layers):
            b = f"blk.{i}."
            # in the order of the forward pass (the first mismatch is the one reported)
            shapes[b + "attn_norm.weight"] = (self.dim,)
            if self.fused_qkv_tensor:
                shapes[b + "attn_qkv.weight"] = (self.q_dim + 2 * self.kv_dim, self.dim)
            else:
                shapes.update({b + "attn_q.weight": (self.q_dim, self.dim),
                               b + "attn_k.weight": (self.kv_dim, self.dim),
                               b + "attn_v.weight": (self.kv_dim, self.dim)})
            shapes.update({b + "attn_output.weight": (self.dim, self.q_dim), b + "ffn_norm.weight": (self.dim,)})
            if self.fused_gate_up_tensor:
                shapes[b + "ffn_up.weight"] = (2 * self.ffn_dim, self.dim)
            else:
                shapes.update({b + "ffn_gate.weight": (self.ffn_dim, self.dim),
                               b + "ffn_up.weight": (self.ffn_dim, self.dim)})
            shapes[b + "ffn_down.weight"] = (self.dim, self.ffn_dim)
            if self.qk_norm:
                shapes.update({b + "attn_q_norm.weight": (self.head_dim,), b + "attn_k_norm.weight": (self.head_dim,)})
            if self.post_norms:
                shapes.update({b + "post_attention_norm.weight": (self.dim,), b + "post_ffw_norm.weight": (self.dim,)})
            if self.qkv_bias:
                shapes.update({b + "attn_q.bias": (self.q_dim,), b + "attn_k.bias": (self.kv_dim,),
                               b + "attn_v.bias": (self.kv_dim,)})
        return shapes


def _int(f: GGUFFile, key: str, default=None, lo: int = 0, hi: int | None = None) -> int:
    """Integer metadata `key` (default when absent), which must lie in [lo, hi]."""
    value = f.get(key, default)
    if value is None:
        raise MetadataError(f"{f.path}: required metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):       # NaN and inf included
        raise MetadataError(f"{f.path}: metadata key {key!r} should be an integer, found {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise MetadataError(f"{f.path}: metadata key {key!r} is {value}, outside {bound}")
    return value


def _float(f: GGUFFile, key: str, default=None, lo: float = 0.0, hi: float | None = None) -> float:
    """Finite float metadata `key` (default when absent), > 0 and in [lo, hi]."""
    value = f.get(key, default)
    if value is None:
        raise MetadataError(f"{f.path}: required metadata key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetadataError(f"{f.path}: metadata key {key!r} should be a number, found {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0 or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise MetadataError(f"{f.path}: metadata key {key!r} is {value!r}; it must be finite, > 0 and {bound}")
    return value


def _check_layer_count(f: GGUFFile, key: str, n_layers: int) -> None:
    """The layer count against the tensors: more layers than tensors is rejected before anything
    is built per layer (a missing tensor of a plausible count is named later, by check_shapes),
    and so is a tensor of a layer past the count (block_count would then be wrong)."""
    if n_layers > len(f.tensors):
        raise MetadataError(f"{f.path}: metadata key {key!r} is {n_layers}, more layers than the file has "
                            f"tensors ({len(f.tensors)})")
    for name in f.tensors:
        layer = _layer_of(name)
        if layer >= n_layers:
            raise MetadataError(f"{f.path}: metadata key {key!r} is {n_layers}, but the file has tensor {name!r} "
                                f"of layer {layer}")


def _layer_of(name: str) -> int:
    """N of a "blk.N.*" tensor name, -1 for other names."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[1].isascii():
        return int(parts[1])
    return -1


def transformer_config(f: GGUFFile) -> TransformerConfig:
    arch = f.require("general.architecture", str)
    a = arch + "."
    for key in REQUIRED_KEYS[arch]:
        if a + key not in f.metadata:
            raise MetadataError(f"{f.path}: required metadata key {a + key!r} is missing (architecture {arch!r} "
                                f"needs {', '.join(a + k for k in REQUIRED_KEYS[arch])})")
    # qwen2 always has q/k/v biases; a llama file may have them too, and the forward pass reads them
    # whenever blk.0 has one (engine/models/llama.py), so they are then required and checked
    qkv_bias = arch == "qwen2" or "blk.0.attn_q.bias" in f.tensors
    n_layers = _int(f, a + "block_count", lo=1, hi=MAX_LAYERS)
    _check_layer_count(f, a + "block_count", n_layers)
    n_heads = _int(f, a + "attention.head_count", lo=1, hi=MAX_HEADS)
    dim = _int(f, a + "embedding_length", lo=1, hi=MAX_EMBEDDING)
    n_kv_heads = _int(f, a + "attention.head_count_kv", n_heads, lo=1, hi=n_heads)
    if n_heads % n_kv_heads:
        raise MetadataError(f"{f.path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    if a + "attention.key_length" not in f.metadata and dim % n_heads:
        raise MetadataError(f"{f.path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    head_dim = _int(f, a + "attention.key_length", dim // n_heads, lo=2, hi=MAX_HEAD_DIM)
    value_length = _int(f, a + "attention.value_length", head_dim, lo=1, hi=MAX_HEAD_DIM)
    if value_length != head_dim or head_dim % 2:
        raise MetadataError(f"{f.path}: attention.key_length {head_dim} and value_length {value_length} must be "
                            f"equal and even (heads are rotated in pairs)")
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise TensorShapeError(f"{f.path}: tensor 'token_embd.weight' is missing")
    tokens = f.get("tokenizer.ggml.tokens", types=list)
    vocab_size = _int(f, a + "vocab_size", len(tokens) if tokens is not None else embd.shape[0],
                      lo=1, hi=MAX_VOCAB)
    rope_dim = _int(f, a + "rope.dimension_count", head_dim, lo=2, hi=head_dim)
    if rope_dim % 2:
        raise MetadataError(f"{f.path}: rope.dimension_count {rope_dim} must be even (pairs are rotated)")
    cfg = TransformerConfig(
        arch=arch,
        n_layers=n_layers,
        dim=dim,
        ffn_dim=_int(f, a + "feed_forward_length", lo=1, hi=MAX_FFN),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rope_base=_float(f, a + "rope.freq_base", 10000.0, lo=1.0),
        rope_dim=rope_dim,
        norm_eps=_float(f, a + "attention.layer_norm_rms_epsilon", 1e-5, hi=1.0),
        n_ctx_train=_int(f, a + "context_length", 2048, lo=1, hi=MAX_CONTEXT),
        vocab_size=vocab_size,
        tied_output="output.weight" not in f.tensors,
        qkv_bias=qkv_bias,
        name=f.get("general.name", "", types=str),
        tensor_types=_count_types(f),
        **_family_fields(f, arch, n_layers, dim, head_dim),
    )
    check_tensors(f, cfg.expected_shapes())
    return cfg


def _family_fields(f: GGUFFile, arch: str, n_layers: int, dim: int, head_dim: int) -> dict:
    """The TransformerConfig fields in which the architectures of the family differ."""
    a = arch + "."
    gemma = arch in ("gemma2", "gemma3")
    out = {
        "neox": arch != "llama",
        "qk_norm": arch in ("qwen3", "gemma3"),
        "post_norms": gemma,
        "fused_qkv_tensor": arch == "phi3" and "blk.0.attn_qkv.weight" in f.tensors,
        "fused_gate_up_tensor": arch == "phi3" and "blk.0.ffn_gate.weight" not in f.tensors,
        "ffn_act": "gelu" if gemma else "silu",
        "embd_scale": float(np.sqrt(np.float32(dim))) if gemma else 1.0,
        "rope_freqs": "rope_freqs.weight" in f.tensors,
    }
    if a + "attention.scale" in f.metadata:
        out["attn_scale"] = _float(f, a + "attention.scale", hi=1e3)
    elif (arch, n_layers) in (("gemma2", 46), ("gemma3", 62)):   # llama.cpp's rule: the 27B models scale by
        # 1/sqrt(dim / n_heads) (their query_pre_attn_scalar), the others by 1/sqrt(head_dim)
        out["attn_scale"] = 1.0 / float(np.sqrt(dim // _int(f, a + "attention.head_count", lo=1)))
    for key, name in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
        if a + key in f.metadata:
            out[name] = _float(f, a + key, hi=1e6)
    if arch in SWA_PATTERN:        # (phi3 files state a window too; llama.cpp ignores it, so do we)
        out["sliding_window"] = _int(f, a + "attention.sliding_window", lo=1, hi=MAX_CONTEXT)
        out["swa_layers"] = _swa_layers(f, a, arch, n_layers)
    if arch == "gemma3":
        out["rope_base_swa"] = _float(f, a + "rope.freq_base_swa", 10000.0, lo=1.0)
    scaling = f.get(a + "rope.scaling.type", "none", types=str)
    if arch == "phi3" and "rope_factors_long.weight" in f.tensors:
        scaling = "longrope"
    if scaling not in ROPE_SCALINGS:
        raise MetadataError(f"{f.path}: metadata key {a + 'rope.scaling.type'!r} is {scaling!r}; lmengine runs "
                            f"{', '.join(ROPE_SCALINGS)}")
    out["rope_scaling"] = scaling
    if scaling in ("linear", "yarn"):
        out["rope_scaling_factor"] = _float(f, a + "rope.scaling.factor", lo=1e-3, hi=1e4)
    if scaling in ("yarn", "longrope"):
        out["rope_orig_ctx"] = _int(f, a + "rope.scaling.original_context_length", lo=1, hi=MAX_CONTEXT)
    if scaling == "yarn":
        out["yarn_beta_fast"] = _float(f, a + "rope.scaling.yarn_beta_fast", 32.0, hi=1e4)
        out["yarn_beta_slow"] = _float(f, a + "rope.scaling.yarn_beta_slow", 1.0, hi=1e4)
        factor = out["rope_scaling_factor"]    # cos and sin times attn_factor * (0.1 ln(factor) + 1), as llama.cpp
        out["rope_attn_factor"] = _float(f, a + "rope.scaling.attn_factor", 1.0, hi=100.0) * \
            (0.1 * float(np.log(factor)) + 1.0 if factor > 1.0 else 1.0)
    elif scaling == "longrope":
        out["rope_attn_factor"] = _float(f, a + "rope.scaling.attn_factor", 1.0, hi=100.0)
    return out


def _swa_layers(f: GGUFFile, a: str, arch: str, n_layers: int) -> tuple:
    """Which layers use the sliding window: {arch}.attention.sliding_window_pattern as a list of
    bools (one per layer) or a period n (layer i slides when i % n < n - 1), else the
    architecture's period (SWA_PATTERN)."""
    key = a + "attention.sliding_window_pattern"
    pattern = f.get(key, SWA_PATTERN.get(arch, 0))
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(p, (bool, int)) for p in pattern):
            raise MetadataError(f"{f.path}: metadata key {key!r} should list {n_layers} booleans, found {pattern!r}")
        return tuple(bool(p) for p in pattern)
    n = _int(f, key, pattern, lo=0, hi=MAX_LAYERS)
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layers)) if n else (True,) * n_layers


def check_tensors(f: GGUFFile, expected: dict) -> None:
    """Every tensor of `expected` (name -> shape) has that shape, a type for its role and finite
    blocks."""
    check_shapes(f, expected)
    for name, shape in expected.items():
        _check_blocks(f, name, vector=len(shape) == 1)


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
    if arch in ("bert", "gpt2"):   # engine/models/bert.py, gpt2.py
        from importlib import import_module
        return import_module(f"lmengine.models.{arch}").config_from_gguf(f)
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
        n_layers = _int(f, layout.KEY_BLOCK_COUNT, lo=1, hi=MAX_LAYERS)
        _check_layer_count(f, layout.KEY_BLOCK_COUNT, n_layers)
        hidden = f.get(layout.KEY_HIDDEN_SIZES, types=list)
        if hidden is None or len(hidden) != n_layers or \
                not all(isinstance(h, int) and not isinstance(h, bool) and 0 < h <= MAX_LSTM_WIDTH for h in hidden):
            raise MetadataError(f"{f.path}: {layout.KEY_HIDDEN_SIZES!r} should list {n_layers} hidden sizes in "
                                f"[1, {MAX_LSTM_WIDTH}] (one per layer of {layout.KEY_BLOCK_COUNT}), found {hidden!r}")
        gate_order = f.get(layout.KEY_GATE_ORDER, layout.CANONICAL_GATE_ORDER, types=str)
        if gate_order != layout.CANONICAL_GATE_ORDER:
            raise MetadataError(f"{f.path}: {layout.KEY_GATE_ORDER!r} is {gate_order!r}; this engine reads "
                                f"{layout.CANONICAL_GATE_ORDER!r} (see converters/lstm_gguf.py)")
        activation = f.get(layout.KEY_OUTPUT_ACTIVATION, "linear", types=str)
        if activation not in layout.OUTPUT_ACTIVATIONS:
            raise MetadataError(f"{f.path}: {layout.KEY_OUTPUT_ACTIVATION!r} is {activation!r}, "
                                f"expected one of {layout.OUTPUT_ACTIVATIONS}")
        cfg = cls(
            vocab_size=_int(f, layout.KEY_VOCAB_SIZE, lo=1, hi=MAX_VOCAB),
            emb_dim=_int(f, layout.KEY_EMBEDDING_LENGTH, lo=1, hi=MAX_LSTM_WIDTH),
            hidden_sizes=tuple(int(h) for h in hidden),
            output_activation=activation,
            source=f.get(layout.KEY_SOURCE, "", types=str),
            name=f.get("general.name", "", types=str),
            tokenizer_kind=f.get("tokenizer.ggml.model", "", types=str),
            tensor_types=_count_types(f),
        )
        check_tensors(f, cfg.expected_shapes())
        return cfg


VECTOR_TYPES = quant.FLOAT_TYPES     # norm weights and biases: stored values (every writer uses F32)


def _check_blocks(f: GGUFFile, name: str, vector: bool) -> None:
    """The tensor's type suits its role (a vector: F32, F16 or BF16; a matrix: any type the kernels
    decode), its byte count matches its shape, and no block holds a NaN or inf scale, no F32 / F16
    / BF16 value is NaN or inf (kernels/blockcheck.py: ~0.2 s per GB, once at load)."""
    info = f.tensors[name]
    if info.type_id not in quant.TYPE_NAMES:
        raise UnsupportedQuantTypeError(f"{f.path}: tensor {name!r} has type {info.type_name}, which lmengine's "
                                        f"kernels do not read (supported: {sorted(quant.TYPE_IDS)})")
    if vector and info.type_id not in VECTOR_TYPES:
        raise UnsupportedQuantTypeError(
            f"{f.path}: tensor {name!r} is a vector (a norm weight or bias) stored as {info.type_name}; vectors "
            f"must be {', '.join(quant.TYPE_NAMES[t] for t in VECTOR_TYPES)}")
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
