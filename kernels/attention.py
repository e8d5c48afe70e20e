"""Causal grouped-query attention over a KV cache, and the cache write.

Cache layout for one layer:
    k_cache float32 [n_slots, n_kv_heads, n_tiles, head_dim, KEY_TILE]: keys in tiles of KEY_TILE
            positions, transposed (k_cache[s, h, i, d, p] is dimension d of the key at position
            i * KEY_TILE + p), so that the scores of KEY_TILE positions are one vector operation;
    v_cache float32 [n_slots, n_kv_heads, n_ctx, head_dim]: one row per position.
n_ctx is a multiple of KEY_TILE (`cache_shapes` rounds it up).

A batch of tokens is described per token: `slots[t]` (which sequence) and `positions[t]` (where
in it). Token t attends to positions 0..positions[t] of its slot. This one description covers a
prompt (one slot, consecutive positions), a decode step of many sequences (many slots, one token
each), and any mix of the two.

Work is split over threads by (token, kv head): each job computes the query heads that share one
kv head, so their keys and values are read once. The C kernel (kernels/csrc/attention.c, AVX-512)
does a job when it can; otherwise the Numba loop below does (the reference).
"""
import math

import numpy as np
from numba import njit, prange

from kernels import native

KEY_TILE = 16   # positions per key tile


def cache_shapes(n_layers, n_slots, n_kv_heads, n_ctx, head_dim):
    """(k_cache shape, v_cache shape) for all layers, n_ctx rounded up to whole key tiles."""
    n_tiles = -(-n_ctx // KEY_TILE)
    return ((n_layers, n_slots, n_kv_heads, n_tiles, head_dim, KEY_TILE),
            (n_layers, n_slots, n_kv_heads, n_tiles * KEY_TILE, head_dim))


@njit(cache=True, nogil=True)
def write_kv(k, v, slots, positions, n_kv_heads, head_dim, k_cache, v_cache):
    """Store k, v [n_tok, n_kv_heads*head_dim] at (slots[t], :, positions[t]) of the caches."""
    n_tok = k.shape[0]
    for t in range(n_tok):
        s = slots[t]
        p = positions[t]
        tile, lane = p // KEY_TILE, p % KEY_TILE
        for h in range(n_kv_heads):
            for d in range(head_dim):
                k_cache[s, h, tile, d, lane] = k[t, h * head_dim + d]
                v_cache[s, h, p, d] = v[t, h * head_dim + d]


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _attend_group(q_g, keys, values, n_pos, scores, out_g):
    """The Numba form of lme_attention: q_g [group, head_dim] (pre-scaled) against keys
    [n_tiles, head_dim, KEY_TILE] and values [n_ctx, head_dim] up to position n_pos - 1;
    out_g [group, head_dim]. scores: scratch [n_tiles * KEY_TILE]."""
    group, head_dim = q_g.shape
    n_tiles = (n_pos + KEY_TILE - 1) // KEY_TILE
    for g in range(group):
        for i in range(n_tiles):
            for p in range(KEY_TILE):
                scores[i * KEY_TILE + p] = 0.0
            for d in range(head_dim):
                qd = q_g[g, d]
                for p in range(KEY_TILE):
                    scores[i * KEY_TILE + p] += qd * keys[i, d, p]
        best = np.float32(-np.inf)
        for j in range(n_pos):
            best = max(best, scores[j])
        total = np.float32(0.0)
        for j in range(n_pos):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        inv_total = np.float32(1.0) / total
        for d in range(head_dim):
            out_g[g, d] = 0.0
        for j in range(n_pos):
            w = scores[j]
            for d in range(head_dim):
                out_g[g, d] += w * values[j, d]
        for d in range(head_dim):
            out_g[g, d] *= inv_total


@njit(cache=True, nogil=True, parallel=True)
def attention(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, out):
    """out[t, head h] = softmax(q_h . K[0..p] / sqrt(head_dim)) @ V[0..p], p = positions[t].

    q, out: [n_tok, n_heads*head_dim]. Query head h reads kv head h // (n_heads // n_kv_heads):
    each kv head serves a consecutive group of query heads.
    """
    n_tok = q.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for job in prange(n_tok * n_kv_heads):
        t = job // n_kv_heads
        kv_head = job % n_kv_heads
        keys = k_cache[slots[t], kv_head]         # [n_tiles, head_dim, KEY_TILE]
        values = v_cache[slots[t], kv_head]       # [n_ctx, head_dim]
        n_pos = positions[t] + 1
        first = kv_head * group * head_dim        # the group's columns in q and out
        q_g = np.empty((group, head_dim), dtype=np.float32)   # contiguous and pre-scaled
        for g in range(group):
            for d in range(head_dim):
                q_g[g, d] = q[t, first + g * head_dim + d] * scale
        scores = np.empty((n_pos + KEY_TILE - 1) // KEY_TILE * KEY_TILE, dtype=np.float32)
        out_g = np.empty((group, head_dim), dtype=np.float32)
        if native.c_attention(q_g, group, head_dim, keys, values, n_pos, scores, out_g) != 0:
            _attend_group(q_g, keys, values, n_pos, scores, out_g)
        for g in range(group):
            for d in range(head_dim):
                out[t, first + g * head_dim + d] = out_g[g, d]
