"""The BERT encoder (GGUF architecture `bert`, as llama.cpp writes it): config, weights, forward.

    x = LayerNorm(token_embd[ids] + position_embd[pos] + token_types[0])        token_embd_norm
    per layer (post-norm):
        x = LayerNorm(x + attn_output(attention(attn_q x, attn_k x, attn_v x)))  attn_output_norm
        x = LayerNorm(x + ffn_down(gelu_erf(ffn_up x)))                          layer_output_norm
The output is the hidden state of every token; engine/embed.py pools it into one vector.

Attention is bidirectional within a sequence and masked past its length, so a batch of texts of
different lengths runs as one padded [B, T] forward (`bert_hidden`). Attention runs sequence by
sequence (only the real length x length block), as NumPy products over the heads ([heads, n, n]
scores, float32, in the cache), the sequences shared among n_threads Python threads; the weight
products go through `Linear` (engine/models/linear.py): q, k and v as one fused GEMM, the biases
and residual adds fused into the passes that follow (bias_gelu, add_rows_bias).

Config keys (llama.cpp's names): bert.block_count, bert.embedding_length, bert.feed_forward_length,
bert.attention.head_count, bert.context_length, bert.attention.layer_norm_epsilon; optional:
bert.pooling_type (0 none, 1 mean, 2 cls, 3 last; none and absent mean "mean" for embed()),
bert.embedding.max_seq_length (ours: sentence-transformers' truncation length; default
bert.context_length), tokenizer.ggml.token_type_count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmengine.kernels.layernorm import GELU_ERF, bias_gelu, layernorm
from lmengine.kernels.ops import softmax_rows

from ..config import _float, _int
from ..errors import MetadataError
from .linear import MIN_ROWS_PER_THREAD, Linear, blas_threads, tensor
from .row_threads import RowThreads

POOLING_NAMES = {0: "mean", 1: "mean", 2: "cls", 3: "last"}   # GGUF pooling_type -> embed()'s pooling


@dataclass(frozen=True)
class BertConfig:
    arch: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    head_dim: int
    n_ctx_train: int          # position embeddings
    norm_eps: float
    vocab_size: int
    n_token_types: int
    pooling: str              # "mean" | "cls" | "last"
    max_seq_length: int       # texts are truncated to this many tokens (special tokens included)


def config_from_gguf(f) -> BertConfig:
    """BertConfig from a `bert` GGUF's metadata; a missing or bad key raises MetadataError naming it."""
    a = "bert"
    n_layers = _int(f, f"{a}.block_count", lo=1, hi=4096)
    dim = _int(f, f"{a}.embedding_length", lo=1)
    n_heads = _int(f, f"{a}.attention.head_count", lo=1)
    if dim % n_heads:
        raise MetadataError(f"{f.path}: {a}.embedding_length {dim} is not a multiple of "
                            f"{a}.attention.head_count {n_heads}")
    n_ctx = _int(f, f"{a}.context_length", lo=1)
    pooling_type = _int(f, f"{a}.pooling_type", default=1, lo=0)
    if pooling_type not in POOLING_NAMES:
        raise MetadataError(f"{f.path}: {a}.pooling_type {pooling_type} is not supported "
                            f"(0 none, 1 mean, 2 cls, 3 last; 4 rank is not)")
    if f.get(f"{a}.attention.causal", False) is True:
        raise MetadataError(f"{f.path}: {a}.attention.causal is true; a bert encoder is bidirectional")
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise MetadataError(f"{f.path}: tensor 'token_embd.weight' is missing")
    return BertConfig(
        arch=a, n_layers=n_layers, dim=dim, ffn_dim=_int(f, f"{a}.feed_forward_length", lo=1), n_heads=n_heads,
        head_dim=dim // n_heads, n_ctx_train=n_ctx, norm_eps=_float(f, f"{a}.attention.layer_norm_epsilon"),
        vocab_size=int(embd.shape[0]),
        n_token_types=_int(f, "tokenizer.ggml.token_type_count", default=2, lo=1),
        pooling=POOLING_NAMES[pooling_type],
        max_seq_length=min(n_ctx, _int(f, f"{a}.embedding.max_seq_length", default=n_ctx, lo=2)))


class BertLayer:
    """The weights of one encoder layer."""

    def __init__(self, f, c: BertConfig, i: int):
        b = f"blk.{i}."
        self.qkv = Linear.fused([Linear(f, b + f"attn_{n}.weight", c.dim, c.dim, b + f"attn_{n}.bias")
                                 for n in "qkv"])                          # [3*dim, dim]
        self.o = Linear(f, b + "attn_output.weight", c.dim, c.dim, b + "attn_output.bias")
        self.attn_norm = (tensor(f, b + "attn_output_norm.weight", (c.dim,)), tensor(f, b + "attn_output_norm.bias", (c.dim,)))
        self.up = Linear(f, b + "ffn_up.weight", c.ffn_dim, c.dim, b + "ffn_up.bias")
        self.up_bias = self.up.bias if self.up.bias is not None else np.zeros(c.ffn_dim, dtype=np.float32)
        self.down = Linear(f, b + "ffn_down.weight", c.dim, c.ffn_dim, b + "ffn_down.bias")
        self.out_norm = (tensor(f, b + "layer_output_norm.weight", (c.dim,)), tensor(f, b + "layer_output_norm.bias", (c.dim,)))


class BertWeights:
    """Every tensor of a `bert` GGUF: embedding tables as float32 (F32: views of the map), the
    matrices as `Linear`s; a missing or misshapen tensor raises TensorShapeError naming it."""

    def __init__(self, f, c: BertConfig):
        self.config = c
        self.token_embd = tensor(f, "token_embd.weight", (c.vocab_size, c.dim))
        self.position_embd = tensor(f, "position_embd.weight", (c.n_ctx_train, c.dim))
        types = f.tensors.get("token_types.weight")
        self.token_type0 = (tensor(f, "token_types.weight", (types.shape[0], c.dim))[0] if types is not None
                            else np.zeros(c.dim, dtype=np.float32))
        self.embd_norm = (tensor(f, "token_embd_norm.weight", (c.dim,)), tensor(f, "token_embd_norm.bias", (c.dim,)))
        self.layers = [BertLayer(f, c, i) for i in range(c.n_layers)]


def dense_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray, n_heads: int,
                    causal: bool, rows: RowThreads | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Multi-head attention within each sequence of a padded batch.

    q, k, v: float32 [B, T, n_heads * head_dim] (views with unit column stride are fine: the
    columns of a fused qkv product); lengths: [B] (positions >= lengths[b] are padding: only the
    lengths[b] x lengths[b] block of a sequence is computed). causal: a query attends to keys at
    or before it only. rows: the sequences are shared among these threads (NumPy releases the GIL
    in its products and ufuncs), every n-th sequence to a thread, as the batch is sorted by
    length; BLAS runs one-threaded (the caller's limit, or set here when rows is None).
    out: float32 [B, T, n_heads * head_dim] to write into (None: a new array).
    Returns out as [B * T, n_heads * head_dim] (padded rows are zeros, to be ignored).
    """
    B, T, width = q.shape
    if out is None:
        out = np.empty((B, T, width), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(width // n_heads))
    n_threads = rows.n_threads if rows is not None else 1
    order = np.concatenate([np.arange(i, B, n_threads) for i in range(n_threads)])   # every n-th per thread

    def run(begin: int, end: int) -> None:
        for b in order[begin:end]:
            n = int(lengths[b])
            _attend(q[b], k[b], v[b], n, n_heads, scale, causal, out[b])
            out[b, n:] = 0.0

    if rows is None:
        with blas_threads(1):     # per-sequence [heads, T, T] products: one BLAS thread
            run(0, B)
    else:
        rows.split(run, B)
    return out.reshape(B * T, width)


def _attend(q, k, v, n: int, n_heads: int, scale, causal: bool, out) -> None:
    """One sequence: q, k, v [T, heads*d] (rows < n real), out [T, heads*d] (rows < n written)."""
    d = q.shape[1] // n_heads

    def heads(x):    # [n, H*d] -> [H, n, d]: a view whose [n, d] matrices BLAS reads in place
        return x[:n].reshape(n, n_heads, d).transpose(1, 0, 2)
    scores = np.matmul(heads(q * scale), heads(k).transpose(0, 2, 1))    # [H, n, n]
    if causal:
        scores[:, np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
    total = np.empty((n_heads, n, 1), dtype=np.float32)                  # [H, n, 1]
    softmax_rows(scores.reshape(n_heads * n, n), total.reshape(n_heads * n))   # exp(s - max), sums
    o = heads(out)                                                       # [H, n, d] view of out
    np.matmul(scores, heads(v), out=o)
    o /= total                       # softmax's division after the product: d < n values a row


def bert_hidden(w: BertWeights, tokens: np.ndarray, lengths: np.ndarray, rows: RowThreads | None = None) -> np.ndarray:
    """Hidden states float32 [B, T, dim] of token ids int64 [B, T] (row b valid up to lengths[b];
    T <= n_ctx_train, ids < vocab_size: the caller checks). rows: the threads every step shares
    its rows among (engine/models/row_threads.py), BLAS one-threaded (the caller sets it); None:
    the caller's thread alone."""
    c = w.config
    B, T = tokens.shape
    rows = rows if rows is not None else RowThreads(1)
    x = w.token_embd[tokens]                                               # [B, T, dim]
    x += w.position_embd[:T][None, :, :]
    x += w.token_type0
    x = np.ascontiguousarray(x.reshape(B * T, c.dim))

    def norm(weights):                    # x = LayerNorm(x), in place: then= of x's rows begin..end
        return lambda begin, end: layernorm(x[begin:end], weights[0], weights[1], c.norm_eps, x[begin:end], False)

    rows.split(norm(w.embd_norm), B * T, MIN_ROWS_PER_THREAD)
    # every layer's products write into the same arrays: fresh ones would be mapped page by page
    # again in each layer (25 MB of page faults a layer for MiniLM's hidden at 32 x 128 tokens)
    qkv = np.empty((B * T, 3 * c.dim), dtype=np.float32)
    att = np.empty((B, T, c.dim), dtype=np.float32)
    hidden = np.empty((B * T, c.ffn_dim), dtype=np.float32)
    for layer in w.layers:
        layer.qkv(x, rows=rows, out=qkv)                                   # [B*T, 3*dim]
        q, k, v = (qkv.reshape(B, T, 3 * c.dim)[..., i * c.dim:(i + 1) * c.dim] for i in range(3))
        dense_attention(q, k, v, lengths, c.n_heads, causal=False, rows=rows, out=att)
        layer.o(att.reshape(B * T, c.dim), residual=x, rows=rows, then=norm(layer.attn_norm))   # x = LN(x + o(att))

        def gelu(begin, end, bias=layer.up_bias):                          # hidden = gelu(up(x) + bias)
            bias_gelu(hidden[begin:end], bias, GELU_ERF, False)
        layer.up(x, add_bias=False, rows=rows, then=gelu, out=hidden)
        layer.down(hidden, residual=x, rows=rows, then=norm(layer.out_norm))   # x = LN(x + down(hidden))
    return x.reshape(B, T, c.dim)
