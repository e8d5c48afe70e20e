/* ops: elementwise work of the forward pass (API: lmengine.h). Each function has a portable path
 * that computes what the Numba loop it replaces computes (kernels/ops.py, kernels/matmul.py,
 * kernels/quant.py: the references, and the fallback without the extension), and SIMD paths:
 *
 * lme_swiglu: out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i].
 *   portable: expf, the Numba loop's bits. AVX2 and AVX-512: common.h's vectorized exp256 /
 *   exp512 (relative error ~2e-7; the AVX2 path's last n % 8 values take expf). On AVX2 it was
 *   ~9x the expf loop (Zen 3, 8192 values: see tests/kernels/test_native.py's tolerance).
 *
 * lme_softmax_rows: s[r] = exp(s[r] - max s[r]) in place and sums[r] = its sum, row by row
 *   (attention's weights before the division; kernels/ops.py `softmax_rows`). portable: expf and
 *   an in-order float sum, the Numba loop's bits. AVX2 (also taken on AVX-512 CPUs): common.h's
 *   exp256 (relative error ~2e-7) and the sum in 8 lanes: within float rounding of it, not its bits.
 *
 * lme_quantize_row: one token's activations -> int8 blocks of 32 (kernels/matmul.py's
 *   `_quantize_row_numba`, bit for bit, on every path): d = max|x| / 127,
 *   q = round-half-even(x * (1 / d)) (0 when d = 0), s = d * sum(q); with a second term
 *   (rq_len > 0), the same of the residual x - d * q. Portable, AVX2, AVX-512.
 *
 * lme_to_f16: float32 -> f16 bits, rounded to nearest even (kernels/quant.py's
 *   `float_to_half_bits`, bit for bit, on every path): the store of an f16 KV cache. Portable
 *   (common.h's fp32_to_fp16), F16C's vcvtps2ph on AVX2 and AVX-512.
 *
 * lme_rope: rotary embedding of one token's heads in place (kernels/ops.py `rope`, bit for bit,
 *   on every path: x0 * c - x1 * s and x0 * s + x1 * c, each a rounded product and a rounded sum).
 *   Pairs (2i, 2i + 1) of each head ("normal", llama) or (i, i + rope_dim / 2) ("neox", qwen2).
 *   Portable, AVX-512 (rope_dim <= 512).
 *
 * No fused multiply-adds anywhere here (-ffp-contract=off, and none written), so the float
 * results equal the Numba loops'.
 */
#include "common.h"

#include <math.h>

#define MAX_ROPE_DIM 512          /* lme_rope's AVX-512 path: rotated dims per head, at most */

/* ---- swiglu ----------------------------------------------------------------------------------- */

static void swiglu_scalar(const float *gate, const float *up, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

#if LME_X86
TARGET_AVX2 static void swiglu_avx2(const float *gate, const float *up, float *out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const int64_t whole = n & ~(int64_t)7;
    for (int64_t i = 0; i < whole; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    swiglu_scalar(gate + whole, up + whole, out + whole, n - whole);     /* the last n % 8 */
}

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
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512: swiglu_avx512(gate, up, out, gate_len); break;
    case LME_ISA_AVX2: swiglu_avx2(gate, up, out, gate_len); break;
#endif
    default: swiglu_scalar(gate, up, out, gate_len); break;
    }
    return LME_OK;
}

/* ---- softmax_rows ------------------------------------------------------------------------------ */

#if LME_X86
TARGET_AVX2 static void softmax_rows_avx2(float *s, int64_t n_rows, int64_t n_cols, float *sums) {
    for (int64_t r = 0; r < n_rows; r++)
        sums[r] = exp_shifted_avx2(s + r * n_cols, n_cols);
}
#endif

int lme_softmax_rows(float *s, int64_t s_len, int64_t n_cols, float *sums, int64_t sums_len) {
    if (s == NULL || sums == NULL)
        return LME_ERR_NULL;
    if (n_cols < 1 || s_len < 0 || s_len % n_cols)
        return LME_ERR_SHAPE;
    const int64_t n_rows = s_len / n_cols;
    if (sums_len < n_rows)
        return LME_ERR_LENGTH;
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512:                        /* the AVX2 path: attention's rows are short, and */
    case LME_ISA_AVX2:                          /* no machine here could test a 512-bit one */
        softmax_rows_avx2(s, n_rows, n_cols, sums);
        break;
#endif
    default:
        for (int64_t r = 0; r < n_rows; r++)
            sums[r] = exp_shifted(s + r * n_cols, n_cols);
        break;
    }
    return LME_OK;
}

/* ---- quantize_row ------------------------------------------------------------------------------- */
/* Per path: one 32-value block x -> q [32], d, s; and the row (with the residual's blocks when
 * rq != NULL). */

static void quantize_block_scalar(const float *x, int8_t *q, float *d, float *s) {
    float amax = 0.0f;
    for (int i = 0; i < QK; i++)
        amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float scale = amax / 127.0f;
    const float inv = scale > 0 ? 1.0f / scale : 0.0f;
    int32_t isum = 0;
    for (int i = 0; i < QK; i++) {
        const int32_t v = (int32_t)rintf(x[i] * inv);      /* round half even */
        q[i] = (int8_t)v;
        isum += v;
    }
    *d = scale;
    *s = scale * (float)isum;
}

static void quantize_row_scalar(const float *x, int64_t n, int8_t *xq, float *xd, float *xs,
                                int8_t *rq, float *rd, float *rs) {
    float residual[QK];
    for (int64_t b = 0; b < n / QK; b++) {
        quantize_block_scalar(x + b * QK, xq + b * QK, xd + b, xs + b);
        if (rq == NULL)
            continue;
        for (int i = 0; i < QK; i++)
            residual[i] = x[b * QK + i] - xd[b] * (float)xq[b * QK + i];
        quantize_block_scalar(residual, rq + b * QK, rd + b, rs + b);
    }
}

#if LME_X86
TARGET_AVX2 static ALWAYS_INLINE void quantize_block_avx2(const float *x, int8_t *q, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    for (int k = 0; k < 4; k++)
        v[k] = _mm256_loadu_ps(x + 8 * k);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float scale = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 inv = _mm256_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
    __m256i i[4];
    for (int k = 0; k < 4; k++)
        i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));         /* round half even */
    /* int32 -> int8 with saturation; the packs work per 128-bit lane, leaving the 4-value groups
     * in the order 0 2 4 6 1 3 5 7 of x: the permute puts them back */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, _MM_SHUFFLE(1, 0, 3, 2)));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, _MM_SHUFFLE(2, 3, 0, 1)));
    *d = scale;
    *s = scale * (float)_mm_cvtsi128_si32(sum4);
}

TARGET_AVX2 static void quantize_row_avx2(const float *x, int64_t n, int8_t *xq, float *xd, float *xs,
                                          int8_t *rq, float *rd, float *rs) {
    float residual[QK];
    for (int64_t b = 0; b < n / QK; b++) {
        quantize_block_avx2(x + b * QK, xq + b * QK, xd + b, xs + b);
        if (rq == NULL)
            continue;
        const __m256 d = _mm256_set1_ps(xd[b]);
        for (int k = 0; k < 4; k++) {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(xq + b * QK + 8 * k))));
            _mm256_storeu_ps(residual + 8 * k, _mm256_sub_ps(_mm256_loadu_ps(x + b * QK + 8 * k), _mm256_mul_ps(d, q)));
        }
        quantize_block_avx2(residual, rq + b * QK, rd + b, rs + b);
    }
}

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
    if (rq_len <= 0)
        rq = NULL;                                   /* one term */
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512: quantize_row_avx512(x, x_len, xq, xd, xs, rq, rd, rs); break;
    case LME_ISA_AVX2: quantize_row_avx2(x, x_len, xq, xd, xs, rq, rd, rs); break;
#endif
    default: quantize_row_scalar(x, x_len, xq, xd, xs, rq, rd, rs); break;
    }
    return LME_OK;
}

/* ---- to_f16 ------------------------------------------------------------------------------------- */

static void to_f16_scalar(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++)
        out[i] = fp32_to_fp16(x[i]);
}

#if LME_X86
TARGET_AVX2 static void to_f16_avx2(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++)
        out[i] = fp32_to_fp16(x[i]);
}

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
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512: to_f16_avx512(x, x_len, out); break;
    case LME_ISA_AVX2: to_f16_avx2(x, x_len, out); break;
#endif
    default: to_f16_scalar(x, x_len, out); break;
    }
    return LME_OK;
}

/* ---- rope --------------------------------------------------------------------------------------- */

/* pair (a, b) of every head rotated by angle i, for the pairs of the layout (neox or normal) */
static void rope_scalar(float *x, int64_t n_heads, int64_t head_dim, int64_t rope_dim, int neox,
                        const float *cos, const float *sin) {
    const int64_t half = rope_dim / 2;
    for (int64_t h = 0; h < n_heads; h++) {
        float *head = x + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
            const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
            const float x0 = head[a], x1 = head[b];
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
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
    rope_scalar(x, n_heads, head_dim, rope_dim, neox != 0, cos, sin);
    return LME_OK;
}
