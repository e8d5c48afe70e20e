/* packed: Q8_0 / Q4_0 / Q4_1 matrices re-laid out 16 rows at a time, and their product with int8
 * activations (API: lmengine.h).
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
 * stores, block after block, one "group block" per 32 columns (struct group_q8_0 / group_q4_0 /
 * group_q4_1 below):
 *
 *     d    f16 x 16      the 16 rows' block scales
 *     m    f16 x 16      the 16 rows' block minimums (Q4_1 only)
 *     qs   chunks of 64 bytes, chunk k = 4 bytes of each of the 16 rows (row r at offset 4r):
 *          Q4_0 / Q4_1: 4 chunks, chunk k = bytes 4k..4k+3 of the row's 16 nibble bytes. Byte j
 *                       of a ggml Q4 block holds value j (low nibble) and value j + 16 (high),
 *                       so chunk k's low nibbles are values 4k..4k+3 and its high nibbles values
 *                       16+4k..19+4k.
 *          Q8_0:        8 chunks, chunk k = values 4k..4k+3, stored as q + 128 (unsigned), so
 *                       that every type is an unsigned-by-signed product.
 *
 * Every type is then read as  w = d * u + m  with u unsigned: Q4_1 (u = nibble, m from the block),
 * Q4_0 (u = nibble, m = -8 d), Q8_0 (u = q + 128, m = -128 d). A block's dot product with an
 * activation block x = xd * xq (xs = xd * sum(xq), as in lmengine.h) is
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
 * each term j, acc += float(isum_bj) * (d_b * xd_bj); then acc += m_b * (xs_b0 [+ xs_b1]). (The
 * AVX-512 and AVX2 kernels fuse these multiply-adds, the portable loop rounds the product first,
 * and AVX2 computes Q8_0 in the signed form, see its section: their results differ within float
 * rounding.)
 */
#include "common.h"

#define GROUP_ROWS 16                          /* rows per packed group: one 512-bit register of int32 */
#define LANE_BYTES 4                           /* bytes of one row in a chunk: one 32-bit lane */
#define CHUNK_BYTES (GROUP_ROWS * LANE_BYTES)  /* 64: one chunk, one 512-bit register */
#define TOKEN_GROUP 8                          /* tokens sharing each load of a group block */
#define PREFETCH_BYTES 2048                    /* how far ahead the weights are prefetched */

/* ---- layout -------------------------------------------------------------------------------- */

/* One group block: 16 rows x 32 columns. f16 values as little-endian bytes (no alignment: a
 * packed matrix may start at any byte); qs[k][r] = the 4 bytes of row r in chunk k. */
struct group_q8_0 {
    uint8_t d[GROUP_ROWS][2];
    uint8_t qs[QK / LANE_BYTES][GROUP_ROWS][LANE_BYTES];          /* values 4k..4k+3, q + 128 */
};

struct group_q4_0 {
    uint8_t d[GROUP_ROWS][2];
    uint8_t qs[QK / 2 / LANE_BYTES][GROUP_ROWS][LANE_BYTES];      /* nibble bytes 4k..4k+3 */
};

struct group_q4_1 {
    uint8_t d[GROUP_ROWS][2];
    uint8_t m[GROUP_ROWS][2];
    uint8_t qs[QK / 2 / LANE_BYTES][GROUP_ROWS][LANE_BYTES];      /* nibble bytes 4k..4k+3 */
};

_Static_assert(sizeof(struct group_q8_0) == 544 && offsetof(struct group_q8_0, qs) == 32
               && sizeof(((struct group_q8_0 *)0)->qs[0]) == CHUNK_BYTES, "Q8_0 group block");
_Static_assert(sizeof(struct group_q4_0) == 288 && offsetof(struct group_q4_0, qs) == 32, "Q4_0 group block");
_Static_assert(sizeof(struct group_q4_1) == 320 && offsetof(struct group_q4_1, m) == 32
               && offsetof(struct group_q4_1, qs) == 64, "Q4_1 group block");
_Static_assert(sizeof(struct group_q8_0) == GROUP_ROWS * sizeof(struct block_q8_0)
               && sizeof(struct group_q4_0) == GROUP_ROWS * sizeof(struct block_q4_0)
               && sizeof(struct group_q4_1) == GROUP_ROWS * sizeof(struct block_q4_1),
               "packing moves bytes, it adds none");

static int64_t group_block_bytes(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q4_1: return sizeof(struct group_q4_1);
    case LME_TYPE_Q4_0: return sizeof(struct group_q4_0);
    case LME_TYPE_Q8_0: return sizeof(struct group_q8_0);
    default: return 0;
    }
}

/* where qs starts in a group block (d, and m, come first) */
static ALWAYS_INLINE int64_t values_offset(int64_t w_type) {
    return w_type == LME_TYPE_Q4_1 ? offsetof(struct group_q4_1, qs) : offsetof(struct group_q8_0, qs);
}
_Static_assert(offsetof(struct group_q4_0, qs) == offsetof(struct group_q8_0, qs), "values_offset");

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

/* ---- packing: one ggml block -> row r of a group block, per type ---------------------------- */

static void pack_block_q8_0(const uint8_t *src, int r, uint8_t *dst) {
    const struct block_q8_0 *in = (const struct block_q8_0 *)src;
    struct group_q8_0 *out = (struct group_q8_0 *)dst;
    memcpy(out->d[r], in->d, 2);
    for (int k = 0; k < QK / LANE_BYTES; k++)
        for (int i = 0; i < LANE_BYTES; i++)
            out->qs[k][r][i] = (uint8_t)(in->qs[LANE_BYTES * k + i] + 128);
}

static void pack_block_q4_0(const uint8_t *src, int r, uint8_t *dst) {
    const struct block_q4_0 *in = (const struct block_q4_0 *)src;
    struct group_q4_0 *out = (struct group_q4_0 *)dst;
    memcpy(out->d[r], in->d, 2);
    for (int k = 0; k < QK / 2 / LANE_BYTES; k++)
        memcpy(out->qs[k][r], in->qs + LANE_BYTES * k, LANE_BYTES);
}

static void pack_block_q4_1(const uint8_t *src, int r, uint8_t *dst) {
    const struct block_q4_1 *in = (const struct block_q4_1 *)src;
    struct group_q4_1 *out = (struct group_q4_1 *)dst;
    memcpy(out->d[r], in->d, 2);
    memcpy(out->m[r], in->m, 2);
    for (int k = 0; k < QK / 2 / LANE_BYTES; k++)
        memcpy(out->qs[k][r], in->qs + LANE_BYTES * k, LANE_BYTES);
}

typedef void (*pack_block_fn)(const uint8_t *src, int r, uint8_t *dst);

static pack_block_fn pack_block_of(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q8_0: return pack_block_q8_0;
    case LME_TYPE_Q4_0: return pack_block_q4_0;
    default: return pack_block_q4_1;
    }
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
    const int64_t gb = group_block_bytes(w_type);
    const pack_block_fn pack_block = pack_block_of(w_type);
    for (int64_t row = 0; row < n_rows; row++) {
        const int64_t group = row / GROUP_ROWS;
        for (int64_t b = 0; b < n_blocks; b++)
            pack_block(w + (row * n_blocks + b) * bytes, (int)(row % GROUP_ROWS), dst + (group * n_blocks + b) * gb);
    }
    return LME_OK;
}

struct packed_args {
    int64_t w_type; const uint8_t *p; int64_t n_rows, n_cols, row_begin, row_end;
    const int8_t *xq; const float *xd, *xs; int64_t n_tok, n_terms; float *out;
};

/* ---- scalar path ----------------------------------------------------------------------------- */

/* Row r of a group block, per type: its 32 unsigned values u (value i at u[i]), its scale d and
 * its minimum m (w = d * u + m). */
typedef void (*unpack_row_fn)(const uint8_t *blk, int r, int32_t u[QK], float *d, float *m);

static void unpack_row_q8_0(const uint8_t *blk, int r, int32_t u[QK], float *d, float *m) {
    const struct group_q8_0 *g = (const struct group_q8_0 *)blk;
    for (int i = 0; i < QK; i++)
        u[i] = g->qs[i / LANE_BYTES][r][i % LANE_BYTES];
    *d = fp16_to_fp32(load_u16(g->d[r]));
    *m = implied_min_factor(LME_TYPE_Q8_0) * *d;
}

/* the 16 nibble bytes of row r: byte j holds values j (low nibble) and j + 16 (high) */
static void unpack_nibbles(const uint8_t qs[QK / 2 / LANE_BYTES][GROUP_ROWS][LANE_BYTES], int r, int32_t u[QK]) {
    for (int j = 0; j < QK / 2; j++) {
        const uint8_t byte = qs[j / LANE_BYTES][r][j % LANE_BYTES];
        u[j] = byte & 0x0F;
        u[j + QK / 2] = byte >> 4;
    }
}

static void unpack_row_q4_0(const uint8_t *blk, int r, int32_t u[QK], float *d, float *m) {
    const struct group_q4_0 *g = (const struct group_q4_0 *)blk;
    unpack_nibbles(g->qs, r, u);
    *d = fp16_to_fp32(load_u16(g->d[r]));
    *m = implied_min_factor(LME_TYPE_Q4_0) * *d;
}

static void unpack_row_q4_1(const uint8_t *blk, int r, int32_t u[QK], float *d, float *m) {
    const struct group_q4_1 *g = (const struct group_q4_1 *)blk;
    unpack_nibbles(g->qs, r, u);
    *d = fp16_to_fp32(load_u16(g->d[r]));
    *m = fp16_to_fp32(load_u16(g->m[r]));
}

static unpack_row_fn unpack_row_of(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q8_0: return unpack_row_q8_0;
    case LME_TYPE_Q4_0: return unpack_row_q4_0;
    default: return unpack_row_q4_1;
    }
}

static void matmul_packed_scalar(const struct packed_args *a) {
    const int64_t n_blocks = a->n_cols / QK, gb = group_block_bytes(a->w_type);
    const unpack_row_fn unpack_row = unpack_row_of(a->w_type);
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const int64_t group = row / GROUP_ROWS;
        const int r = (int)(row % GROUP_ROWS);
        for (int64_t t = 0; t < a->n_tok; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < n_blocks; b++) {
                int32_t u[QK];
                float d, m;
                unpack_row(a->p + (group * n_blocks + b) * gb, r, u, &d, &m);
                float xs_sum = 0.0f;
                for (int64_t j = 0; j < a->n_terms; j++) {
                    const int64_t x_row = j * a->n_tok + t;
                    const int8_t *xq = a->xq + x_row * a->n_cols + b * QK;
                    int32_t isum = 0;
                    for (int i = 0; i < QK; i++)
                        isum += u[i] * (int32_t)xq[i];
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
    const int64_t n_blocks = a->n_cols / QK, gb = group_block_bytes(w_type), vo = values_offset(w_type);
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
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));   /* d: first */
        const __m512 m = w_type == LME_TYPE_Q4_1
                             ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + offsetof(struct group_q4_1, m))))
                             : _mm512_mul_ps(d, _mm512_set1_ps(implied_min_factor(w_type)));
        __m512i u[8];                                    /* u[k]: values 4k..4k+3 of the 16 rows */
        if (w_type == LME_TYPE_Q8_0) {
            for (int k = 0; k < 8; k++)
                u[k] = _mm512_loadu_si512(blk + vo + CHUNK_BYTES * k);
        } else {
            for (int k = 0; k < 4; k++) {
                const __m512i raw = _mm512_loadu_si512(blk + vo + CHUNK_BYTES * k);
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

/* ---- AVX2 path ------------------------------------------------------------------------------- */

/* AVX2 has no int8 product accumulating into int32: vpmaddubsw multiplies u8 by s8 and adds
 * adjacent pairs into (saturating) int16, vpmaddwd then adds int16 pairs into int32. Its 256-bit
 * registers hold 8 rows' lanes, so a group runs as two halves of 8 rows (bytes 0..31 and 32..63
 * of every chunk), each over all the group's blocks in turn (the second half finds them in
 * cache). Per half, block, token and term, with x_k = activation bytes 4k..4k+3 in every lane and
 * u_k = the half's chunk k (values 4k..4k+3 of its 8 rows):
 *     Q4_0, Q4_1 (u <= 15):  s16 = sum over k of maddubs(u_k, x_k), summed in int16: a lane adds
 *                            16 products, at most 16 * 15 * 128 < 2^15, so it cannot overflow;
 *                            isum = madd(s16, 1)
 *     Q8_0 (u = q + 128):    maddubs(u, x) pairs could reach 2 * 255 * 127 and saturate, so the
 *                            signed form, q = u - 128 and m = 0: isum = sum over k of
 *                            madd(maddubs(|q_k|, sign(x_k, q_k)), 1) (pairs at most 2 * 128 * 127),
 *                            and no m * xs term. Same value as the u-form, without its cancelling
 *                            terms; computing 128 * sum(xq) to keep the u-form cost 20%.
 * The float part is otherwise the AVX-512 kernel's (fused multiply-adds, the same order), and a
 * (row, token) result does not depend on the other tokens of the call.
 * Against the row-major kernel of qdot.c (one thread, a 1536 x 2048 matrix in cache, 1 / 4 / 16 /
 * 64 tokens; Zen 3): Q4_0 and Q4_1 x1.9-2.1 / x1.5 / x1.7 / x1.7 (about 67 GMAC/s from 4 tokens
 * on), Q8_0 x1.1 / x1.1 / x1.3 / x1.3. */

#define HALF_ROWS 8                           /* rows per 256-bit register of int32 */

/* 4 activation bytes (values 4k..4k+3 of a block) in every 32-bit lane */
TARGET_AVX2 static ALWAYS_INLINE __m256i broadcast4_avx2(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* isum of the half's 8 rows with one token's block xq (32 bytes): u[k] as described above (Q8_0:
 * q, signed) */
TARGET_AVX2 static ALWAYS_INLINE __m256i isum8_avx2(int64_t w_type, const __m256i u[8], const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (w_type == LME_TYPE_Q8_0) {
        __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
        for (int k = 0; k < 8; k += 2) {
            even = _mm256_add_epi32(even, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(u[k]),
                                                                                 _mm256_sign_epi8(broadcast4_avx2(xq + 4 * k), u[k])), ones));
            odd = _mm256_add_epi32(odd, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(u[k + 1]),
                                                                               _mm256_sign_epi8(broadcast4_avx2(xq + 4 * k + 4), u[k + 1])), ones));
        }
        return _mm256_add_epi32(even, odd);
    }
    __m256i even = _mm256_maddubs_epi16(u[0], broadcast4_avx2(xq));
    __m256i odd = _mm256_maddubs_epi16(u[1], broadcast4_avx2(xq + 4));
    for (int k = 2; k < 8; k += 2) {
        even = _mm256_add_epi16(even, _mm256_maddubs_epi16(u[k], broadcast4_avx2(xq + 4 * k)));
        odd = _mm256_add_epi16(odd, _mm256_maddubs_epi16(u[k + 1], broadcast4_avx2(xq + 4 * k + 4)));
    }
    return _mm256_madd_epi16(_mm256_add_epi16(even, odd), ones);
}

/* Half `half` (rows 8 half .. 8 half + 7) of one group of 16 rows times tokens t0 .. t0 + n_group - 1
 * (w_type, n_terms and n_group compile-time constants after inlining) */
TARGET_AVX2 static ALWAYS_INLINE void half_tokens_avx2(const struct packed_args *a, int64_t w_type, int n_terms,
                                                       int n_group, int64_t group, int half, int64_t t0) {
    const int64_t n_blocks = a->n_cols / QK, gb = group_block_bytes(w_type), vo = values_offset(w_type);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[TOKEN_GROUP];
    for (int t = 0; t < n_group; t++)
        acc[t] = _mm256_setzero_ps();
    const uint8_t *blk = a->p + group * n_blocks * gb;
    const int prefetch = n_group * n_terms >= 4 && t0 == 0 && half == 0;   /* as the AVX-512 kernel */
    for (int64_t b = 0; b < n_blocks; b++, blk += gb) {
        if (prefetch)
            for (int64_t line = 0; line < gb; line += 64)
                _mm_prefetch((const char *)blk + PREFETCH_BYTES + line, _MM_HINT_T0);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 2 * HALF_ROWS * half)));
        const __m256 m = w_type == LME_TYPE_Q4_1
                             ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + offsetof(struct group_q4_1, m)
                                                                                  + 2 * HALF_ROWS * half)))
                         : w_type == LME_TYPE_Q4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(implied_min_factor(w_type)))
                                                   : _mm256_setzero_ps();     /* Q8_0, signed form: no m */
        const uint8_t *values = blk + vo + 4 * HALF_ROWS * half;
        __m256i u[8];                                  /* u[k]: values 4k..4k+3 of the half's 8 rows */
        if (w_type == LME_TYPE_Q8_0) {
            for (int k = 0; k < 8; k++)                /* q = u - 128: flip the top bit */
                u[k] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(values + CHUNK_BYTES * k)),
                                        _mm256_set1_epi8((char)0x80));
        } else {
            for (int k = 0; k < 4; k++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(values + CHUNK_BYTES * k));
                u[k] = _mm256_and_si256(raw, low4);
                u[k + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            }
        }
        for (int t = 0; t < n_group; t++) {
            float xs_sum = 0.0f;
            for (int j = 0; j < n_terms; j++) {
                const int64_t x_row = j * a->n_tok + t0 + t;
                const __m256 isum = _mm256_cvtepi32_ps(isum8_avx2(w_type, u, a->xq + x_row * a->n_cols + b * QK));
                acc[t] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, _mm256_set1_ps(a->xd[x_row * n_blocks + b])), acc[t]);
                xs_sum += a->xs[x_row * n_blocks + b];
            }
            if (w_type != LME_TYPE_Q8_0)
                acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs_sum), acc[t]);
        }
    }
    const int64_t row0 = group * GROUP_ROWS + HALF_ROWS * half;
    const int64_t rows_here = a->row_end - row0 < HALF_ROWS ? a->row_end - row0 : HALF_ROWS;
    for (int t = 0; t < n_group; t++) {
        float *o = a->out + (t0 + t) * a->n_rows + row0;
        if (rows_here == HALF_ROWS) {
            _mm256_storeu_ps(o, acc[t]);
        } else {
            float tmp[HALF_ROWS];
            _mm256_storeu_ps(tmp, acc[t]);
            memcpy(o, tmp, (size_t)rows_here * sizeof(float));
        }
    }
}

TARGET_AVX2 static ALWAYS_INLINE void groups_avx2(const struct packed_args *a, int64_t w_type, int n_terms) {
    const int64_t group_end = (a->row_end + GROUP_ROWS - 1) / GROUP_ROWS;
    for (int64_t group = a->row_begin / GROUP_ROWS; group < group_end; group++) {
        for (int half = 0; half < 2 && group * GROUP_ROWS + HALF_ROWS * half < a->row_end; half++) {
            int64_t t0 = 0;
            for (; t0 + TOKEN_GROUP <= a->n_tok; t0 += TOKEN_GROUP)
                half_tokens_avx2(a, w_type, n_terms, TOKEN_GROUP, group, half, t0);
            switch (a->n_tok - t0) {                      /* the last tokens: a constant count */
            case 7: half_tokens_avx2(a, w_type, n_terms, 7, group, half, t0); break;
            case 6: half_tokens_avx2(a, w_type, n_terms, 6, group, half, t0); break;
            case 5: half_tokens_avx2(a, w_type, n_terms, 5, group, half, t0); break;
            case 4: half_tokens_avx2(a, w_type, n_terms, 4, group, half, t0); break;
            case 3: half_tokens_avx2(a, w_type, n_terms, 3, group, half, t0); break;
            case 2: half_tokens_avx2(a, w_type, n_terms, 2, group, half, t0); break;
            case 1: half_tokens_avx2(a, w_type, n_terms, 1, group, half, t0); break;
            default: break;
            }
        }
    }
}

TARGET_AVX2 static void matmul_packed_avx2(const struct packed_args *a) {
    const int two = a->n_terms == 2;
    switch (a->w_type) {
    case LME_TYPE_Q4_1: two ? groups_avx2(a, LME_TYPE_Q4_1, 2) : groups_avx2(a, LME_TYPE_Q4_1, 1); return;
    case LME_TYPE_Q4_0: two ? groups_avx2(a, LME_TYPE_Q4_0, 2) : groups_avx2(a, LME_TYPE_Q4_0, 1); return;
    default: two ? groups_avx2(a, LME_TYPE_Q8_0, 2) : groups_avx2(a, LME_TYPE_Q8_0, 1); return;
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
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512: matmul_packed_avx512(&a); break;
    case LME_ISA_AVX2: matmul_packed_avx2(&a); break;
#endif
    default: matmul_packed_scalar(&a); break;
    }
    return LME_OK;
}
