"""Causal grouped-query attention over a KV cache, and the cache write.

Cache layout for one layer:
    k_cache [n_slots, n_kv_heads, n_tiles, head_dim, KEY_TILE]: keys in tiles of KEY_TILE
            positions, transposed (k_cache[s, h, i, d, p] is dimension d of the key at position
            i * KEY_TILE + p), so that the scores of KEY_TILE positions are one vector operation;
    v_cache [n_slots, n_kv_heads, n_ctx, head_dim]: one row per position.
n_ctx is a multiple of KEY_TILE (`cache_shapes` rounds it up). The elements are float32, or f16
held as their uint16 bits (KV_DTYPES): half the memory, and half the memory traffic, which is
what attention over many sequences is bound by. Everything here takes either.

A batch of tokens is described per token: `slots[t]` (which sequence) and `positions[t]` (where
in it). Token t attends to positions 0..positions[t] of its slot. This one description covers a
prompt (one slot, consecutive positions), a decode step of many sequences (many slots, one token
each), and any mix of the two.

Work is split over threads by (token, kv head): each job computes the query heads that share one
kv head, so their keys and values are read once. The C kernel (kernels/csrc/attention.c: scalar, AVX2,
AVX-512) does a job when the extension is loaded; otherwise the Numba loop below does (the reference).
"""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import native
from .quant import F16, F32, float_to_half_bits, half_bits_to_float

KEY_TILE = 16   # positions per key tile
KV_DTYPES = {"f32": np.float32, "f16": np.uint16}   # cache element types (f16 as its bits)


def cache_shapes(n_layers, n_slots, n_kv_heads, n_ctx, head_dim):
    """(k_cache shape, v_cache shape) for all layers, n_ctx rounded up to whole key tiles."""
    n_tiles = -(-n_ctx // KEY_TILE)
    return ((n_layers, n_slots, n_kv_heads, n_tiles, head_dim, KEY_TILE),
            (n_layers, n_slots, n_kv_heads, n_tiles * KEY_TILE, head_dim))


def _store(x, out):
    """out[:] = x (float32, 1-D) in the element type of out (a cache row): float32, or f16 bits
    rounded to nearest even (Numba-only; see the overload below)."""
    raise NotImplementedError


@overload(_store)
def _store_impl(x, out):
    if out.dtype == types.uint16:
        def store_f16(x, out):
            if x.strides[0] == 4 and out.strides[0] == 2 and native.c_to_f16(x, out) == 0:
                return                                              # the C kernel did it
            for i in range(x.shape[0]):
                out[i] = float_to_half_bits(x[i])
        return store_f16

    def store_f32(x, out):
        for i in range(x.shape[0]):
            out[i] = x[i]
    return store_f32


def _load(value):
    """A cache element as float32 (Numba-only; see the overload below)."""
    raise NotImplementedError


@overload(_load)
def _load_impl(value):
    if value == types.uint16:
        return lambda value: half_bits_to_float(value)
    return lambda value: value


@njit(cache=True, nogil=True)
def write_kv(k, v, slots, positions, n_kv_heads, head_dim, k_cache, v_cache):
    """Store k, v [n_tok, n_kv_heads*head_dim] at (slots[t], :, positions[t]) of the caches."""
    n_tok = k.shape[0]
    key = np.empty(head_dim, dtype=k_cache.dtype)     # one key in the cache's element type
    for t in range(n_tok):
        s = slots[t]
        p = positions[t]
        tile, lane = p // KEY_TILE, p % KEY_TILE
        for h in range(n_kv_heads):
            _store(k[t, h * head_dim: (h + 1) * head_dim], key)
            for d in range(head_dim):
                k_cache[s, h, tile, d, lane] = key[d]
            _store(v[t, h * head_dim: (h + 1) * head_dim], v_cache[s, h, p])


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _attend_group(q_g, group, head_dim, keys, values, n_pos, scores, out_g, first_pos=0, cap=0.0):
    """The Numba form of lme_attention: q_g [group * head_dim] (the group's query heads side by
    side, pre-scaled) against keys [n_tiles, head_dim, KEY_TILE] and values [n_ctx, head_dim] at
    positions first_pos .. n_pos - 1; out_g [group * head_dim]. scores: scratch of at least
    n_tiles * KEY_TILE. cap > 0: scores are soft-capped to cap * tanh(score / cap) (gemma2)."""
    n_tiles = (n_pos + KEY_TILE - 1) // KEY_TILE
    first_tile = first_pos // KEY_TILE
    for g in range(group):
        first = g * head_dim
        for i in range(first_tile, n_tiles):
            for p in range(KEY_TILE):
                scores[i * KEY_TILE + p] = 0.0
            for d in range(head_dim):
                qd = q_g[first + d]
                for p in range(KEY_TILE):
                    scores[i * KEY_TILE + p] += qd * _load(keys[i, d, p])
        if cap > 0.0:
            for j in range(first_pos, n_pos):
                scores[j] = cap * math.tanh(scores[j] / cap)
        best = np.float32(-np.inf)
        for j in range(first_pos, n_pos):
            best = max(best, scores[j])
        total = np.float32(0.0)
        for j in range(first_pos, n_pos):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        inv_total = np.float32(1.0) / total
        for d in range(head_dim):
            out_g[first + d] = 0.0
        for j in range(first_pos, n_pos):
            w = scores[j]
            for d in range(head_dim):
                out_g[first + d] += w * _load(values[j, d])
        for d in range(head_dim):
            out_g[first + d] *= inv_total


@njit(cache=True, nogil=True, parallel=True)
def attend(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, scale, cap, window, out):
    """out[t, head h] = softmax(cap(q_h . K[j] * scale)) @ V[j] over the positions j of token t's
    window: positions[t] - window < j <= positions[t] (window 0: every j <= positions[t]).
    cap(s) = cap * tanh(s / cap) when cap > 0 (gemma2's soft-capping), s otherwise.

    q, out: [n_tok, n_heads*head_dim]. Query head h reads kv head h // (n_heads // n_kv_heads):
    each kv head serves a consecutive group of query heads. The C kernel does it where the rows of
    `out` are contiguous; the Numba loop otherwise, and without the extension.
    """
    n_tok = q.shape[0]
    group = n_heads // n_kv_heads
    kv_type = F16 if k_cache.itemsize == 2 else F32
    scaled = q * np.float32(scale)                           # a contiguous copy, pre-scaled
    c_out = out.strides[1] == out.itemsize                   # rows of out are contiguous
    for job in prange(n_tok * n_kv_heads):
        t = job // n_kv_heads
        kv_head = job % n_kv_heads
        keys = k_cache[slots[t], kv_head]         # [n_tiles, head_dim, KEY_TILE]
        values = v_cache[slots[t], kv_head]       # [n_ctx, head_dim]
        n_pos = positions[t] + 1
        first_pos = max(n_pos - window, 0) if window > 0 else 0
        first = kv_head * group * head_dim        # the group's columns in q and out
        q_g = scaled[t, first: first + group * head_dim]
        out_g = out[t, first: first + group * head_dim]
        scores = np.empty(group * ((n_pos + KEY_TILE - 1) // KEY_TILE * KEY_TILE), dtype=np.float32)
        if not c_out or native.c_attention(kv_type, q_g, group, head_dim, keys, values, n_pos, first_pos,
                                           np.float32(cap), scores, out_g) != 0:
            _attend_group(q_g, group, head_dim, keys, values, n_pos, scores, out_g, first_pos, np.float32(cap))


@njit(cache=True, nogil=True)
def attention(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, out):
    """out[t, head h] = softmax(q_h . K[0..p] / sqrt(head_dim)) @ V[0..p], p = positions[t]
    (`attend` without soft-cap or window).

    q, out: [n_tok, n_heads*head_dim]. Query head h reads kv head h // (n_heads // n_kv_heads):
    each kv head serves a consecutive group of query heads.
    """
    attend(q, k_cache, v_cache, slots, positions, n_heads, n_kv_heads, head_dim, 1.0 / math.sqrt(head_dim), 0.0, 0,
           out)
