/* Pieces shared by the C kernels (qdot.c: row-major ggml blocks; packed.c: the 16-row packed
 * form): platform macros, the block formats of Q8_0 / Q4_0 / Q4_1, exact f16 -> f32. Internal. */
#ifndef LME_COMMON_H
#define LME_COMMON_H

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

#if LME_X86
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

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
