/* qdot: fused decode-and-dot of ggml weight blocks with activations (API: lmengine.h).
 *
 * Structure (read top to bottom; the block formats and f16 conversion are in common.h):
 *   1. block decoders: a chunk of one weight row -> int8 values + scales, or -> float
 *   2. the generic tile loops: the integer path runs over groups of up to TOKEN_GROUP_MAX tokens;
 *      for each group and each row of the tile, every weight block is read once, in place,
 *      and multiplied with the group's activation blocks (held in per-token accumulators); the
 *      float path decodes a chunk of each row once and dots it with every token
 *   3. the ISA-specific primitives: scalar; a 256-bit integer kernel for AVX-512 VNNI
 *      (vpdpbusd, one block at a time); the AVX2 kernel (maddubs, quads of 4 blocks whose
 *      integer lanes are summed before the float part)
 *   4. the exact kernels of Q5_0, Q5_1 and IQ4_NL (scalar; AVX2 and AVX-512 VNNI): the same
 *      bits on every path
 *   5. argument checks and the entry points, which run the tile function of the path
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
#define GROUP_BLOCKS_EXACT 8                   /* blocks per float sum of the exact kernels (section 4) */

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
/* ---- 3b. 256-bit integer kernel of AVX-512 VNNI (AVX2 has its own, section 3c) --------------- */
/* Per row and token: blocks in groups of 8; a group's 8 scale products dw * xd are one vector
 * (one multiply for 8 blocks, lane j broadcast by a permute for block j), its Q4 minimum terms
 * mw * xs one multiply and add; block j's 8-lane integer partial sums are converted and
 * multiply-added into one of two accumulators (even / odd blocks). The result is the horizontal
 * sum of the two. (It was AVX2's kernel too, with maddubs as the block product, until the quads
 * of section 3c replaced it there: 1.4x faster on the AVX2 development machine. VNNI's vpdpbusd makes a
 * block's 8 lanes in one instruction, and this path, measured on such CPUs, stays as it was.) */
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

/* The AVX2 kernel works on quads of 4 blocks instead of section 3b's one block at a time: the
 * integer lanes of the 4 blocks are pair-summed into one vector of partial isums, so that the
 * float part (a convert and a multiply-add) runs once per quad and token instead of once per
 * block, with no per-block scale permute. On the AVX2 development machine (AMD EPYC, Zen 3) this
 * makes the int8 product 1.3-1.4x faster (the K-quant kernel, whose sub-block scales are integers, needs no float work
 * per block at all and is faster still). Per quad and token:
 *     pair(j, j + 1) = [2 lanes of j, 2 of j + 1 | 2 of j, 2 of j + 1]     int32 partial isums
 *         Q4_0, Q4_1: madd(hadd_epi16(maddubs(u_j, x_j), maddubs(u_j+1, x_j+1)), 1)
 *                     (maddubs pair sums of 4-bit weights are below 2 * 15 * 128, so the int16
 *                     sum of two of them cannot overflow)
 *         Q8_0:       hadd_epi32(isum(j), isum(j + 1))      (|w| up to 128: no int16 sums)
 *     quad = hadd_epi32(pair(0, 1), pair(2, 3)) = [b0 b1 b2 b3 | b0 b1 b2 b3], the two lanes
 *            of block j (low and high 128 bits) summing to its exact isum
 *     acc_t += [s0 s1 s2 s3 | s0 s1 s2 s3] * float(quad),   s_j = dw_j * xd_tj
 *     acc_t += [mw_j * xs_tj, j < 4 | 0 0 0 0]               (Q4_0 with mw = -8 dw, Q4_1)
 * and the row's result is the horizontal sum of acc_t. The operations for one (row, token) do
 * not depend on n_group: batched decode equals one-by-one decode bit for bit. Blocks past the
 * row's end (its last quad) are zero weights, and their activations are not read. */
TARGET_AVX2 static ALWAYS_INLINE __m256i quad_pair_avx2(int64_t w_type, __m256i u0, __m256i u1, __m256i x0,
                                                       __m256i x1) {
    if (w_type == LME_TYPE_Q8_0)
        return _mm256_hadd_epi32(isum_avx2(u0, x0), isum_avx2(u1, x1));
    return _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_maddubs_epi16(u0, x0), _mm256_maddubs_epi16(u1, x1)),
                             _mm256_set1_epi16(1));
}

/* 4 floats p[0 .. n - 1] (lanes from n on 0, nothing read past p[n - 1]) in both 128-bit halves */
TARGET_AVX2 static ALWAYS_INLINE __m256 quad_floats_avx2(const float *p, int n) {
    if (n == 4)
        return _mm256_broadcast_ps((const __m128 *)p);
    const __m128 v = _mm256_castps256_ps128(load_floats_256(p, n));
    return _mm256_set_m128(v, v);
}

/* The f16 scales dw and minimums mw (Q4_0: -8 dw; Q8_0: 0) of the quad's blocks as floats,
 * lanes from n_here on 0. Q4_1's d and m are adjacent: one 32-bit load per block. */
TARGET_AVX2 static ALWAYS_INLINE void quad_halves_avx2(int64_t w_type, const uint8_t *blk, int n_here, __m128 *dw,
                                                       __m128 *mw) {
    const int64_t bytes = block_bytes(w_type);
    if (w_type == LME_TYPE_Q4_1) {
        uint32_t dm[4];
        for (int j = 0; j < 4; j++)
            dm[j] = j < n_here ? load_u32(blk + j * bytes) : 0;
        const __m256 f = _mm256_cvtph_ps(_mm_setr_epi32((int)dm[0], (int)dm[1], (int)dm[2], (int)dm[3]));
        const __m128 lo = _mm256_castps256_ps128(f), hi = _mm256_extractf128_ps(f, 1);   /* d0 m0 d1 m1 | d2 m2 d3 m3 */
        *dw = _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
        *mw = _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
        return;
    }
    uint16_t h[4];
    for (int j = 0; j < 4; j++)
        h[j] = j < n_here ? load_u16(blk + j * bytes) : 0;
    *dw = _mm_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], 0, 0, 0, 0));
    *mw = w_type == LME_TYPE_Q4_0 ? _mm_mul_ps(_mm_set1_ps(-8.0f), *dw) : _mm_setzero_ps();
}

/* Blocks blk .. blk + n_here - 1 (n_here 1..4, a constant) of one row with the same blocks of
 * tokens 0 .. n_group - 1 (token t's at xq + t * x_stride * QK, xd/xs + t * x_stride) */
TARGET_AVX2 static ALWAYS_INLINE void quad_avx2(int64_t w_type, int n_group, int n_here, const uint8_t *blk,
                                                const int8_t *xq, const float *xd, const float *xs,
                                                int64_t x_stride, __m256 acc[TOKEN_GROUP_AVX2]) {
    const int64_t bytes = block_bytes(w_type);
    __m256i w[4], u[4];
    for (int j = 0; j < 4; j++) {
        const uint8_t *b = blk + j * bytes;
        if (j >= n_here) {
            w[j] = u[j] = _mm256_setzero_si256();
        } else if (w_type == LME_TYPE_Q8_0) {
            w[j] = _mm256_loadu_si256((const __m256i *)((const struct block_q8_0 *)b)->qs);
            u[j] = _mm256_sign_epi8(w[j], w[j]);
        } else {
            w[j] = _mm256_setzero_si256();
            u[j] = nibbles_256(w_type == LME_TYPE_Q4_0 ? ((const struct block_q4_0 *)b)->qs
                                                       : ((const struct block_q4_1 *)b)->qs);
        }
    }
    __m128 dw4, mw4;                                   /* the quad's scales and minimums */
    quad_halves_avx2(w_type, blk, n_here, &dw4, &mw4);
    const __m256 dw = _mm256_set_m128(dw4, dw4);
    const __m256 mw = _mm256_set_m128(_mm_setzero_ps(), mw4);    /* [mw_0 .. mw_3 | 0 0 0 0] */
    for (int t = 0; t < n_group; t++) {
        const int8_t *x = xq + t * x_stride * QK;
        __m256i v[4];
        for (int j = 0; j < 4; j++) {
            v[j] = j < n_here ? _mm256_loadu_si256((const __m256i *)(x + j * QK)) : _mm256_setzero_si256();
            if (w_type == LME_TYPE_Q8_0)
                v[j] = _mm256_sign_epi8(v[j], w[j]);
        }
        const __m256i quad = _mm256_hadd_epi32(quad_pair_avx2(w_type, u[0], u[1], v[0], v[1]),
                                               quad_pair_avx2(w_type, u[2], u[3], v[2], v[3]));
        const __m256 scale = _mm256_mul_ps(dw, quad_floats_avx2(xd + t * x_stride, n_here));
        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(quad), acc[t]);
        if (w_type != LME_TYPE_Q8_0)
            acc[t] = _mm256_fmadd_ps(mw, quad_floats_avx2(xs + t * x_stride, n_here), acc[t]);
    }
}

/* the tile's rows x tokens t0 .. t0 + n_group - 1, for constant w_type and n_group: quads of
 * blocks, the last one partial */
TARGET_AVX2 static ALWAYS_INLINE void rows_quads_avx2(int64_t w_type, int n_group, const struct q8_args *a,
                                                      int64_t t0) {
    const int64_t bytes = block_bytes(w_type), nb = a->n_cols / QK;
    const int8_t *xq = a->xq + t0 * nb * QK;
    const float *xd = a->xd + t0 * nb, *xs = a->xs + t0 * nb;
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const uint8_t *w_row = a->w + row * nb * bytes;
        __m256 acc[TOKEN_GROUP_AVX2];
        for (int t = 0; t < n_group; t++)
            acc[t] = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4)
            quad_avx2(w_type, n_group, 4, w_row + b * bytes, xq + b * QK, xd + b, xs + b, nb, acc);
        switch (nb - b) {                          /* the last quad's blocks, as a constant */
        case 3: quad_avx2(w_type, n_group, 3, w_row + b * bytes, xq + b * QK, xd + b, xs + b, nb, acc); break;
        case 2: quad_avx2(w_type, n_group, 2, w_row + b * bytes, xq + b * QK, xd + b, xs + b, nb, acc); break;
        case 1: quad_avx2(w_type, n_group, 1, w_row + b * bytes, xq + b * QK, xd + b, xs + b, nb, acc); break;
        default: break;
        }
        for (int t = 0; t < n_group; t++)
            a->out[(t0 + t) * a->n_rows + row] = hsum_avx2(acc[t]);
    }
}

TARGET_AVX2 static ALWAYS_INLINE void rows_quads_typed_avx2(int64_t w_type, const struct q8_args *a, int64_t t0,
                                                            int n_group) {
    switch (n_group) {                         /* n_group as a constant (1 .. TOKEN_GROUP_AVX2) */
    case 4: rows_quads_avx2(w_type, 4, a, t0); return;
    case 3: rows_quads_avx2(w_type, 3, a, t0); return;
    case 2: rows_quads_avx2(w_type, 2, a, t0); return;
    default: rows_quads_avx2(w_type, 1, a, t0); return;
    }
}

TARGET_AVX2 static void rows_dot_q8_avx2(const struct q8_args *a, int64_t t0, int n_group) {
    switch (a->w_type) {                       /* w_type as a constant */
    case LME_TYPE_Q8_0: rows_quads_typed_avx2(LME_TYPE_Q8_0, a, t0, n_group); return;
    case LME_TYPE_Q4_0: rows_quads_typed_avx2(LME_TYPE_Q4_0, a, t0, n_group); return;
    default: rows_quads_typed_avx2(LME_TYPE_Q4_1, a, t0, n_group); return;
    }
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

/* ---- 4. Q5_0, Q5_1, IQ4_NL: the exact kernels ------------------------------------------------ */
/* The weights of a block in integer form, W = dw * q + mw (q int8 [32], value j as in common.h):
 *   Q5_0    q = 5-bit value 0..31 (nibble | qh bit << 4), mw = -16 dw   (ggml: d (q - 16))
 *   Q5_1    q = 5-bit value 0..31, mw = m
 *   IQ4_NL  q = KVALUES_IQ4NL[nibble] (-127 .. 113), no mw
 * Arithmetic (lmengine.h), the same IEEE operations in the same order on every path and in the
 * Numba reference (kernels/matmul.py), so all agree bit for bit: per (row, token), blocks in
 * groups of 8 (the last group padded with p_j = 0),
 *     isum_j = sum_i q_ij xq_ij                                   exact integer
 *     p_j    = (dw_j * xd_j) * (float)isum_j  (+ mw_j * xs_j)
 *     acc    = acc + group_sum(p) = acc + (((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)))
 * (group_sum is hsum_avx2's order). Each token has its own accumulator: batch invariant.
 * AVX2: per block and token one maddubs (u8 x s8; IQ4_NL through the sign trick, |q| <= 127)
 * and one madd to 8 int32 lanes; the lanes of 8 blocks are reduced to their 8 exact isums
 * with hadds, so the float part is one 8-lane multiply(-add) and one horizontal sum per group. */

static inline int64_t exact_block_bytes(int64_t w_type) {       /* 0: not one of these types */
    switch (w_type) {
    case LME_TYPE_Q5_0: return sizeof(struct block_q5_0);
    case LME_TYPE_Q5_1: return sizeof(struct block_q5_1);
    case LME_TYPE_IQ4_NL: return sizeof(struct block_iq4_nl);
    default: return 0;
    }
}

static ALWAYS_INLINE float group_sum(const float p[GROUP_BLOCKS_EXACT]) {
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

/* ---- 4a. scalar ---- */

/* One block blk -> q[32] (integer form above); returns dw, *mw its min (0 for IQ4_NL) */
static float decode_exact_block(int64_t w_type, const uint8_t *blk, int8_t q[QK], float *mw) {
    const float d = fp16_to_fp32(load_u16(blk));
    if (w_type == LME_TYPE_IQ4_NL) {
        const uint8_t *qs = ((const struct block_iq4_nl *)blk)->qs;
        for (int j = 0; j < QK / 2; j++) {
            q[j] = KVALUES_IQ4NL[qs[j] & 0x0F];
            q[j + QK / 2] = KVALUES_IQ4NL[qs[j] >> 4];
        }
        *mw = 0.0f;
        return d;
    }
    const uint8_t *qh_bytes = w_type == LME_TYPE_Q5_0 ? ((const struct block_q5_0 *)blk)->qh
                                                      : ((const struct block_q5_1 *)blk)->qh;
    const uint8_t *qs = qh_bytes + 4;                      /* both layouts: qs follows qh */
    const uint32_t qh = (uint32_t)qh_bytes[0] | ((uint32_t)qh_bytes[1] << 8) | ((uint32_t)qh_bytes[2] << 16)
                        | ((uint32_t)qh_bytes[3] << 24);
    for (int j = 0; j < QK / 2; j++) {
        q[j] = (int8_t)((qs[j] & 0x0F) | (((qh >> j) & 1) << 4));
        q[j + QK / 2] = (int8_t)((qs[j] >> 4) | (((qh >> (j + QK / 2)) & 1) << 4));
    }
    *mw = w_type == LME_TYPE_Q5_0 ? -16.0f * d : fp16_to_fp32(load_u16(((const struct block_q5_1 *)blk)->m));
    return d;
}

/* rows of the tile x tokens t0 .. t0 + n_group - 1: each group of 8 blocks of a row decoded
 * once, then dotted with every token */
static void rows_exact_scalar(const struct q8_args *a, int64_t t0, int n_group) {
    const int64_t bytes = exact_block_bytes(a->w_type), nb = a->n_cols / QK;
    const int mins = a->w_type != LME_TYPE_IQ4_NL;
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const uint8_t *w_row = a->w + row * nb * bytes;
        float acc[TOKEN_GROUP_MAX] = {0};
        for (int64_t b0 = 0; b0 < nb; b0 += GROUP_BLOCKS_EXACT) {
            const int n_here = nb - b0 < GROUP_BLOCKS_EXACT ? (int)(nb - b0) : GROUP_BLOCKS_EXACT;
            int8_t q[GROUP_BLOCKS_EXACT][QK];
            float dw[GROUP_BLOCKS_EXACT], mw[GROUP_BLOCKS_EXACT];
            for (int j = 0; j < n_here; j++)
                dw[j] = decode_exact_block(a->w_type, w_row + (b0 + j) * bytes, q[j], &mw[j]);
            for (int t = 0; t < n_group; t++) {
                const int64_t first = (t0 + t) * nb + b0;          /* token's block b0 */
                float p[GROUP_BLOCKS_EXACT];
                for (int j = 0; j < GROUP_BLOCKS_EXACT; j++) {
                    if (j >= n_here) {
                        p[j] = 0.0f;
                        continue;
                    }
                    const int8_t *xq = a->xq + (first + j) * QK;
                    int32_t isum = 0;
                    for (int i = 0; i < QK; i++)
                        isum += (int32_t)q[j][i] * (int32_t)xq[i];
                    p[j] = (dw[j] * a->xd[first + j]) * (float)isum;
                    if (mins)
                        p[j] = p[j] + mw[j] * a->xs[first + j];
                }
                acc[t] = acc[t] + group_sum(p);
            }
        }
        for (int t = 0; t < n_group; t++)
            a->out[(t0 + t) * a->n_rows + row] = acc[t];
    }
}

#if LME_X86
/* ---- 4b. AVX2 and AVX-512 VNNI (one 256-bit kernel, as section 3b) ---- */

/* The 32 weights of block blk as bytes: Q5_0, Q5_1 unsigned 0..31; IQ4_NL the signed codebook values */
TARGET_AVX2 static ALWAYS_INLINE __m256i exact_weights_avx2(int64_t w_type, const uint8_t *blk) {
    if (w_type == LME_TYPE_IQ4_NL) {
        const __m256i book = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4NL));
        return _mm256_shuffle_epi8(book, nibbles_256(((const struct block_iq4_nl *)blk)->qs));
    }
    const uint8_t *qh = w_type == LME_TYPE_Q5_0 ? ((const struct block_q5_0 *)blk)->qh
                                                : ((const struct block_q5_1 *)blk)->qh;
    int32_t bits;
    memcpy(&bits, qh, sizeof bits);
    /* byte j of qh_bytes: byte j / 8 of qh; then 0x10 where bit j % 8 of it is set, i.e. bit j of qh */
    const __m256i qh_bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits),
                                                 _mm256_setr_epi64x(0, 0x0101010101010101ll, 0x0202020202020202ll,
                                                                    0x0303030303030303ll));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh_bytes, bit), bit),
                                          _mm256_set1_epi8(0x10));
    return _mm256_or_si256(nibbles_256(qh + 4), high);
}

/* int32 x 8 whose sum is isum of weights w (u: their unsigned form) with the 32 xq at x; lane k
 * holds the products 4k .. 4k + 3 both with isum_avx2 and with isum_vnni (the same lanes) */
TARGET_AVX2 static ALWAYS_INLINE __m256i exact_lanes_256(isum_u8s8_fn isum, int64_t w_type, __m256i w, __m256i u,
                                                         const int8_t *x) {
    __m256i v = _mm256_loadu_si256((const __m256i *)x);
    if (w_type == LME_TYPE_IQ4_NL)
        v = _mm256_sign_epi8(v, w);
    return isum(u, v);
}

/* The 8 isums of one token's group of blocks, in block order (blocks from n_here on: 0, and
 * their activations are not read): w, u the weights as bytes and their unsigned form, x the
 * token's first block. The lanes of blocks j, j + 1 are pair-summed by hadd, and so on: a quad
 * [lanes 0-3 of blocks 4h .. 4h + 3 | lanes 4-7 of them], then low half + high half. */
TARGET_AVX2 static ALWAYS_INLINE __m256i exact_isums_256(isum_u8s8_fn isum, int64_t w_type, int n_here,
                                                         const __m256i w[GROUP_BLOCKS_EXACT],
                                                         const __m256i u[GROUP_BLOCKS_EXACT], const int8_t *x) {
    __m256i quad[2];
    for (int h = 0; h < 2; h++) {
        __m256i lanes[4];
        for (int k = 0; k < 4; k++) {
            const int j = 4 * h + k;
            lanes[k] = j < n_here ? exact_lanes_256(isum, w_type, w[j], u[j], x + j * QK) : _mm256_setzero_si256();
        }
        quad[h] = _mm256_hadd_epi32(_mm256_hadd_epi32(lanes[0], lanes[1]), _mm256_hadd_epi32(lanes[2], lanes[3]));
    }
    return _mm256_add_epi32(_mm256_permute2x128_si256(quad[0], quad[1], 0x20),
                            _mm256_permute2x128_si256(quad[0], quad[1], 0x31));
}

/* One group of n_here <= 8 blocks of a row (blk) with the same blocks of the n_group tokens
 * (xq, xd, xs of token t at t * nb blocks on): acc[t] = acc[t] + group_sum(p). The group's
 * weights are put in byte form once, then each token runs through them on its own (few live
 * registers). w_type and n_group are constants after inlining (n_here too, but for the last
 * group of a row). */
TARGET_AVX2 static ALWAYS_INLINE void exact_group_256(isum_u8s8_fn isum, int64_t w_type, int n_group, int n_here,
                                                      const uint8_t *blk, const int8_t *xq, const float *xd,
                                                      const float *xs, int64_t nb, float acc[TOKEN_GROUP_AVX2]) {
    const int64_t bytes = exact_block_bytes(w_type);
    __m256i w[GROUP_BLOCKS_EXACT], u[GROUP_BLOCKS_EXACT];
    for (int j = 0; j < GROUP_BLOCKS_EXACT; j++) {
        w[j] = j < n_here ? exact_weights_avx2(w_type, blk + j * bytes) : _mm256_setzero_si256();
        u[j] = w_type == LME_TYPE_IQ4_NL ? _mm256_sign_epi8(w[j], w[j]) : w[j];
    }
    const __m256 dw = halves_256(blk, bytes, n_here);          /* lanes from n_here on 0 */
    __m256 mw = _mm256_setzero_ps();
    if (w_type == LME_TYPE_Q5_0)
        mw = _mm256_mul_ps(_mm256_set1_ps(-16.0f), dw);
    else if (w_type == LME_TYPE_Q5_1)
        mw = halves_256(blk + offsetof(struct block_q5_1, m), bytes, n_here);
    for (int t = 0; t < n_group; t++) {
        const __m256i sums = exact_isums_256(isum, w_type, n_here, w, u, xq + t * nb * QK);
        __m256 p = _mm256_mul_ps(_mm256_mul_ps(dw, load_floats_256(xd + t * nb, n_here)), _mm256_cvtepi32_ps(sums));
        if (w_type != LME_TYPE_IQ4_NL)
            p = _mm256_add_ps(p, _mm256_mul_ps(mw, load_floats_256(xs + t * nb, n_here)));
        acc[t] = acc[t] + hsum_avx2(p);                        /* group_sum's order */
    }
}

/* rows of the tile x tokens t0 .. t0 + n_group - 1 for constant w_type and n_group */
TARGET_AVX2 static ALWAYS_INLINE void rows_exact_typed_256(isum_u8s8_fn isum, int64_t w_type, int n_group,
                                                           const struct q8_args *a, int64_t t0) {
    const int64_t bytes = exact_block_bytes(w_type), nb = a->n_cols / QK;
    const int8_t *xq = a->xq + t0 * nb * QK;
    const float *xd = a->xd + t0 * nb, *xs = a->xs + t0 * nb;
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const uint8_t *w_row = a->w + row * nb * bytes;
        float acc[TOKEN_GROUP_AVX2] = {0};
        int64_t b = 0;
        for (; b + GROUP_BLOCKS_EXACT <= nb; b += GROUP_BLOCKS_EXACT)
            exact_group_256(isum, w_type, n_group, GROUP_BLOCKS_EXACT, w_row + b * bytes, xq + b * QK, xd + b,
                            xs + b, nb, acc);
        if (b < nb)
            exact_group_256(isum, w_type, n_group, (int)(nb - b), w_row + b * bytes, xq + b * QK, xd + b, xs + b,
                            nb, acc);
        for (int t = 0; t < n_group; t++)
            a->out[(t0 + t) * a->n_rows + row] = acc[t];
    }
}

TARGET_AVX2 static ALWAYS_INLINE void rows_exact_group_256(isum_u8s8_fn isum, int64_t w_type, const struct q8_args *a,
                                                           int64_t t0, int n_group) {
    switch (n_group) {                         /* n_group as a constant (1 .. TOKEN_GROUP_AVX2) */
    case 4: rows_exact_typed_256(isum, w_type, 4, a, t0); return;
    case 3: rows_exact_typed_256(isum, w_type, 3, a, t0); return;
    case 2: rows_exact_typed_256(isum, w_type, 2, a, t0); return;
    default: rows_exact_typed_256(isum, w_type, 1, a, t0); return;
    }
}

TARGET_AVX2 static ALWAYS_INLINE void rows_exact_any_256(isum_u8s8_fn isum, const struct q8_args *a, int64_t t0,
                                                         int n_group) {
    switch (a->w_type) {                       /* w_type as a constant */
    case LME_TYPE_Q5_0: rows_exact_group_256(isum, LME_TYPE_Q5_0, a, t0, n_group); return;
    case LME_TYPE_Q5_1: rows_exact_group_256(isum, LME_TYPE_Q5_1, a, t0, n_group); return;
    default: rows_exact_group_256(isum, LME_TYPE_IQ4_NL, a, t0, n_group); return;
    }
}

TARGET_AVX2 static void rows_exact_avx2(const struct q8_args *a, int64_t t0, int n_group) {
    rows_exact_any_256(isum_avx2, a, t0, n_group);
}

/* AVX-512 VNNI: the block products by vpdpbusd, the same lanes (so the same bits); 4 tokens a
 * group as on AVX2. (Not run by this project's CI machine, which lacks AVX-512.) */
TARGET_AVX512 static void rows_exact_avx512(const struct q8_args *a, int64_t t0, int n_group) {
    rows_exact_any_256(isum_vnni, a, t0, n_group);
}
#endif /* LME_X86 */

/* Token groups outermost, as tile_q8 */
static void tile_exact(void (*rows)(const struct q8_args *, int64_t, int), int token_group, const struct q8_args *a) {
    for (int64_t t0 = 0; t0 < a->n_tok; t0 += token_group) {
        const int64_t left = a->n_tok - t0;
        rows(a, t0, left < token_group ? (int)left : token_group);
    }
}

/* ---- 5. argument checks and entry points ---------------------------------------------------- */

/* Checks shared by both entry points, for blocks of per_block values in `bytes` bytes (0: an
 * unsupported type). Sets *nothing_to_do when the tile is empty. */
static int check_matrix(int64_t per_block, int64_t bytes, const uint8_t *w, int64_t w_len, int64_t n_rows,
                        int64_t n_cols, int64_t row_begin, int64_t row_end, int64_t n_tok, const float *out,
                        int64_t out_len, int *nothing_to_do) {
    if (per_block == 0 || bytes == 0)
        return LME_ERR_TYPE;
    if (n_rows < 0 || n_cols <= 0 || n_tok < 0 || n_cols % per_block != 0)
        return LME_ERR_SHAPE;
    const int64_t row_bytes = n_cols / per_block * bytes;
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
    const int exact = exact_block_bytes(w_type) > 0;          /* Q5_0, Q5_1, IQ4_NL */
    if (!exact && w_type != LME_TYPE_Q8_0 && w_type != LME_TYPE_Q4_0 && w_type != LME_TYPE_Q4_1)
        return LME_ERR_TYPE;
    int nothing_to_do = 0;
    const int rc = check_matrix(QK, exact ? exact_block_bytes(w_type) : block_bytes(w_type), w, w_len, n_rows,
                                n_cols, row_begin, row_end, n_tok, out, out_len, &nothing_to_do);
    if (rc != LME_OK || nothing_to_do)
        return rc;
    if (xq == NULL || xd == NULL || xs == NULL)
        return LME_ERR_NULL;
    const int64_t n_blocks = n_tok * (n_cols / QK);
    if (xq_len < n_tok * n_cols || xd_len < n_blocks || xs_len < n_blocks)
        return LME_ERR_LENGTH;
    const struct q8_args a = {w_type, w, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok, out};
    if (exact) {
        switch (lme_get_isa()) {
#if LME_X86
        case LME_ISA_AVX512: tile_exact(rows_exact_avx512, TOKEN_GROUP_AVX2, &a); break;
        case LME_ISA_AVX2: tile_exact(rows_exact_avx2, TOKEN_GROUP_AVX2, &a); break;
#endif
        default: tile_exact(rows_exact_scalar, TOKEN_GROUP_MAX, &a); break;
        }
        return LME_OK;
    }
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
    const int rc = check_matrix(block_size(w_type), block_bytes(w_type), w, w_len, n_rows, n_cols, row_begin,
                                row_end, n_tok, out, out_len, &nothing_to_do);
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
