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


@njit(cache=True, nogil=True, parallel=True)
def attention(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, out):
    """out[t, head h] = softmax(q_h . K[0..p] / sqrt(head_dim)) @ V[0..p], p = positions[t].

    q, out: [n_tok, n_heads*head_dim]. Query head h reads kv head h // (n_heads // n_kv_heads):
    each kv head serves a consecutive group of query heads.
    """
    n_tok = q.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for job in prange(n_tok * n_heads):
        t = job // n_heads
        h = job % n_heads
        kvh = h // group
        s = slots[t]
        n_pos = positions[t] + 1
        q_off = h * head_dim
        # scores[j] = q . k_j * scale
        scores = np.empty(n_pos, dtype=np.float32)
        best = -np.inf
        for j in range(n_pos):
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += q[t, q_off + d] * k_cache[s, kvh, j, d]
            acc *= scale
            scores[j] = acc
            if acc > best:
                best = acc
        total = np.float32(0.0)
        for j in range(n_pos):
            e = np.float32(math.exp(scores[j] - best))
            scores[j] = e
            total += e
        inv_total = np.float32(1.0) / total
        for d in range(head_dim):
            out[t, q_off + d] = 0.0
        for j in range(n_pos):
            w = scores[j] * inv_total
            for d in range(head_dim):
                out[t, q_off + d] += w * v_cache[s, kvh, j, d]
