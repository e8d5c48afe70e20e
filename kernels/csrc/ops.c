/* ops: elementwise work of the forward pass that is worth SIMD (see qdot.h for the API; the Numba
 * loops of kernels/ops.py are the reference and the fallback).
 *
 * lme_swiglu: out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], with
 * common.h's vectorized exp (relative error ~2e-7, as expf).
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
