"""Causal grouped-query attention over a KV cache, and the cache write.

Cache layout for one layer: k_cache, v_cache float32 [n_slots, n_kv_heads, n_ctx, head_dim] (the
HF / ONNX `[batch, n_kv_heads, seq, head_dim]` layout), so one head's keys are contiguous.

A batch of tokens is described per token: `slots[t]` (which sequence) and `positions[t]` (where
in it). Token t attends to positions 0..positions[t] of its slot. This one description covers a
prompt (one slot, consecutive positions), a decode step of many sequences (many slots, one token
each), and any mix of the two.
"""
import math

import numpy as np
from numba import njit, prange

from kernels.matmul import dot_f32  # vectorized float32 dot product (fastmath reduction)


@njit(cache=True, nogil=True)
def write_kv(k, v, slots, positions, n_kv_heads, head_dim, k_cache, v_cache):
    """Store k, v [n_tok, n_kv_heads*head_dim] at (slots[t], :, positions[t], :) of the caches."""
    n_tok = k.shape[0]
    for t in range(n_tok):
        s = slots[t]
        p = positions[t]
        for h in range(n_kv_heads):
            for d in range(head_dim):
                k_cache[s, h, p, d] = k[t, h * head_dim + d]
                v_cache[s, h, p, d] = v[t, h * head_dim + d]


@njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
def attention(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, out):
    """out[t, head h] = softmax(q_h . K[0..p] / sqrt(head_dim)) @ V[0..p], p = positions[t].

    q, out: [n_tok, n_heads*head_dim]. Query head h reads kv head h // (n_heads // n_kv_heads):
    each kv head serves a consecutive group of query heads. The dot products and the weighted sum
    of V rows run over contiguous head_dim vectors (vectorized; float32 summation order differs
    from a scalar loop at rounding level).
    """
    n_tok = q.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for job in prange(n_tok * n_heads):
        t = job // n_heads
        h = job % n_heads
        keys = k_cache[slots[t], h // group]      # [n_ctx, head_dim]
        values = v_cache[slots[t], h // group]    # [n_ctx, head_dim]
        q_h = np.empty(head_dim, dtype=np.float32)   # contiguous and pre-scaled (q may be a view)
        for d in range(head_dim):
            q_h[d] = q[t, h * head_dim + d] * scale
        n_pos = positions[t] + 1
        scores = np.empty(n_pos, dtype=np.float32)
        best = -np.inf
        for j in range(n_pos):
            score = dot_f32(q_h, keys[j], head_dim)
            scores[j] = score
            best = max(best, score)
        total = np.float32(0.0)
        for j in range(n_pos):
            e = np.float32(math.exp(scores[j] - best))
            scores[j] = e
            total += e
        acc = np.zeros(head_dim, dtype=np.float32)
        for j in range(n_pos):
            w = scores[j]
            v_j = values[j]
            for d in range(head_dim):
                acc[d] += w * v_j[d]
        inv_total = np.float32(1.0) / total
        for d in range(head_dim):
            out[t, h * head_dim + d] = acc[d] * inv_total
