/* attention: one token's grouped-query attention over a KV cache, for the query heads that share
 * one kv head (see qdot.h for the API; kernels/attention.py is the Numba reference and fallback).
 *
 * Cache layout (one slot, one kv head), elements float32 or f16 (kv_type):
 *     keys    [n_tiles][head_dim][16]   positions 16i..16i+15 transposed: lane p of row d of tile
 *                                       i is dimension d of the key at position 16i + p
 *     values  [n_ctx][head_dim]         one row per position
 * With keys transposed, the scores of 16 positions are one vector: sum over d of q[d] (broadcast)
 * times row d of the tile -- no horizontal sums.
 *
 * For each query head g of the group (q pre-scaled by 1/sqrt(head_dim)):
 *     s_j = q_g . k_j  for j < n_pos;   w_j = exp(s_j - max s) / sum exp(s - max s)
 *     out_g = sum_j w_j v_j
 * The exponential is common.h's exp512 (a polynomial, relative error ~2e-7, as expf).
 *
 * Memory: in a batch of many sequences the caches are far larger than the CPU caches, so reading
 * them is what costs. Each key tile and each value row is loaded once for up to 4 heads of the
 * group (2 with head_dim 128: the accumulators must fit in registers), f16 values converted as
 * they are loaded. Software prefetching, of the next tiles or of the next job's, measured no
 * faster (or slower).
 */
#include "common.h"

#include <math.h>

#define KEY_TILE 16                              /* positions per key tile: one 512-bit vector */

#if LME_X86

/* 16 floats at element `index` of a cache array of float32 (f16 = 0) or f16 bits (f16 = 1) */
TARGET_AVX512 static ALWAYS_INLINE __m512 load16(int f16, const void *cache, int64_t index) {
    if (f16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + index)));
    return _mm512_loadu_ps((const float *)cache + index);
}

static ALWAYS_INLINE __mmask16 valid_lanes(int64_t left) {     /* the first min(left, 16) lanes */
    return left >= KEY_TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* softmax weights in place: w_j = exp(s_j - max s) / sum, for the n_pos scores of one head
 * (the padding lanes of the last tile become 0) */
TARGET_AVX512 static void softmax(float *scores, int64_t n_pos) {
    const int64_t n_tiles = (n_pos + KEY_TILE - 1) / KEY_TILE;
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n_tiles; i++)
        best = _mm512_mask_max_ps(best, valid_lanes(n_pos - i * KEY_TILE), best, _mm512_loadu_ps(scores + i * KEY_TILE));
    const __m512 max_score = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_tiles; i++) {
        const __m512 e = _mm512_maskz_mov_ps(valid_lanes(n_pos - i * KEY_TILE),
                                             exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + i * KEY_TILE), max_score)));
        total = _mm512_add_ps(total, e);
        _mm512_storeu_ps(scores + i * KEY_TILE, e);
    }
    const __m512 inv_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t i = 0; i < n_tiles; i++)
        _mm512_storeu_ps(scores + i * KEY_TILE, _mm512_mul_ps(_mm512_loadu_ps(scores + i * KEY_TILE), inv_total));
}

/* n_heads query heads (1..4) against one kv head; head_dim = 16 * n_vec. n_vec, n_heads and f16
 * are constants after inlining, so the accumulators below live in registers.
 * q [n_heads][head_dim]; scores [n_heads][n_tiles * 16] scratch; out [n_heads][head_dim]. */
TARGET_AVX512 static ALWAYS_INLINE void heads_avx512(int n_vec, int n_heads, int f16, const float *q,
                                                     const void *keys, const void *values, int64_t n_pos,
                                                     float *scores, float *out) {
    const int64_t head_dim = 16 * n_vec, tile_len = head_dim * KEY_TILE;
    const int64_t n_tiles = (n_pos + KEY_TILE - 1) / KEY_TILE, padded = n_tiles * KEY_TILE;

    /* 1. scores, one key tile at a time: each row of the tile is loaded once for all heads; two
     *    partial sums per head (even and odd d) keep enough FMA chains going */
    for (int64_t i = 0; i < n_tiles; i++) {
        const int64_t tile = i * tile_len;
        __m512 even[4], odd[4];
        for (int h = 0; h < n_heads; h++)
            even[h] = odd[h] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 2) {
            const __m512 row0 = load16(f16, keys, tile + d * KEY_TILE);
            const __m512 row1 = load16(f16, keys, tile + (d + 1) * KEY_TILE);
            for (int h = 0; h < n_heads; h++) {
                even[h] = _mm512_fmadd_ps(_mm512_set1_ps(q[h * head_dim + d]), row0, even[h]);
                odd[h] = _mm512_fmadd_ps(_mm512_set1_ps(q[h * head_dim + d + 1]), row1, odd[h]);
            }
        }
        for (int h = 0; h < n_heads; h++)
            _mm512_storeu_ps(scores + h * padded + i * KEY_TILE, _mm512_add_ps(even[h], odd[h]));
    }
    /* 2. the weights */
    for (int h = 0; h < n_heads; h++)
        softmax(scores + h * padded, n_pos);
    /* 3. out_h = sum_j w_hj v_j: each value row is loaded once for all heads */
    __m512 acc[4][8];
    for (int h = 0; h < n_heads; h++)
        for (int k = 0; k < n_vec; k++)
            acc[h][k] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n_pos; j++) {
        __m512 row[8];
        for (int k = 0; k < n_vec; k++)
            row[k] = load16(f16, values, j * head_dim + 16 * k);
        for (int h = 0; h < n_heads; h++) {
            const __m512 w = _mm512_set1_ps(scores[h * padded + j]);
            for (int k = 0; k < n_vec; k++)
                acc[h][k] = _mm512_fmadd_ps(w, row[k], acc[h][k]);
        }
    }
    for (int h = 0; h < n_heads; h++)
        for (int k = 0; k < n_vec; k++)
            _mm512_storeu_ps(out + h * head_dim + 16 * k, acc[h][k]);
}

/* heads_avx512 for head_dim = 16 * n_vec and every (n_heads, f16) */
#define HEADS_CASES(n_vec)                                                                            \
    switch (n_heads * 2 + f16) {                                                                      \
    case 2: heads_avx512(n_vec, 1, 0, q, keys, values, n_pos, scores, out); break;                    \
    case 3: heads_avx512(n_vec, 1, 1, q, keys, values, n_pos, scores, out); break;                    \
    case 4: heads_avx512(n_vec, 2, 0, q, keys, values, n_pos, scores, out); break;                    \
    case 5: heads_avx512(n_vec, 2, 1, q, keys, values, n_pos, scores, out); break;                    \
    case 6: heads_avx512(n_vec, 3, 0, q, keys, values, n_pos, scores, out); break;                    \
    case 7: heads_avx512(n_vec, 3, 1, q, keys, values, n_pos, scores, out); break;                    \
    case 8: heads_avx512(n_vec, 4, 0, q, keys, values, n_pos, scores, out); break;                    \
    default: heads_avx512(n_vec, 4, 1, q, keys, values, n_pos, scores, out); break;                   \
    }

TARGET_AVX512 static void heads_32(int n_heads, int f16, const float *q, const void *keys, const void *values,
                                   int64_t n_pos, float *scores, float *out) { HEADS_CASES(2) }
TARGET_AVX512 static void heads_64(int n_heads, int f16, const float *q, const void *keys, const void *values,
                                   int64_t n_pos, float *scores, float *out) { HEADS_CASES(4) }
TARGET_AVX512 static void heads_128(int n_heads, int f16, const float *q, const void *keys, const void *values,
                                    int64_t n_pos, float *scores, float *out) { HEADS_CASES(8) }

/* the group in runs of up to 4 heads (2 for head_dim 128: 16 accumulators in step 3) */
TARGET_AVX512 static void attention_avx512(int f16, const float *q, int64_t group, int64_t head_dim,
                                           const void *keys, const void *values, int64_t n_pos,
                                           float *scores, float *out) {
    const int64_t padded = (n_pos + KEY_TILE - 1) / KEY_TILE * KEY_TILE, max_heads = head_dim == 128 ? 2 : 4;
    for (int64_t g = 0; g < group; g += max_heads) {
        const int n_heads = (int)(group - g < max_heads ? group - g : max_heads);
        const float *q_g = q + g * head_dim;
        float *scores_g = scores + g * padded, *out_g = out + g * head_dim;
        if (head_dim == 64)
            heads_64(n_heads, f16, q_g, keys, values, n_pos, scores_g, out_g);
        else if (head_dim == 128)
            heads_128(n_heads, f16, q_g, keys, values, n_pos, scores_g, out_g);
        else
            heads_32(n_heads, f16, q_g, keys, values, n_pos, scores_g, out_g);
    }
}
#endif /* LME_X86 */

int lme_attention(int64_t kv_type, const float *q, int64_t q_len, int64_t group, int64_t head_dim,
                  const void *keys, int64_t keys_len, const void *values, int64_t values_len,
                  int64_t n_pos, float *scores, int64_t scores_len, float *out, int64_t out_len) {
    if (kv_type != LME_TYPE_F32 && kv_type != LME_TYPE_F16)
        return LME_ERR_TYPE;
    if (group <= 0 || head_dim <= 0 || n_pos <= 0 || group > INT64_MAX / head_dim
        || n_pos > INT64_MAX / head_dim / KEY_TILE / group)
        return LME_ERR_SHAPE;
    if (q == NULL || keys == NULL || values == NULL || scores == NULL || out == NULL)
        return LME_ERR_NULL;
    const int64_t padded = (n_pos + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    if (q_len < group * head_dim || out_len < group * head_dim || keys_len < padded * head_dim
        || values_len < n_pos * head_dim || scores_len < group * padded)
        return LME_ERR_LENGTH;
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512 && (head_dim == 32 || head_dim == 64 || head_dim == 128)) {
        attention_avx512(kv_type == LME_TYPE_F16, q, group, head_dim, keys, values, n_pos, scores, out);
        return LME_OK;
    }
#endif
    return LME_ERR_ISA;        /* no SIMD path for this CPU or head_dim: the caller's loop does it */
}
