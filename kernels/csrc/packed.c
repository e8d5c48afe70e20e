/* packed: Q8_0 / Q4_0 / Q4_1 matrices re-laid out 16 rows at a time, and their product with int8
 * activations (see qdot.h for the API).
 *
 * Why: in ggml's row-major layout one SIMD register holds 32 values of ONE row, so every block
 * product ends in a horizontal sum and a per-(row, token) scale -- about one instruction per 3
 * bytes of weights, which makes the in-place kernel of qdot.c compute-bound below the memory
 * bandwidth. Here one 512-bit register holds 4 consecutive values of 16 DIFFERENT rows, so a
 * VNNI instruction (vpdpbusd: 16 lanes, each the sum of 4 u8 x s8 products) works on 16 rows at
 * once against 4 activation bytes broadcast to every lane, the 16 row results stay in the 16
 * lanes (no horizontal sums), and the block scales of the 16 rows are one vector.
 *
 * Packed layout: rows are taken in groups of 16 (the last group padded with zero rows); a group
 * stores, block after block, one "group block" per 32 columns:
 *
 *     d    f16 x 16      the 16 rows' block scales
 *     m    f16 x 16      the 16 rows' block minimums (Q4_1 only)
 *     values             Q4_0 / Q4_1: 4 chunks of 64 bytes; chunk k = bytes 4k..4k+3 of each of
 *                        the 16 rows' 16 nibble bytes (row r at chunk offset 4r). Byte j of a
 *                        ggml Q4 block holds value j (low nibble) and value j + 16 (high), so
 *                        chunk k's low nibbles are values 4k..4k+3 and its high nibbles values
 *                        16+4k..19+4k.
 *                        Q8_0: 8 chunks of 64 bytes; chunk k = values 4k..4k+3 of each row, stored
 *                        as q + 128 (unsigned), so that every type is an unsigned-by-signed product.
 *
 * Every type is then read as  w = d * u + m  with u unsigned: Q4_1 (u = nibble, m from the block),
 * Q4_0 (u = nibble, m = -8 d), Q8_0 (u = q + 128, m = -128 d). A block's dot product with an
 * activation block x = xd * xq (xs = xd * sum(xq), as in qdot.h) is
 *
 *     d * xd * isum(u, xq) + m * xs,     isum an exact int32 sum (|u| <= 255, |xq| <= 127)
 *
 * Group block sizes: Q4_1 64 + 256 = 320 bytes (the same 20 bytes per row-block as ggml), Q4_0
 * 32 + 256 = 288 (18), Q8_0 32 + 512 = 544 (34): packing moves bytes, it adds none.
 *
 * Activations may come in n_terms = 1 or 2 int8 terms per value (x = term 0 + term 1, the second
 * quantizing the first's rounding error; kernels.matmul ACT_INT8X2): term j of token t is row
 * j * n_tok + t of xq / xd / xs. Both terms accumulate into the token's one result.
 *
 * Arithmetic of one (row, token), the same whatever n_tok and wherever the token sits in the
 * batch (so batched decode equals one-by-one decode bit for bit): for each block b in order, for
 * each term j, acc += float(isum_bj) * (d_b * xd_bj); then acc += m_b * (xs_b0 [+ xs_b1]).
 */
#include "common.h"

#define GROUP_ROWS 16                          /* rows per packed group: one 512-bit register of int32 */
#define TOKEN_GROUP 8                          /* tokens sharing each load of a group block */
#define PREFETCH_BYTES 2048                    /* how far ahead the weights are prefetched */

/* ---- layout -------------------------------------------------------------------------------- */

static int64_t group_block_bytes(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q4_1: return 2 * GROUP_ROWS * 2 + GROUP_ROWS * QK / 2;   /* 320 */
    case LME_TYPE_Q4_0: return GROUP_ROWS * 2 + GROUP_ROWS * QK / 2;       /* 288 */
    case LME_TYPE_Q8_0: return GROUP_ROWS * 2 + GROUP_ROWS * QK;           /* 544 */
    default: return 0;
    }
}

static int64_t scale_bytes(int64_t w_type) {     /* d (and m) at the start of a group block */
    return w_type == LME_TYPE_Q4_1 ? 2 * GROUP_ROWS * 2 : GROUP_ROWS * 2;
}

/* m of a row-block from its d, for the types whose m is implied: Q4_0 -8 d, Q8_0 -128 d */
static ALWAYS_INLINE float implied_min_factor(int64_t w_type) {
    return w_type == LME_TYPE_Q4_0 ? -8.0f : -128.0f;
}

int64_t lme_packed_bytes(int64_t w_type, int64_t n_rows, int64_t n_cols) {
    const int64_t gb = group_block_bytes(w_type);
    if (gb == 0)
        return LME_ERR_TYPE;
    if (n_rows < 0 || n_cols <= 0 || n_cols % QK != 0)
        return LME_ERR_SHAPE;
    const int64_t n_groups = (n_rows + GROUP_ROWS - 1) / GROUP_ROWS;
    const int64_t per_group = n_cols / QK * gb;
    if (n_groups > 0 && per_group > INT64_MAX / n_groups)
        return LME_ERR_SHAPE;
    return n_groups * per_group;
}

int lme_pack_q8(int64_t w_type, const uint8_t *w, int64_t w_len, int64_t n_rows, int64_t n_cols,
                uint8_t *dst, int64_t dst_len) {
    const int64_t packed = lme_packed_bytes(w_type, n_rows, n_cols);
    if (packed < 0)
        return (int)packed;
    const int64_t bytes = block_bytes(w_type), n_blocks = n_cols / QK;
    if (n_rows > 0 && n_blocks * bytes > INT64_MAX / n_rows)
        return LME_ERR_SHAPE;
    if (packed == 0)
        return LME_OK;
    if (w == NULL || dst == NULL)
        return LME_ERR_NULL;
    if (w_len < n_rows * n_blocks * bytes || dst_len < packed)
        return LME_ERR_LENGTH;
    memset(dst, 0, (size_t)packed);                            /* padding rows: d = m = u = 0 */
    const int64_t gb = group_block_bytes(w_type), sb = scale_bytes(w_type);
    const int value_bytes = w_type == LME_TYPE_Q8_0 ? QK : QK / 2;  /* per row and block */
    for (int64_t row = 0; row < n_rows; row++) {
        const int64_t group = row / GROUP_ROWS, r = row % GROUP_ROWS;
        for (int64_t b = 0; b < n_blocks; b++) {
            const uint8_t *src = w + (row * n_blocks + b) * bytes;
            uint8_t *out = dst + (group * n_blocks + b) * gb;
            memcpy(out + 2 * r, src, 2);                                   /* d */
            if (w_type == LME_TYPE_Q4_1)
                memcpy(out + GROUP_ROWS * 2 + 2 * r, src + 2, 2);           /* m */
            const uint8_t *values = src + (w_type == LME_TYPE_Q4_1 ? 4 : 2);
            for (int k = 0; k < value_bytes / 4; k++)                      /* chunk k, lane r */
                for (int i = 0; i < 4; i++) {
                    const uint8_t v = values[4 * k + i];
                    out[sb + 64 * k + 4 * r + i] = w_type == LME_TYPE_Q8_0 ? (uint8_t)(v ^ 0x80) : v;
                }
        }
    }
    return LME_OK;
}

struct packed_args {
    int64_t w_type; const uint8_t *p; int64_t n_rows, n_cols, row_begin, row_end;
    const int8_t *xq; const float *xd, *xs; int64_t n_tok, n_terms; float *out;
};

/* ---- scalar path ----------------------------------------------------------------------------- */

/* u value `i` (0..31) of lane r of a group block's values */
static ALWAYS_INLINE int32_t packed_value(int64_t w_type, const uint8_t *values, int r, int i) {
    if (w_type == LME_TYPE_Q8_0)
        return values[64 * (i / 4) + 4 * r + i % 4];
    const int j = i % 16;                                        /* the ggml byte holding value i */
    const uint8_t byte = values[64 * (j / 4) + 4 * r + j % 4];
    return i < 16 ? (byte & 0x0F) : (byte >> 4);
}

static void matmul_packed_scalar(const struct packed_args *a) {
    const int64_t n_blocks = a->n_cols / QK, gb = group_block_bytes(a->w_type);
    const int64_t sb = scale_bytes(a->w_type);
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const int64_t group = row / GROUP_ROWS;
        const int r = (int)(row % GROUP_ROWS);
        for (int64_t t = 0; t < a->n_tok; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < n_blocks; b++) {
                const uint8_t *blk = a->p + (group * n_blocks + b) * gb;
                const float d = fp16_to_fp32(load_u16(blk + 2 * r));
                const float m = a->w_type == LME_TYPE_Q4_1 ? fp16_to_fp32(load_u16(blk + GROUP_ROWS * 2 + 2 * r))
                                                           : implied_min_factor(a->w_type) * d;
                float xs_sum = 0.0f;
                for (int64_t j = 0; j < a->n_terms; j++) {
                    const int64_t x_row = j * a->n_tok + t;
                    const int8_t *xq = a->xq + x_row * a->n_cols + b * QK;
                    int32_t isum = 0;
                    for (int i = 0; i < QK; i++)
                        isum += packed_value(a->w_type, blk + sb, r, i) * (int32_t)xq[i];
                    acc += (float)isum * (d * a->xd[x_row * n_blocks + b]);
                    xs_sum += a->xs[x_row * n_blocks + b];
                }
                acc += m * xs_sum;
            }
            a->out[t * a->n_rows + row] = acc;
        }
    }
}

#if LME_X86
/* ---- AVX-512 VNNI path ----------------------------------------------------------------------- */

/* 4 activation bytes (values 4k..4k+3 of a block) in every 32-bit lane */
TARGET_AVX512 static ALWAYS_INLINE __m512i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* One group of 16 rows times tokens t0 .. t0 + n_group - 1 (n_group, n_terms and w_type
 * compile-time constants after inlining): per block, the 8 value registers (lane r = row r) are
 * formed once and multiplied with each token's broadcast activations. */
TARGET_AVX512 static ALWAYS_INLINE void group_tokens_avx512(const struct packed_args *a, int64_t w_type,
                                                            int n_terms, int n_group, int64_t group,
                                                            int64_t t0) {
    const int64_t n_blocks = a->n_cols / QK, gb = group_block_bytes(w_type), sb = scale_bytes(w_type);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[TOKEN_GROUP];
    for (int t = 0; t < n_group; t++)
        acc[t] = _mm512_setzero_ps();
    const uint8_t *blk = a->p + group * n_blocks * gb;
    /* With a few tokens the products are slow enough that the hardware prefetcher falls behind
     * the weights streaming from memory (the first token group reads them; later groups find them
     * in cache): ask for them ahead. With one or two tokens reading is the bottleneck and the
     * prefetch instructions only cost issue slots. */
    const int prefetch = n_group * n_terms >= 4 && t0 == 0;
    for (int64_t b = 0; b < n_blocks; b++, blk += gb) {
        if (prefetch)
            for (int64_t line = 0; line < gb; line += 64)
                _mm_prefetch((const char *)blk + PREFETCH_BYTES + line, _MM_HINT_T0);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        const __m512 m = w_type == LME_TYPE_Q4_1
                             ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + GROUP_ROWS * 2)))
                             : _mm512_mul_ps(d, _mm512_set1_ps(implied_min_factor(w_type)));
        __m512i u[8];                                    /* u[k]: values 4k..4k+3 of the 16 rows */
        if (w_type == LME_TYPE_Q8_0) {
            for (int k = 0; k < 8; k++)
                u[k] = _mm512_loadu_si512(blk + sb + 64 * k);
        } else {
            for (int k = 0; k < 4; k++) {
                const __m512i raw = _mm512_loadu_si512(blk + sb + 64 * k);
                u[k] = _mm512_and_si512(raw, low4);
                u[k + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            }
        }
        for (int t = 0; t < n_group; t++) {
            float xs_sum = 0.0f;
            for (int j = 0; j < n_terms; j++) {
                const int64_t x_row = j * a->n_tok + t0 + t;
                const int8_t *xq = a->xq + x_row * a->n_cols + b * QK;
                /* two chains of four, so one token's products overlap */
                __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], broadcast4(xq));
                __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[1], broadcast4(xq + 4));
                even = _mm512_dpbusd_epi32(even, u[2], broadcast4(xq + 8));
                odd = _mm512_dpbusd_epi32(odd, u[3], broadcast4(xq + 12));
                even = _mm512_dpbusd_epi32(even, u[4], broadcast4(xq + 16));
                odd = _mm512_dpbusd_epi32(odd, u[5], broadcast4(xq + 20));
                even = _mm512_dpbusd_epi32(even, u[6], broadcast4(xq + 24));
                odd = _mm512_dpbusd_epi32(odd, u[7], broadcast4(xq + 28));
                const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                acc[t] = _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(a->xd[x_row * n_blocks + b])),
                                         acc[t]);
                xs_sum += a->xs[x_row * n_blocks + b];
            }
            acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs_sum), acc[t]);
        }
    }
    const int64_t row0 = group * GROUP_ROWS;
    const int64_t rows_here = a->row_end - row0 < GROUP_ROWS ? a->row_end - row0 : GROUP_ROWS;
    const __mmask16 keep = (__mmask16)((1u << rows_here) - 1);
    for (int t = 0; t < n_group; t++)
        _mm512_mask_storeu_ps(a->out + (t0 + t) * a->n_rows + row0, keep, acc[t]);
}

TARGET_AVX512 static ALWAYS_INLINE void groups_avx512(const struct packed_args *a, int64_t w_type, int n_terms) {
    const int64_t group_end = (a->row_end + GROUP_ROWS - 1) / GROUP_ROWS;
    for (int64_t group = a->row_begin / GROUP_ROWS; group < group_end; group++) {
        int64_t t0 = 0;
        for (; t0 + TOKEN_GROUP <= a->n_tok; t0 += TOKEN_GROUP)
            group_tokens_avx512(a, w_type, n_terms, TOKEN_GROUP, group, t0);
        switch (a->n_tok - t0) {                          /* the last tokens: a constant count */
        case 7: group_tokens_avx512(a, w_type, n_terms, 7, group, t0); break;
        case 6: group_tokens_avx512(a, w_type, n_terms, 6, group, t0); break;
        case 5: group_tokens_avx512(a, w_type, n_terms, 5, group, t0); break;
        case 4: group_tokens_avx512(a, w_type, n_terms, 4, group, t0); break;
        case 3: group_tokens_avx512(a, w_type, n_terms, 3, group, t0); break;
        case 2: group_tokens_avx512(a, w_type, n_terms, 2, group, t0); break;
        case 1: group_tokens_avx512(a, w_type, n_terms, 1, group, t0); break;
        default: break;
        }
    }
}

TARGET_AVX512 static void matmul_packed_avx512(const struct packed_args *a) {
    const int two = a->n_terms == 2;
    switch (a->w_type) {
    case LME_TYPE_Q4_1: two ? groups_avx512(a, LME_TYPE_Q4_1, 2) : groups_avx512(a, LME_TYPE_Q4_1, 1); return;
    case LME_TYPE_Q4_0: two ? groups_avx512(a, LME_TYPE_Q4_0, 2) : groups_avx512(a, LME_TYPE_Q4_0, 1); return;
    default: two ? groups_avx512(a, LME_TYPE_Q8_0, 2) : groups_avx512(a, LME_TYPE_Q8_0, 1); return;
    }
}
#endif /* LME_X86 */

/* ---- entry point ----------------------------------------------------------------------------- */

int lme_matmul_packed(int64_t w_type, const uint8_t *p, int64_t p_len,
                      int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                      const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                      const float *xs, int64_t xs_len, int64_t n_tok, int64_t n_terms,
                      float *out, int64_t out_len) {
    const int64_t packed = lme_packed_bytes(w_type, n_rows, n_cols);
    if (packed < 0)
        return (int)packed;
    if (n_tok < 0 || (n_terms != 1 && n_terms != 2) || n_tok > INT64_MAX / 2 / n_cols
        || (n_rows > 0 && n_tok > INT64_MAX / n_rows))
        return LME_ERR_SHAPE;
    if (row_begin < 0 || row_end < row_begin || row_end > n_rows || row_begin % GROUP_ROWS != 0)
        return LME_ERR_RANGE;
    if (row_begin == row_end || n_tok == 0)
        return LME_OK;
    if (p == NULL || xq == NULL || xd == NULL || xs == NULL || out == NULL)
        return LME_ERR_NULL;
    const int64_t x_rows = n_terms * n_tok, n_blocks = n_cols / QK;
    if (p_len < packed || xq_len < x_rows * n_cols || xd_len < x_rows * n_blocks
        || xs_len < x_rows * n_blocks || out_len < n_tok * n_rows)
        return LME_ERR_LENGTH;
    const struct packed_args a = {w_type, p, n_rows, n_cols, row_begin, row_end, xq, xd, xs, n_tok, n_terms, out};
#if LME_X86
    if (lme_get_isa() == LME_ISA_AVX512) {
        matmul_packed_avx512(&a);
        return LME_OK;
    }
#endif
    matmul_packed_scalar(&a);
    return LME_OK;
}
