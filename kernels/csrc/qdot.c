/* qdot: fused decode-and-dot of ggml weight blocks with activations (API: lmengine.h).
 *
 * Structure (read top to bottom; the block formats and f16 conversion are in common.h):
 *   1. block decoders: a chunk of one weight row -> int8 values + scales, or -> float
 *   2. the generic tile loops: the integer path runs over groups of up to TOKEN_GROUP_MAX tokens;
 *      for each group and each row of the tile, every weight block is read once, in place,
 *      and multiplied with the group's activation blocks (held in per-token accumulators); the
 *      float path decodes a chunk of each row once and dots it with every token
 *   3. the ISA-specific primitives: scalar; a 256-bit integer kernel shared by AVX2 (maddubs)
 *      and AVX-512 VNNI (vpdpbusd), which differ only in the 32-byte block product
 *   4. argument checks and the entry points, which run the tile function of the path
 *      lme_get_isa() selects (generic loops + that ISA's primitives, compiled for it with
 *      __attribute__((target)); cpu.c picks the path by CPUID).
 *
 * Batch invariance: the integer result for one (row, token) comes from the same operations in the
 * same order whatever n_tok is and wherever the token sits in the batch (each token has its own
 * accumulators), so batched decode equals one-by-one decode bit for bit.
 *
 * One build runs on any x86-64 (no -march): each SIMD function carries its own target
 * attribute and is only called when CPUID says the CPU has it. Elsewhere only the scalar path
 * exists.
 */
#include "common.h"

#define CHUNK_BLOCKS 64                        /* a row is decoded this many blocks at a time */
#define CHUNK_VALUES (CHUNK_BLOCKS * QK)       /* 2048 values: 2 KB int8 or 8 KB float */
#define TOKEN_GROUP_MAX 8                      /* tokens sharing each load of a weight block */

/* ---- 1. block decoders ----------------------------------------------------------------------- */

struct q8_args {
    int64_t w_type; const uint8_t *w; int64_t n_rows, n_cols, row_begin, row_end;
    const int8_t *xq; const float *xd, *xs; int64_t n_tok; float *out;
};

struct f32_args {
    int64_t w_type; const uint8_t *w; int64_t n_rows, n_cols, row_begin, row_end;
    const float *x; int64_t n_tok; float *out;
};

/* The ISA-specific pieces the generic loops below are built from (section 3 defines them). */
struct kit {
    /* out[t * n_rows + row] for the tile's rows and tokens t0 <= t < t0 + n_group (n_group <=
     * token_group): the sum over blocks b of dw_b * xd_tb * isum_tb (+ mw_b * xs_tb for Q4_0 and
     * Q4_1), isum_tb the exact integer dot product of the weight block with token t's xq block */
    void (*rows_dot_q8)(const struct q8_args *a, int64_t t0, int n_group);
    int token_group;                                   /* 1 .. TOKEN_GROUP_MAX */
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    void (*decode_f16)(const uint8_t *src, int64_t n, float *dst);      /* n f16 -> float */
    /* 16 bytes of nibbles -> 32 int8: dst[j] = low nibble of src[j] - bias, dst[j + 16] = high - bias */
    void (*unpack_nibbles)(const uint8_t *src, int8_t *dst, int bias);
    float (*half)(const uint8_t *src);                                   /* one f16 -> float */
};

/* Integer form of n_blocks Q8_0/Q4_0/Q4_1 blocks, such that W = d * q + m per block:
 * q int8 [n_blocks * 32], d [n_blocks] scales, m [n_blocks] mins.
 *   Q8_0: q signed, m = 0.   Q4_1: q = nibble 0..15, m from the block.
 *   Q4_0: signed form q = nibble - 8, m = 0 (exact as float: the float path uses it), or, with
 *         q4_0_unsigned, q = nibble and m = -8 d (the integer path: u8 x s8 products, no signs). */
static ALWAYS_INLINE void decode_q8_blocks(const struct kit *k, int64_t w_type, const uint8_t *src,
                                           int64_t n_blocks, int8_t *q, float *d, float *m,
                                           int q4_0_unsigned) {
    for (int64_t b = 0; b < n_blocks; b++) {
        if (w_type == LME_TYPE_Q8_0) {
            const struct block_q8_0 *blk = (const struct block_q8_0 *)src + b;
            d[b] = k->half(blk->d);
            m[b] = 0.0f;
            memcpy(q + b * QK, blk->qs, QK);
        } else if (w_type == LME_TYPE_Q4_0) {
            const struct block_q4_0 *blk = (const struct block_q4_0 *)src + b;
            d[b] = k->half(blk->d);
            m[b] = q4_0_unsigned ? -8.0f * d[b] : 0.0f;
            k->unpack_nibbles(blk->qs, q + b * QK, q4_0_unsigned ? 0 : 8);
        } else {
            const struct block_q4_1 *blk = (const struct block_q4_1 *)src + b;
            d[b] = k->half(blk->d);
            m[b] = k->half(blk->m);
            k->unpack_nibbles(blk->qs, q + b * QK, 0);
        }
    }
}

/* n values (whole blocks) from the start of src into dst, as float. Same arithmetic as ggml's
 * dequantize (no fused multiply-add: built with -ffp-contract=off). */
static ALWAYS_INLINE void decode_f32_values(const struct kit *k, int64_t w_type, const uint8_t *src,
                                            int64_t n, float *dst) {
    switch (w_type) {
    case LME_TYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    case LME_TYPE_F16:
        k->decode_f16(src, n, dst);
        return;
    case LME_TYPE_BF16:
        for (int64_t i = 0; i < n; i++)
            dst[i] = f32_from_bits((uint32_t)load_u16(src + 2 * i) << 16);
        return;
    default: {
        int8_t q[CHUNK_VALUES] ALIGN64;
        float d[CHUNK_BLOCKS], m[CHUNK_BLOCKS];
        const int64_t n_blocks = n / QK;                   /* n <= CHUNK_VALUES */
        decode_q8_blocks(k, w_type, src, n_blocks, q, d, m, 0);
        for (int64_t b = 0; b < n_blocks; b++)
            for (int i = 0; i < QK; i++)
                dst[b * QK + i] = d[b] * (float)q[b * QK + i] + m[b];
        return;
    }
    }
}

/* ---- 2. generic tile loops ------------------------------------------------------------------- */

/* Token groups outermost: a group's activations (8 x n_cols bytes) and the tile's rows both stay
 * in L1 while each row is read once per group. */
static ALWAYS_INLINE void tile_q8(const struct kit *k, const struct q8_args *a) {
    for (int64_t t0 = 0; t0 < a->n_tok; t0 += k->token_group) {
        const int64_t left = a->n_tok - t0;
        k->rows_dot_q8(a, t0, left < k->token_group ? (int)left : k->token_group);
    }
}

static ALWAYS_INLINE void tile_f32(const struct kit *k, const struct f32_args *a) {
    float row_values[CHUNK_VALUES] ALIGN64;        /* a chunk of one row, decoded */
    const int64_t per_block = block_size(a->w_type);
    const int64_t bytes = block_bytes(a->w_type);
    const int64_t row_bytes = a->n_cols / per_block * bytes;
    for (int64_t r = a->row_begin; r < a->row_end; r++) {
        const uint8_t *row = a->w + r * row_bytes;
        for (int64_t c0 = 0; c0 < a->n_cols; c0 += CHUNK_VALUES) {
            const int64_t n = a->n_cols - c0 < CHUNK_VALUES ? a->n_cols - c0 : CHUNK_VALUES;
            decode_f32_values(k, a->w_type, row + c0 / per_block * bytes, n, row_values);
            for (int64_t t = 0; t < a->n_tok; t++) {
                const float v = k->dot_f32(row_values, a->x + t * a->n_cols + c0, n);
                float *o = a->out + t * a->n_rows + r;
                *o = c0 == 0 ? v : *o + v;
            }
        }
    }
}

/* ---- 3a. scalar primitives ------------------------------------------------------------------- */

static const struct kit KIT_SCALAR;

/* kit.rows_dot_q8, portable: each block decoded once (integer form) and dotted with each token */
static void rows_dot_q8_scalar(const struct q8_args *a, int64_t t0, int n_group) {
    const int64_t bytes = block_bytes(a->w_type);
    const int64_t n_blocks = a->n_cols / QK;                  /* blocks per row, and per token */
    const int w_unsigned = a->w_type != LME_TYPE_Q8_0;        /* Q4_0 and Q4_1: nibbles 0..15 */
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const uint8_t *w_row = a->w + row * n_blocks * bytes;
        float acc[TOKEN_GROUP_MAX] = {0};
        for (int64_t b = 0; b < n_blocks; b++) {
            int8_t q[QK];
            float d, m;
            decode_q8_blocks(&KIT_SCALAR, a->w_type, w_row + b * bytes, 1, q, &d, &m, 1);
            for (int t = 0; t < n_group; t++) {
                const int64_t block = (t0 + t) * n_blocks + b;     /* token t's block b */
                const int8_t *xq = a->xq + block * QK;
                int32_t isum = 0;
                for (int i = 0; i < QK; i++)
                    isum += (int32_t)q[i] * (int32_t)xq[i];
                acc[t] += d * a->xd[block] * (float)isum;
                if (w_unsigned)
                    acc[t] += m * a->xs[block];
            }
        }
        for (int t = 0; t < n_group; t++)
            a->out[(t0 + t) * a->n_rows + row] = acc[t];
    }
}

static float dot_f32_scalar(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};                            /* 8 partial sums: the compiler may use SSE */
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += a[i + k] * b[i + k];
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

static void decode_f16_scalar(const uint8_t *src, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++)
        dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
}

static void unpack_nibbles_scalar(const uint8_t *src, int8_t *dst, int bias) {
    for (int j = 0; j < QK / 2; j++) {
        dst[j] = (int8_t)((src[j] & 0x0F) - bias);
        dst[j + QK / 2] = (int8_t)((src[j] >> 4) - bias);
    }
}

static float half_scalar(const uint8_t *src) { return fp16_to_fp32(load_u16(src)); }

static const struct kit KIT_SCALAR = {rows_dot_q8_scalar, TOKEN_GROUP_MAX, dot_f32_scalar,
                                      decode_f16_scalar, unpack_nibbles_scalar, half_scalar};
static void tile_q8_scalar(const struct q8_args *a) { tile_q8(&KIT_SCALAR, a); }
static void tile_f32_scalar(const struct f32_args *a) { tile_f32(&KIT_SCALAR, a); }

#if LME_X86
/* ---- 3b. 256-bit integer kernel, shared by AVX2 and AVX-512 VNNI ------------------------------ */
/* Per row and token: blocks in groups of 8; a group's 8 scale products dw * xd are one vector
 * (one multiply for 8 blocks, lane j broadcast by a permute for block j), its Q4 minimum terms
 * mw * xs one multiply and add; block j's 8-lane integer partial sums are converted and
 * multiply-added into one of two accumulators (even / odd blocks). The result is the horizontal
 * sum of the two. This fixes the float arithmetic of a (row, token) pair for both SIMD paths. */
#define GROUP_BLOCKS 8                         /* blocks whose scales share one vector */

/* int32 x 8 whose sum is the dot product of 32 unsigned bytes u with 32 signed bytes s */
typedef __m256i (*isum_u8s8_fn)(__m256i u, __m256i s);

TARGET_AVX2 static ALWAYS_INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes 0..15: value j from the low nibble of byte j, j + 16 from its high */
TARGET_AVX2 static ALWAYS_INLINE __m256i nibbles_256(const uint8_t *src) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)src);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

/* 8 f16 values p, p + stride, ... as floats; lanes from n on 0 */
TARGET_AVX2 static ALWAYS_INLINE __m256 halves_256(const uint8_t *p, int64_t stride, int n) {
    uint16_t h[GROUP_BLOCKS];
    for (int j = 0; j < GROUP_BLOCKS; j++)
        h[j] = j < n ? load_u16(p + j * stride) : 0;
    return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3],
                                          (short)h[4], (short)h[5], (short)h[6], (short)h[7]));
}

/* 8 floats from p, lanes from n on 0 (no read past lane n - 1) */
TARGET_AVX2 static ALWAYS_INLINE __m256 load_floats_256(const float *p, int n) {
    if (n == GROUP_BLOCKS)
        return _mm256_loadu_ps(p);
    const __m256i in_range = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, in_range);
}

/* One group of n_here <= 8 consecutive blocks of a weight row (from blk) times the same blocks of
 * the n_group tokens (token t's at xq + t * x_stride * QK, xd/xs + t * x_stride). Lane j of the
 * scale vector s_t holds dw_j * xd_tj for block j of the group; then per block j
 *     acc_t += s_t[j] * float(isum_tj)      (acc = even[t] for even j, odd[t] for odd j)
 * and once per group (Q4_0, Q4_1) even[t] += mw * xs_t, lane j the block minimum term of block j.
 * w_type, n_group and n_here are compile-time constants after inlining. Each weight block is loaded and put in byte form once for all tokens. Integer form as
 * decode_q8_blocks: Q4_0 and Q4_1 as nibbles 0..15 (Q4_0 with mw = -8 dw); Q8_0 as |w| and
 * sign(x, w), so that u8 x s8 applies (|w| <= 128 and |x| <= 127 keep maddubs' int16 pair sums
 * below 2^15). */
TARGET_AVX2 static ALWAYS_INLINE void accumulate_group_256(
        isum_u8s8_fn isum, int64_t w_type, int n_group, int n_here, const uint8_t *blk,
        const int8_t *xq, const float *xd, const float *xs, int64_t x_stride,
        __m256 even[TOKEN_GROUP_MAX], __m256 odd[TOKEN_GROUP_MAX]) {
    const int64_t bytes = block_bytes(w_type);
    /* One token (and not Q4_0, whose mw needs dw as a vector): each block's scale product is
     * formed on its own, the same float multiply as the vector's lane, without building dw. */
    const int scalar_scales = n_group == 1 && w_type != LME_TYPE_Q4_0;
    __m256 dw = _mm256_setzero_ps(), scale[TOKEN_GROUP_MAX];
    if (!scalar_scales) {
        dw = halves_256(blk, bytes, n_here);
        for (int t = 0; t < n_group; t++)
            scale[t] = _mm256_mul_ps(dw, load_floats_256(xd + t * x_stride, n_here));
    }
    if (w_type != LME_TYPE_Q8_0) {
        const __m256 mw = w_type == LME_TYPE_Q4_0 ? _mm256_mul_ps(_mm256_set1_ps(-8.0f), dw)
                                                  : halves_256(blk + offsetof(struct block_q4_1, m), bytes, n_here);
        for (int t = 0; t < n_group; t++)
            even[t] = _mm256_add_ps(even[t], _mm256_mul_ps(mw, load_floats_256(xs + t * x_stride, n_here)));
    }
    for (int j = 0; j < n_here; j++) {
        const uint8_t *b = blk + j * bytes;
        __m256i u, w = _mm256_setzero_si256();
        if (w_type == LME_TYPE_Q8_0) {
            w = _mm256_loadu_si256((const __m256i *)((const struct block_q8_0 *)b)->qs);
            u = _mm256_sign_epi8(w, w);
        } else {
            u = nibbles_256(w_type == LME_TYPE_Q4_0 ? ((const struct block_q4_0 *)b)->qs
                                                    : ((const struct block_q4_1 *)b)->qs);
        }
        const __m256i lane_j = _mm256_set1_epi32(j);
        for (int t = 0; t < n_group; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (t * x_stride + j) * QK));
            if (w_type == LME_TYPE_Q8_0)
                x = _mm256_sign_epi8(x, w);
            const __m256 s = scalar_scales ? _mm256_set1_ps(_cvtsh_ss(load_u16(b)) * xd[j])
                                           : _mm256_permutevar8x32_ps(scale[t], lane_j);
            const __m256 p = _mm256_cvtepi32_ps(isum(u, x));
            if (j % 2 == 0)
                even[t] = _mm256_fmadd_ps(s, p, even[t]);
            else
                odd[t] = _mm256_fmadd_ps(s, p, odd[t]);
        }
    }
}

/* out for one row and tokens t0 .. t0 + n_group - 1, over groups of 8 blocks (the last < 8 blocks:
 * groups of 2, then 1; every group size a compile-time constant). Even and odd blocks
 * go to two accumulators, so that one token still has two independent FMA chains. The operations
 * for one (row, token) are the same, in the same order, for every n_group: a token's result
 * does not depend on its batch. */
TARGET_AVX2 static ALWAYS_INLINE void rows_dot_q8_256(isum_u8s8_fn isum, int64_t w_type, int n_group,
                                                      const struct q8_args *a, int64_t t0, int64_t row) {
    const int64_t bytes = block_bytes(w_type);
    const int64_t n_blocks = a->n_cols / QK;                  /* blocks per row, and per token */
    const uint8_t *w_row = a->w + row * n_blocks * bytes;
    const int8_t *xq = a->xq + t0 * n_blocks * QK;
    const float *xd = a->xd + t0 * n_blocks, *xs = a->xs + t0 * n_blocks;
    __m256 even[TOKEN_GROUP_MAX], odd[TOKEN_GROUP_MAX];
    for (int t = 0; t < n_group; t++)
        even[t] = odd[t] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + GROUP_BLOCKS <= n_blocks; b += GROUP_BLOCKS)
        accumulate_group_256(isum, w_type, n_group, GROUP_BLOCKS, w_row + b * bytes, xq + b * QK, xd + b,
                             xs + b, n_blocks, even, odd);
    for (; b + 2 <= n_blocks; b += 2)                        /* the tail: pairs, then one block */
        accumulate_group_256(isum, w_type, n_group, 2, w_row + b * bytes, xq + b * QK, xd + b, xs + b,
                             n_blocks, even, odd);
    if (b < n_blocks)
        accumulate_group_256(isum, w_type, n_group, 1, w_row + b * bytes, xq + b * QK, xd + b, xs + b,
                             n_blocks, even, odd);
    for (int t = 0; t < n_group; t++)
        a->out[(t0 + t) * a->n_rows + row] = hsum_avx2(_mm256_add_ps(even[t], odd[t]));
}

/* kit.rows_dot_q8 for constant w_type and n_group: the tile's rows one at a time */
TARGET_AVX2 static ALWAYS_INLINE void rows_dot_q8_group_256(isum_u8s8_fn isum, int64_t w_type, int n_group,
                                                            const struct q8_args *a, int64_t t0) {
    for (int64_t row = a->row_begin; row < a->row_end; row++)
        rows_dot_q8_256(isum, w_type, n_group, a, t0, row);
}

/* The same with n_group (1 .. TOKEN_GROUP_MAX) turned into a constant */
TARGET_AVX2 static ALWAYS_INLINE void rows_dot_q8_typed_256(isum_u8s8_fn isum, int64_t w_type,
                                                            const struct q8_args *a, int64_t t0, int n_group) {
    switch (n_group) {
    case 8: rows_dot_q8_group_256(isum, w_type, 8, a, t0); return;
    case 7: rows_dot_q8_group_256(isum, w_type, 7, a, t0); return;
    case 6: rows_dot_q8_group_256(isum, w_type, 6, a, t0); return;
    case 5: rows_dot_q8_group_256(isum, w_type, 5, a, t0); return;
    case 4: rows_dot_q8_group_256(isum, w_type, 4, a, t0); return;
    case 3: rows_dot_q8_group_256(isum, w_type, 3, a, t0); return;
    case 2: rows_dot_q8_group_256(isum, w_type, 2, a, t0); return;
    default: rows_dot_q8_group_256(isum, w_type, 1, a, t0); return;
    }
}

TARGET_AVX2 static ALWAYS_INLINE void rows_dot_q8_any_256(isum_u8s8_fn isum, const struct q8_args *a,
                                                          int64_t t0, int n_group) {
    switch (a->w_type) {
    case LME_TYPE_Q8_0: rows_dot_q8_typed_256(isum, LME_TYPE_Q8_0, a, t0, n_group); return;
    case LME_TYPE_Q4_0: rows_dot_q8_typed_256(isum, LME_TYPE_Q4_0, a, t0, n_group); return;
    default: rows_dot_q8_typed_256(isum, LME_TYPE_Q4_1, a, t0, n_group); return;
    }
}

/* ---- 3c. AVX2 primitives (AVX2 + FMA + F16C) ------------------------------------------------- */

TARGET_AVX2 static ALWAYS_INLINE __m256i isum_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

TARGET_AVX2 static float dot_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float sum = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* 4 tokens: 12 of AVX2's 16 vector registers hold their accumulators and scales (3: slower) */
#define TOKEN_GROUP_AVX2 4
TARGET_AVX2 static void rows_dot_q8_avx2(const struct q8_args *a, int64_t t0, int n_group) {
    rows_dot_q8_any_256(isum_avx2, a, t0, n_group);
}

TARGET_AVX2 static void decode_f16_avx2(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    for (; i < n; i++)
        dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
}

TARGET_AVX2 static void unpack_nibbles_avx2(const uint8_t *src, int8_t *dst, int bias) {
    _mm256_storeu_si256((__m256i *)dst, _mm256_sub_epi8(nibbles_256(src), _mm256_set1_epi8((char)bias)));
}

TARGET_AVX2 static float half_f16c(const uint8_t *src) { return _cvtsh_ss(load_u16(src)); }

static const struct kit KIT_AVX2 = {rows_dot_q8_avx2, TOKEN_GROUP_AVX2, dot_f32_avx2, decode_f16_avx2,
                                    unpack_nibbles_avx2, half_f16c};
TARGET_AVX2 static void tile_q8_avx2(const struct q8_args *a) { tile_q8(&KIT_AVX2, a); }
TARGET_AVX2 static void tile_f32_avx2(const struct f32_args *a) { tile_f32(&KIT_AVX2, a); }

/* ---- 3d. AVX-512 primitives (F/BW/VL + VNNI) ------------------------------------------------- */
/* The integer blocks use 256-bit vpdpbusd (one 32-value block per instruction, one scale per
 * block); the float dots use 512-bit vectors. */

TARGET_AVX512 static ALWAYS_INLINE __m256i isum_vnni(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

TARGET_AVX512 static float dot_f32_avx512(const float *a, const float *b, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i < n; i += 16) {                       /* tail with a masked load: no over-read */
        const int64_t left = n - i;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* 8 tokens: 24 of AVX-512's 32 vector registers hold their accumulators and scales (4, 6: slower) */
#define TOKEN_GROUP_AVX512 8
TARGET_AVX512 static void rows_dot_q8_avx512(const struct q8_args *a, int64_t t0, int n_group) {
    rows_dot_q8_any_256(isum_vnni, a, t0, n_group);
}

TARGET_AVX512 static void decode_f16_avx512(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * i))));
    for (; i < n; i++)
        dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
}

static const struct kit KIT_AVX512 = {rows_dot_q8_avx512, TOKEN_GROUP_AVX512, dot_f32_avx512,
                                      decode_f16_avx512, unpack_nibbles_avx2, half_f16c};
TARGET_AVX512 static void tile_q8_avx512(const struct q8_args *a) { tile_q8(&KIT_AVX512, a); }
TARGET_AVX512 static void tile_f32_avx512(const struct f32_args *a) { tile_f32(&KIT_AVX512, a); }
#endif /* LME_X86 */

/* ---- 4. argument checks and entry points ---------------------------------------------------- */

/* Checks shared by both entry points. Sets *nothing_to_do when the tile is empty. */
static int check_matrix(int64_t w_type, const uint8_t *w, int64_t w_len, int64_t n_rows, int64_t n_cols,
                        int64_t row_begin, int64_t row_end, int64_t n_tok, const float *out,
                        int64_t out_len, int *nothing_to_do) {
    const int64_t per_block = block_size(w_type);
    if (per_block == 0)
        return LME_ERR_TYPE;
    if (n_rows < 0 || n_cols <= 0 || n_tok < 0 || n_cols % per_block != 0)
        return LME_ERR_SHAPE;
    const int64_t row_bytes = n_cols / per_block * block_bytes(w_type);
    if ((n_rows > 0 && row_bytes > INT64_MAX / n_rows) || (n_rows > 0 && n_tok > INT64_MAX / n_rows)
        || n_tok > INT64_MAX / n_cols)
        return LME_ERR_SHAPE;
    if (row_begin < 0 || row_end < row_begin || row_end > n_rows)
        return LME_ERR_RANGE;
    *nothing_to_do = row_begin == row_end || n_tok == 0;
    if (*nothing_to_do)
        return LME_OK;
    if (w == NULL || out == NULL)
        return LME_ERR_NULL;
    if (w_len < n_rows * row_bytes || out_len < n_tok * n_rows)
        return LME_ERR_LENGTH;
    return LME_OK;
}

int lme_matmul_q8(int64_t w_type, const uint8_t *w, int64_t w_len,
                  int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                  const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                  const float *xs, int64_t xs_len, int64_t n_tok,
                  float *out, int64_t out_len) {
    if (w_type != LME_TYPE_Q8_0 && w_type != LME_TYPE_Q4_0 && w_type != LME_TYPE_Q4_1)
        return LME_ERR_TYPE;
    int nothing_to_do = 0;
    const int rc = check_matrix(w_type, w, w_len, n_rows, n_cols, row_begin, row_end, n_tok, out,
                                out_len, &nothing_to_do);
    if (rc != LME_OK || nothing_to_do)
        return rc;
    if (xq == NULL || xd == NULL || xs == NULL)
        return LME_ERR_NULL;
    const int64_t n_blocks = n_tok * (n_cols / QK);
    if (xq_len < n_tok * n_cols || xd_len < n_blocks || xs_len < n_blocks)
        return LME_ERR_LENGTH;
    const struct q8_args a = {w_type, w, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok, out};
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512: tile_q8_avx512(&a); break;
    case LME_ISA_AVX2: tile_q8_avx2(&a); break;
#endif
    default: tile_q8_scalar(&a); break;
    }
    return LME_OK;
}

int lme_matmul_f32(int64_t w_type, const uint8_t *w, int64_t w_len,
                   int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                   const float *x, int64_t x_len, int64_t n_tok,
                   float *out, int64_t out_len) {
    int nothing_to_do = 0;
    const int rc = check_matrix(w_type, w, w_len, n_rows, n_cols, row_begin, row_end, n_tok, out,
                                out_len, &nothing_to_do);
    if (rc != LME_OK || nothing_to_do)
        return rc;
    if (x == NULL)
        return LME_ERR_NULL;
    if (x_len < n_tok * n_cols)
        return LME_ERR_LENGTH;
    const struct f32_args a = {w_type, w, n_rows, n_cols, row_begin, row_end, x, n_tok, out};
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512: tile_f32_avx512(&a); break;
    case LME_ISA_AVX2: tile_f32_avx2(&a); break;
#endif
    default: tile_f32_scalar(&a); break;
    }
    return LME_OK;
}
