"""The llama-family forward pass (llama, qwen2), one compiled call per step.

Weights stay in the GGUF file's memory map. Matrices are passed to the kernels as raw ggml blocks:
`data[offset : offset + n_bytes]` with their ggml type; only the small vectors (norm weights and
biases, a few KB per layer) are decoded to float32 at load time.

One call of `llama_forward` runs a batch of tokens through every layer. Each token carries its
own slot (sequence) and position, so the same call serves a prompt, one decode step of many
sequences, or a mix (see kernels/attention.py).

Packed matrices: on CPUs with AVX-512 VNNI the int8 paths read the Q8_0/Q4_0/Q4_1 matrices in the
16-row packed layout of kernels/csrc/packed.c (made once at load, `LlamaWeights(pack=True)`; the
file's pages of those matrices are then dropped from memory). A layer whose q, k, v (and gate, up)
matrices are packed back to back runs them as one product over the concatenated rows, quantizing
its input once.

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

import mmap

import numpy as np
from numba import njit

from kernels.attention import attention, write_kv
from kernels import native
from kernels.matmul import matmul, matmul_packed, matmul_packed_parts
from kernels.ops import add_bias, add_inplace, rmsnorm, rope, rope_angles, rope_inv_freq, swiglu
from kernels.quant import dequantize, dequantize_row_into, row_bytes

# Per-layer matrices: rows of `mat_off` / `mat_type` / `mat_bytes`.
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN = range(7)
MATRIX_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
OUTPUT = len(MATRIX_NAMES)  # the output matrix's entry in `acts` (after the 7 per-layer kinds)
# Per-layer fusions (rows of `fused`): q|k|v and gate|up packed back to back, run as one product.
FUSED_QKV, FUSED_GATE_UP = range(2)
# Per-layer vectors, decoded to float32: rows of `vec_off` (offset into `vecs`, -1 when absent).
ATTN_NORM, FFN_NORM, Q_BIAS, K_BIAS, V_BIAS = range(5)
VECTOR_NAMES = ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias")


class LlamaWeights:
    """Where each weight lives: byte ranges of the GGUF map for matrices (and, with pack=True,
    offsets into one array of packed matrices), float32 for vectors."""

    def __init__(self, gguf_file, config, pack=False):
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

        # packed matrices: pk_off[layer, j] offset into self.packed (-1: not packed), out_pk_off
        self.pk_off = np.full((c.n_layers, len(MATRIX_NAMES)), -1, dtype=np.int64)
        self.fused = np.zeros((c.n_layers, 2), dtype=np.int64)
        self.out_pk_off = -1
        self.packed = np.zeros(0, dtype=np.uint8)
        if pack:
            self._pack(gguf_file, config)

    def _matrix_shapes(self, config):
        c = config
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return ((q_dim, c.dim), (kv_dim, c.dim), (kv_dim, c.dim), (c.dim, q_dim),
                (c.ffn_dim, c.dim), (c.ffn_dim, c.dim), (c.dim, c.ffn_dim))

    def _pack(self, gguf_file, config):
        """Pack every Q8_0/Q4_0/Q4_1 matrix (in file order within a layer, so q|k|v and gate|up
        end up back to back) into one array, then drop the file's pages of those matrices."""
        c = config
        shapes = self._matrix_shapes(c)
        jobs = []          # (where the result goes, raw offset, raw bytes, type, rows, cols)
        for layer in range(c.n_layers):
            for j, (n_rows, n_cols) in enumerate(shapes):
                if self.mat_type[layer, j] in native.Q8_TYPES:
                    jobs.append(((layer, j), self.mat_off[layer, j], self.mat_bytes[layer, j],
                                 self.mat_type[layer, j], n_rows, n_cols))
        if self.out_type in native.Q8_TYPES:
            jobs.append((None, self.out_off, self.out_bytes, self.out_type, c.vocab_size, c.dim))
        sizes = [native.packed_bytes(ty, rows, cols) for _, _, _, ty, rows, cols in jobs]
        self.packed = np.empty(sum(sizes), dtype=np.uint8)
        offset = 0
        for (where, raw_off, raw_bytes, ty, rows, cols), size in zip(jobs, sizes):
            native.pack_q8(self.data[raw_off: raw_off + raw_bytes], ty, rows, cols,
                           out=self.packed[offset: offset + size])
            if where is None:
                self.out_pk_off = offset
            else:
                self.pk_off[where] = offset
            offset += size
            # (a tied embedding is still read by rows for the token lookup: only the pages of
            # the tokens seen come back)
            _drop_pages(gguf_file, raw_off, raw_bytes)
        for layer in range(c.n_layers):
            self.fused[layer, FUSED_QKV] = self._back_to_back(layer, (ATTN_Q, ATTN_K, ATTN_V), shapes)
            self.fused[layer, FUSED_GATE_UP] = self._back_to_back(layer, (FFN_GATE, FFN_UP), shapes)

    def _back_to_back(self, layer, matrices, shapes):
        """Whether the packed matrices follow one another with one type and whole 16-row groups
        (so together they are the packing of their concatenated rows)."""
        first = matrices[0]
        for prev, j in zip(matrices, matrices[1:]):
            rows, cols = shapes[prev]
            if (self.pk_off[layer, prev] < 0 or self.pk_off[layer, j] < 0
                    or self.mat_type[layer, j] != self.mat_type[layer, first] or rows % native.PACK_ROWS
                    or shapes[j][1] != cols
                    or self.pk_off[layer, j] != self.pk_off[layer, prev]
                    + native.packed_bytes(self.mat_type[layer, prev], rows, cols)):
                return 0
        return 1

    def forward_args(self):
        """The weight arguments of `llama_forward`, in order."""
        return (self.data, self.mat_off, self.mat_bytes, self.mat_type, self.vecs, self.vec_off,
                self.output_norm_off, self.embd_off, self.embd_type, self.embd_row_bytes,
                self.out_off, self.out_bytes, self.out_type, self.dims, self.norm_eps,
                self.inv_freq, self.neox, self.packed, self.pk_off, self.fused, self.out_pk_off)


def _drop_pages(gguf_file, offset, n_bytes):
    """Tell the OS that this process no longer needs the file's pages in [offset, offset + n_bytes)
    (whole pages inside it): they leave the resident set; reading them again would reload them."""
    mm = getattr(gguf_file.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    begin = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)


@njit(cache=True, nogil=True)
def _project(data, off, n_bytes, packed, pk_off, w_type, n_rows, n_cols, x, out, act):
    """out [n, n_rows] = x [n, n_cols] @ W.T: W packed at packed[pk_off:] when pk_off >= 0, else
    the raw blocks at data[off : off + n_bytes]. out must be contiguous."""
    if pk_off >= 0:
        matmul_packed(packed[pk_off:], w_type, n_rows, n_cols, x, out, act)
    else:
        matmul(data[off: off + n_bytes], w_type, n_rows, n_cols, x, out, act)


@njit(cache=True, nogil=True)
def _project_into(data, off, n_bytes, packed, pk_off, w_type, n_rows, n_cols, x, out_view, act):
    """_project into a column range of a wider array (through a contiguous scratch)."""
    scratch = np.empty((x.shape[0], n_rows), dtype=np.float32)
    _project(data, off, n_bytes, packed, pk_off, w_type, n_rows, n_cols, x, scratch, act)
    out_view[:, :] = scratch


@njit(cache=True, nogil=True)
def llama_forward(data, mat_off, mat_bytes, mat_type, vecs, vec_off, output_norm_off,
                  embd_off, embd_type, embd_row_bytes, out_off, out_bytes, out_type,
                  dims, norm_eps, inv_freq, neox, packed, pk_off, fused, out_pk_off,
                  tokens, slots, positions, logit_rows, k_cache, v_cache, logits, acts):
    """Run tokens [n] (at slots[n], positions[n]) through the model; write their K/V into the
    caches and the logits of rows `logit_rows` [m] into logits [m, vocab]. `acts` [8] is the
    activation precision (kernels.matmul.ACT_*) of each matrix kind: the 7 per-layer matrices in
    MATRIX_NAMES order, then OUTPUT. Packed matrices need ACT_INT8 or ACT_INT8X2.
    """
    n_layers, dim, ffn_dim, n_heads, n_kv_heads, head_dim, rope_dim, vocab = \
        dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7]
    q_dim = n_heads * head_dim
    kv_dim = n_kv_heads * head_dim
    n = tokens.shape[0]

    x = np.empty((n, dim), dtype=np.float32)
    xb = np.empty((n, dim), dtype=np.float32)
    qkv = np.empty((n, q_dim + 2 * kv_dim), dtype=np.float32)
    q = qkv[:, :q_dim]
    k = qkv[:, q_dim: q_dim + kv_dim]
    v = qkv[:, q_dim + kv_dim:]
    att = np.empty((n, q_dim), dtype=np.float32)
    gate_up = np.empty((n, 2 * ffn_dim), dtype=np.float32)
    hidden = np.empty((n, ffn_dim), dtype=np.float32)
    cos, sin = rope_angles(positions, inv_freq)   # [n, rope_dim // 2] each
    qkv_rows = np.array([q_dim, kv_dim, kv_dim], dtype=np.int64)         # parts of the fused products
    gate_up_rows = np.array([ffn_dim, ffn_dim], dtype=np.int64)

    # token embedding: one row of token_embd per token, decoded from its blocks
    for t in range(n):
        row = embd_off + tokens[t] * embd_row_bytes
        dequantize_row_into(embd_type, data[row: row + embd_row_bytes], dim, x[t])

    for layer in range(n_layers):
        off, nb, ty, pk = mat_off[layer], mat_bytes[layer], mat_type[layer], pk_off[layer]
        vo = vec_off[layer]

        # attention: x += W_o @ attention(rope(W_q xb), rope(W_k xb), W_v xb)
        rmsnorm(x, vecs[vo[ATTN_NORM]: vo[ATTN_NORM] + dim], norm_eps, xb)
        if fused[layer, FUSED_QKV]:
            matmul_packed_parts(packed[pk[ATTN_Q]:], ty[ATTN_Q], qkv_rows, dim, xb, qkv, acts[ATTN_Q: ATTN_V + 1])
        else:
            _project_into(data, off[ATTN_Q], nb[ATTN_Q], packed, pk[ATTN_Q], ty[ATTN_Q], q_dim, dim, xb, q, acts[ATTN_Q])
            _project_into(data, off[ATTN_K], nb[ATTN_K], packed, pk[ATTN_K], ty[ATTN_K], kv_dim, dim, xb, k, acts[ATTN_K])
            _project_into(data, off[ATTN_V], nb[ATTN_V], packed, pk[ATTN_V], ty[ATTN_V], kv_dim, dim, xb, v, acts[ATTN_V])
        if vo[Q_BIAS] >= 0:
            add_bias(q, vecs[vo[Q_BIAS]: vo[Q_BIAS] + q_dim])
            add_bias(k, vecs[vo[K_BIAS]: vo[K_BIAS] + kv_dim])
            add_bias(v, vecs[vo[V_BIAS]: vo[V_BIAS] + kv_dim])
        rope(q, cos, sin, n_heads, head_dim, rope_dim, neox)
        rope(k, cos, sin, n_kv_heads, head_dim, rope_dim, neox)
        write_kv(k, v, slots, positions, n_kv_heads, head_dim, k_cache[layer], v_cache[layer])
        attention(q, k_cache[layer], v_cache[layer], slots, positions, n_heads, n_kv_heads, head_dim, att)
        _project(data, off[ATTN_OUTPUT], nb[ATTN_OUTPUT], packed, pk[ATTN_OUTPUT], ty[ATTN_OUTPUT],
                 dim, q_dim, att, xb, acts[ATTN_OUTPUT])
        add_inplace(x, xb)

        # feed-forward: x += W_down @ (silu(W_gate xb) * (W_up xb))
        rmsnorm(x, vecs[vo[FFN_NORM]: vo[FFN_NORM] + dim], norm_eps, xb)
        gate = gate_up[:, :ffn_dim]
        up = gate_up[:, ffn_dim:]
        if fused[layer, FUSED_GATE_UP]:
            matmul_packed_parts(packed[pk[FFN_GATE]:], ty[FFN_GATE], gate_up_rows, dim, xb, gate_up,
                                acts[FFN_GATE: FFN_UP + 1])
        else:
            _project_into(data, off[FFN_GATE], nb[FFN_GATE], packed, pk[FFN_GATE], ty[FFN_GATE],
                          ffn_dim, dim, xb, gate, acts[FFN_GATE])
            _project_into(data, off[FFN_UP], nb[FFN_UP], packed, pk[FFN_UP], ty[FFN_UP],
                          ffn_dim, dim, xb, up, acts[FFN_UP])
        swiglu(gate, up, hidden)
        _project(data, off[FFN_DOWN], nb[FFN_DOWN], packed, pk[FFN_DOWN], ty[FFN_DOWN],
                 dim, ffn_dim, hidden, xb, acts[FFN_DOWN])
        add_inplace(x, xb)

    # logits for the requested rows only: output_norm, then the output (or tied embedding) matrix
    m = logit_rows.shape[0]
    sel = np.empty((m, dim), dtype=np.float32)
    for i in range(m):
        sel[i] = x[logit_rows[i]]
    normed = np.empty((m, dim), dtype=np.float32)
    rmsnorm(sel, vecs[output_norm_off: output_norm_off + dim], norm_eps, normed)
    _project(data, out_off, out_bytes, packed, out_pk_off, out_type, vocab, dim, normed, logits, acts[OUTPUT])
