"""The llama-family forward pass (llama, qwen2), one compiled call per step.

Weights stay in the GGUF file's memory map. Matrices are passed to the kernels as raw ggml blocks:
`data[offset : offset + n_bytes]` with their ggml type; only the small vectors (norm weights and
biases, a few KB per layer) are decoded to float32 at load time.

One call of `llama_forward` runs a batch of tokens through every layer. Each token carries its
own slot (sequence) and position, so the same call serves a prompt, one decode step of many
sequences, or a mix (see kernels/attention.py).

Shapes (n = tokens in the call):
    x        [n, dim]        residual stream
    xb       [n, dim]        normed input of a sub-layer
    q        [n, n_heads * head_dim]
    k, v     [n, n_kv_heads * head_dim]
    gate, up [n, ffn_dim]
    k_cache, v_cache [n_layers, n_slots, n_kv_heads, n_ctx, head_dim]
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.attention import attention, write_kv
from kernels.matmul import matmul
from kernels.ops import add_bias, add_inplace, rmsnorm, rope, rope_inv_freq, swiglu
from kernels.quant import dequantize, dequantize_row_into, row_bytes

# Per-layer matrices: rows of `mat_off` / `mat_type` / `mat_bytes`.
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN = range(7)
MATRIX_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Per-layer vectors, decoded to float32: rows of `vec_off` (offset into `vecs`, -1 when absent).
ATTN_NORM, FFN_NORM, Q_BIAS, K_BIAS, V_BIAS = range(5)
VECTOR_NAMES = ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias")


class LlamaWeights:
    """Where each weight lives: byte ranges of the GGUF map for matrices, float32 for vectors."""

    def __init__(self, gguf_file, config):
        f, c = gguf_file, config
        self.data = np.asarray(f.data)  # uint8 [file_size], read-only memory map
        self.mat_off = np.zeros((c.n_layers, len(MATRIX_NAMES)), dtype=np.int64)
        self.mat_bytes = np.zeros((c.n_layers, len(MATRIX_NAMES)), dtype=np.int64)
        self.mat_type = np.zeros((c.n_layers, len(MATRIX_NAMES)), dtype=np.int64)
        for layer in range(c.n_layers):
            for j, name in enumerate(MATRIX_NAMES):
                info = f.tensors[f"blk.{layer}.{name}.weight"]
                self.mat_off[layer, j], self.mat_bytes[layer, j], self.mat_type[layer, j] = \
                    info.offset, info.n_bytes, info.type_id

        vectors = []  # float32 pieces, concatenated into self.vecs
        self.vec_off = np.full((c.n_layers, len(VECTOR_NAMES)), -1, dtype=np.int64)
        n_floats = 0
        for layer in range(c.n_layers):
            for j, name in enumerate(VECTOR_NAMES):
                info = f.tensors.get(f"blk.{layer}.{name}")
                if info is None:
                    continue
                values = dequantize(info.type_id, f.tensor_bytes(info.name), info.shape).ravel()
                self.vec_off[layer, j] = n_floats
                vectors.append(values)
                n_floats += values.size
        info = f.tensors["output_norm.weight"]
        self.output_norm_off = n_floats
        vectors.append(dequantize(info.type_id, f.tensor_bytes(info.name), info.shape).ravel())
        self.vecs = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)

        embd = f.tensors["token_embd.weight"]
        self.embd_off, self.embd_type = embd.offset, embd.type_id
        self.embd_row_bytes = row_bytes(embd.type_id, c.dim)
        out = embd if c.tied_output else f.tensors["output.weight"]
        self.out_off, self.out_bytes, self.out_type = out.offset, out.n_bytes, out.type_id

        # Sizes as one int64 vector, so the compiled forward gets them in one argument.
        self.dims = np.array([c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim,
                              c.rope_dim, c.vocab_size], dtype=np.int64)
        self.norm_eps = float(c.norm_eps)
        self.inv_freq = rope_inv_freq(c.rope_dim, float(c.rope_base))
        self.neox = c.arch == "qwen2"  # qwen2 rotates (i, i + rope_dim/2); llama GGUFs adjacent pairs

    def forward_args(self):
        """The weight arguments of `llama_forward`, in order."""
        return (self.data, self.mat_off, self.mat_bytes, self.mat_type, self.vecs, self.vec_off,
                self.output_norm_off, self.embd_off, self.embd_type, self.embd_row_bytes,
                self.out_off, self.out_bytes, self.out_type, self.dims, self.norm_eps,
                self.inv_freq, self.neox)


@njit(cache=True, nogil=True)
def _project(data, off, n_bytes, w_type, n_rows, n_cols, x, out, act):
    """out [n, n_rows] = x [n, n_cols] @ W.T, W the raw blocks at data[off : off + n_bytes]."""
    matmul(data[off: off + n_bytes], w_type, n_rows, n_cols, x, out, act)


@njit(cache=True, nogil=True)
def llama_forward(data, mat_off, mat_bytes, mat_type, vecs, vec_off, output_norm_off,
                  embd_off, embd_type, embd_row_bytes, out_off, out_bytes, out_type,
                  dims, norm_eps, inv_freq, neox,
                  tokens, slots, positions, logit_rows, k_cache, v_cache, logits, act):
    """Run tokens [n] (at slots[n], positions[n]) through the model; write their K/V into the
    caches and the logits of rows `logit_rows` [m] into logits [m, vocab]. `act` is the
    activation precision of the matrix products (kernels.matmul.ACT_*)."""
    n_layers, dim, ffn_dim, n_heads, n_kv_heads, head_dim, rope_dim, vocab = \
        dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7]
    q_dim = n_heads * head_dim
    kv_dim = n_kv_heads * head_dim
    n = tokens.shape[0]

    x = np.empty((n, dim), dtype=np.float32)
    xb = np.empty((n, dim), dtype=np.float32)
    q = np.empty((n, q_dim), dtype=np.float32)
    k = np.empty((n, kv_dim), dtype=np.float32)
    v = np.empty((n, kv_dim), dtype=np.float32)
    att = np.empty((n, q_dim), dtype=np.float32)
    gate = np.empty((n, ffn_dim), dtype=np.float32)
    up = np.empty((n, ffn_dim), dtype=np.float32)

    # token embedding: one row of token_embd per token, decoded from its blocks
    for t in range(n):
        row = embd_off + tokens[t] * embd_row_bytes
        dequantize_row_into(embd_type, data[row: row + embd_row_bytes], dim, x[t])

    for layer in range(n_layers):
        off, nb, ty = mat_off[layer], mat_bytes[layer], mat_type[layer]
        vo = vec_off[layer]

        # attention: x += W_o @ attention(rope(W_q xb), rope(W_k xb), W_v xb)
        rmsnorm(x, vecs[vo[ATTN_NORM]: vo[ATTN_NORM] + dim], norm_eps, xb)
        _project(data, off[ATTN_Q], nb[ATTN_Q], ty[ATTN_Q], q_dim, dim, xb, q, act)
        _project(data, off[ATTN_K], nb[ATTN_K], ty[ATTN_K], kv_dim, dim, xb, k, act)
        _project(data, off[ATTN_V], nb[ATTN_V], ty[ATTN_V], kv_dim, dim, xb, v, act)
        if vo[Q_BIAS] >= 0:
            add_bias(q, vecs[vo[Q_BIAS]: vo[Q_BIAS] + q_dim])
            add_bias(k, vecs[vo[K_BIAS]: vo[K_BIAS] + kv_dim])
            add_bias(v, vecs[vo[V_BIAS]: vo[V_BIAS] + kv_dim])
        rope(q, positions, n_heads, head_dim, rope_dim, inv_freq, neox)
        rope(k, positions, n_kv_heads, head_dim, rope_dim, inv_freq, neox)
        write_kv(k, v, slots, positions, n_kv_heads, head_dim, k_cache[layer], v_cache[layer])
        attention(q, k_cache[layer], v_cache[layer], slots, positions, n_heads, n_kv_heads, head_dim, att)
        _project(data, off[ATTN_OUTPUT], nb[ATTN_OUTPUT], ty[ATTN_OUTPUT], dim, q_dim, att, xb, act)
        add_inplace(x, xb)

        # feed-forward: x += W_down @ (silu(W_gate xb) * (W_up xb))
        rmsnorm(x, vecs[vo[FFN_NORM]: vo[FFN_NORM] + dim], norm_eps, xb)
        _project(data, off[FFN_GATE], nb[FFN_GATE], ty[FFN_GATE], ffn_dim, dim, xb, gate, act)
        _project(data, off[FFN_UP], nb[FFN_UP], ty[FFN_UP], ffn_dim, dim, xb, up, act)
        swiglu(gate, up)
        _project(data, off[FFN_DOWN], nb[FFN_DOWN], ty[FFN_DOWN], dim, ffn_dim, gate, xb, act)
        add_inplace(x, xb)

    # logits for the requested rows only: output_norm, then the output (or tied embedding) matrix
    m = logit_rows.shape[0]
    sel = np.empty((m, dim), dtype=np.float32)
    for i in range(m):
        sel[i] = x[logit_rows[i]]
    normed = np.empty((m, dim), dtype=np.float32)
    rmsnorm(sel, vecs[output_norm_off: output_norm_off + dim], norm_eps, normed)
    matmul(data[out_off: out_off + out_bytes], out_type, vocab, dim, normed, logits, act)
