/* The C API of kernels._native (every function of kernels/csrc/; kernels/build_native.py hands
 * these declarations to cffi). First qdot.c: dot products of ggml weight blocks with activations,
 * over a tile of weight rows.
 *
 * A weight matrix W (n_rows x n_cols) is raw ggml blocks: row r at bytes [r * row_bytes,
 * (r + 1) * row_bytes) of w. For rows r in [row_begin, row_end) and tokens t in [0, n_tok):
 *
 *     out[t * n_rows + r] = dot(W[r], x[t])
 *
 * lme_matmul_q8:  W is Q8_0, Q4_0 or Q4_1; x[t] is given as 8-bit blocks of 32 values:
 *                 xq int8 [n_tok * n_cols] in [-127, 127], xd float [n_tok * n_cols/32]
 *                 (x ~ xd * xq), xs float [n_tok * n_cols/32] (xd * sum of the block's xq).
 *                 Each block product is an exact integer sum; out accumulates
 *                 dw * xd * isum (+ mw * xs: Q4_1, and Q4_0 as nibbles with mw = -8 dw) in
 *                 float. (An xq of -128 gives a wrong product with Q8_0 weights, never a crash.)
 * lme_matmul_f32: W is F32, F16, BF16, Q8_0, Q4_0 or Q4_1, decoded to float; x float [n_tok * n_cols].
 *
 * Every function checks its arguments (NULL pointers, unknown type, n_cols not whole blocks, the
 * row range, and that every buffer length covers what will be read or written) and returns a
 * negative LME_ERR_* code without touching memory when one is wrong; 0 on success. Buffer
 * lengths are element counts. The functions keep no state except the selected SIMD path, so
 * several threads may call them at once on disjoint row ranges of the same out.
 */
#ifndef LME_QDOT_H
#define LME_QDOT_H

#include <stdint.h>

/* ggml type ids */
#define LME_TYPE_F32 0
#define LME_TYPE_F16 1
#define LME_TYPE_Q4_0 2
#define LME_TYPE_Q4_1 3
#define LME_TYPE_Q8_0 8
#define LME_TYPE_BF16 30

/* SIMD paths */
#define LME_ISA_SCALAR 0   /* portable C */
#define LME_ISA_AVX2 1     /* AVX2 + FMA + F16C */
#define LME_ISA_AVX512 2   /* AVX-512 F/BW/VL + VNNI (vpdpbusd) */

/* return codes */
#define LME_OK 0
#define LME_ERR_NULL (-1)      /* a NULL pointer */
#define LME_ERR_TYPE (-2)      /* unsupported ggml type for this function */
#define LME_ERR_SHAPE (-3)     /* n_rows/n_cols/n_tok negative, or n_cols not whole blocks */
#define LME_ERR_RANGE (-4)     /* row range outside [0, n_rows] */
#define LME_ERR_LENGTH (-5)    /* a buffer shorter than its shape needs */
#define LME_ERR_ISA (-6)       /* a SIMD path this CPU (or build) does not have */
#define LME_ERR_NO_NATIVE (-100) /* returned by the Python-side stand-ins when the extension is absent */

int lme_native_available(void);  /* 1 */
int lme_best_isa(void);          /* best path this CPU and build support */
int lme_get_isa(void);           /* path in use */
int lme_set_isa(int isa);        /* select a path (-1: the best); LME_ERR_ISA if unsupported */

int lme_matmul_q8(int64_t w_type, const uint8_t *w, int64_t w_len,
                  int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                  const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                  const float *xs, int64_t xs_len, int64_t n_tok,
                  float *out, int64_t out_len);

int lme_matmul_f32(int64_t w_type, const uint8_t *w, int64_t w_len,
                   int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                   const float *x, int64_t x_len, int64_t n_tok,
                   float *out, int64_t out_len);

/* The 16-row packed form of a Q8_0 / Q4_0 / Q4_1 matrix (layout and arithmetic: packed.c), for
 * the int8 product on AVX-512 VNNI (elsewhere a portable scalar loop computes the same sums).
 * lme_packed_bytes: its size in bytes (negative LME_ERR_* for a bad type or shape).
 * lme_pack_q8:      w (row-major ggml blocks, as lme_matmul_q8) -> dst.
 * lme_matmul_packed: as lme_matmul_q8 on the packed matrix p, for rows [row_begin, row_end)
 *                   with row_begin a multiple of 16; activations in n_terms (1 or 2) int8 terms,
 *                   term j of token t at row j * n_tok + t of xq / xd / xs, summed. */
int64_t lme_packed_bytes(int64_t w_type, int64_t n_rows, int64_t n_cols);
int lme_pack_q8(int64_t w_type, const uint8_t *w, int64_t w_len, int64_t n_rows, int64_t n_cols,
                uint8_t *dst, int64_t dst_len);
int lme_matmul_packed(int64_t w_type, const uint8_t *p, int64_t p_len,
                      int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                      const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                      const float *xs, int64_t xs_len, int64_t n_tok, int64_t n_terms,
                      float *out, int64_t out_len);

/* Attention of one token for the `group` query heads sharing one kv head (attention.c):
 * q [group * head_dim] (pre-scaled by 1/sqrt(head_dim)), keys [ceil(n_pos/16) tiles][head_dim][16]
 * (transposed tiles of 16 positions), values [n_pos][head_dim], both of kv_type LME_TYPE_F32 or
 * LME_TYPE_F16 (lengths in elements), scores: scratch of group * ceil(n_pos/16)*16 floats;
 * out [group * head_dim]. LME_ERR_ISA when this CPU or head_dim has no SIMD path (AVX-512 with
 * head_dim 32, 64 or 128): the caller computes it itself. */
int lme_attention(int64_t kv_type, const float *q, int64_t q_len, int64_t group, int64_t head_dim,
                  const void *keys, int64_t keys_len, const void *values, int64_t values_len,
                  int64_t n_pos, float *scores, int64_t scores_len, float *out, int64_t out_len);

/* out[i] = silu(gate[i]) * up[i] for i < gate_len (ops.c); LME_ERR_ISA without AVX-512. */
int lme_swiglu(const float *gate, int64_t gate_len, const float *up, int64_t up_len, float *out,
               int64_t out_len);

/* One token's activations x [x_len] -> int8 blocks (ops.c; as kernels/matmul.py _quantize_row,
 * bit for bit): xq [x_len], xd, xs [x_len / 32]; with rq_len > 0 also the residual's blocks
 * rq, rd, rs (the second int8 term). LME_ERR_ISA without AVX-512. */
int lme_quantize_row(const float *x, int64_t x_len, int8_t *xq, int64_t xq_len, float *xd, int64_t xd_len,
                     float *xs, int64_t xs_len, int8_t *rq, int64_t rq_len, float *rd, int64_t rd_len,
                     float *rs, int64_t rs_len);

/* out[i] = the f16 bits of x[i] for i < x_len, rounded to nearest even (ops.c); LME_ERR_ISA
 * without AVX-512. */
int lme_to_f16(const float *x, int64_t x_len, uint16_t *out, int64_t out_len);

/* Rotary embedding of one token in place (ops.c; kernels/ops.py `rope`, bit for bit): x
 * [n_heads * head_dim], the first rope_dim dims of each head rotated by the angles whose cos, sin
 * [rope_dim / 2] are given; pairs (2i, 2i + 1), or (i, i + rope_dim / 2) with neox != 0.
 * LME_ERR_ISA without AVX-512 (or rope_dim > 512). */
int lme_rope(float *x, int64_t x_len, int64_t n_heads, int64_t head_dim, int64_t rope_dim, int64_t neox,
             const float *cos, int64_t cos_len, const float *sin, int64_t sin_len);

#endif
