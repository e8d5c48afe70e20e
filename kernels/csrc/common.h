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

#endif
