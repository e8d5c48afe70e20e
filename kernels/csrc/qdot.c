/* qdot: fused decode-and-dot of ggml weight blocks with activations (see qdot.h).
 *
 * Structure (read top to bottom):
 *   1. block formats and f16 conversion (portable C)
 *   2. row decoders: a chunk of one weight row -> int8 values + scales, or -> float
 *   3. the generic tile loops: for each row of the tile, decode a chunk of it once (it stays in
 *      L1), then dot it with that chunk of every token's activations, up to 4 tokens at a time
 *      (one load of each weight block serves 4 tokens); with one token, the SIMD paths read
 *      the blocks in place instead (no decode pass)
 *   4. the ISA-specific primitives: scalar; a 256-bit integer row dot shared by AVX2 (maddubs)
 *      and AVX-512 VNNI (vpdpbusd), which differ only in the 32-byte block product
 *   5. the tile functions per ISA (generic loops + that ISA's primitives, compiled for it with
 *      __attribute__((target))), run-time ISA selection by CPUID, argument checks, entry points.
 *
 * One build runs on any x86-64 (no -march): each SIMD function carries its own target
 * attribute and is only called when CPUID says the CPU has it. Elsewhere only the scalar path
 * exists.
 */
#include "qdot.h"

#include <stddef.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LME_X86 1
#include <immintrin.h>
#else
#define LME_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define ALIGN64 __attribute__((aligned(64)))
#else
#define ALWAYS_INLINE inline
#define ALIGN64
#endif

#define QK 32                                  /* values per block of Q8_0 / Q4_0 / Q4_1 */
#define CHUNK_BLOCKS 64                        /* a row is decoded this many blocks at a time */
#define CHUNK_VALUES (CHUNK_BLOCKS * QK)       /* 2048 values: 2 KB int8 or 8 KB float */
/* The integer path decodes a whole row at once when it has at most ROW_BLOCKS blocks (16384
 * values, 16 KB), so its accumulators run over the row exactly as the one-token path's do. */
#define ROW_BLOCKS 512

/* ---- 1. block formats ------------------------------------------------------------------------ */

static int64_t block_size(int64_t w_type) {      /* values per block; 0: unsupported type */
    switch (w_type) {
    case LME_TYPE_F32: case LME_TYPE_F16: case LME_TYPE_BF16: return 1;
    case LME_TYPE_Q8_0: case LME_TYPE_Q4_0: case LME_TYPE_Q4_1: return QK;
    default: return 0;
    }
}

static int64_t block_bytes(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_F32: return 4;
    case LME_TYPE_F16: case LME_TYPE_BF16: return 2;
    case LME_TYPE_Q8_0: return 2 + QK;          /* d f16 | q int8 x 32 */
    case LME_TYPE_Q4_0: return 2 + QK / 2;      /* d f16 | 16 bytes: value j low nibble, j+16 high */
    case LME_TYPE_Q4_1: return 4 + QK / 2;      /* d f16 | m f16 | 16 bytes as Q4_0 */
    default: return 0;
    }
}

static ALWAYS_INLINE uint16_t load_u16(const uint8_t *p) {   /* little-endian, any alignment */
    return (uint16_t)(p[0] | (p[1] << 8));
}

static ALWAYS_INLINE float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Exact f16 -> f32 without denormal float arithmetic (so DAZ/FTZ modes cannot change it). */
static ALWAYS_INLINE float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1F;
    const uint32_t mantissa = h & 0x3FF;
    if (exponent == 0x1F)                                   /* inf, NaN */
        return f32_from_bits(sign | 0x7F800000u | (mantissa << 13));
    if (exponent == 0) {                                    /* zero, subnormal: mantissa * 2^-24 */
        const float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    }
    return f32_from_bits(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

/* ---- 2. row decoders ------------------------------------------------------------------------- */

/* One decoded chunk of a weight row (integer form) and the activations of up to ROW_DOT_TOKENS
 * tokens over the same columns: token t's blocks start at xq + t * x_stride * QK,
 * xd + t * x_stride, xs + t * x_stride (x_stride = blocks per activation row). */
#define ROW_DOT_TOKENS 4
struct row_q8 {
    const int8_t *q;            /* n_blocks * 32 weight values: signed, or 0..15 if w_unsigned */
    const float *d, *m;         /* n_blocks scales and mins (m used when w_unsigned: Q4_0, Q4_1) */
    int64_t n_blocks;
    const int8_t *xq;
    const float *xd, *xs;
    int64_t x_stride;
    int n_tok;                  /* 1 .. ROW_DOT_TOKENS */
    int w_unsigned;
};

/* The ISA-specific pieces the generic loops below are built from (section 4 defines them). */
struct kit {
    /* result[t] = sum over blocks b of d[b] * xd_t[b] * isum_tb (+ m[b] * xs_t[b] if w_unsigned),
     * isum_tb the exact integer dot product of the block's q with token t's xq */
    void (*row_dot_q8)(const struct row_q8 *r, float *result);
    /* the same for one token, reading the row's blocks in place (no decode pass): the GEMV
     * path; NULL where the decode pass costs nothing extra (scalar) */
    float (*row_dot_q8_raw)(int64_t w_type, const uint8_t *row, int64_t n_blocks,
                            const int8_t *xq, const float *xd, const float *xs);
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
    const int64_t bytes = block_bytes(w_type);
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint8_t *blk = src + b * bytes;
        d[b] = k->half(blk);
        if (w_type == LME_TYPE_Q8_0) {
            m[b] = 0.0f;
            memcpy(q + b * QK, blk + 2, QK);
        } else if (w_type == LME_TYPE_Q4_0) {
            m[b] = q4_0_unsigned ? -8.0f * d[b] : 0.0f;
            k->unpack_nibbles(blk + 2, q + b * QK, q4_0_unsigned ? 0 : 8);
        } else {                                      /* Q4_1 */
            m[b] = k->half(blk + 2);
            k->unpack_nibbles(blk + 4, q + b * QK, 0);
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

/* ---- 3. generic tile loops ------------------------------------------------------------------- */

struct q8_args {
    int64_t w_type; const uint8_t *w; int64_t n_rows, n_cols, row_begin, row_end;
    const int8_t *xq; const float *xd, *xs; int64_t n_tok; float *out;
};

struct f32_args {
    int64_t w_type; const uint8_t *w; int64_t n_rows, n_cols, row_begin, row_end;
    const float *x; int64_t n_tok; float *out;
};

static ALWAYS_INLINE void tile_q8(const struct kit *k, const struct q8_args *a) {
    int8_t q[ROW_BLOCKS * QK] ALIGN64;             /* a row (or a chunk of one), as integers */
    float d[ROW_BLOCKS], m[ROW_BLOCKS];            /* its block scales and mins */
    const int64_t bytes = block_bytes(a->w_type);
    const int64_t blocks_per_row = a->n_cols / QK;
    const int64_t row_bytes = blocks_per_row * bytes;
    if (a->n_tok == 1 && k->row_dot_q8_raw != NULL) {          /* one token: read blocks in place */
        for (int64_t row = a->row_begin; row < a->row_end; row++)
            a->out[row] = k->row_dot_q8_raw(a->w_type, a->w + row * row_bytes, blocks_per_row,
                                            a->xq, a->xd, a->xs);
        return;
    }
    const int w_unsigned = a->w_type != LME_TYPE_Q8_0;          /* Q4_0 and Q4_1: nibbles 0..15 */
    struct row_q8 r = {q, d, m, 0, NULL, NULL, NULL, blocks_per_row, 0, w_unsigned};
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const uint8_t *w_row = a->w + row * row_bytes;
        for (int64_t b0 = 0; b0 < blocks_per_row; b0 += ROW_BLOCKS) {
            r.n_blocks = blocks_per_row - b0 < ROW_BLOCKS ? blocks_per_row - b0 : ROW_BLOCKS;
            decode_q8_blocks(k, a->w_type, w_row + b0 * bytes, r.n_blocks, q, d, m, 1);
            for (int64_t t0 = 0; t0 < a->n_tok; t0 += ROW_DOT_TOKENS) {
                const int64_t block0 = t0 * blocks_per_row + b0;    /* token t0's first block here */
                float v[ROW_DOT_TOKENS];
                r.n_tok = a->n_tok - t0 < ROW_DOT_TOKENS ? (int)(a->n_tok - t0) : ROW_DOT_TOKENS;
                r.xq = a->xq + block0 * QK;
                r.xd = a->xd + block0;
                r.xs = a->xs + block0;
                k->row_dot_q8(&r, v);
                for (int t = 0; t < r.n_tok; t++) {
                    float *o = a->out + (t0 + t) * a->n_rows + row;
                    *o = b0 == 0 ? v[t] : *o + v[t];
                }
            }
        }
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

/* ---- 4a. scalar primitives ------------------------------------------------------------------- */

static void row_dot_q8_scalar(const struct row_q8 *r, float *result) {
    for (int t = 0; t < r->n_tok; t++) {
        const int8_t *xq = r->xq + t * r->x_stride * QK;
        const float *xd = r->xd + t * r->x_stride, *xs = r->xs + t * r->x_stride;
        float acc = 0.0f;
        for (int64_t b = 0; b < r->n_blocks; b++) {
            int32_t isum = 0;
            for (int i = 0; i < QK; i++)
                isum += (int32_t)r->q[b * QK + i] * (int32_t)xq[b * QK + i];
            acc += r->d[b] * xd[b] * (float)isum;
            if (r->w_unsigned)
                acc += r->m[b] * xs[b];
        }
        result[t] = acc;
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

static const struct kit KIT_SCALAR = {row_dot_q8_scalar, NULL, dot_f32_scalar, decode_f16_scalar,
                                      unpack_nibbles_scalar, half_scalar};
static void tile_q8_scalar(const struct q8_args *a) { tile_q8(&KIT_SCALAR, a); }
static void tile_f32_scalar(const struct f32_args *a) { tile_f32(&KIT_SCALAR, a); }

#if LME_X86
/* ---- 4b. 256-bit integer row dot, shared by AVX2 and AVX-512 VNNI ----------------------------- */
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

/* int32 x 8 whose sum is the dot product of 32 unsigned bytes u with 32 signed bytes s */
typedef __m256i (*isum_u8s8_fn)(__m256i u, __m256i s);

TARGET_AVX2 static ALWAYS_INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc[t] += d * xd_t * isum(block b, token t) for the n_tok tokens (a compile-time constant
 * after inlining). Signed weights use |w| and sign(x, w), so that u8 x s8 applies; |w| <= 128
 * and |x| <= 127 keep maddubs' int16 pair sums below 2^15. */
TARGET_AVX2 static ALWAYS_INLINE void accumulate_block(isum_u8s8_fn isum, const struct row_q8 *r, int64_t b,
                                                       int n_tok, int w_unsigned, __m256 *acc) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)(r->q + b * QK));
    const __m256i u = w_unsigned ? w : _mm256_sign_epi8(w, w);
    for (int t = 0; t < n_tok; t++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(r->xq + (t * r->x_stride + b) * QK));
        if (!w_unsigned)
            x = _mm256_sign_epi8(x, w);
        const __m256 scale = _mm256_set1_ps(r->d[b] * r->xd[t * r->x_stride + b]);
        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum(u, x)), acc[t]);
    }
}

/* min[t] += m[b] * xs_t[b]: the block-minimum term of Q4_0 / Q4_1 (scalar, as the raw path does it) */
static ALWAYS_INLINE void accumulate_mins(const struct row_q8 *r, int64_t b, int n_tok, float *min_acc) {
    for (int t = 0; t < n_tok; t++)
        min_acc[t] += r->m[b] * r->xs[t * r->x_stride + b];
}

/* kit.row_dot_q8 for constant n_tok and w_unsigned; blocks alternate between two accumulator
 * sets so that one token still has two independent FMA chains. */
TARGET_AVX2 static ALWAYS_INLINE void row_dot_q8_256(isum_u8s8_fn isum, float (*dot_f32)(const float *, const float *, int64_t),
                                                     const struct row_q8 *r, int n_tok, int w_unsigned, float *result) {
    __m256 even[ROW_DOT_TOKENS], odd[ROW_DOT_TOKENS];
    float min_even[ROW_DOT_TOKENS], min_odd[ROW_DOT_TOKENS];
    for (int t = 0; t < n_tok; t++) {
        even[t] = odd[t] = _mm256_setzero_ps();
        min_even[t] = min_odd[t] = 0.0f;
    }
    int64_t b = 0;
    for (; b + 2 <= r->n_blocks; b += 2) {
        accumulate_block(isum, r, b, n_tok, w_unsigned, even);
        accumulate_block(isum, r, b + 1, n_tok, w_unsigned, odd);
        if (w_unsigned) {
            accumulate_mins(r, b, n_tok, min_even);
            accumulate_mins(r, b + 1, n_tok, min_odd);
        }
    }
    if (b < r->n_blocks) {
        accumulate_block(isum, r, b, n_tok, w_unsigned, even);
        if (w_unsigned)
            accumulate_mins(r, b, n_tok, min_even);
    }
    /* the same operations in the same order as row_dot_q8_raw_256: one token's result does not
     * depend on how many tokens share the call (batched decode == one-by-one decode, bit for bit) */
    for (int t = 0; t < n_tok; t++)
        result[t] = hsum_avx2(_mm256_add_ps(even[t], odd[t])) + (min_even[t] + min_odd[t]);
    (void)dot_f32;
}

/* 16 bytes of nibbles -> 32 bytes 0..15: value j from the low nibble of byte j, j + 16 from its high */
TARGET_AVX2 static ALWAYS_INLINE __m256i nibbles_256(const uint8_t *src) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)src);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

/* One block of a raw row (w_type a compile-time constant after inlining) into the accumulators:
 * acc += d * xd * isum, min_acc += m * xs, in the integer form of decode_q8_blocks (Q4_0
 * unsigned, m = -8 d). */
TARGET_AVX2 static ALWAYS_INLINE void accumulate_raw_block(isum_u8s8_fn isum, int64_t w_type, const uint8_t *blk,
                                                           const int8_t *xq, float xd, float xs,
                                                           __m256 *acc, float *min_acc) {
    const float d = _cvtsh_ss(load_u16(blk));
    __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    __m256i u;
    if (w_type == LME_TYPE_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        u = _mm256_sign_epi8(w, w);
        x = _mm256_sign_epi8(x, w);
    } else if (w_type == LME_TYPE_Q4_0) {
        u = nibbles_256(blk + 2);
        *min_acc += -8.0f * d * xs;
    } else {
        u = nibbles_256(blk + 4);
        *min_acc += _cvtsh_ss(load_u16(blk + 2)) * xs;
    }
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xd), _mm256_cvtepi32_ps(isum(u, x)), *acc);
}

TARGET_AVX2 static ALWAYS_INLINE float row_dot_q8_raw_256(isum_u8s8_fn isum, int64_t w_type, const uint8_t *row,
                                                          int64_t n_blocks, const int8_t *xq,
                                                          const float *xd, const float *xs) {
    const int64_t bytes = block_bytes(w_type);
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    float min_even = 0.0f, min_odd = 0.0f;
    int64_t b = 0;
    for (; b + 2 <= n_blocks; b += 2) {
        accumulate_raw_block(isum, w_type, row + b * bytes, xq + b * QK, xd[b], xs[b], &even, &min_even);
        accumulate_raw_block(isum, w_type, row + (b + 1) * bytes, xq + (b + 1) * QK, xd[b + 1], xs[b + 1],
                             &odd, &min_odd);
    }
    if (b < n_blocks)
        accumulate_raw_block(isum, w_type, row + b * bytes, xq + b * QK, xd[b], xs[b], &even, &min_even);
    return hsum_avx2(_mm256_add_ps(even, odd)) + (min_even + min_odd);
}

/* ---- 4c. AVX2 primitives (AVX2 + FMA + F16C) ------------------------------------------------- */

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

TARGET_AVX2 static void row_dot_q8_avx2(const struct row_q8 *r, float *result) {
    if (r->w_unsigned) {
        switch (r->n_tok) {
        case 4: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 4, 1, result); return;
        case 3: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 3, 1, result); return;
        case 2: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 2, 1, result); return;
        default: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 1, 1, result); return;
        }
    }
    switch (r->n_tok) {
    case 4: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 4, 0, result); return;
    case 3: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 3, 0, result); return;
    case 2: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 2, 0, result); return;
    default: row_dot_q8_256(isum_avx2, dot_f32_avx2, r, 1, 0, result); return;
    }
}

TARGET_AVX2 static float row_dot_q8_raw_avx2(int64_t w_type, const uint8_t *row, int64_t n_blocks,
                                             const int8_t *xq, const float *xd, const float *xs) {
    switch (w_type) {
    case LME_TYPE_Q8_0: return row_dot_q8_raw_256(isum_avx2, LME_TYPE_Q8_0, row, n_blocks, xq, xd, xs);
    case LME_TYPE_Q4_0: return row_dot_q8_raw_256(isum_avx2, LME_TYPE_Q4_0, row, n_blocks, xq, xd, xs);
    default: return row_dot_q8_raw_256(isum_avx2, LME_TYPE_Q4_1, row, n_blocks, xq, xd, xs);
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

static const struct kit KIT_AVX2 = {row_dot_q8_avx2, row_dot_q8_raw_avx2, dot_f32_avx2, decode_f16_avx2,
                                    unpack_nibbles_avx2, half_f16c};
TARGET_AVX2 static void tile_q8_avx2(const struct q8_args *a) { tile_q8(&KIT_AVX2, a); }
TARGET_AVX2 static void tile_f32_avx2(const struct f32_args *a) { tile_f32(&KIT_AVX2, a); }

/* ---- 4d. AVX-512 primitives (F/BW/VL + VNNI) ------------------------------------------------- */
/* The integer blocks use 256-bit vpdpbusd (one 32-value block per instruction, one scale per
 * block); the float dots use 512-bit vectors. */
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

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

TARGET_AVX512 static void row_dot_q8_avx512(const struct row_q8 *r, float *result) {
    if (r->w_unsigned) {
        switch (r->n_tok) {
        case 4: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 4, 1, result); return;
        case 3: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 3, 1, result); return;
        case 2: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 2, 1, result); return;
        default: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 1, 1, result); return;
        }
    }
    switch (r->n_tok) {
    case 4: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 4, 0, result); return;
    case 3: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 3, 0, result); return;
    case 2: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 2, 0, result); return;
    default: row_dot_q8_256(isum_vnni, dot_f32_avx512, r, 1, 0, result); return;
    }
}

TARGET_AVX512 static float row_dot_q8_raw_avx512(int64_t w_type, const uint8_t *row, int64_t n_blocks,
                                                 const int8_t *xq, const float *xd, const float *xs) {
    switch (w_type) {
    case LME_TYPE_Q8_0: return row_dot_q8_raw_256(isum_vnni, LME_TYPE_Q8_0, row, n_blocks, xq, xd, xs);
    case LME_TYPE_Q4_0: return row_dot_q8_raw_256(isum_vnni, LME_TYPE_Q4_0, row, n_blocks, xq, xd, xs);
    default: return row_dot_q8_raw_256(isum_vnni, LME_TYPE_Q4_1, row, n_blocks, xq, xd, xs);
    }
}

TARGET_AVX512 static void decode_f16_avx512(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * i))));
    for (; i < n; i++)
        dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
}

static const struct kit KIT_AVX512 = {row_dot_q8_avx512, row_dot_q8_raw_avx512, dot_f32_avx512, decode_f16_avx512,
                                      unpack_nibbles_avx2, half_f16c};
TARGET_AVX512 static void tile_q8_avx512(const struct q8_args *a) { tile_q8(&KIT_AVX512, a); }
TARGET_AVX512 static void tile_f32_avx512(const struct f32_args *a) { tile_f32(&KIT_AVX512, a); }
#endif /* LME_X86 */

/* ---- 5. ISA selection ------------------------------------------------------------------------ */

static int cpu_has_isa(int isa) {
    if (isa == LME_ISA_SCALAR)
        return 1;
#if LME_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                     && __builtin_cpu_supports("f16c");
    if (isa == LME_ISA_AVX2)
        return avx2;
    if (isa == LME_ISA_AVX512)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

int lme_native_available(void) { return 1; }

int lme_best_isa(void) {
    if (cpu_has_isa(LME_ISA_AVX512)) return LME_ISA_AVX512;
    if (cpu_has_isa(LME_ISA_AVX2)) return LME_ISA_AVX2;
    return LME_ISA_SCALAR;
}

/* The path in use: the best one, chosen when the library is loaded (before any kernel runs, so
 * threads never race on it); lme_set_isa changes it. */
static int selected_isa = LME_ISA_SCALAR;

#if defined(__GNUC__) || defined(__clang__)
__attribute__((constructor)) static void select_best_isa(void) { selected_isa = lme_best_isa(); }
#endif

int lme_get_isa(void) { return selected_isa; }

int lme_set_isa(int isa) {
    if (isa == -1) {
        selected_isa = lme_best_isa();
        return LME_OK;
    }
    if (isa < LME_ISA_SCALAR || isa > LME_ISA_AVX512 || !cpu_has_isa(isa))
        return LME_ERR_ISA;
    selected_isa = isa;
    return LME_OK;
}

/* ---- argument checks and entry points -------------------------------------------------------- */

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
