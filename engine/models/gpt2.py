"""GPT-2 (GGUF architecture `gpt2`, as llama.cpp writes it): config, weights, forward.

    x = token_embd[ids] + position_embd[pos]                     (learned positions)
    per layer (pre-norm):
        x += attn_output(attention(split(attn_qkv(LayerNorm(x)))))   attn_norm; fused q|k|v with bias
        x += ffn_down(gelu_tanh(ffn_up(LayerNorm(x))))               ffn_norm
    logits = output(LayerNorm(x))                                   output_norm; output = token_embd if absent

Two entry points share the layer code (`_layers`), differing only in how attention sees keys:
* `gpt2_step`: tokens with (slot, position) each, keys and values written into a per-slot cache
  [n_slots, n_layers, n_ctx, dim] and read back (prompts, batched decode: engine/backends/gpt2_backend.py);
* `gpt2_hidden`: a padded batch [B, T] with causal masking and no cache (embeddings).
Products go through `Linear` (engine/models/linear.py); LayerNorm and GELU are
lmengine.kernels.layernorm; attention is NumPy.

Config keys: gpt2.block_count, gpt2.embedding_length, gpt2.feed_forward_length,
gpt2.attention.head_count, gpt2.context_length, gpt2.attention.layer_norm_epsilon.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmengine.kernels.layernorm import GELU_TANH, gelu, layernorm

from ..config import _float, _int
from ..errors import MetadataError
from .bert import dense_attention
from .linear import Linear, tensor


@dataclass(frozen=True)
class GPT2Config:
    arch: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    head_dim: int
    n_ctx_train: int
    norm_eps: float
    vocab_size: int
    tied_output: bool


def config_from_gguf(f) -> GPT2Config:
    """GPT2Config from a `gpt2` GGUF's metadata; a missing or bad key raises MetadataError naming it."""
    a = "gpt2"
    dim = _int(f, f"{a}.embedding_length", lo=1)
    n_heads = _int(f, f"{a}.attention.head_count", lo=1)
    if dim % n_heads:
        raise MetadataError(f"{f.path}: {a}.embedding_length {dim} is not a multiple of "
                            f"{a}.attention.head_count {n_heads}")
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise MetadataError(f"{f.path}: tensor 'token_embd.weight' is missing")
    return GPT2Config(arch=a, n_layers=_int(f, f"{a}.block_count", lo=1, hi=4096), dim=dim,
                      ffn_dim=_int(f, f"{a}.feed_forward_length", lo=1), n_heads=n_heads, head_dim=dim // n_heads,
                      n_ctx_train=_int(f, f"{a}.context_length", lo=1),
                      norm_eps=_float(f, f"{a}.attention.layer_norm_epsilon"), vocab_size=int(embd.shape[0]),
                      tied_output="output.weight" not in f.tensors)


def _norm(f, name, dim):
    return tensor(f, name + ".weight", (dim,)), tensor(f, name + ".bias", (dim,))


class GPT2Layer:
    def __init__(self, f, c: GPT2Config, i: int):
        b = f"blk.{i}."
        self.attn_norm = _norm(f, b + "attn_norm", c.dim)
        self.qkv = Linear(f, b + "attn_qkv.weight", 3 * c.dim, c.dim, b + "attn_qkv.bias")
        self.o = Linear(f, b + "attn_output.weight", c.dim, c.dim, b + "attn_output.bias")
        self.ffn_norm = _norm(f, b + "ffn_norm", c.dim)
        self.up = Linear(f, b + "ffn_up.weight", c.ffn_dim, c.dim, b + "ffn_up.bias")
        self.down = Linear(f, b + "ffn_down.weight", c.dim, c.ffn_dim, b + "ffn_down.bias")


class GPT2Weights:
    """Every tensor of a `gpt2` GGUF; a missing or misshapen tensor raises TensorShapeError naming it."""

    def __init__(self, f, c: GPT2Config):
        self.config = c
        self.token_embd = tensor(f, "token_embd.weight", (c.vocab_size, c.dim))
        self.position_embd = tensor(f, "position_embd.weight", (c.n_ctx_train, c.dim))
        self.layers = [GPT2Layer(f, c, i) for i in range(c.n_layers)]
        self.output_norm = _norm(f, "output_norm", c.dim)
        self.output = Linear(f, "token_embd.weight" if c.tied_output else "output.weight", c.vocab_size, c.dim)


def _layers(w: GPT2Weights, x: np.ndarray, attend) -> np.ndarray:
    """Run x float32 [n, dim] through every layer; attend(layer_index, qkv [n, 3*dim]) -> [n, dim]."""
    c = w.config
    for i, layer in enumerate(w.layers):
        h = np.empty_like(x)
        layernorm(x, layer.attn_norm[0], layer.attn_norm[1], c.norm_eps, h)
        x += layer.o(attend(i, layer.qkv(h)))
        layernorm(x, layer.ffn_norm[0], layer.ffn_norm[1], c.norm_eps, h)
        up = layer.up(h)
        gelu(up, GELU_TANH)
        x += layer.down(up)
    return x


def final_norm(w: GPT2Weights, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    layernorm(x, w.output_norm[0], w.output_norm[1], w.config.norm_eps, out)
    return out


def gpt2_step(w: GPT2Weights, tokens, slots, positions, rows, k_cache, v_cache) -> np.ndarray:
    """Logits float32 [len(rows), vocab] of rows `rows` of tokens [n] at (slots[n], positions[n]),
    writing their keys/values into k_cache, v_cache [n_slots, n_layers, n_ctx, dim]. A token
    attends to positions 0..positions[t] of its slot (the same slot's earlier tokens of this call
    included). Callers check ids, slots and positions."""
    c = w.config
    x = w.token_embd[tokens] + w.position_embd[positions]                 # [n, dim]
    groups = [(s, np.flatnonzero(slots == s)) for s in np.unique(slots)]
    scale = np.float32(1.0 / np.sqrt(c.head_dim))

    def attend(layer, qkv):
        q, k, v = qkv[:, :c.dim], qkv[:, c.dim: 2 * c.dim], qkv[:, 2 * c.dim:]
        k_cache[slots, layer, positions] = k
        v_cache[slots, layer, positions] = v
        out = np.empty((qkv.shape[0], c.dim), dtype=np.float32)
        for s, idx in groups:
            pos = positions[idx]
            n_keys = int(pos.max()) + 1
            keys = k_cache[s, layer, :n_keys].reshape(n_keys, c.n_heads, c.head_dim)
            values = v_cache[s, layer, :n_keys].reshape(n_keys, c.n_heads, c.head_dim)
            qh = q[idx].reshape(len(idx), c.n_heads, c.head_dim)
            scores = np.einsum("mhd,phd->hmp", qh, keys) * scale              # [H, m, n_keys]
            scores[:, np.arange(n_keys)[None, :] > pos[:, None]] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            out[idx] = np.einsum("hmp,phd->mhd", scores, values).reshape(len(idx), c.dim)
        return out

    x = _layers(w, x, attend)
    return w.output(final_norm(w, np.ascontiguousarray(x[rows])))


def gpt2_hidden(w: GPT2Weights, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Final hidden states (after output_norm) float32 [B, T, dim] of a padded batch int64 [B, T]."""
    c = w.config
    B, T = tokens.shape
    x = (w.token_embd[tokens] + w.position_embd[:T][None]).reshape(B * T, c.dim)

    def attend(layer, qkv):
        qkv = qkv.reshape(B, T, 3 * c.dim)
        return dense_attention(qkv[..., :c.dim], qkv[..., c.dim: 2 * c.dim], qkv[..., 2 * c.dim:], lengths,
                               c.n_heads, causal=True)

    return final_norm(w, _layers(w, np.ascontiguousarray(x), attend)).reshape(B, T, c.dim)
