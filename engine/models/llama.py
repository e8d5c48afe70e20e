"""The llama-family forward pass (llama, qwen2, qwen3, gemma2, gemma3, phi3), one compiled call per step.

Weights stay in the GGUF file's memory map. Matrices are passed to the kernels as raw ggml blocks:
`data[offset : offset + n_bytes]` with their ggml type; only the small vectors (norm weights and
biases, a few KB per layer) are decoded to float32 at load time.

One call of `llama_forward` runs a batch of tokens through every layer. Each token carries its
own slot (sequence) and position, so the same call serves a prompt, one decode step of many
sequences, or a mix (see kernels/attention.py).

The weights reach compiled code as one record, `LlamaModel` (a NamedTuple Numba compiles
against), with a field per GGUF matrix kind (`attn_q`, ..., `output`, each a `Matrix`: where its
blocks are for every layer) and per vector kind. Every product in the layer loop is one call of
`project` (one matrix) or `project_parts` (q|k|v, gate|up), whatever the matrix's layout.

Packed matrices: on CPUs with AVX2 or AVX-512 VNNI the int8 paths read the Q8_0/Q4_0/Q4_1/Q4_K/
Q5_K/Q6_K/IQ4_XS matrices (`packing.PACKABLE_TYPES`) in the 16-row packed layout of kernels/csrc/packed.c (made once at load by lmengine.kernels.packing,
`LlamaWeights(pack=True)`; the file's pages of those matrices are then given back). A layer whose
q, k, v (and gate, up) matrices are packed back to back runs them as one product over the
concatenated rows, quantizing its input once.

One forward serves the whole family: what differs between architectures is data in the record
(engine/config.py reads it from the GGUF), never a second compiled function. A norm weight array
with 0 columns means "no such norm" (q/k norms of qwen3 and gemma3, the post-norms of gemma);
a soft-cap of 0.0 means "no cap" (gemma2); a layer's window of 0 means global attention (gemma's
sliding-window layers have their width); `gelu` picks GeGLU (gemma) over SwiGLU; the RoPE
frequencies carry every scaling (Llama 3's factors, linear, YaRN, phi3's long-rope), and
`rope_mscale` YaRN's / long-rope's attention factor (cos and sin times it: the rotated dims
only). Fused tensors (phi3's attn_qkv and gate|up in ffn_up) are split into row ranges at load,
so the forward sees q, k, v, gate, up.

Shapes (n = tokens in the call):
    x        [n, dim]        residual stream
    xb       [n, dim]        normed input of a sub-layer
    qkv      [n, q_dim + 2 * kv_dim]    q | k | v side by side; q_dim = n_heads * head_dim,
                                        kv_dim = n_kv_heads * head_dim
    gate_up  [n, 2 * ffn_dim]           gate | up
    hidden   [n, ffn_dim]               silu(gate) * up
    k_cache  [n_layers, n_slots, n_kv_heads, n_ctx / 16, head_dim, 16]   keys in transposed tiles
    v_cache  [n_layers, n_slots, n_kv_heads, n_ctx, head_dim]            (see kernels/attention.py)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from lmengine.kernels import packing
from lmengine.kernels.attention import attend, write_kv
from lmengine.kernels.matmul import matmul, matmul_packed, matmul_packed_parts
from lmengine.kernels.ops import (add_bias, add_inplace, geglu, head_rmsnorm, rmsnorm, rope, rope_angles,
                                  rope_frequencies, softcap, swiglu)
from lmengine.kernels.quant import dequantize, dequantize_row_into

# The matrix kinds of a layer, in the order of `acts` (the activation precision of each kind,
# lmengine.kernels.matmul.ACT_*), then the output matrix.
MATRIX_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN = range(7)
OUTPUT = len(MATRIX_NAMES)


class Matrix(NamedTuple):
    """One GGUF matrix kind in every layer (the embedding and output matrices: one "layer").
    Matrix `layer` is n_rows x n_cols of type w_type[layer]: raw ggml blocks at
    data[offset[layer] : offset[layer] + n_bytes[layer]], or, when packed_at[layer] >= 0, its
    16-row packed copy at packed[packed_at[layer]:]."""
    offset: np.ndarray       # int64 [n_layers]
    n_bytes: np.ndarray      # int64 [n_layers]
    w_type: np.ndarray       # int64 [n_layers]: ggml type id
    packed_at: np.ndarray    # int64 [n_layers]: offset into LlamaModel.packed, -1: read raw
    n_rows: int
    n_cols: int


class LlamaModel(NamedTuple):
    """Everything the compiled forward pass reads of the weights."""
    data: np.ndarray         # uint8 [file size]: the GGUF file's memory map
    packed: np.ndarray       # uint8: packed copies of some matrices (empty when none)
    token_embd: Matrix       # [vocab, dim], read by rows
    attn_q: Matrix           # [q_dim, dim]
    attn_k: Matrix           # [kv_dim, dim]
    attn_v: Matrix           # [kv_dim, dim]
    attn_output: Matrix      # [dim, q_dim]
    ffn_gate: Matrix         # [ffn_dim, dim]
    ffn_up: Matrix           # [ffn_dim, dim]
    ffn_down: Matrix         # [dim, ffn_dim]
    output: Matrix           # [vocab, dim] (token_embd's blocks when the output is tied)
    attn_norm: np.ndarray    # float32 [n_layers, dim]
    ffn_norm: np.ndarray     # float32 [n_layers, dim]
    output_norm: np.ndarray  # float32 [dim]
    has_qkv_bias: bool       # qwen2
    q_bias: np.ndarray       # float32 [n_layers, q_dim] ([n_layers, 0] without biases)
    k_bias: np.ndarray       # float32 [n_layers, kv_dim]
    v_bias: np.ndarray       # float32 [n_layers, kv_dim]
    fused_qkv: np.ndarray    # bool [n_layers]: q|k|v packed back to back (one product)
    fused_gate_up: np.ndarray  # bool [n_layers]: gate|up likewise
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    vocab_size: int
    norm_eps: float
    inv_freq: np.ndarray     # float64 [rope_dim // 2]: RoPE frequencies, scalings applied
    neox: bool               # rotate pairs (i, i + rope_dim/2) (qwen2 and later), else (2i, 2i + 1)
    q_norm: np.ndarray       # float32 [n_layers, head_dim]: per-head RMSNorm of q ([n_layers, 0]: none)
    k_norm: np.ndarray       # float32 [n_layers, head_dim]: of k (qwen3, gemma3)
    post_attn_norm: np.ndarray  # float32 [n_layers, dim]: norm of the attention output ([n_layers, 0]: none)
    post_ffn_norm: np.ndarray   # float32 [n_layers, dim]: of the feed-forward output (gemma2, gemma3)
    gelu: bool               # GeGLU (gelu_tanh(gate) * up), else SwiGLU
    embd_scale: float        # the embedding rows are multiplied by this (gemma: sqrt(dim); else 1.0)
    attn_scale: float        # attention scores = q . k * attn_scale (1/sqrt(head_dim) unless stated)
    attn_softcap: float      # > 0: scores capped to c * tanh(s / c) (gemma2); 0.0: off
    final_softcap: float     # > 0: logits likewise (gemma2); 0.0: off
    window: np.ndarray       # int64 [n_layers]: sliding window of each layer, 0 for global attention
    inv_freq_swa: np.ndarray  # float64 [rope_dim // 2]: RoPE frequencies of the sliding-window layers
    rope_mscale: float       # cos and sin of the global layers times this (YaRN's, long-rope's attention factor)


class LlamaWeights:
    """Builds the `LlamaModel` record of a GGUF file (`.model`): byte ranges of the file's map
    for matrices, packed copies with pack=True, float32 for the vectors. n_ctx (the context the
    model will run with) picks phi3's long-rope factors as llama.cpp does: the long ones when it
    exceeds the original training context."""

    def __init__(self, gguf_file, config, pack=False, n_ctx=None):
        f, c = gguf_file, config
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        shapes = {"attn_q": (q_dim, c.dim), "attn_k": (kv_dim, c.dim), "attn_v": (kv_dim, c.dim),
                  "attn_output": (c.dim, q_dim), "ffn_gate": (c.ffn_dim, c.dim), "ffn_up": (c.ffn_dim, c.dim),
                  "ffn_down": (c.dim, c.ffn_dim)}
        self.data = np.asarray(f.data)     # uint8 [file size], read-only memory map

        def layer_infos(name):
            return [f.tensors[f"blk.{layer}.{name}.weight"] for layer in range(c.n_layers)]

        # a fused tensor (phi3) is split into row ranges: ggml rows are contiguous whole blocks
        fused_tensors = {}
        if c.fused_qkv_tensor:
            fused_tensors["attn_qkv"] = (("attn_q", "attn_k", "attn_v"), (q_dim, kv_dim, kv_dim))
        if c.fused_gate_up_tensor:
            fused_tensors["ffn_up"] = (("ffn_gate", "ffn_up"), (c.ffn_dim, c.ffn_dim))
        matrices = {}
        for source, (names, rows) in fused_tensors.items():
            infos, first = layer_infos(source), 0
            for name, n_rows in zip(names, rows):
                matrices[name] = _matrix_rows(infos, first, n_rows, c.dim)
                first += n_rows
        for name, shape in shapes.items():
            if name not in matrices:
                matrices[name] = _matrix(layer_infos(name), *shape)
        embd = f.tensors["token_embd.weight"]
        matrices["token_embd"] = _matrix([embd], c.vocab_size, c.dim)
        matrices["output"] = _matrix([embd if c.tied_output else f.tensors["output.weight"]], c.vocab_size, c.dim)

        self.packed = np.zeros(0, dtype=np.uint8)
        fused = {"qkv": np.zeros(c.n_layers, dtype=np.bool_), "gate_up": np.zeros(c.n_layers, dtype=np.bool_)}
        if pack:
            self._pack(gguf_file, matrices, fused)

        def vectors(name, width):
            """float32 [n_layers, width] of blk.{layer}.{name}, or [n_layers, 0] when absent."""
            infos = [f.tensors.get(f"blk.{layer}.{name}") for layer in range(c.n_layers)]
            if infos[0] is None:
                return np.zeros((c.n_layers, 0), dtype=np.float32)
            return np.stack([_floats(f, info).reshape(width) for info in infos])

        has_bias = "blk.0.attn_q.bias" in f.tensors
        inv_freq, inv_freq_swa = _rope_frequencies(f, c, n_ctx)
        self.model = LlamaModel(
            data=self.data, packed=self.packed, **matrices,
            attn_norm=vectors("attn_norm.weight", c.dim), ffn_norm=vectors("ffn_norm.weight", c.dim),
            output_norm=_floats(f, f.tensors["output_norm.weight"]).reshape(c.dim),
            has_qkv_bias=has_bias, q_bias=vectors("attn_q.bias", q_dim), k_bias=vectors("attn_k.bias", kv_dim),
            v_bias=vectors("attn_v.bias", kv_dim), fused_qkv=fused["qkv"], fused_gate_up=fused["gate_up"],
            n_layers=int(c.n_layers), dim=int(c.dim), ffn_dim=int(c.ffn_dim), n_heads=int(c.n_heads),
            n_kv_heads=int(c.n_kv_heads), head_dim=int(c.head_dim), rope_dim=int(c.rope_dim),
            vocab_size=int(c.vocab_size), norm_eps=float(c.norm_eps),
            inv_freq=inv_freq, neox=c.neox,
            q_norm=vectors("attn_q_norm.weight", c.head_dim), k_norm=vectors("attn_k_norm.weight", c.head_dim),
            post_attn_norm=vectors("post_attention_norm.weight", c.dim),
            post_ffn_norm=vectors("post_ffw_norm.weight", c.dim),
            gelu=c.ffn_act == "gelu", embd_scale=float(c.embd_scale), attn_scale=float(c.attn_scale),
            attn_softcap=float(c.attn_softcap), final_softcap=float(c.final_softcap),
            window=np.array([c.sliding_window if swa else 0 for swa in c.swa_layers], dtype=np.int64),
            inv_freq_swa=inv_freq_swa, rope_mscale=float(c.rope_attn_factor))

    @property
    def n_packed(self) -> int:
        """How many matrices are read from packed copies (the tied embedding counts once)."""
        return sum(int((getattr(self.model, name).packed_at >= 0).sum()) for name in MATRIX_NAMES + ("output",))

    def _pack(self, gguf_file, matrices, fused):
        """Pack every matrix of a type in packing.PACKABLE_TYPES, within a layer in the order q, k, v, attn_output,
        gate, up, down (so q|k|v and gate|up end up back to back), then the output matrix, and
        give the file's pages of each one back. (A tied embedding is still read by rows for the
        token lookup: only the pages of the tokens seen come back.)"""
        jobs = []     # (matrix name, layer) of each packed matrix, in packing order
        for layer in range(len(matrices["attn_q"].offset)):
            jobs += [(name, layer) for name in MATRIX_NAMES
                     if matrices[name].w_type[layer] in packing.PACKABLE_TYPES]
        if matrices["output"].w_type[0] in packing.PACKABLE_TYPES:
            jobs.append(("output", 0))
        raw = [(matrices[n].offset[l], matrices[n].n_bytes[l], matrices[n].w_type[l], matrices[n].n_rows,
                matrices[n].n_cols) for n, l in jobs]
        mapped = getattr(gguf_file.data, "_mmap", None)
        self.packed, starts = packing.pack_matrices(
            self.data, raw, release=lambda offset, n_bytes: packing.release_pages(mapped, offset, n_bytes))
        for (name, layer), start in zip(jobs, starts):
            matrices[name].packed_at[layer] = start
        for layer in range(len(fused["qkv"])):
            for key, names in (("qkv", ("attn_q", "attn_k", "attn_v")), ("gate_up", ("ffn_gate", "ffn_up"))):
                fused[key][layer] = packing.contiguous_parts(
                    [(matrices[n].packed_at[layer], matrices[n].w_type[layer], matrices[n].n_rows,
                      matrices[n].n_cols) for n in names])


def _matrix(infos, n_rows, n_cols) -> Matrix:
    """A Matrix over the tensors `infos` (one per layer), none packed yet."""
    return Matrix(offset=np.array([i.offset for i in infos], dtype=np.int64),
                  n_bytes=np.array([i.n_bytes for i in infos], dtype=np.int64),
                  w_type=np.array([i.type_id for i in infos], dtype=np.int64),
                  packed_at=np.full(len(infos), -1, dtype=np.int64), n_rows=int(n_rows), n_cols=int(n_cols))


def _matrix_rows(infos, first_row, n_rows, n_cols) -> Matrix:
    """A Matrix over rows first_row .. first_row + n_rows of the tensors `infos` (one per layer):
    a part of a fused tensor (phi3's attn_qkv, ffn_up holding gate | up)."""
    row_bytes = np.array([i.n_bytes // i.shape[0] for i in infos], dtype=np.int64)
    return Matrix(offset=np.array([i.offset for i in infos], dtype=np.int64) + first_row * row_bytes,
                  n_bytes=n_rows * row_bytes,
                  w_type=np.array([i.type_id for i in infos], dtype=np.int64),
                  packed_at=np.full(len(infos), -1, dtype=np.int64), n_rows=int(n_rows), n_cols=int(n_cols))


def _rope_frequencies(f, c, n_ctx):
    """(inv_freq, inv_freq_swa) of config `c`: the RoPE frequencies of the global and of the
    sliding-window layers, with the file's scaling."""
    factors = None
    if c.rope_freqs:                          # Llama 3: rope_freqs.weight, as llama.cpp writes it
        factors = _floats(f, f.tensors["rope_freqs.weight"])
    if c.rope_scaling == "longrope":         # phi3: long factors past the original context
        long_ctx = n_ctx is not None and c.rope_orig_ctx and n_ctx > c.rope_orig_ctx
        factors = _floats(f, f.tensors["rope_factors_long.weight" if long_ctx else "rope_factors_short.weight"])
    scaling = c.rope_scaling if c.rope_scaling in ("linear", "yarn") else "none"
    inv_freq = rope_frequencies(c.rope_dim, float(c.rope_base), scaling, float(c.rope_scaling_factor), factors,
                                int(c.rope_orig_ctx), float(c.yarn_beta_fast), float(c.yarn_beta_slow))
    # gemma3's local layers: their own base, no scaling (llama.cpp: rope_freq_scale_train_swa = 1)
    inv_freq_swa = rope_frequencies(c.rope_dim, float(c.rope_base_swa)) if c.rope_base_swa else inv_freq
    return inv_freq, inv_freq_swa


def _floats(f, info) -> np.ndarray:
    """A (small) tensor decoded to float32."""
    return np.ascontiguousarray(dequantize(info.type_id, f.tensor_bytes(info.name), info.shape), dtype=np.float32)


# -- the compiled forward pass ------------------------------------------------------------------

@njit(cache=True, nogil=True)
def project(model, m, layer, x, out, act):
    """out [n, m.n_rows] = x [n, m.n_cols] @ W.T for matrix kind `m` of `layer`, from its packed
    copy when it has one, else from its raw blocks in the file. out must be contiguous."""
    if m.packed_at[layer] >= 0:
        matmul_packed(model.packed[m.packed_at[layer]:], m.w_type[layer], m.n_rows, m.n_cols, x, out, act)
    else:
        begin = m.offset[layer]
        matmul(model.data[begin: begin + m.n_bytes[layer]], m.w_type[layer], m.n_rows, m.n_cols, x, out, act)


@njit(cache=True, nogil=True)
def project_parts(model, parts, fused, layer, x, out, acts):
    """out [n, sum of the parts' rows] = the products of x with each matrix of `parts` (q, k, v or
    gate, up), side by side; acts[i] is part i's precision. `fused`: the parts are packed back to
    back, so one product over their concatenated rows computes all of them, quantizing x once."""
    if fused:
        part_rows = np.empty(len(parts), dtype=np.int64)
        for i in range(len(parts)):
            part_rows[i] = parts[i].n_rows
        first = parts[0]
        matmul_packed_parts(model.packed[first.packed_at[layer]:], first.w_type[layer], part_rows, first.n_cols,
                            x, out, acts)
        return
    column = 0
    for i in range(len(parts)):
        m = parts[i]
        scratch = np.empty((x.shape[0], m.n_rows), dtype=np.float32)   # project wants a contiguous out
        project(model, m, layer, x, scratch, acts[i])
        out[:, column: column + m.n_rows] = scratch
        column += m.n_rows


@njit(cache=True, nogil=True)
def llama_forward(model, tokens, slots, positions, logit_rows, k_cache, v_cache, logits, acts, hidden_out):
    """Run tokens [n] (at slots[n], positions[n]) through the model; write their K/V into the
    caches and the logits of rows `logit_rows` [m] into logits [m, vocab]. `acts` [8] is the
    activation precision (lmengine.kernels.matmul.ACT_*) of each matrix kind: the 7 per-layer
    matrices in MATRIX_NAMES order, then OUTPUT. Packed matrices need ACT_INT8 or ACT_INT8X2.
    hidden_out: float32 [m, dim] to get the final hidden states of rows `logit_rows` (after
    output_norm) instead of logits (embeddings: the output matrix is skipped and `logits` is
    not written), or [0, dim] (empty) for logits.
    """
    w = model
    dim, ffn_dim = w.dim, w.ffn_dim
    q_dim, kv_dim = w.n_heads * w.head_dim, w.n_kv_heads * w.head_dim
    n = tokens.shape[0]

    x = np.empty((n, dim), dtype=np.float32)
    xb = np.empty((n, dim), dtype=np.float32)
    qkv = np.empty((n, q_dim + 2 * kv_dim), dtype=np.float32)
    q = qkv[:, :q_dim]
    k = qkv[:, q_dim: q_dim + kv_dim]
    v = qkv[:, q_dim + kv_dim:]
    att = np.empty((n, q_dim), dtype=np.float32)
    gate_up = np.empty((n, 2 * ffn_dim), dtype=np.float32)
    gate = gate_up[:, :ffn_dim]
    up = gate_up[:, ffn_dim:]
    hidden = np.empty((n, ffn_dim), dtype=np.float32)
    cos_g, sin_g = rope_angles(positions, w.inv_freq, w.rope_mscale)   # [n, rope_dim // 2] each: global layers
    cos_l, sin_l = rope_angles(positions, w.inv_freq_swa, 1.0)         # sliding-window layers

    # token embedding: row tokens[t] of token_embd, decoded from its blocks
    row_bytes = w.token_embd.n_bytes[0] // w.token_embd.n_rows
    for t in range(n):
        begin = w.token_embd.offset[0] + tokens[t] * row_bytes
        dequantize_row_into(w.token_embd.w_type[0], w.data[begin: begin + row_bytes], dim, x[t])
        if w.embd_scale != 1.0:
            x[t] *= np.float32(w.embd_scale)

    for layer in range(w.n_layers):
        # attention: x += W_o @ attention(rope(W_q xb), rope(W_k xb), W_v xb)
        rmsnorm(x, w.attn_norm[layer], w.norm_eps, xb)
        project_parts(w, (w.attn_q, w.attn_k, w.attn_v), w.fused_qkv[layer], layer, xb, qkv, acts[ATTN_Q: ATTN_V + 1])
        if w.has_qkv_bias:
            add_bias(q, w.q_bias[layer])
            add_bias(k, w.k_bias[layer])
            add_bias(v, w.v_bias[layer])
        if w.q_norm.shape[1] > 0:
            head_rmsnorm(q, w.q_norm[layer], w.n_heads, w.head_dim, w.norm_eps)
            head_rmsnorm(k, w.k_norm[layer], w.n_kv_heads, w.head_dim, w.norm_eps)
        window = w.window[layer]
        cos, sin = (cos_l, sin_l) if window > 0 else (cos_g, sin_g)
        rope(q, cos, sin, w.n_heads, w.head_dim, w.rope_dim, w.neox)
        rope(k, cos, sin, w.n_kv_heads, w.head_dim, w.rope_dim, w.neox)
        write_kv(k, v, slots, positions, w.n_kv_heads, w.head_dim, k_cache[layer], v_cache[layer])
        attend(q, k_cache[layer], v_cache[layer], slots, positions, w.n_heads, w.n_kv_heads, w.head_dim,
               w.attn_scale, w.attn_softcap, window, att)
        project(w, w.attn_output, layer, att, xb, acts[ATTN_OUTPUT])
        if w.post_attn_norm.shape[1] > 0:
            rmsnorm(xb, w.post_attn_norm[layer], w.norm_eps, xb)
        add_inplace(x, xb)

        # feed-forward: x += W_down @ (act(W_gate xb) * (W_up xb)), act silu or gelu_tanh
        rmsnorm(x, w.ffn_norm[layer], w.norm_eps, xb)
        project_parts(w, (w.ffn_gate, w.ffn_up), w.fused_gate_up[layer], layer, xb, gate_up, acts[FFN_GATE: FFN_UP + 1])
        if w.gelu:
            geglu(gate, up, hidden)
        else:
            swiglu(gate, up, hidden)
        project(w, w.ffn_down, layer, hidden, xb, acts[FFN_DOWN])
        if w.post_ffn_norm.shape[1] > 0:
            rmsnorm(xb, w.post_ffn_norm[layer], w.norm_eps, xb)
        add_inplace(x, xb)

    # logits for the requested rows only: output_norm, then the output (or tied embedding) matrix
    m = logit_rows.shape[0]
    sel = np.empty((m, dim), dtype=np.float32)
    for i in range(m):
        sel[i] = x[logit_rows[i]]
    normed = np.empty((m, dim), dtype=np.float32)
    rmsnorm(sel, w.output_norm, w.norm_eps, normed)
    if hidden_out.shape[0] > 0:          # embeddings: the normed hidden states, no output matrix
        hidden_out[:] = normed
        return
    project(w, w.output, 0, normed, logits, acts[OUTPUT])
    if w.final_softcap > 0.0:
        softcap(logits, w.final_softcap)
