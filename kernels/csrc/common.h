/* Pieces shared by the C kernels (internal, not part of the API in lmengine.h): platform and
 * target macros, the block formats of the 32-value types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL)
 * and IQ4's codebook, exact f16 <-> f32 conversion, the
 * CPU check of cpu.c, and the vector exponential of the AVX-512 kernels. */
#ifndef LME_COMMON_H
#define LME_COMMON_H

#include "lmengine.h"

#include <stddef.h>
#include <math.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LME_X86 1
#include <immintrin.h>
#else
#define LME_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define NEVER_INLINE __attribute__((noinline))
#define ALIGN64 __attribute__((aligned(64)))
#else
#define ALWAYS_INLINE inline
#define NEVER_INLINE
#define ALIGN64
#endif

/* Functions for one SIMD path carry its target attribute (the build has no -march): they are
 * compiled for that instruction set and only called when lme_get_isa() selects it. */
#if LME_X86
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

/* Loops to unroll fully (a SIMD kernel's constant trip counts), and an empty asm statement that
 * pins a vector accumulator in a register at that point: without it GCC reassociates a chain of
 * integer adds (acc += p_k) into a tree over all the products, keeping each product live and
 * spilling them to the stack (packed.c: a third of the instructions were stack moves). */
#if defined(__clang__)
#define LME_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define LME_UNROLL _Pragma("GCC unroll 16")
#else
#define LME_UNROLL
#endif
#if defined(__GNUC__) || defined(__clang__)
#define LME_KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define LME_KEEP_IN_REGISTER(v) ((void)0)
#endif

/* Whether this CPU (and build) can run the SIMD path `isa` (LME_ISA_*); cpu.c. */
int lme_cpu_has_isa(int isa);

/* ---- block formats (ggml's, little-endian, no alignment: a block may start at any byte) ------- */

#define QK 32                                  /* values per block of the 32-value types */

struct block_q8_0 {                            /* value i = d * qs[i] */
    uint8_t d[2];                              /* f16 scale */
    int8_t qs[QK];
};

struct block_q4_0 {                            /* value j = d * (nibble - 8) */
    uint8_t d[2];                              /* f16 scale */
    uint8_t qs[QK / 2];                        /* byte j: value j low nibble, value j + 16 high */
};

struct block_q4_1 {                            /* value j = d * nibble + m */
    uint8_t d[2];                              /* f16 scale */
    uint8_t m[2];                              /* f16 minimum */
    uint8_t qs[QK / 2];                        /* as Q4_0 */
};

struct block_q5_0 {                            /* value j = d * (q_j - 16), q_j 5 bits */
    uint8_t d[2];                              /* f16 scale */
    uint8_t qh[4];                             /* u32 little-endian: bit j is bit 4 of q_j */
    uint8_t qs[QK / 2];                        /* low 4 bits of q_j: as Q4_0's nibbles */
};

struct block_q5_1 {                            /* value j = d * q_j + m */
    uint8_t d[2];                              /* f16 scale */
    uint8_t m[2];                              /* f16 minimum */
    uint8_t qh[4];                             /* as Q5_0 */
    uint8_t qs[QK / 2];
};

struct block_iq4_nl {                          /* value j = d * KVALUES_IQ4NL[nibble j] */
    uint8_t d[2];                              /* f16 scale */
    uint8_t qs[QK / 2];                        /* nibbles as Q4_0's */
};

/* the non-linear 4-bit codebook of IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl) */
static const int8_t KVALUES_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                         1, 13, 25, 38, 53, 69, 89, 113};

_Static_assert(sizeof(struct block_q8_0) == 34 && offsetof(struct block_q8_0, qs) == 2, "Q8_0 block");
_Static_assert(sizeof(struct block_q4_0) == 18 && offsetof(struct block_q4_0, qs) == 2, "Q4_0 block");
_Static_assert(sizeof(struct block_q4_1) == 20 && offsetof(struct block_q4_1, m) == 2
               && offsetof(struct block_q4_1, qs) == 4, "Q4_1 block");
_Static_assert(sizeof(struct block_q5_0) == 22 && offsetof(struct block_q5_0, qs) == 6, "Q5_0 block");
_Static_assert(sizeof(struct block_q5_1) == 24 && offsetof(struct block_q5_1, qh) == 4
               && offsetof(struct block_q5_1, qs) == 8, "Q5_1 block");
_Static_assert(sizeof(struct block_iq4_nl) == 18 && offsetof(struct block_iq4_nl, qs) == 2, "IQ4_NL block");

/* bytes per superblock of 256 values (LME_QK_K) of the K types and IQ4_XS; 0: not such a type */
static inline int64_t kblock_bytes(int64_t w_type) {      /* bytes per superblock; 0: not a K type */
    switch (w_type) {
    case LME_TYPE_Q2_K: return 84;
    case LME_TYPE_Q3_K: return 110;
    case LME_TYPE_Q4_K: return 144;
    case LME_TYPE_Q5_K: return 176;
    case LME_TYPE_Q6_K: return 210;
    case LME_TYPE_IQ4_XS: return 136;
    default: return 0;
    }
}

static inline int64_t block_size(int64_t w_type) {      /* values per block; 0: unsupported type */
    switch (w_type) {
    case LME_TYPE_F32: case LME_TYPE_F16: case LME_TYPE_BF16: return 1;
    case LME_TYPE_Q8_0: case LME_TYPE_Q4_0: case LME_TYPE_Q4_1: return QK;
    default: return 0;
    }
}

static inline int64_t block_bytes(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_F32: return 4;
    case LME_TYPE_F16: case LME_TYPE_BF16: return 2;
    case LME_TYPE_Q8_0: return sizeof(struct block_q8_0);
    case LME_TYPE_Q4_0: return sizeof(struct block_q4_0);
    case LME_TYPE_Q4_1: return sizeof(struct block_q4_1);
    default: return 0;
    }
}

/* ---- scalar conversions ----------------------------------------------------------------------- */

static ALWAYS_INLINE uint16_t load_u16(const uint8_t *p) {   /* little-endian, any alignment */
    return (uint16_t)(p[0] | (p[1] << 8));
}

static ALWAYS_INLINE uint32_t load_u32(const uint8_t *p) {   /* little-endian, any alignment */
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static ALWAYS_INLINE float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static ALWAYS_INLINE uint32_t f32_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
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

/* f32 -> f16 bits, rounded to nearest, ties to even, in integer arithmetic (the same bits as
 * F16C's vcvtps2ph and kernels/quant.py's float_to_half_bits): overflow gives inf, NaN a quiet
 * NaN keeping the sign and the top 9 payload bits. */
static ALWAYS_INLINE uint16_t fp32_to_fp16(float f) {
    const uint32_t bits = f32_bits(f);
    const uint32_t sign = (bits >> 16) & 0x8000;
    const uint32_t ax = bits & 0x7FFFFFFF;                  /* |f| */
    if (ax >= 0x7F800000)                                   /* inf, NaN */
        return (uint16_t)(ax == 0x7F800000 ? sign | 0x7C00 : sign | 0x7E00 | ((ax >> 13) & 0x3FF));
    if (ax >= 0x477FF000)                                   /* >= 65520: rounds past 65504 */
        return (uint16_t)(sign | 0x7C00);
    uint32_t h, rest, halfway;
    if (ax >= 0x38800000) {                                 /* >= 2^-14: a normal f16 */
        const uint32_t rebiased = ax - ((127 - 15) << 23);  /* exponent bias 127 -> 15 */
        h = rebiased >> 13;
        rest = rebiased & 0x1FFF;
        halfway = 0x1000;
    } else {
        const uint32_t exponent = ax >> 23;
        if (exponent < 102)                                 /* < 2^-25: rounds to zero */
            return (uint16_t)sign;
        /* f16 subnormal: |f| / 2^-24 = significand >> (126 - exponent) */
        const uint32_t significand = (ax & 0x7FFFFF) | 0x800000, shift = 126 - exponent;  /* 14..24 */
        h = significand >> shift;
        rest = significand & ((1u << shift) - 1);
        halfway = 1u << (shift - 1);
    }
    if (rest > halfway || (rest == halfway && (h & 1)))
        h += 1;                                             /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

/* s[j] = exp(s[j] - max s) for j < n, in place (expf, the sum in order); returns the sum of the
 * new s. A softmax before its division: the portable paths of lme_softmax_rows and attention
 * (exp_shifted_avx2 below is the AVX2 form). */
static inline float exp_shifted(float *s, int64_t n) {
    float best = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < n; j++)
        best = s[j] > best ? s[j] : best;
    for (int64_t j = 0; j < n; j++) {
        s[j] = expf(s[j] - best);
        total += s[j];
    }
    return total;
}

#if LME_X86
/* exp(x) of 8 floats, exp512's polynomial and clamp (below) with AVX2 + FMA: 2^n is built from
 * the exponent bits, as AVX2 has no scalef (n is in [-126, 127] after the clamp: a normal float). */
TARGET_AVX2 static ALWAYS_INLINE __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));                        /* p * 2^n */
}

/* s[j] = exp(s[j] - max s) for j < n, in place (n >= 1); returns the sum of the new s, added in
 * 8 lanes and then the tail. A softmax before its division: ops.c's lme_softmax_rows and the
 * AVX2 attention kernel. -inf entries give exp256's ~1e-38; NaN propagates. */
TARGET_AVX2 static ALWAYS_INLINE float exp_shifted_avx2(float *s, int64_t n) {
    const int64_t whole = n & ~(int64_t)7;                    /* the 8-lane part; the tail after it */
    __m256 best8 = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < whole; j += 8)
        best8 = _mm256_max_ps(best8, _mm256_loadu_ps(s + j));
    __m128 best4 = _mm_max_ps(_mm256_castps256_ps128(best8), _mm256_extractf128_ps(best8, 1));
    best4 = _mm_max_ps(best4, _mm_movehl_ps(best4, best4));
    float best = _mm_cvtss_f32(_mm_max_ss(best4, _mm_movehdup_ps(best4)));
    for (int64_t j = whole; j < n; j++)
        best = s[j] > best ? s[j] : best;
    const __m256 best_v = _mm256_set1_ps(best);
    __m256 total8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < whole; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), best_v));
        _mm256_storeu_ps(s + j, e);
        total8 = _mm256_add_ps(total8, e);
    }
    __m128 total4 = _mm_add_ps(_mm256_castps256_ps128(total8), _mm256_extractf128_ps(total8, 1));
    total4 = _mm_add_ps(total4, _mm_movehl_ps(total4, total4));
    float total = _mm_cvtss_f32(_mm_add_ss(total4, _mm_movehdup_ps(total4)));
    if (whole < n) {                                          /* the tail through one vector */
        float tail[8];
        for (int64_t j = 0; j < 8; j++)
            tail[j] = whole + j < n ? s[whole + j] - best : -INFINITY;
        _mm256_storeu_ps(tail, exp256(_mm256_loadu_ps(tail)));
        for (int64_t j = whole; j < n; j++) {
            s[j] = tail[j - whole];
            total += s[j];
        }
    }
    return total;
}

/* exp(x) of 16 floats (Cephes' expf polynomial: relative error ~2e-7); x is clamped to
 * [-87, 88], so huge negative arguments give ~1e-38 and huge positive ones ~1.6e38, never inf. */
TARGET_AVX512 static ALWAYS_INLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);          /* x - n ln2, in */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);               /* two parts */
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);                                             /* p * 2^n */
}
#endif

#endif
