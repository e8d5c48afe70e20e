/* attention: one token's grouped-query attention over a KV cache, for the query heads that share
 * one kv head (API: lmengine.h; kernels/attention.py `_attend_group` is the Numba reference).
 *
 * Cache layout (one slot, one kv head), elements float32 or f16 (kv_type):
 *     keys    [n_tiles][head_dim][16]   positions 16i..16i+15 transposed: lane p of row d of tile
 *                                       i is dimension d of the key at position 16i + p
 *     values  [n_ctx][head_dim]         one row per position
 * With keys transposed, the scores of 16 positions are one vector: sum over d of q[d] (broadcast)
 * times row d of the tile -- no horizontal sums.
 *
 * For each query head g of the group (q pre-scaled by 1/sqrt(head_dim)), over the positions
 * first_pos <= j < n_pos (first_pos > 0: a sliding window):
 *     s_j = q_g . k_j, or cap * tanh(q_g . k_j / cap) when cap > 0 (gemma2's soft-capping);
 *     w_j = exp(s_j - max s) / sum exp(s - max s);   out_g = sum_j w_j v_j
 * Scores are computed from the key tile that holds first_pos on; the positions of that tile
 * before first_pos get s = -inf (weight 0, or the AVX-512 exponential's ~1e-38: below any
 * float sum of weights that includes the maximum's 1), and the value rows are read from
 * first_pos on.
 *
 * Paths (per call, lme_get_isa()):
 *   portable (any head_dim, any CPU): the three steps as plain loops over float rows (f16 rows
 *     converted first), the softmax with expf.
 *   AVX2 (head_dim a multiple of 8; others take the portable loops): 8-lane FMA accumulators in
 *     registers, and the exponential is common.h's exp256 (relative error ~2e-7, as expf).
 *   AVX-512 (head_dim 32, 64, 128; other sizes take the AVX2 kernel, or the portable loops):
 *     16-lane accumulators in registers, and the exponential is common.h's exp512 (a polynomial,
 *     relative error ~2e-7, as expf).
 * The paths sum in different orders (and fuse multiply-adds or not): their results agree within
 * float rounding, not bit for bit.
 *
 * Memory: in a batch of many sequences the caches are far larger than the CPU caches, so reading
 * them is what costs. Each key tile and each value row is loaded once for several heads of the
 * group (AVX-512: up to 4, 2 with head_dim 128, so that the accumulators fit in registers; AVX2:
 * up to 4; portable: the whole group), f16 values converted as they are loaded. Software
 * prefetching, of the next tiles or of the next job's, measured no faster (or slower).
 */
#include "common.h"

#include <float.h>
#include <math.h>

#define KEY_TILE 16                              /* positions per key tile: one 512-bit vector */
#define ROW_CHUNK 256                            /* portable path: value dims converted at a time */

/* ---- portable path ------------------------------------------------------------------------------ */

/* n floats of a cache array from element `index` on: a pointer into it (float32), or into buf
 * after conversion (f16) */
static ALWAYS_INLINE const float *cache_floats(int f16, const void *cache, int64_t index, int64_t n, float *buf) {
    if (!f16)
        return (const float *)cache + index;
    const uint16_t *halves = (const uint16_t *)cache + index;
    for (int64_t i = 0; i < n; i++)
        buf[i] = fp16_to_fp32(halves[i]);
    return buf;
}

/* step 2 of one head, in place: the scores s [n_pos] -> w_j = exp(s_j - max s) / sum (expf) */
static void softmax_weights(float *s, int64_t n_pos) {
    const float inv_total = 1.0f / exp_shifted(s, n_pos);
    for (int64_t j = 0; j < n_pos; j++)
        s[j] *= inv_total;
}

/* step 1b of one head, in place, on the scores s (indexed by position) of the tiles from the one
 * holding first_pos on: the positions of that tile before first_pos get -inf, and with cap > 0
 * the others become cap * tanh(s / cap) (tanhf: the Numba reference's math.tanh in float32). */
static void window_and_cap(float *s, int64_t first_pos, int64_t n_pos, float cap) {
    for (int64_t j = first_pos / KEY_TILE * KEY_TILE; j < first_pos; j++)
        s[j] = -INFINITY;
    if (cap > 0.0f)
        for (int64_t j = first_pos; j < n_pos; j++)
            s[j] = cap * tanhf(s[j] / cap);
}

/* steps 1b and 2 for one head: s [padded] scores -> weights, from first_pos's tile on */
static void window_softmax(float *s, int64_t first_pos, int64_t n_pos, float cap) {
    const int64_t lead = first_pos / KEY_TILE * KEY_TILE;
    window_and_cap(s, first_pos, n_pos, cap);
    softmax_weights(s + lead, n_pos - lead);
}

/* The whole group: scores [group][n_tiles * 16] (weights after step 2), out [group][head_dim]. */
static void attention_scalar(int f16, const float *q, int64_t group, int64_t head_dim, const void *keys,
                             const void *values, int64_t n_pos, int64_t first_pos, float cap, float *scores,
                             float *out) {
    const int64_t n_tiles = (n_pos + KEY_TILE - 1) / KEY_TILE, padded = n_tiles * KEY_TILE;
    float buf[ROW_CHUNK];

    /* 1. scores, one key tile at a time: s[p] += q[d] * k[d][p], each row read once for the group */
    for (int64_t i = first_pos / KEY_TILE; i < n_tiles; i++) {
        for (int64_t h = 0; h < group; h++)
            for (int p = 0; p < KEY_TILE; p++)
                scores[h * padded + i * KEY_TILE + p] = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) {
            const float *row = cache_floats(f16, keys, (i * head_dim + d) * KEY_TILE, KEY_TILE, buf);
            for (int64_t h = 0; h < group; h++) {
                const float qd = q[h * head_dim + d];
                float *s = scores + h * padded + i * KEY_TILE;
                for (int p = 0; p < KEY_TILE; p++)
                    s[p] += qd * row[p];
            }
        }
    }
    /* 2. the weights */
    for (int64_t h = 0; h < group; h++)
        window_softmax(scores + h * padded, first_pos, n_pos, cap);
    /* 3. out_h = sum_j w_hj v_j, each value row (in chunks of ROW_CHUNK dims) read once for the group */
    for (int64_t k = 0; k < group * head_dim; k++)
        out[k] = 0.0f;
    for (int64_t j = first_pos; j < n_pos; j++)
        for (int64_t d0 = 0; d0 < head_dim; d0 += ROW_CHUNK) {
            const int64_t n = head_dim - d0 < ROW_CHUNK ? head_dim - d0 : ROW_CHUNK;
            const float *row = cache_floats(f16, values, j * head_dim + d0, n, buf);
            for (int64_t h = 0; h < group; h++) {
                const float w = scores[h * padded + j];
                float *o = out + h * head_dim + d0;
                for (int64_t d = 0; d < n; d++)
                    o[d] += w * row[d];
            }
        }
}

#if LME_X86
/* ---- AVX2 path (head_dim a multiple of 8) ------------------------------------------------------- */
/* Runs of up to 4 heads, the accumulators in registers: step 1 two vectors (16 positions) per
 * head; step 3 a chunk of 16 dims per head, the run of heads passing over the value rows once per
 * chunk. With one or two heads a second set of accumulators (even / odd d, or j) keeps enough FMA
 * chains going. Step 2 is window_softmax_avx2: common.h's exp_shifted_avx2 (exp256), then one
 * multiply by 1 / sum. */

#define AVX2_HEADS 4                             /* heads sharing each load */

/* 8 floats at element `index` of a cache array of float32 (f16 = 0) or f16 bits (f16 = 1) */
TARGET_AVX2 static ALWAYS_INLINE __m256 load8(int f16, const void *cache, int64_t index) {
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + index)));
    return _mm256_loadu_ps((const float *)cache + index);
}

/* step 1 for n_heads (1..4, a constant after inlining) heads: q [n_heads][head_dim] ->
 * scores [n_heads][padded] */
TARGET_AVX2 static ALWAYS_INLINE void scores_avx2(int n_heads, int f16, const float *q, int64_t head_dim,
                                                  const void *keys, int64_t first_tile, int64_t n_tiles,
                                                  int64_t padded, float *scores) {
    const int n_sets = n_heads <= 2 ? 2 : 1;            /* accumulator sets: even / odd d */
    for (int64_t i = first_tile; i < n_tiles; i++) {
        const int64_t tile = i * head_dim * KEY_TILE;
        __m256 lo[2][AVX2_HEADS], hi[2][AVX2_HEADS];    /* [set][head]: positions 0..7, 8..15 */
        for (int k = 0; k < n_sets; k++)
            for (int h = 0; h < n_heads; h++)
                lo[k][h] = hi[k][h] = _mm256_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += n_sets)
            for (int k = 0; k < n_sets; k++) {
                const int64_t row = tile + (d + k) * KEY_TILE;
                const __m256 row_lo = load8(f16, keys, row), row_hi = load8(f16, keys, row + 8);
                for (int h = 0; h < n_heads; h++) {
                    const __m256 qd = _mm256_broadcast_ss(q + h * head_dim + d + k);
                    lo[k][h] = _mm256_fmadd_ps(qd, row_lo, lo[k][h]);
                    hi[k][h] = _mm256_fmadd_ps(qd, row_hi, hi[k][h]);
                }
            }
        for (int h = 0; h < n_heads; h++) {
            if (n_sets == 2) {
                lo[0][h] = _mm256_add_ps(lo[0][h], lo[1][h]);
                hi[0][h] = _mm256_add_ps(hi[0][h], hi[1][h]);
            }
            _mm256_storeu_ps(scores + h * padded + i * KEY_TILE, lo[0][h]);
            _mm256_storeu_ps(scores + h * padded + i * KEY_TILE + 8, hi[0][h]);
        }
    }
}

/* step 3 for n_heads (1..4, a constant after inlining) heads: weights [n_heads][padded] ->
 * out [n_heads][head_dim], over the value rows first_pos .. n_pos - 1 */
TARGET_AVX2 static ALWAYS_INLINE void values_avx2(int n_heads, int f16, const float *weights, int64_t head_dim,
                                                  const void *values, int64_t first_pos, int64_t n_pos,
                                                  int64_t padded, float *out) {
    const int n_sets = n_heads <= 2 ? 2 : 1;            /* accumulator sets: even / odd j */
    for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
        const int n_vec = head_dim - d0 >= 16 ? 2 : 1;  /* dims d0..d0+15, or the last 8 */
        __m256 acc[2][AVX2_HEADS][2];                   /* [set][head][vector] */
        for (int k = 0; k < n_sets; k++)
            for (int h = 0; h < n_heads; h++)
                acc[k][h][0] = acc[k][h][1] = _mm256_setzero_ps();
        int64_t j = first_pos;
        for (; j + n_sets <= n_pos; j += n_sets)
            for (int k = 0; k < n_sets; k++) {
                const int64_t row = (j + k) * head_dim + d0;
                const __m256 v0 = load8(f16, values, row);
                const __m256 v1 = n_vec == 2 ? load8(f16, values, row + 8) : v0;
                for (int h = 0; h < n_heads; h++) {
                    const __m256 w = _mm256_broadcast_ss(weights + h * padded + j + k);
                    acc[k][h][0] = _mm256_fmadd_ps(w, v0, acc[k][h][0]);
                    acc[k][h][1] = _mm256_fmadd_ps(w, v1, acc[k][h][1]);
                }
            }
        if (j < n_pos) {                                /* n_sets == 2, an odd count: the last row */
            const int64_t row = j * head_dim + d0;
            const __m256 v0 = load8(f16, values, row);
            const __m256 v1 = n_vec == 2 ? load8(f16, values, row + 8) : v0;
            for (int h = 0; h < n_heads; h++) {
                const __m256 w = _mm256_broadcast_ss(weights + h * padded + j);
                acc[0][h][0] = _mm256_fmadd_ps(w, v0, acc[0][h][0]);
                acc[0][h][1] = _mm256_fmadd_ps(w, v1, acc[0][h][1]);
            }
        }
        for (int h = 0; h < n_heads; h++)
            for (int v = 0; v < n_vec; v++) {
                const __m256 sum = n_sets == 2 ? _mm256_add_ps(acc[0][h][v], acc[1][h][v]) : acc[0][h][v];
                _mm256_storeu_ps(out + h * head_dim + d0 + 8 * v, sum);
            }
    }
}

/* window_softmax with the 8-lane exponential: the tile's positions before first_pos get
 * exp256's ~1e-38 rather than 0 (never read: step 3 starts at first_pos) */
TARGET_AVX2 static void window_softmax_avx2(float *s, int64_t first_pos, int64_t n_pos, float cap) {
    const int64_t lead = first_pos / KEY_TILE * KEY_TILE;
    window_and_cap(s, first_pos, n_pos, cap);
    const float inv_total = 1.0f / exp_shifted_avx2(s + lead, n_pos - lead);
    const __m256 inv8 = _mm256_set1_ps(inv_total);
    int64_t j = lead;
    for (; j + 8 <= n_pos; j += 8)
        _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv8));
    for (; j < n_pos; j++)
        s[j] *= inv_total;
}

TARGET_AVX2 static ALWAYS_INLINE void heads_avx2(int n_heads, int f16, const float *q, int64_t head_dim,
                                                 const void *keys, const void *values, int64_t n_pos,
                                                 int64_t first_pos, float cap, float *scores, float *out) {
    const int64_t n_tiles = (n_pos + KEY_TILE - 1) / KEY_TILE, padded = n_tiles * KEY_TILE;
    scores_avx2(n_heads, f16, q, head_dim, keys, first_pos / KEY_TILE, n_tiles, padded, scores);
    for (int h = 0; h < n_heads; h++)
        window_softmax_avx2(scores + h * padded, first_pos, n_pos, cap);
    values_avx2(n_heads, f16, scores, head_dim, values, first_pos, n_pos, padded, out);
}

/* heads_avx2 with (n_heads, f16) turned into constants */
TARGET_AVX2 static void heads_any_avx2(int n_heads, int f16, const float *q, int64_t head_dim, const void *keys,
                                       const void *values, int64_t n_pos, int64_t first_pos, float cap,
                                       float *scores, float *out) {
    switch (n_heads * 2 + f16) {
    case 2: heads_avx2(1, 0, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    case 3: heads_avx2(1, 1, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    case 4: heads_avx2(2, 0, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    case 5: heads_avx2(2, 1, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    case 6: heads_avx2(3, 0, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    case 7: heads_avx2(3, 1, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    case 8: heads_avx2(4, 0, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    default: heads_avx2(4, 1, q, head_dim, keys, values, n_pos, first_pos, cap, scores, out); break;
    }
}

/* the group in runs of up to 4 heads */
TARGET_AVX2 static void attention_avx2(int f16, const float *q, int64_t group, int64_t head_dim,
                                       const void *keys, const void *values, int64_t n_pos, int64_t first_pos,
                                       float cap, float *scores, float *out) {
    const int64_t padded = (n_pos + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    for (int64_t g = 0; g < group; g += AVX2_HEADS) {
        const int n_heads = (int)(group - g < AVX2_HEADS ? group - g : AVX2_HEADS);
        heads_any_avx2(n_heads, f16, q + g * head_dim, head_dim, keys, values, n_pos, first_pos, cap,
                       scores + g * padded, out + g * head_dim);
    }
}
#endif

#if LME_X86
/* ---- AVX-512 path ------------------------------------------------------------------------------- */

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
 * (the padding lanes of the last tile become 0; lanes holding -inf ~1e-38: exp512 clamps) */
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
                                                     int64_t first_pos, float cap, float *scores, float *out) {
    const int64_t head_dim = 16 * n_vec, tile_len = head_dim * KEY_TILE;
    const int64_t n_tiles = (n_pos + KEY_TILE - 1) / KEY_TILE, padded = n_tiles * KEY_TILE;
    const int64_t lead = first_pos / KEY_TILE * KEY_TILE;

    /* 1. scores, one key tile at a time: each row of the tile is loaded once for all heads; two
     *    partial sums per head (even and odd d) keep enough FMA chains going */
    for (int64_t i = first_pos / KEY_TILE; i < n_tiles; i++) {
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
    for (int h = 0; h < n_heads; h++) {
        window_and_cap(scores + h * padded, first_pos, n_pos, cap);
        softmax(scores + h * padded + lead, n_pos - lead);
    }
    /* 3. out_h = sum_j w_hj v_j: each value row is loaded once for all heads */
    __m512 acc[4][8];
    for (int h = 0; h < n_heads; h++)
        for (int k = 0; k < n_vec; k++)
            acc[h][k] = _mm512_setzero_ps();
    for (int64_t j = first_pos; j < n_pos; j++) {
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
#define HEADS_CASES(n_vec)                                                                          \
    switch (n_heads * 2 + f16) {                                                                    \
    case 2: heads_avx512(n_vec, 1, 0, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    case 3: heads_avx512(n_vec, 1, 1, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    case 4: heads_avx512(n_vec, 2, 0, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    case 5: heads_avx512(n_vec, 2, 1, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    case 6: heads_avx512(n_vec, 3, 0, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    case 7: heads_avx512(n_vec, 3, 1, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    case 8: heads_avx512(n_vec, 4, 0, q, keys, values, n_pos, first_pos, cap, scores, out); break;  \
    default: heads_avx512(n_vec, 4, 1, q, keys, values, n_pos, first_pos, cap, scores, out); break; \
    }

TARGET_AVX512 static void heads_32(int n_heads, int f16, const float *q, const void *keys, const void *values,
                                   int64_t n_pos, int64_t first_pos, float cap, float *scores, float *out) { HEADS_CASES(2) }
TARGET_AVX512 static void heads_64(int n_heads, int f16, const float *q, const void *keys, const void *values,
                                   int64_t n_pos, int64_t first_pos, float cap, float *scores, float *out) { HEADS_CASES(4) }
TARGET_AVX512 static void heads_128(int n_heads, int f16, const float *q, const void *keys, const void *values,
                                    int64_t n_pos, int64_t first_pos, float cap, float *scores, float *out) { HEADS_CASES(8) }

/* the group in runs of up to 4 heads (2 for head_dim 128: 16 accumulators in step 3) */
TARGET_AVX512 static void attention_avx512(int f16, const float *q, int64_t group, int64_t head_dim,
                                           const void *keys, const void *values, int64_t n_pos,
                                           int64_t first_pos, float cap, float *scores, float *out) {
    const int64_t padded = (n_pos + KEY_TILE - 1) / KEY_TILE * KEY_TILE, max_heads = head_dim == 128 ? 2 : 4;
    for (int64_t g = 0; g < group; g += max_heads) {
        const int n_heads = (int)(group - g < max_heads ? group - g : max_heads);
        const float *q_g = q + g * head_dim;
        float *scores_g = scores + g * padded, *out_g = out + g * head_dim;
        if (head_dim == 64)
            heads_64(n_heads, f16, q_g, keys, values, n_pos, first_pos, cap, scores_g, out_g);
        else if (head_dim == 128)
            heads_128(n_heads, f16, q_g, keys, values, n_pos, first_pos, cap, scores_g, out_g);
        else
            heads_32(n_heads, f16, q_g, keys, values, n_pos, first_pos, cap, scores_g, out_g);
    }
}
#endif /* LME_X86 */

int lme_attention(int64_t kv_type, const float *q, int64_t q_len, int64_t group, int64_t head_dim,
                  const void *keys, int64_t keys_len, const void *values, int64_t values_len,
                  int64_t n_pos, int64_t first_pos, float cap, float *scores, int64_t scores_len, float *out,
                  int64_t out_len) {
    if (kv_type != LME_TYPE_F32 && kv_type != LME_TYPE_F16)
        return LME_ERR_TYPE;
    if (group <= 0 || head_dim <= 0 || n_pos <= 0 || group > INT64_MAX / head_dim
        || n_pos > INT64_MAX / head_dim / KEY_TILE / group)
        return LME_ERR_SHAPE;
    if (first_pos < 0 || first_pos >= n_pos || !(cap >= 0.0f && cap <= FLT_MAX))   /* NaN fails both */
        return LME_ERR_SHAPE;
    if (q == NULL || keys == NULL || values == NULL || scores == NULL || out == NULL)
        return LME_ERR_NULL;
    const int64_t padded = (n_pos + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    if (q_len < group * head_dim || out_len < group * head_dim || keys_len < padded * head_dim
        || values_len < n_pos * head_dim || scores_len < group * padded)
        return LME_ERR_LENGTH;
    const int f16 = kv_type == LME_TYPE_F16;
    const int isa = lme_get_isa();
#if LME_X86
    if (isa == LME_ISA_AVX512 && (head_dim == 32 || head_dim == 64 || head_dim == 128)) {
        attention_avx512(f16, q, group, head_dim, keys, values, n_pos, first_pos, cap, scores, out);
        return LME_OK;
    }
    if (isa >= LME_ISA_AVX2 && head_dim % 8 == 0) {      /* AVX-512 CPUs have AVX2 */
        attention_avx2(f16, q, group, head_dim, keys, values, n_pos, first_pos, cap, scores, out);
        return LME_OK;
    }
#endif
    (void)isa;
    attention_scalar(f16, q, group, head_dim, keys, values, n_pos, first_pos, cap, scores, out);
    return LME_OK;
}
