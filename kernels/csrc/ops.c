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
 */
#include "common.h"

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
