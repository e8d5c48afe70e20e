/* kquants: fused products of K-quant weight blocks with Q8_K activations (see lmengine.h).
 *
 * Structure (read top to bottom):
 *   1. the superblock layouts, and the scales of one superblock (portable C, shared by all paths)
 *   2. Q8_K quantization of activations: scalar, AVX2 (same bits)
 *   3. the scalar kernel: a superblock -> integer form (q[256], one scale per 16 values, mins),
 *      dotted with each token of a group
 *   4. the AVX2 kernel: per type a loader of 32-value groups as unsigned bytes (IQ4_XS: signed,
 *      through the sign trick) and their int16 scales; one token loop shared by all types; the
 *      lane sums of two superblocks reduced together, and their float part as 4-lane products
 *   5. the tile loop (row tiles x token groups), argument checks, entry points.
 *
 * Arithmetic (lmengine.h): the integer sums isum, imin of a superblock are exact, so every path
 * may form them its own way (the scalar path from signed q, the AVX2 path from unsigned q with
 * the offset through xsum). The float part is the same IEEE operations in the same order on
 * every path (add_superblock: per superblock and token, the products (d xd) float(isum) and
 * (dmin xd) float(imin), added to then subtracted from the accumulator; finish_avx2 forms the
 * products of two superblocks in one 4-lane multiply, the same roundings), so the paths agree
 * bit for bit. Each token has its own accumulator: a (row, token) result does not depend on the
 * batch. Built with -ffp-contract=off: no fused multiply-add in the float part.
 *
 * Speed (AVX2): per 32 values and token one maddubs (u8 x s8 -> int16 pairs), one madd with the
 * sub-block scales (-> int32) and one add; the scales are unpacked once per superblock by
 * scalar code (free ALU slots), the weights once per superblock for up to TOKEN_GROUP_AVX2 tokens.
 */
#include "common.h"

#include <math.h>

/* ---- 1. superblock layouts ----------------------------------------------------------------- */
/* Byte offsets inside one superblock of 256 values (all f16 little-endian; "group g" below is
 * values 32 g .. 32 g + 31, "sub-block s" values 16 s .. 16 s + 15):
 *
 *   Q4_K  144: [0] d | [2] dmin | [4:16] scales: 8 x (6-bit sc, 6-bit mn), one per group |
 *              [16:144] qs: group g = nibble (g % 2) of qs[32 (g / 2) + l], l < 32
 *   Q5_K  176: as Q4_K, then [16:48] qh: bit g of qh[l] is bit 4 of group g's value l |
 *              [48:176] qs as Q4_K's
 *   Q6_K  210: [0:128] ql | [128:192] qh | [192:208] int8 scales, one per sub-block | [208] d;
 *              group g (n = g / 4, k = g % 4): low 4 bits = nibble (k / 2) of
 *              ql[64 n + 32 (k % 2) + l], high 2 bits = bits 2k, 2k+1 of qh[32 n + l]; q - 32
 *   Q3_K  110: [0:32] hmask | [32:96] qs | [96:108] scales: 16 x 6 bit | [108] d;
 *              group g (n = g / 4, j = g % 4): low 2 bits = bits 2j, 2j+1 of qs[32 n + l],
 *              bit 2 = bit g of hmask[l]; q - 4; scale - 32
 *   Q2_K   84: [0:16] scales: low nibble sc, high nibble mn, one byte per sub-block |
 *              [16:80] qs: group g = bits 2j, 2j+1 of qs[32 n + l] | [80] d | [82] dmin
 *   IQ4_XS 136: [0] d | [2] scales_h u16 | [4:8] scales_l | [8:136] qs: group g value l =
 *              kvalues[nibble (l / 16) of qs[16 g + l % 16]]; scale of group g: low 4 bits
 *              nibble (g % 2) of scales_l[g / 2], high 2 bits bits 2g, 2g+1 of scales_h; - 32
 */
#define QK_K LME_QK_K                          /* values per superblock */
#define N_SUB (QK_K / 16)                      /* sub-blocks of 16 values (one xsum each) */
#define N_GROUP (QK_K / 32)                    /* groups of 32 values (one 256-bit vector each) */
#define TOKEN_GROUP_MAX 8                      /* tokens sharing each load of a superblock */
#define TILE_BYTES (48 * 1024)                 /* weight bytes per row tile (stays in L2 while
                                                * every token group passes over it) */

/* KVALUES_IQ4NL, the 4-bit codebook of IQ4_XS, and kblock_bytes: common.h */

static ALWAYS_INLINE int has_mins(int64_t w_type) {          /* w = d sc q - dmin mn */
    return w_type == LME_TYPE_Q2_K || w_type == LME_TYPE_Q4_K || w_type == LME_TYPE_Q5_K;
}

static ALWAYS_INLINE int scale_per_32(int64_t w_type) {      /* one scale per group, else per sub-block */
    return w_type == LME_TYPE_Q4_K || w_type == LME_TYPE_Q5_K || w_type == LME_TYPE_IQ4_XS;
}

static ALWAYS_INLINE int scale_bias(int64_t w_type) {        /* stored scale = scale + bias */
    return w_type == LME_TYPE_Q3_K || w_type == LME_TYPE_IQ4_XS ? 32 : 0;
}

static ALWAYS_INLINE int64_t d_offset(int64_t w_type) {      /* byte offset of the f16 d */
    switch (w_type) {
    case LME_TYPE_Q2_K: return 80;
    case LME_TYPE_Q3_K: return 108;
    case LME_TYPE_Q6_K: return 208;
    default: return 0;                                       /* Q4_K, Q5_K, IQ4_XS */
    }
}

static ALWAYS_INLINE int64_t dmin_offset(int64_t w_type) {   /* the f16 dmin (types with mins) */
    return w_type == LME_TYPE_Q2_K ? 82 : 2;
}

static ALWAYS_INLINE uint64_t load_u64(const uint8_t *p) {
    return (uint64_t)load_u32(p) | ((uint64_t)load_u32(p + 4) << 32);
}

/* The scales of one superblock as stored bytes: byte k of sc[k / 8] (at bit 8 (k % 8)) is the
 * scale of group k (scale_per_32 types, k < 8) or of sub-block k (k < 16), to be read as int8
 * minus scale_bias; mn likewise the unsigned mins (has_mins types). */
struct kscales {
    uint64_t sc[2], mn[2];
};

static ALWAYS_INLINE void decode_scales(int64_t w_type, const uint8_t *blk, struct kscales *s) {
    s->sc[1] = s->mn[0] = s->mn[1] = 0;
    switch (w_type) {
    case LME_TYPE_Q4_K: case LME_TYPE_Q5_K: {
        /* 12 bytes a0 | a1 | a2 (4 each): groups 0-3 sc = low 6 bits of a0, mn = low 6 bits of a1;
         * groups 4-7 sc = low nibble of a2 | top 2 bits of a0 (as bits 4-5),
         *            mn = high nibble of a2 | top 2 bits of a1 */
        const uint32_t a0 = load_u32(blk + 4), a1 = load_u32(blk + 8), a2 = load_u32(blk + 12);
        const uint32_t sc_hi = (a2 & 0x0F0F0F0Fu) | ((a0 >> 2) & 0x30303030u);
        const uint32_t mn_hi = ((a2 >> 4) & 0x0F0F0F0Fu) | ((a1 >> 2) & 0x30303030u);
        s->sc[0] = (a0 & 0x3F3F3F3Fu) | ((uint64_t)sc_hi << 32);
        s->mn[0] = (a1 & 0x3F3F3F3Fu) | ((uint64_t)mn_hi << 32);
        return;
    }
    case LME_TYPE_Q6_K:
        s->sc[0] = load_u64(blk + 192);
        s->sc[1] = load_u64(blk + 200);
        return;
    case LME_TYPE_Q3_K: {
        /* low 4 bits: sub-blocks 0-7 the low nibbles of a0 | a1, 8-15 their high nibbles;
         * bits 4-5: sub-block s from bits 2 (s / 4), 2 (s / 4) + 1 of byte s % 4 of a2 */
        const uint32_t a0 = load_u32(blk + 96), a1 = load_u32(blk + 100), a2 = load_u32(blk + 104);
        const uint32_t s0 = (a0 & 0x0F0F0F0Fu) | ((a2 << 4) & 0x30303030u);
        const uint32_t s1 = (a1 & 0x0F0F0F0Fu) | ((a2 << 2) & 0x30303030u);
        const uint32_t s2 = ((a0 >> 4) & 0x0F0F0F0Fu) | (a2 & 0x30303030u);
        const uint32_t s3 = ((a1 >> 4) & 0x0F0F0F0Fu) | ((a2 >> 2) & 0x30303030u);
        s->sc[0] = s0 | ((uint64_t)s1 << 32);
        s->sc[1] = s2 | ((uint64_t)s3 << 32);
        return;
    }
    case LME_TYPE_Q2_K:
        for (int k = 0; k < 2; k++) {
            const uint64_t v = load_u64(blk + 8 * k);
            s->sc[k] = v & 0x0F0F0F0F0F0F0F0Full;
            s->mn[k] = (v >> 4) & 0x0F0F0F0F0F0F0F0Full;
        }
        return;
    default: {                                               /* IQ4_XS */
        /* low 4 bits of group g: nibble g % 2 of scales_l byte g / 2 -- spread the 8 nibbles
         * of the u32 to 8 bytes; bits 4-5: bits 2g, 2g + 1 of scales_h -- spread the 8 2-bit
         * fields of the u16 to 8 bytes */
        uint64_t low = load_u32(blk + 4);
        low = (low | (low << 16)) & 0x0000FFFF0000FFFFull;
        low = (low | (low << 8)) & 0x00FF00FF00FF00FFull;
        low = (low | (low << 4)) & 0x0F0F0F0F0F0F0F0Full;
        uint64_t high = load_u16(blk + 2);
        high = (high & 0xFF) | ((high & 0xFF00) << 24);
        high = (high | (high << 12)) & 0x000F000F000F000Full;
        high = (high | (high << 6)) & 0x0303030303030303ull;
        s->sc[0] = low | (high << 4);
        return;
    }
    }
}

static ALWAYS_INLINE int scale_byte(const uint64_t v[2], int k) {
    return (int)((v[k / 8] >> (8 * (k % 8))) & 0xFF);
}

/* The float part of one superblock for one token (every path): acc + (d xd) isum - (dmin xd) imin */
static ALWAYS_INLINE float add_superblock(int mins, float acc, float d, float dmin, float xd,
                                          int64_t isum, int64_t imin) {
    acc = acc + (d * xd) * (float)isum;
    if (mins)
        acc = acc - (dmin * xd) * (float)imin;
    return acc;
}

struct k_args {
    int64_t w_type; const uint8_t *w; int64_t n_rows, n_cols, row_begin, row_end;
    const int8_t *xq; const float *xd; const int16_t *xsum; int64_t n_tok; float *out;
};

/* ---- 2. Q8_K quantization of activations ---------------------------------------------------- */

/* xq value of x * inv_d: rounded to nearest even, NaN -> 0, clamped to [-127, 127] (only a
 * non-finite x can leave [-127.5, 127.5]) */
static ALWAYS_INLINE int8_t q8k_value(float v) {
    v = rintf(v);
    if (v != v)
        v = 0.0f;
    v = v < -127.0f ? -127.0f : v;
    v = v > 127.0f ? 127.0f : v;
    return (int8_t)v;
}

static ALWAYS_INLINE float q8k_scale(float amax, float *inv_d) {   /* d, and 1 / d (0 if d is 0) */
    const float d = amax / 127.0f;
    *inv_d = d > 0.0f ? 1.0f / d : 0.0f;
    return d;
}

static ALWAYS_INLINE void q8k_sums(const int8_t *q, int16_t *sums) {     /* 256 values -> 16 sums */
    for (int j = 0; j < N_SUB; j++) {
        int s = 0;
        for (int i = 0; i < 16; i++)
            s += q[16 * j + i];
        sums[j] = (int16_t)s;
    }
}

static void quantize_block_scalar(const float *x, int8_t *q, float *d, int16_t *sums) {
    float amax = 0.0f;
    for (int i = 0; i < QK_K; i++) {
        const float a = fabsf(x[i]);
        if (a > amax)                                   /* a NaN is skipped */
            amax = a;
    }
    float inv_d;
    *d = q8k_scale(amax, &inv_d);
    for (int i = 0; i < QK_K; i++)
        q[i] = q8k_value(x[i] * inv_d);
    q8k_sums(q, sums);
}

#if LME_X86
#ifndef TARGET_AVX2
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

/* as quantize_block_scalar: max is exact in any order, the rest is per value */
TARGET_AVX2 static void quantize_block_avx2(const float *x, int8_t *q, float *d, int16_t *sums) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < QK_K; i += 8)      /* max_ps(a, m) returns m when a is NaN: NaN skipped */
        vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), vmax);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float inv_d;
    *d = q8k_scale(_mm_cvtss_f32(m), &inv_d);
    const __m256 scale = _mm256_set1_ps(inv_d);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < QK_K; i += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), scale),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));          /* NaN -> 0 */
            v[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        /* packs work per 128-bit lane: the permute puts the 32 bytes back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    q8k_sums(q, sums);
}
#endif

/* ---- 3. scalar kernel ------------------------------------------------------------------------ */

/* One superblock in integer form: weight of value i = d * sc[i / 16] * q[i] - dmin * mn[i / 16] */
struct kblock {
    int8_t q[QK_K];
    int32_t sc[N_SUB], mn[N_SUB];
    float d, dmin;
};

/* the 256 weight integers q of a superblock (layouts in section 1), group g = q[32 g .. 32 g + 31] */
static void decode_quants(int64_t w_type, const uint8_t *blk, int8_t *q) {
    switch (w_type) {
    case LME_TYPE_Q4_K: case LME_TYPE_Q5_K: {
        const uint8_t *qs = blk + (w_type == LME_TYPE_Q4_K ? 16 : 48), *qh = blk + 16;
        for (int g = 0; g < N_GROUP; g++)
            for (int l = 0; l < 32; l++) {
                int v = (qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0x0F;
                if (w_type == LME_TYPE_Q5_K)
                    v |= ((qh[l] >> g) & 1) << 4;
                q[32 * g + l] = (int8_t)v;
            }
        return;
    }
    case LME_TYPE_Q6_K:
        for (int g = 0; g < N_GROUP; g++) {
            const int n = g / 4, j = g % 4;
            for (int l = 0; l < 32; l++)
                q[32 * g + l] = (int8_t)((((blk[64 * n + 32 * (j % 2) + l] >> (4 * (j / 2))) & 0x0F)
                                          | (((blk[128 + 32 * n + l] >> (2 * j)) & 3) << 4)) - 32);
        }
        return;
    case LME_TYPE_Q3_K:
        for (int g = 0; g < N_GROUP; g++) {
            const int n = g / 4, j = g % 4;
            for (int l = 0; l < 32; l++)
                q[32 * g + l] = (int8_t)((((blk[32 + 32 * n + l] >> (2 * j)) & 3) | (((blk[l] >> g) & 1) << 2)) - 4);
        }
        return;
    case LME_TYPE_Q2_K:
        for (int g = 0; g < N_GROUP; g++) {
            const int n = g / 4, j = g % 4;
            for (int l = 0; l < 32; l++)
                q[32 * g + l] = (int8_t)((blk[16 + 32 * n + l] >> (2 * j)) & 3);
        }
        return;
    default:                                                 /* IQ4_XS */
        for (int g = 0; g < N_GROUP; g++)
            for (int l = 0; l < 16; l++) {
                const uint8_t byte = blk[8 + 16 * g + l];
                q[32 * g + l] = KVALUES_IQ4NL[byte & 0x0F];
                q[32 * g + 16 + l] = KVALUES_IQ4NL[byte >> 4];
            }
        return;
    }
}

static void decode_kblock(int64_t w_type, const uint8_t *blk, struct kblock *k) {
    struct kscales s;
    decode_scales(w_type, blk, &s);
    for (int i = 0; i < N_SUB; i++) {
        const int idx = scale_per_32(w_type) ? i / 2 : i;
        k->sc[i] = (int8_t)scale_byte(s.sc, idx) - scale_bias(w_type);
        k->mn[i] = scale_byte(s.mn, idx);
    }
    k->d = fp16_to_fp32(load_u16(blk + d_offset(w_type)));
    k->dmin = has_mins(w_type) ? fp16_to_fp32(load_u16(blk + dmin_offset(w_type))) : 0.0f;
    decode_quants(w_type, blk, k->q);
}

/* one token's integer sums with a decoded superblock: xq [256], xsum [16] of that superblock */
static ALWAYS_INLINE void kblock_sums(const struct kblock *k, const int8_t *xq, const int16_t *xsum,
                                      int64_t *isum, int64_t *imin) {
    int64_t s = 0, m = 0;
    for (int sub = 0; sub < N_SUB; sub++) {
        int32_t dot = 0;
        for (int i = 0; i < 16; i++)
            dot += (int32_t)k->q[16 * sub + i] * (int32_t)xq[16 * sub + i];
        s += (int64_t)k->sc[sub] * dot;
        m += (int64_t)k->mn[sub] * xsum[sub];
    }
    *isum = s;
    *imin = m;
}

/* out for rows [r0, r1) and tokens t0 .. t0 + n_group - 1: each superblock decoded once */
static void rows_k_scalar(const struct k_args *a, int64_t t0, int n_group, int64_t r0, int64_t r1) {
    const int64_t bytes = kblock_bytes(a->w_type), nb = a->n_cols / QK_K;
    const int mins = has_mins(a->w_type);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w_row = a->w + row * nb * bytes;
        float acc[TOKEN_GROUP_MAX] = {0};
        for (int64_t b = 0; b < nb; b++) {
            struct kblock k;
            decode_kblock(a->w_type, w_row + b * bytes, &k);
            for (int t = 0; t < n_group; t++) {
                const int64_t tb = (t0 + t) * nb + b;            /* token t's superblock b */
                int64_t isum, imin;
                kblock_sums(&k, a->xq + tb * QK_K, a->xsum + tb * N_SUB, &isum, &imin);
                acc[t] = add_superblock(mins, acc[t], k.d, k.dmin, a->xd[tb], isum, imin);
            }
        }
        for (int t = 0; t < n_group; t++)
            a->out[(t0 + t) * a->n_rows + row] = acc[t];
    }
}

/* ---- 4. AVX2 kernel ------------------------------------------------------------------------- */
#if LME_X86
/* Per superblock and token: the 8 groups of 32 values, each with its weights w as 32 bytes and
 * its int16 x 16 scale vector (lanes 0-7 the scale of sub-block 2g, 8-15 of 2g + 1), shared by
 * the tokens of a group; per token
 *     lanes_t += madd(maddubs(u, x_t), scale)        (32 values -> 8 int32 lanes)
 * with u = w as unsigned bytes (Q6_K and Q3_K store q + 32 and q + 4: the offset is taken off
 * once per superblock through xsum), or for IQ4_XS (signed codebook values) u = |w| and x_t
 * with w's sign. maddubs' int16 pair sums stay below 2^15: u <= 127 and |x| <= 127.
 * The 8 lanes of isum and of imin are reduced by horizontal adds, two superblocks at a time,
 * to the four integers (isum, imin) of both; their float part is one 4-lane multiply by
 * (d xd, dmin xd) and the four scalar adds of add_superblock, in superblock order. */
#define TOKEN_GROUP_AVX2 4       /* tokens per pass over a superblock (their sums stay in registers) */

TARGET_AVX2 static ALWAYS_INLINE __m256i load_256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* per byte of v: bits [from, from + width) moved to [to, to + width), all other bits 0 (16-bit
 * shifts: the mask drops what crosses from the neighbouring byte) */
TARGET_AVX2 static ALWAYS_INLINE __m256i bits_256(__m256i v, int from, int width, int to) {
    const __m256i mask = _mm256_set1_epi8((char)(((1 << width) - 1) << to));
    if (to > from)
        v = _mm256_slli_epi16(v, to - from);
    else if (from > to)
        v = _mm256_srli_epi16(v, from - to);
    return _mm256_and_si256(v, mask);
}

/* group g of a superblock: 32 weights as bytes (unsigned; IQ4_XS: signed codebook values) */
TARGET_AVX2 static ALWAYS_INLINE __m256i group_weights_avx2(int64_t w_type, const uint8_t *blk, int g) {
    const int n = g / 4, j = g % 4;
    switch (w_type) {
    case LME_TYPE_Q4_K:
        return bits_256(load_256(blk + 16 + 32 * (g / 2)), 4 * (g % 2), 4, 0);
    case LME_TYPE_Q5_K:
        return _mm256_or_si256(bits_256(load_256(blk + 48 + 32 * (g / 2)), 4 * (g % 2), 4, 0),
                               bits_256(load_256(blk + 16), g, 1, 4));
    case LME_TYPE_Q6_K:
        return _mm256_or_si256(bits_256(load_256(blk + 64 * n + 32 * (j % 2)), 4 * (j / 2), 4, 0),
                               bits_256(load_256(blk + 128 + 32 * n), 2 * j, 2, 4));
    case LME_TYPE_Q3_K:
        return _mm256_or_si256(bits_256(load_256(blk + 32 + 32 * n), 2 * j, 2, 0), bits_256(load_256(blk), g, 1, 2));
    case LME_TYPE_Q2_K:
        return bits_256(load_256(blk + 16 + 32 * n), 2 * j, 2, 0);
    default: {                                               /* IQ4_XS: codebook lookup */
        const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 8 + 16 * g));
        const __m128i low4 = _mm_set1_epi8(0x0F);
        const __m256i index = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
        const __m256i book = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4NL));
        return _mm256_shuffle_epi8(book, index);
    }
    }
}

/* The scales of one superblock as int16, ready for group_scales_avx2 */
struct scales_avx2 {
    __m256i low, high;   /* per group (scale_per_32): both lanes the 8 group scales (high unused);
                          * per sub-block: both lanes sub-blocks 0-7 (low), 8-15 (high) */
    __m256i all;         /* int16 x 16: the scale of each sub-block (the xsum offset terms) */
};

TARGET_AVX2 static ALWAYS_INLINE void load_scales_avx2(int64_t w_type, const struct kscales *s, struct scales_avx2 *v) {
    __m128i bytes = _mm_set_epi64x((long long)s->sc[1], (long long)s->sc[0]);
    if (scale_bias(w_type))
        bytes = _mm_sub_epi8(bytes, _mm_set1_epi8((char)scale_bias(w_type)));
    if (scale_per_32(w_type)) {
        v->low = v->high = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(bytes));
        v->all = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(bytes, bytes));
    } else {
        v->all = _mm256_cvtepi8_epi16(bytes);
        v->low = _mm256_permute2x128_si256(v->all, v->all, 0x00);
        v->high = _mm256_permute2x128_si256(v->all, v->all, 0x11);
    }
}

/* int16 x 16 for group g: lanes 0-7 the scale of sub-block 2g, lanes 8-15 that of 2g + 1 */
TARGET_AVX2 static ALWAYS_INLINE __m256i group_scales_avx2(int64_t w_type, const struct scales_avx2 *v, int g) {
    if (scale_per_32(w_type))                                  /* int16 number g, everywhere */
        return _mm256_shuffle_epi8(v->low, _mm256_set1_epi16((short)(0x0100 + 0x0202 * g)));
    const int k = 2 * (g % 4);                                 /* int16 number k, then k + 1 */
    const __m256i pick = _mm256_set_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * (k + 1))),
                                          _mm_set1_epi16((short)(0x0100 + 0x0202 * k)));
    return _mm256_shuffle_epi8(g < 4 ? v->low : v->high, pick);
}

/* int16 x 16: the min of each sub-block (has_mins types) */
TARGET_AVX2 static ALWAYS_INLINE __m256i mins_avx2(int64_t w_type, const struct kscales *s) {
    if (scale_per_32(w_type)) {
        const __m128i m = _mm_cvtsi64_si128((long long)s->mn[0]);
        return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
    }
    return _mm256_cvtepu8_epi16(_mm_set_epi64x((long long)s->mn[1], (long long)s->mn[0]));
}

/* One superblock (blk) of a row with the same superblock of n_group tokens (token t's xq, xsum
 * at t * x_stride * {256, 16} from the given pointers): part[t] = the horizontal pair sums of
 * isum's and imin's lanes, hadd(isum lanes, imin lanes) (types without mins: isum's lanes
 * and zeros). w_type and n_group are constants after inlining. */
TARGET_AVX2 static ALWAYS_INLINE void superblock_avx2(int64_t w_type, int n_group, const uint8_t *blk,
                                                      const int8_t *xq, const int16_t *xsum, int64_t x_stride,
                                                      __m256i part[TOKEN_GROUP_AVX2]) {
    struct kscales s;
    decode_scales(w_type, blk, &s);
    struct scales_avx2 sv;
    load_scales_avx2(w_type, &s, &sv);

    __m256i isum[TOKEN_GROUP_AVX2];
    for (int t = 0; t < n_group; t++)
        isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = 0; g < N_GROUP; g++) {
        const __m256i w = group_weights_avx2(w_type, blk, g);
        const __m256i scale = group_scales_avx2(w_type, &sv, g);
        const __m256i u = w_type == LME_TYPE_IQ4_XS ? _mm256_sign_epi8(w, w) : w;
        for (int t = 0; t < n_group; t++) {
            __m256i x = load_256(xq + t * x_stride * QK_K + 32 * g);
            if (w_type == LME_TYPE_IQ4_XS)
                x = _mm256_sign_epi8(x, w);
            isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), scale));
        }
    }

    const __m256i mins = has_mins(w_type) ? mins_avx2(w_type, &s) : _mm256_setzero_si256();
    for (int t = 0; t < n_group; t++) {
        const __m256i sums = load_256(xsum + t * x_stride * N_SUB);
        if (w_type == LME_TYPE_Q6_K)        /* q = stored - 32: isum -= 32 * sum_s sc_s xsum_s */
            isum[t] = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(_mm256_madd_epi16(sums, sv.all), 5));
        if (w_type == LME_TYPE_Q3_K)        /* q = stored - 4 */
            isum[t] = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(_mm256_madd_epi16(sums, sv.all), 2));
        part[t] = _mm256_hadd_epi32(isum[t], has_mins(w_type) ? _mm256_madd_epi16(sums, mins) : _mm256_setzero_si256());
    }
}

/* The f16 d and dmin of superblock blk as lanes 0, 1 (dmin 0 for types without mins) */
TARGET_AVX2 static ALWAYS_INLINE __m128i halves_avx2(int64_t w_type, const uint8_t *blk) {
    if (has_mins(w_type))                                       /* dmin follows d */
        return _mm_cvtsi32_si128((int)load_u32(blk + d_offset(w_type)));
    return _mm_cvtsi32_si128((int)load_u16(blk + d_offset(w_type)));
}

/* Superblocks a and (if two) a + 1 for one token: from their parts, (isum, imin) of each, then
 * acc updated as add_superblock does, a first. blk: superblock a; xd: token's xd of a. */
TARGET_AVX2 static ALWAYS_INLINE float finish_avx2(int64_t w_type, int two, float acc, __m256i part_a, __m256i part_b,
                                                   const uint8_t *blk, const float *xd) {
    const int64_t bytes = kblock_bytes(w_type);
    const __m256i h = _mm256_hadd_epi32(part_a, part_b);
    const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    const __m128 v = _mm_cvtepi32_ps(sums);                     /* isum_a, imin_a, isum_b, imin_b */
    const __m128i halves = two ? _mm_unpacklo_epi32(halves_avx2(w_type, blk), halves_avx2(w_type, blk + bytes))
                               : halves_avx2(w_type, blk);
    uint64_t xd_bits = 0;                                       /* xd_a, xd_b (a's alone: 0) */
    memcpy(&xd_bits, xd, two ? 2 * sizeof(float) : sizeof(float));
    const __m128 x_scale = _mm_castsi128_ps(_mm_cvtsi64_si128((long long)xd_bits));
    const __m128 xd4 = _mm_unpacklo_ps(x_scale, x_scale);       /* xd_a, xd_a, xd_b, xd_b */
    const __m128 p = _mm_mul_ps(_mm_mul_ps(_mm_cvtph_ps(halves), xd4), v);  /* (d xd) isum, (dmin xd) imin, ... */
    acc = acc + _mm_cvtss_f32(p);
    if (has_mins(w_type))
        acc = acc - _mm_cvtss_f32(_mm_movehdup_ps(p));
    if (two) {
        const __m128 pb = _mm_movehl_ps(p, p);
        acc = acc + _mm_cvtss_f32(pb);
        if (has_mins(w_type))
            acc = acc - _mm_cvtss_f32(_mm_movehdup_ps(pb));
    }
    return acc;
}

/* rows [r0, r1) x tokens t0 .. t0 + n_group - 1, for constant w_type and n_group: superblocks in
 * pairs (the last one alone when nb is odd) */
TARGET_AVX2 static ALWAYS_INLINE void rows_k_typed_avx2(int64_t w_type, int n_group, const struct k_args *a,
                                                        int64_t t0, int64_t r0, int64_t r1) {
    const int64_t bytes = kblock_bytes(w_type), nb = a->n_cols / QK_K;
    const int8_t *xq = a->xq + t0 * a->n_cols;
    const int16_t *xsum = a->xsum + t0 * nb * N_SUB;
    const float *xd = a->xd + t0 * nb;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *w_row = a->w + row * nb * bytes;
        float acc[TOKEN_GROUP_AVX2] = {0};
        __m256i part_a[TOKEN_GROUP_AVX2], part_b[TOKEN_GROUP_AVX2];
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2) {
            superblock_avx2(w_type, n_group, w_row + b * bytes, xq + b * QK_K, xsum + b * N_SUB, nb, part_a);
            superblock_avx2(w_type, n_group, w_row + (b + 1) * bytes, xq + (b + 1) * QK_K, xsum + (b + 1) * N_SUB,
                            nb, part_b);
            for (int t = 0; t < n_group; t++)
                acc[t] = finish_avx2(w_type, 1, acc[t], part_a[t], part_b[t], w_row + b * bytes, xd + t * nb + b);
        }
        if (b < nb) {
            superblock_avx2(w_type, n_group, w_row + b * bytes, xq + b * QK_K, xsum + b * N_SUB, nb, part_a);
            for (int t = 0; t < n_group; t++)
                acc[t] = finish_avx2(w_type, 0, acc[t], part_a[t], _mm256_setzero_si256(), w_row + b * bytes,
                                     xd + t * nb + b);
        }
        for (int t = 0; t < n_group; t++)
            a->out[(t0 + t) * a->n_rows + row] = acc[t];
    }
}

TARGET_AVX2 static ALWAYS_INLINE void rows_k_group_avx2(int64_t w_type, const struct k_args *a, int64_t t0,
                                                        int n_group, int64_t r0, int64_t r1) {
    switch (n_group) {                        /* n_group as a constant (1 .. TOKEN_GROUP_AVX2) */
    case 4: rows_k_typed_avx2(w_type, 4, a, t0, r0, r1); return;
    case 3: rows_k_typed_avx2(w_type, 3, a, t0, r0, r1); return;
    case 2: rows_k_typed_avx2(w_type, 2, a, t0, r0, r1); return;
    default: rows_k_typed_avx2(w_type, 1, a, t0, r0, r1); return;
    }
}

TARGET_AVX2 static void rows_k_avx2(const struct k_args *a, int64_t t0, int n_group, int64_t r0, int64_t r1) {
    switch (a->w_type) {                      /* w_type as a constant */
    case LME_TYPE_Q2_K: rows_k_group_avx2(LME_TYPE_Q2_K, a, t0, n_group, r0, r1); return;
    case LME_TYPE_Q3_K: rows_k_group_avx2(LME_TYPE_Q3_K, a, t0, n_group, r0, r1); return;
    case LME_TYPE_Q4_K: rows_k_group_avx2(LME_TYPE_Q4_K, a, t0, n_group, r0, r1); return;
    case LME_TYPE_Q5_K: rows_k_group_avx2(LME_TYPE_Q5_K, a, t0, n_group, r0, r1); return;
    case LME_TYPE_Q6_K: rows_k_group_avx2(LME_TYPE_Q6_K, a, t0, n_group, r0, r1); return;
    default: rows_k_group_avx2(LME_TYPE_IQ4_XS, a, t0, n_group, r0, r1); return;
    }
}
#endif /* LME_X86 */

/* ---- 5. tile loop, checks, entry points ------------------------------------------------------ */

typedef void (*rows_k_fn)(const struct k_args *a, int64_t t0, int n_group, int64_t r0, int64_t r1);

/* Row tiles of about TILE_BYTES outermost, token groups inside: a tile is read from memory once,
 * then from cache by the following token groups. */
static void tile_k(rows_k_fn rows, int token_group, const struct k_args *a) {
    const int64_t row_bytes = a->n_cols / QK_K * kblock_bytes(a->w_type);
    const int64_t tile_rows = row_bytes >= TILE_BYTES ? 1 : TILE_BYTES / row_bytes;
    for (int64_t r0 = a->row_begin; r0 < a->row_end; r0 += tile_rows) {
        const int64_t r1 = a->row_end - r0 < tile_rows ? a->row_end : r0 + tile_rows;
        for (int64_t t0 = 0; t0 < a->n_tok; t0 += token_group) {
            const int64_t left = a->n_tok - t0;
            rows(a, t0, left < token_group ? (int)left : token_group, r0, r1);
        }
    }
}

int lme_quantize_q8k(const float *x, int64_t x_len, int64_t n_tok, int64_t n_cols,
                     int8_t *xq, int64_t xq_len, float *xd, int64_t xd_len,
                     int16_t *xsum, int64_t xsum_len) {
    if (n_tok < 0 || n_cols <= 0 || n_cols % QK_K != 0 || n_tok > INT64_MAX / n_cols)
        return LME_ERR_SHAPE;
    if (n_tok == 0)
        return LME_OK;
    if (x == NULL || xq == NULL || xd == NULL || xsum == NULL)
        return LME_ERR_NULL;
    const int64_t n = n_tok * n_cols;
    if (x_len < n || xq_len < n || xd_len < n / QK_K || xsum_len < n / 16)
        return LME_ERR_LENGTH;
    void (*block)(const float *, int8_t *, float *, int16_t *) = quantize_block_scalar;
#if LME_X86
    if (lme_get_isa() != LME_ISA_SCALAR)
        block = quantize_block_avx2;
#endif
    for (int64_t b = 0; b < n / QK_K; b++)
        block(x + b * QK_K, xq + b * QK_K, xd + b, xsum + b * N_SUB);
    return LME_OK;
}

int lme_matmul_k(int64_t w_type, const uint8_t *w, int64_t w_len,
                 int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                 const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                 const int16_t *xsum, int64_t xsum_len, int64_t n_tok,
                 float *out, int64_t out_len) {
    const int64_t bytes = kblock_bytes(w_type);
    if (bytes == 0)
        return LME_ERR_TYPE;
    if (n_rows < 0 || n_cols <= 0 || n_tok < 0 || n_cols % QK_K != 0)
        return LME_ERR_SHAPE;
    const int64_t row_bytes = n_cols / QK_K * bytes;
    if ((n_rows > 0 && (row_bytes > INT64_MAX / n_rows || n_tok > INT64_MAX / n_rows))
        || n_tok > INT64_MAX / n_cols)
        return LME_ERR_SHAPE;
    if (row_begin < 0 || row_end < row_begin || row_end > n_rows)
        return LME_ERR_RANGE;
    if (row_begin == row_end || n_tok == 0)
        return LME_OK;
    if (w == NULL || out == NULL || xq == NULL || xd == NULL || xsum == NULL)
        return LME_ERR_NULL;
    if (w_len < n_rows * row_bytes || out_len < n_tok * n_rows || xq_len < n_tok * n_cols
        || xd_len < n_tok * (n_cols / QK_K) || xsum_len < n_tok * (n_cols / 16))
        return LME_ERR_LENGTH;
    const struct k_args a = {w_type, w, n_rows, n_cols, row_begin, row_end, xq, xd, xsum, n_tok, out};
#if LME_X86
    if (lme_get_isa() != LME_ISA_SCALAR) {        /* AVX2, and AVX-512 CPUs (which have AVX2) */
        tile_k(rows_k_avx2, TOKEN_GROUP_AVX2, &a);
        return LME_OK;
    }
#endif
    tile_k(rows_k_scalar, TOKEN_GROUP_MAX, &a);
    return LME_OK;
}
