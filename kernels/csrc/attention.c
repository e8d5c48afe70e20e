/* attention: one token's grouped-query attention over a KV cache, for the query heads that share
 * one kv head (see qdot.h for the API; kernels/attention.py is the Numba reference and fallback).
 *
 * Cache layout (one slot, one kv head):
 *     keys    [n_tiles][head_dim][16]   positions 16i..16i+15 transposed: lane p of row d of tile
 *                                       i is dimension d of the key at position 16i + p
 *     values  [n_ctx][head_dim]         one row per position
 * With keys transposed, the scores of 16 positions are one vector: sum over d of q[d] (broadcast)
 * times row d of the tile -- no horizontal sums. The tile's rows are loaded once for all the
 * group's query heads.
 *
 * For each query head g of the group (q pre-scaled by 1/sqrt(head_dim)):
 *     s_j = q_g . k_j  for j < n_pos;   w_j = exp(s_j - max s) / sum exp(s - max s)
 *     out_g = sum_j w_j v_j
 * The exponential is common.h's exp512 (a polynomial, relative error ~2e-7, as expf).
 */
#include "common.h"

#include <math.h>

#define KEY_TILE 16                              /* positions per key tile: one 512-bit vector */

#if LME_X86

/* One query head, head_dim = 16 * n_vec (n_vec constant after inlining). */
TARGET_AVX512 static ALWAYS_INLINE void head_avx512(int n_vec, const float *q, const float *keys,
                                                    const float *values, int64_t n_pos, float *scores,
                                                    float *out) {
    const int64_t head_dim = 16 * n_vec, n_tiles = (n_pos + KEY_TILE - 1) / KEY_TILE;
    /* scores, 16 positions at a time; four partial sums over d keep four FMA chains going */
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n_tiles; i++) {
        const float *tile = keys + i * head_dim * KEY_TILE;
        __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t d = 0; d < head_dim; d += 4)
            for (int k = 0; k < 4; k++)
                s[k] = _mm512_fmadd_ps(_mm512_set1_ps(q[d + k]), _mm512_loadu_ps(tile + (d + k) * KEY_TILE), s[k]);
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
        const int64_t left = n_pos - i * KEY_TILE;
        const __mmask16 valid = left >= KEY_TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        best = _mm512_mask_max_ps(best, valid, best, sum);
        _mm512_storeu_ps(scores + i * KEY_TILE, sum);
    }
    const float max_score = _mm512_reduce_max_ps(best);
    /* weights: exp(s - max), and their sum (positions past n_pos masked out) */
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_tiles; i++) {
        const int64_t left = n_pos - i * KEY_TILE;
        const __mmask16 valid = left >= KEY_TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(
            _mm512_loadu_ps(scores + i * KEY_TILE), _mm512_set1_ps(max_score))));
        total = _mm512_add_ps(total, e);
        _mm512_storeu_ps(scores + i * KEY_TILE, e);
    }
    const __m512 inv_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    /* out = sum_j w_j v_j, two accumulators per 16 dims (even / odd positions) */
    __m512 even[8], odd[8];
    for (int k = 0; k < n_vec; k++)
        even[k] = odd[k] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n_pos; j += 2) {
        const __m512 w0 = _mm512_set1_ps(scores[j]), w1 = _mm512_set1_ps(scores[j + 1]);
        for (int k = 0; k < n_vec; k++) {
            even[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values + j * head_dim + 16 * k), even[k]);
            odd[k] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(values + (j + 1) * head_dim + 16 * k), odd[k]);
        }
    }
    if (j < n_pos) {
        const __m512 w0 = _mm512_set1_ps(scores[j]);
        for (int k = 0; k < n_vec; k++)
            even[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(values + j * head_dim + 16 * k), even[k]);
    }
    for (int k = 0; k < n_vec; k++)
        _mm512_storeu_ps(out + 16 * k, _mm512_mul_ps(_mm512_add_ps(even[k], odd[k]), inv_total));
}

TARGET_AVX512 static void group_avx512(const float *q, int64_t group, int64_t head_dim, const float *keys,
                                       const float *values, int64_t n_pos, float *scores, float *out) {
    for (int64_t g = 0; g < group; g++) {
        const float *q_g = q + g * head_dim;
        float *out_g = out + g * head_dim;
        switch (head_dim) {
        case 64: head_avx512(4, q_g, keys, values, n_pos, scores, out_g); break;
        case 128: head_avx512(8, q_g, keys, values, n_pos, scores, out_g); break;
        default: head_avx512(2, q_g, keys, values, n_pos, scores, out_g); break;   /* 32 */
        }
    }
}
#endif /* LME_X86 */

int lme_attention(const float *q, int64_t q_len, int64_t group, int64_t head_dim,
                  const float *keys, int64_t keys_len, const float *values, int64_t values_len,
                  int64_t n_pos, float *scores, int64_t scores_len, float *out, int64_t out_len) {
    if (group <= 0 || head_dim <= 0 || n_pos <= 0 || group > INT64_MAX / head_dim
        || n_pos > INT64_MAX / head_dim / KEY_TILE)
        return LME_ERR_SHAPE;
    if (q == NULL || keys == NULL || values == NULL || scores == NULL || out == NULL)
        return LME_ERR_NULL;
    const int64_t padded = (n_pos + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    if (q_len < group * head_dim || out_len < group * head_dim || keys_len < padded * head_dim
        || values_len < n_pos * head_dim || scores_len < padded)
        return LME_ERR_LENGTH;
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512 && (head_dim == 32 || head_dim == 64 || head_dim == 128)) {
        group_avx512(q, group, head_dim, keys, values, n_pos, scores, out);
        return LME_OK;
    }
#endif
    return LME_ERR_ISA;        /* no SIMD path for this CPU or head_dim: the caller's loop does it */
}
