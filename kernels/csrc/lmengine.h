/* lmengine.h: the C API of lmengine.kernels._native, every exported function of kernels/csrc/
 * (kernels/build_native.py hands these declarations to cffi, comments and preprocessor lines
 * stripped, so this header stays the one place they are declared).
 *
 * Files (ggml's layout: one file per family of kernels, CPU features apart):
 *   cpu.c        CPU feature detection and the SIMD path in use (lme_*_isa)
 *   qdot.c       products of row-major ggml weight blocks with activations
 *   packed.c     the 16-row packed layout of Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / IQ4_XS
 *                matrices and its product
 *   attention.c  one token's attention over a KV cache
 *   ops.c        elementwise work: swiglu, activation quantization, f32 -> f16, rope
 *   common.h     internal pieces shared by them (block formats, f16 conversion, target macros)
 *
 * Conventions of every function:
 *   - Arguments are checked (NULL pointers, unknown type, shapes, ranges, and that every buffer
 *     length covers what will be read or written); a wrong one returns a negative LME_ERR_* code
 *     without touching memory; 0 (LME_OK) on success. Buffer lengths are element counts.
 *   - Each function has a portable C path and SIMD paths (AVX2, AVX-512) picked per call by
 *     lme_get_isa(), so each works on any CPU. Where a SIMD path gives other bits than the
 *     portable one, the function's comment says so.
 *   - No state is kept except the selected SIMD path, so several threads may call the functions
 *     at once on disjoint outputs.
 */
#ifndef LME_LMENGINE_H
#define LME_LMENGINE_H

#include <stdint.h>

/* ggml type ids */
#define LME_TYPE_F32 0
#define LME_TYPE_F16 1
#define LME_TYPE_Q4_0 2
#define LME_TYPE_Q4_1 3
#define LME_TYPE_Q5_0 6
#define LME_TYPE_Q5_1 7
#define LME_TYPE_Q8_0 8
#define LME_TYPE_Q2_K 10
#define LME_TYPE_Q3_K 11
#define LME_TYPE_Q4_K 12
#define LME_TYPE_Q5_K 13
#define LME_TYPE_Q6_K 14
#define LME_TYPE_IQ4_NL 20
#define LME_TYPE_IQ4_XS 23
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
#define LME_ERR_ISA (-6)       /* lme_set_isa: a SIMD path this CPU (or build) does not have */
#define LME_ERR_NO_NATIVE (-100) /* returned by the Python-side stand-ins when the extension is absent */

/* ---- cpu.c: the SIMD path ------------------------------------------------------------------- */

int lme_native_available(void);  /* 1 */
int lme_best_isa(void);          /* best path this CPU and build support */
int lme_get_isa(void);           /* path in use (the best one from load time on) */
int lme_set_isa(int isa);        /* select a path (-1: the best); LME_ERR_ISA if unsupported */

/* ---- qdot.c: row-major products ------------------------------------------------------------- */
/* Dot products of ggml weight blocks with activations, over a tile of weight rows.
 *
 * A weight matrix W (n_rows x n_cols) is raw ggml blocks: row r at bytes [r * row_bytes,
 * (r + 1) * row_bytes) of w. For rows r in [row_begin, row_end) and tokens t in [0, n_tok):
 *
 *     out[t * n_rows + r] = dot(W[r], x[t])
 *
 * lme_matmul_q8:  W is Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL; x[t] is given as 8-bit blocks
 *                 of 32 values: xq int8 [n_tok * n_cols] in [-127, 127], xd float
 *                 [n_tok * n_cols/32] (x ~ xd * xq), xs float [n_tok * n_cols/32] (xd * sum of
 *                 the block's xq). Each block product is an exact integer sum.
 *                 Q8_0, Q4_0, Q4_1: out accumulates dw * xd * isum (+ mw * xs: Q4_1, and Q4_0
 *                 as nibbles with mw = -8 dw) in float, in an order that differs between SIMD
 *                 paths (within float rounding).
 *                 Q5_0, Q5_1, IQ4_NL: the same bits on every SIMD path (and in the Numba
 *                 reference, kernels/matmul.py): per (row, token), blocks in groups of 8, the
 *                 last group padded with p_j = 0,
 *                     p_j = (dw_j * xd_j) * (float)isum_j  (+ mw_j * xs_j: Q5_0, Q5_1)
 *                     acc = acc + (((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)))
 *                 with q_j the 5-bit values 0..31 (Q5_0: mw = -16 dw; Q5_1: mw = m) or the
 *                 IQ4_NL codebook values (no mw); acc from 0, out = acc.
 *                 Every type: a (row, token) result does not depend on n_tok or the token's
 *                 place in the batch. (An xq of -128 gives a wrong product with Q8_0 and IQ4_NL
 *                 weights, never a crash.)
 * lme_matmul_f32: W is F32, F16, BF16, Q8_0, Q4_0 or Q4_1, decoded to float exactly as ggml
 *                 does; x float [n_tok * n_cols]; float sums in a per-path order. */
int lme_matmul_q8(int64_t w_type, const uint8_t *w, int64_t w_len,
                  int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                  const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                  const float *xs, int64_t xs_len, int64_t n_tok,
                  float *out, int64_t out_len);

int lme_matmul_f32(int64_t w_type, const uint8_t *w, int64_t w_len,
                   int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                   const float *x, int64_t x_len, int64_t n_tok,
                   float *out, int64_t out_len);

/* ---- packed.c: the 16-row packed layout ------------------------------------------------------ */
/* The packed form of a Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / IQ4_XS matrix (layout and
 * arithmetic: packed.c; the K types and IQ4_XS need whole 256-column superblocks), made for the int8 product on AVX2 and
 * AVX-512 VNNI (elsewhere a portable loop computes the same sums).
 * lme_packed_bytes: its size in bytes (negative LME_ERR_* for a bad type or shape).
 * lme_pack_q8:      w (row-major ggml blocks, as lme_matmul_q8) -> dst.
 * lme_matmul_packed: as lme_matmul_q8 on the packed matrix p, for rows [row_begin, row_end)
 *                   with row_begin a multiple of 16; activations in n_terms (1 or 2) int8 terms,
 *                   term j of token t at row j * n_tok + t of xq / xd / xs, summed; xq's rows
 *                   xq_stride >= n_cols bytes apart (padded: see packed.c). */
int64_t lme_packed_bytes(int64_t w_type, int64_t n_rows, int64_t n_cols);
int lme_pack_q8(int64_t w_type, const uint8_t *w, int64_t w_len, int64_t n_rows, int64_t n_cols,
                uint8_t *dst, int64_t dst_len);
int lme_matmul_packed(int64_t w_type, const uint8_t *p, int64_t p_len,
                      int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                      const int8_t *xq, int64_t xq_len, int64_t xq_stride, const float *xd, int64_t xd_len,
                      const float *xs, int64_t xs_len, int64_t n_tok, int64_t n_terms,
                      float *out, int64_t out_len);

/* ---- attention.c ------------------------------------------------------------------------------ */
/* Attention of one token for the `group` query heads sharing one kv head, over the positions
 * first_pos .. n_pos - 1 (0 <= first_pos < n_pos; first_pos > 0: a sliding window):
 * q [group * head_dim] (pre-scaled by the attention scale), keys [ceil(n_pos/16) tiles][head_dim][16]
 * (transposed tiles of 16 positions), values [n_pos][head_dim], both of kv_type LME_TYPE_F32 or
 * LME_TYPE_F16 (lengths in elements), scores: scratch of group * ceil(n_pos/16)*16 floats;
 * out [group * head_dim]. cap > 0 soft-caps the scores to cap * tanh(s / cap) (gemma2), 0 does
 * not; a negative, inf or NaN cap, or first_pos outside [0, n_pos), is LME_ERR_SHAPE. Any
 * head_dim; the float sums (and the exponential: expf, or a polynomial on AVX-512) differ between
 * paths within float rounding. */
int lme_attention(int64_t kv_type, const float *q, int64_t q_len, int64_t group, int64_t head_dim,
                  const void *keys, int64_t keys_len, const void *values, int64_t values_len,
                  int64_t n_pos, int64_t first_pos, float cap, float *scores, int64_t scores_len, float *out,
                  int64_t out_len);

/* ---- ops.c: elementwise work ------------------------------------------------------------------ */

/* out[i] = silu(gate[i]) * up[i] for i < gate_len. Portable path: kernels/ops.py's loop bit for
 * bit (expf); AVX2 and AVX-512: a polynomial exp (relative error ~2e-7). */
int lme_swiglu(const float *gate, int64_t gate_len, const float *up, int64_t up_len, float *out,
               int64_t out_len);

/* The unnormalized softmax of each row of s [s_len / n_cols rows][n_cols], in place:
 * s[r][j] = exp(s[r][j] - max_j s[r][j]), sums[r] = the row's sum of them (the caller divides:
 * attention divides its head_dim-wide output rather than the n_cols-wide weights). A row's -inf
 * entries (a causal mask) give 0 on the portable path, ~1e-38 on the SIMD ones; a row needs one
 * finite value. Portable path: kernels/ops.py's loop bit for bit (expf, the sum in order); AVX2
 * (on AVX-512 CPUs too): a polynomial exp (relative error ~2e-7), the sum in 8 lanes. */
int lme_softmax_rows(float *s, int64_t s_len, int64_t n_cols, float *sums, int64_t sums_len);

/* One token's activations x [x_len] -> int8 blocks (as kernels/matmul.py _quantize_row_numba,
 * bit for bit, on every path): xq [x_len], xd, xs [x_len / 32]; with rq_len > 0 also the
 * residual's blocks rq, rd, rs (the second int8 term). */
int lme_quantize_row(const float *x, int64_t x_len, int8_t *xq, int64_t xq_len, float *xd, int64_t xd_len,
                     float *xs, int64_t xs_len, int8_t *rq, int64_t rq_len, float *rd, int64_t rd_len,
                     float *rs, int64_t rs_len);

/* out[i] = the f16 bits of x[i] for i < x_len, rounded to nearest even (kernels/quant.py's
 * float_to_half_bits, bit for bit, on every path). */
int lme_to_f16(const float *x, int64_t x_len, uint16_t *out, int64_t out_len);

/* Rotary embedding of one token in place (kernels/ops.py `rope`, bit for bit, on every path): x
 * [n_heads * head_dim], the first rope_dim dims of each head rotated by the angles whose cos, sin
 * [rope_dim / 2] are given; pairs (2i, 2i + 1), or (i, i + rope_dim / 2) with neox != 0. */
int lme_rope(float *x, int64_t x_len, int64_t n_heads, int64_t head_dim, int64_t rope_dim, int64_t neox,
             const float *cos, int64_t cos_len, const float *sin, int64_t sin_len);

/* ---- kquants.c: K-quant products ------------------------------------------------------------ */

/* K-quant products (kquants.c): ggml's Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS weight blocks,
 * read in place, times activations quantized to Q8_K. Same conventions as the rest of the API
 * (return codes LME_OK / LME_ERR_*, buffer lengths in elements, the SIMD path of lme_get_isa).
 *
 * Superblocks: every one of these types stores a row in superblocks of 256 values (LME_QK_K);
 * n_cols must be a multiple of 256, and row r of W is at bytes [r * row_bytes, (r + 1) * row_bytes)
 * of w, row_bytes = n_cols / 256 * (bytes per superblock: Q2_K 84, Q3_K 110, Q4_K 144,
 * Q5_K 176, Q6_K 210, IQ4_XS 136).
 *
 * Q8_K activations of n_tok tokens x n_cols values, three arrays (nb = n_cols / 256):
 *     xq   int8  [n_tok * n_cols]        in [-127, 127]
 *     xd   float [n_tok * nb]            one scale per 256 values: x[t, i] ~ xd[t, i/256] * xq[t, i]
 *     xsum int16 [n_tok * n_cols / 16]   xsum[t, j] = sum of xq[t, 16 j .. 16 j + 15]
 * (the fields of ggml's block_q8_K, as separate arrays).
 *
 * lme_quantize_q8k: x float [n_tok * n_cols] -> xq, xd, xsum. Per 256 values: amax = max |x|
 *     (NaN skipped), d = amax / 127, xq = rint(x * (1 / d)) rounded to nearest even and clamped
 *     to [-127, 127], a NaN product giving 0 (so all 0 when amax is 0; an inf in the block makes
 *     d inf and every xq 0); xsum the sums of 16. Same bits on every SIMD path. (ggml's
 *     quantize_row_q8_K maps the value of largest magnitude to -128; this maps it to +-127, as
 *     the 32-value quantizer of kernels/matmul.py does, so xq never holds -128.)
 *
 * lme_matmul_k: out[t * n_rows + r] = dot(W[r], x[t]) for rows r in [row_begin, row_end) and
 *     tokens t < n_tok. Per (row, token), over superblocks b in order, float32 acc from 0:
 *         isum = sum over the 16 sub-blocks s of 16 values: sc_s * sum_i q_i * xq_i    (exact int)
 *         imin = sum over s of mn_s * xsum_s                      (exact int; Q2_K, Q4_K, Q5_K)
 *         acc  = acc + (d * xd) * (float)isum
 *         acc  = acc - (dmin * xd) * (float)imin                  (Q2_K, Q4_K, Q5_K)
 *     with the weight of value i = d * sc_s * q_i - dmin * mn_s (q, sc, mn integers of the block,
 *     d, dmin its f16 scales). The result of a (row, token) does not depend on n_tok, on the
 *     token's place in the batch or on the row range (batch invariance), and is the same on
 *     every SIMD path. xsum must be the sums of xq (as lme_quantize_q8k writes them), and xq
 *     must not hold -128: other values give wrong results, never a crash.
 *     Memory traffic: the rows are taken in tiles of about 48 KB; each tile is read from memory
 *     once and then dotted with the tokens in groups of 4 (AVX2; 8 in portable C), every
 *     superblock unpacked once per group. Threads may split the rows (disjoint row ranges).
 */
#define LME_QK_K 256    /* values per superblock (and per Q8_K activation block) */

int lme_quantize_q8k(const float *x, int64_t x_len, int64_t n_tok, int64_t n_cols,
                     int8_t *xq, int64_t xq_len, float *xd, int64_t xd_len,
                     int16_t *xsum, int64_t xsum_len);

int lme_matmul_k(int64_t w_type, const uint8_t *w, int64_t w_len,
                 int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                 const int8_t *xq, int64_t xq_len, const float *xd, int64_t xd_len,
                 const int16_t *xsum, int64_t xsum_len, int64_t n_tok,
                 float *out, int64_t out_len);

#endif
