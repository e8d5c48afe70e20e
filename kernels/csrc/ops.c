/* ops: elementwise work of the forward pass that is worth SIMD (see qdot.h for the API; the Numba
 * loops of kernels/ops.py are the reference and the fallback).
 *
 * lme_swiglu: out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], with
 * common.h's vectorized exp (relative error ~2e-7, as expf).
 *
 * lme_quantize_row: one token's activations -> int8 blocks of 32 (kernels/matmul.py's
 * `_quantize_row`, bit for bit): d = max|x| / 127, q = round-half-even(x * (1 / d)) (0 when
 * d = 0), s = d * sum(q); with a second term (r_len > 0), the same of the residual
 * x - d * q. No fused multiply-adds (-ffp-contract=off), so the float results equal Numba's.
 *
 * lme_to_f16: float32 -> f16 bits, rounded to nearest even (F16C's vcvtps2ph; kernels/quant.py's
 * `float_to_half_bits`, bit for bit): the store of an f16 KV cache.
 *
 * lme_rope: rotary embedding of one token's heads in place (kernels/ops.py `rope`, bit for bit:
 * x0 * c - x1 * s and x0 * s + x1 * c, each a rounded product and a rounded sum). Pairs
 * (2i, 2i + 1) of each head ("normal", llama) or (i, i + rope_dim / 2) ("neox", qwen2).
 */
#include "common.h"

#define MAX_ROPE_DIM 512          /* lme_rope's SIMD path: rotated dims per head, at most */

#if LME_X86
TARGET_AVX512 static void swiglu_avx512(const float *gate, const float *up, float *out, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 lanes = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(lanes, gate + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(out + i, lanes, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(lanes, up + i)));
    }
}
#endif

#if LME_X86
/* one 32-value block: q, d, s (x and q 32 values) */
TARGET_AVX512 static ALWAYS_INLINE void quantize_block_avx512(const float *x, int8_t *q, float *d, float *s) {
    const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float scale = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
    const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));       /* round half even */
    const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(q_lo));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(q_hi));
    *d = scale;
    *s = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
}

TARGET_AVX512 static void quantize_row_avx512(const float *x, int64_t n, int8_t *xq, float *xd, float *xs,
                                              int8_t *rq, float *rd, float *rs) {
    float residual[QK];
    for (int64_t b = 0; b < n / QK; b++) {
        quantize_block_avx512(x + b * QK, xq + b * QK, xd + b, xs + b);
        if (rq == NULL)
            continue;
        const __m512 d = _mm512_set1_ps(xd[b]);
        for (int half = 0; half < 2; half++) {
            const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(xq + b * QK + 16 * half))));
            _mm512_storeu_ps(residual + 16 * half, _mm512_sub_ps(_mm512_loadu_ps(x + b * QK + 16 * half), _mm512_mul_ps(d, q)));
        }
        quantize_block_avx512(residual, rq + b * QK, rd + b, rs + b);
    }
}
#endif

int lme_quantize_row(const float *x, int64_t x_len, int8_t *xq, int64_t xq_len, float *xd, int64_t xd_len,
                     float *xs, int64_t xs_len, int8_t *rq, int64_t rq_len, float *rd, int64_t rd_len,
                     float *rs, int64_t rs_len) {
    if (x_len % QK != 0)
        return LME_ERR_SHAPE;
    if (x == NULL || xq == NULL || xd == NULL || xs == NULL || (rq_len > 0 && (rq == NULL || rd == NULL || rs == NULL)))
        return LME_ERR_NULL;
    const int64_t n_blocks = x_len / QK;
    if (xq_len < x_len || xd_len < n_blocks || xs_len < n_blocks
        || (rq_len > 0 && (rq_len < x_len || rd_len < n_blocks || rs_len < n_blocks)))
        return LME_ERR_LENGTH;
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512) {
        quantize_row_avx512(x, x_len, xq, xd, xs, rq_len > 0 ? rq : NULL, rd, rs);
        return LME_OK;
    }
#endif
    return LME_ERR_ISA;           /* the caller's loop does it */
}

int lme_swiglu(const float *gate, int64_t gate_len, const float *up, int64_t up_len, float *out,
               int64_t out_len) {
    if (gate == NULL || up == NULL || out == NULL)
        return LME_ERR_NULL;
    if (up_len < gate_len || out_len < gate_len)
        return LME_ERR_LENGTH;
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512) {
        swiglu_avx512(gate, up, out, gate_len);
        return LME_OK;
    }
#endif
    return LME_ERR_ISA;           /* the caller's loop does it */
}

#if LME_X86
TARGET_AVX512 static void to_f16_avx512(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 lanes = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m256i half = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(lanes, x + i),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(out + i, lanes, half);
    }
}
#endif

int lme_to_f16(const float *x, int64_t x_len, uint16_t *out, int64_t out_len) {
    if (x == NULL || out == NULL)
        return LME_ERR_NULL;
    if (out_len < x_len)
        return LME_ERR_LENGTH;
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512) {
        to_f16_avx512(x, x_len, out);
        return LME_OK;
    }
#endif
    return LME_ERR_ISA;           /* the caller's loop does it */
}

#if LME_X86
/* rope of one token, pairs (2i, 2i + 1): 16 floats = 8 pairs; with c2 = (c0 c0 c1 c1 ...) and
 * s2 = (-s0 s0 -s1 s1 ...), x' = x * c2 + swap_pairs(x) * s2 */
TARGET_AVX512 static void rope_normal_avx512(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                                             const float *cos, const float *sin) {
    float c2[MAX_ROPE_DIM] ALIGN64, s2[MAX_ROPE_DIM] ALIGN64;
    for (int64_t i = 0; i < rope_dim / 2; i++) {
        c2[2 * i] = c2[2 * i + 1] = cos[i];
        s2[2 * i] = -sin[i];
        s2[2 * i + 1] = sin[i];
    }
    for (int64_t h = 0; h < n_heads; h++) {
        float *head = x + h * head_dim;
        for (int64_t i = 0; i < rope_dim; i += 16) {
            const __mmask16 lanes = rope_dim - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (rope_dim - i)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(lanes, head + i);
            const __m512 swapped = _mm512_permute_ps(v, 0xB1);                /* (x1 x0 x3 x2 ...) */
            const __m512 out = _mm512_add_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, c2 + i)),
                                             _mm512_mul_ps(swapped, _mm512_maskz_loadu_ps(lanes, s2 + i)));
            _mm512_mask_storeu_ps(head + i, lanes, out);
        }
    }
}

/* rope of one token, pairs (i, i + half) */
TARGET_AVX512 static void rope_neox_avx512(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                                           const float *cos, const float *sin) {
    const int64_t half = rope_dim / 2;
    for (int64_t h = 0; h < n_heads; h++) {
        float *head = x + h * head_dim;
        for (int64_t i = 0; i < half; i += 16) {
            const __mmask16 lanes = half - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - i)) - 1);
            const __m512 x0 = _mm512_maskz_loadu_ps(lanes, head + i), x1 = _mm512_maskz_loadu_ps(lanes, head + half + i);
            const __m512 c = _mm512_maskz_loadu_ps(lanes, cos + i), s = _mm512_maskz_loadu_ps(lanes, sin + i);
            _mm512_mask_storeu_ps(head + i, lanes, _mm512_sub_ps(_mm512_mul_ps(x0, c), _mm512_mul_ps(x1, s)));
            _mm512_mask_storeu_ps(head + half + i, lanes, _mm512_add_ps(_mm512_mul_ps(x0, s), _mm512_mul_ps(x1, c)));
        }
    }
}
#endif

int lme_rope(float *x, int64_t x_len, int64_t n_heads, int64_t head_dim, int64_t rope_dim, int64_t neox,
             const float *cos, int64_t cos_len, const float *sin, int64_t sin_len) {
    if (n_heads < 0 || head_dim <= 0 || rope_dim < 0 || rope_dim > head_dim || rope_dim % 2 != 0
        || n_heads > INT64_MAX / head_dim)
        return LME_ERR_SHAPE;
    if (x == NULL || cos == NULL || sin == NULL)
        return LME_ERR_NULL;
    if (x_len < n_heads * head_dim || cos_len < rope_dim / 2 || sin_len < rope_dim / 2)
        return LME_ERR_LENGTH;
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512 && rope_dim <= MAX_ROPE_DIM) {
        if (neox)
            rope_neox_avx512(x, n_heads, head_dim, rope_dim, cos, sin);
        else
            rope_normal_avx512(x, n_heads, head_dim, rope_dim, cos, sin);
        return LME_OK;
    }
#endif
    return LME_ERR_ISA;           /* the caller's loop does it */
}
