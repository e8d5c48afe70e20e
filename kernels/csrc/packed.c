/* packed: Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / IQ4_XS matrices re-laid out 16 rows at a time,
 * and their product with int8 activations (API: lmengine.h).
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
 * Q4_K and Q5_K are packed per superblock of 256 columns: a "group superblock" is a header (struct
 * k_header: the 16 rows' f16 d and dmin, the 6-bit scales sc and mins mn of their 8 groups of 32
 * values as one byte each), then per group its chunks: 4 of the values' low 4 bits in Q4_1's
 * layout (regrouped: byte j of a group = value j | value j + 16 << 4; ggml's pairs groups 2n and
 * 2n + 1 in one byte instead), and for Q5_K a 5th chunk of their bit 4 (row r's 4 bytes; byte i:
 * bit k = bit 4 of value 4k + i, bit 4 + k = that of value 16 + 4k + i, k < 4). A group of 32
 * values is then a Q4_1 block (u <= 15 or 31) with d = d_sb * sc and m = -(dmin_sb * mn), both
 * exact in float32 (an 11-bit f16 significand times a 6-bit integer), so the product is Q4_1's on
 * 32-value activation blocks -- finer than ggml's Q8_K (one activation scale per 256 values). The
 * scales and mins take one byte instead of 12 bits: per 16 rows x 256 columns Q4_K 2368 bytes
 * against ggml's 16 x 144 = 2304 (+2.8%), Q5_K 2880 against 2816 (+2.3%).
 *
 * Q6_K (w = d_sb * sc_s * q, q = 6-bit value - 32, one int8 scale sc_s per sub-block of 16 values)
 * has a header of the 16 rows' f16 d and their int8 scales (struct q6_header), then per group 6
 * chunks: 4 of the low 4 bits as Q4_1's, then 2 of the top 2 bits (chunk 4 for values 0..15, 5
 * for 16..31: row r's byte i holds at bits 2k, 2k + 1 those of value 4k + i, resp. 16 + 4k + i),
 * 3360 bytes per 16 x 256, as ggml's 16 x 210. Its block sum is isum = sum over the two sub-blocks
 * of sc_s * sum(q x) -- exact in int32 and in float32 (|isum| <= 2 * 128 * 16 * 32 * 127 < 2^24) --
 * with d = d_sb and m = 0: the signed form of Q8_0's AVX2 kernel, no m * xs term.
 *
 * IQ4_XS (w = d_sb * (sc - 32) * kvalues[nibble], 6-bit scales per group of 32) has a header of
 * the 16 rows' f16 d and their group scales minus 32 as int8 (struct iq4_header), then per group
 * the 4 nibble chunks of Q4_1's layout (ggml's nibble order within a group is already Q4_1's):
 * 2208 bytes per 16 x 256 against ggml's 16 x 136 = 2176 (+1.5%). A group is read in the signed
 * form (the codebook values, -127..113, looked up by byte shuffles), d = d_sb * (sc - 32), m = 0.
 *
 * The K types have an AVX2 kernel only (so have the row-major K kernels of kquants.c): on an
 * AVX-512 machine they run on it.
 *
 * Every type is then read as  w = d * u + m  with u unsigned: Q4_1 (u = nibble, m from the block),
 * Q4_0 (u = nibble, m = -8 d), Q8_0 (u = q + 128, m = -128 d), Q4_K and Q5_K (u = the 4- or 5-bit
 * value, d and m from the superblock's and the group's scales). A block's dot product with an activation block
 * x = xd * xq (xs = xd * sum(xq), as in lmengine.h) is
 *
 *     d * xd * isum(u, xq) + m * xs,     isum an exact int32 sum (|u| <= 255, |xq| <= 127)
 *
 * Group block sizes: Q4_1 64 + 256 = 320 bytes (the same 20 bytes per row-block as ggml), Q4_0
 * 32 + 256 = 288 (18), Q8_0 32 + 512 = 544 (34): packing moves bytes, it adds none (Q4_K, Q5_K: 2-3%).
 *
 * Activations may come in n_terms = 1 or 2 int8 terms per value (x = term 0 + term 1, the second
 * quantizing the first's rounding error; kernels.matmul ACT_INT8X2): term j of token t is row
 * j * n_tok + t of xq / xd / xs. Both terms accumulate into the token's one result.
 *
 * xq's rows are xq_stride >= n_cols bytes apart. Callers pad them (kernels.matmul X_ROW_PAD): at
 * n_cols = 4096 or 8192 unpadded rows are a multiple of 4 KB apart, so the 8 tokens of a group
 * fall in the same L1 sets and evict each other while the weights stream through (Q4_K, one
 * thread, 2048 rows, 8 tokens: 64-65 GMAC/s at 4096 or 8192 columns against 78-80 at 2048, 6144
 * or 7936).
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

/* The header of a Q4_K / Q5_K group superblock (16 rows x 256 columns = 8 groups of 32 values);
 * the groups' chunks follow, group after group (k_group_chunks each). */
#define QK_K LME_QK_K                          /* values per K-quant superblock */
#define K_GROUPS (QK_K / QK)                   /* groups of 32 values per superblock */
struct k_header {
    uint8_t d[GROUP_ROWS][2];
    uint8_t dmin[GROUP_ROWS][2];
    uint8_t sc[K_GROUPS][GROUP_ROWS];                             /* 6-bit scale of group g, row r */
    uint8_t mn[K_GROUPS][GROUP_ROWS];                             /* 6-bit min */
};

/* The header of a Q6_K group superblock */
struct q6_header {
    uint8_t d[GROUP_ROWS][2];
    int8_t sc[2 * K_GROUPS][GROUP_ROWS];                          /* scale of sub-block s, row r */
};

/* The header of an IQ4_XS group superblock */
struct iq4_header {
    uint8_t d[GROUP_ROWS][2];
    int8_t sc[K_GROUPS][GROUP_ROWS];                              /* scale - 32 of group g, row r */
};

/* the types packed per superblock of 256 columns (the K types with a packed layout and IQ4_XS),
 * and their header and chunks per group of 32 values */
static ALWAYS_INLINE int per_superblock(int64_t w_type) {
    return w_type == LME_TYPE_Q4_K || w_type == LME_TYPE_Q5_K || w_type == LME_TYPE_Q6_K || w_type == LME_TYPE_IQ4_XS;
}
static ALWAYS_INLINE int64_t k_header_bytes(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q6_K: return sizeof(struct q6_header);
    case LME_TYPE_IQ4_XS: return sizeof(struct iq4_header);
    default: return sizeof(struct k_header);
    }
}
static ALWAYS_INLINE int64_t k_group_chunks(int64_t w_type) {
    return w_type == LME_TYPE_Q6_K ? 6 : w_type == LME_TYPE_Q5_K ? 5 : 4;
}

/* the types whose header is a k_header (d, dmin, scales and mins) */
static ALWAYS_INLINE int has_k_header(int64_t w_type) { return w_type == LME_TYPE_Q4_K || w_type == LME_TYPE_Q5_K; }

/* whether w = d u + m has an m (the signed forms, Q8_0 on AVX2, Q6_K and IQ4_XS, have none) */
static ALWAYS_INLINE int signed_form(int64_t w_type) {
    return w_type == LME_TYPE_Q8_0 || w_type == LME_TYPE_Q6_K || w_type == LME_TYPE_IQ4_XS;
}

_Static_assert(sizeof(struct group_q8_0) == 544 && offsetof(struct group_q8_0, qs) == 32
               && sizeof(((struct group_q8_0 *)0)->qs[0]) == CHUNK_BYTES, "Q8_0 group block");
_Static_assert(sizeof(struct group_q4_0) == 288 && offsetof(struct group_q4_0, qs) == 32, "Q4_0 group block");
_Static_assert(sizeof(struct group_q4_1) == 320 && offsetof(struct group_q4_1, m) == 32
               && offsetof(struct group_q4_1, qs) == 64, "Q4_1 group block");
_Static_assert(sizeof(struct group_q8_0) == GROUP_ROWS * sizeof(struct block_q8_0)
               && sizeof(struct group_q4_0) == GROUP_ROWS * sizeof(struct block_q4_0)
               && sizeof(struct group_q4_1) == GROUP_ROWS * sizeof(struct block_q4_1),
               "packing moves bytes, it adds none");
_Static_assert(sizeof(struct k_header) == 320 && offsetof(struct k_header, sc) == 64
               && offsetof(struct k_header, mn) == 192, "K group superblock header");
_Static_assert(sizeof(struct q6_header) == 288 && offsetof(struct q6_header, sc) == 32, "Q6_K header");
_Static_assert(sizeof(struct iq4_header) == 160 && offsetof(struct iq4_header, sc) == 32, "IQ4_XS header");

/* bytes of one packed unit: a group block (16 rows x 32 columns), for the per_superblock types a
 * group superblock (16 x 256); 0: no packed layout */
static int64_t group_block_bytes(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q4_K: case LME_TYPE_Q5_K: case LME_TYPE_Q6_K: case LME_TYPE_IQ4_XS:
        return k_header_bytes(w_type) + K_GROUPS * k_group_chunks(w_type) * CHUNK_BYTES;
    case LME_TYPE_Q4_1: return sizeof(struct group_q4_1);
    case LME_TYPE_Q4_0: return sizeof(struct group_q4_0);
    case LME_TYPE_Q8_0: return sizeof(struct group_q8_0);
    default: return 0;
    }
}

/* columns of one packed unit, and ggml's bytes for them in one row */
static ALWAYS_INLINE int64_t unit_values(int64_t w_type) { return per_superblock(w_type) ? QK_K : QK; }
static ALWAYS_INLINE int64_t unit_src_bytes(int64_t w_type) {
    return per_superblock(w_type) ? kblock_bytes(w_type) : block_bytes(w_type);
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
    if (n_rows < 0 || n_cols <= 0 || n_cols % unit_values(w_type) != 0)
        return LME_ERR_SHAPE;
    const int64_t n_groups = (n_rows + GROUP_ROWS - 1) / GROUP_ROWS;
    const int64_t per_group = n_cols / unit_values(w_type) * gb;
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

/* Packing the K types works on 4 bytes (of 4 values) at a time, in 32-bit words: per value only
 * shifts and masks, so a 1B file packs at memory speed rather than at 0.6-0.8 GB/s per thread. */
static ALWAYS_INLINE void store_u32(uint8_t *p, uint32_t v) {     /* little-endian, any alignment */
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Row r's lanes (at `lanes` = chunk 0 + 4 r) of the 4 nibble chunks of one group of 32 values,
 * value l being bits [shift, shift + 4) of in[l]: byte j = value j | value j + 16 << 4 (Q4_1's). */
static void put_nibbles(const uint8_t *in, int shift, uint8_t *lanes) {
    for (int k = 0; k < 4; k++) {
        const uint32_t low = (load_u32(in + 4 * k) >> shift) & 0x0F0F0F0Fu;
        const uint32_t high = (load_u32(in + 16 + 4 * k) >> shift) & 0x0F0F0F0Fu;
        store_u32(lanes + k * CHUNK_BYTES, low | high << 4);
    }
}

/* Row r's lane of a chunk of top bits: byte i holds, at bits [width k, width (k + 1)), the bits
 * [shift, shift + width) of in[4k + i], for k < count (Q5_K: width 1, count 8, in[4k + i] being
 * value 4k + i and, from k = 4, value 16 + 4 (k - 4) + i; Q6_K: width 2, count 4). */
static ALWAYS_INLINE void put_top_bits(const uint8_t *in, int shift, int width, int count, uint8_t *lane) {
    const uint32_t mask = width == 1 ? 0x01010101u : 0x03030303u;
    uint32_t bits = 0;
    for (int k = 0; k < count; k++)
        bits |= ((load_u32(in + 4 * k) >> shift) & mask) << (width * k);
    store_u32(lane, bits);
}

/* A Q4_K / Q5_K superblock (144 / 176 bytes: d, dmin, 12 bytes of scales, Q5_K's 32 bytes qh,
 * 128 of nibbles qs) -> row r of a group superblock. Scales as ggml's get_scale_min_k4: bytes
 * s[0..11]; group j < 4: sc = s[j] & 63, mn = s[j + 4] & 63; j >= 4: the low 4 bits from s[j + 4]
 * (sc the low nibble, mn the high one), the top 2 from the top bits of s[j - 4] (sc) and s[j]
 * (mn). Values: group g's value l is nibble g % 2 of qs[32 (g / 2) + l], and (Q5_K) bit g of
 * qh[l] its bit 4. */
static void pack_block_k(int64_t w_type, const uint8_t *src, int r, uint8_t *dst) {
    struct k_header *out = (struct k_header *)dst;
    const uint8_t *s = src + 4, *qh = src + 16, *qs = src + (w_type == LME_TYPE_Q5_K ? 48 : 16);
    memcpy(out->d[r], src, 2);
    memcpy(out->dmin[r], src + 2, 2);
    for (int j = 0; j < K_GROUPS; j++) {
        out->sc[j][r] = j < 4 ? s[j] & 63 : (uint8_t)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        out->mn[j][r] = j < 4 ? s[j + 4] & 63 : (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
    for (int g = 0; g < K_GROUPS; g++) {
        uint8_t *lanes = dst + sizeof(struct k_header) + g * k_group_chunks(w_type) * CHUNK_BYTES + LANE_BYTES * r;
        put_nibbles(qs + QK * (g / 2), 4 * (g % 2), lanes);
        if (w_type == LME_TYPE_Q5_K)      /* byte i: bit k = bit g of qh[4k + i] (value 4k + i), k < 8 */
            put_top_bits(qh, g, 1, 8, lanes + 4 * CHUNK_BYTES);
    }
}

/* A Q6_K superblock (210 bytes: ql[128] | qh[64] | int8 scales[16] | f16 d) -> row r of a group
 * superblock. Value 128 n + 32 k + l (n < 2, k < 4, l < 32): low 4 bits nibble k / 2 of
 * ql[64 n + 32 (k % 2) + l], top 2 bits bits 2k, 2k + 1 of qh[32 n + l]. */
static void pack_block_q6_k(const uint8_t *src, int r, uint8_t *dst) {
    struct q6_header *out = (struct q6_header *)dst;
    const uint8_t *ql = src, *qh = src + 128;
    memcpy(out->d[r], src + 208, 2);
    for (int s = 0; s < 2 * K_GROUPS; s++)
        out->sc[s][r] = (int8_t)src[192 + s];
    for (int g = 0; g < K_GROUPS; g++) {
        const int n = g / 4, k = g % 4;
        uint8_t *lanes = dst + sizeof(struct q6_header) + g * k_group_chunks(LME_TYPE_Q6_K) * CHUNK_BYTES
                         + LANE_BYTES * r;
        put_nibbles(ql + 64 * n + 32 * (k % 2), 4 * (k / 2), lanes);
        for (int h = 0; h < 2; h++)       /* chunk 4 + h, byte i: bits 2kk.. = top of value 16 h + 4kk + i */
            put_top_bits(qh + 32 * n + QK / 2 * h, 2 * k, 2, 4, lanes + (4 + h) * CHUNK_BYTES);
    }
}

/* An IQ4_XS superblock (136 bytes: f16 d | u16 scales_h | scales_l[4] | qs[128]) -> row r of a
 * group superblock. Group g: scale = (nibble g % 2 of scales_l[g / 2]) | (bits 2g, 2g + 1 of
 * scales_h) << 4, minus 32; its nibbles qs[16 g .. 16 g + 15], byte j holding values j and j + 16
 * (Q4_1's order). */
static void pack_block_iq4_xs(const uint8_t *src, int r, uint8_t *dst) {
    struct iq4_header *out = (struct iq4_header *)dst;
    const uint16_t scales_h = load_u16(src + 2);
    memcpy(out->d[r], src, 2);
    for (int g = 0; g < K_GROUPS; g++) {
        const int low = (src[4 + g / 2] >> (4 * (g % 2))) & 0x0F, high = (scales_h >> (2 * g)) & 3;
        out->sc[g][r] = (int8_t)((low | high << 4) - 32);
        uint8_t *lanes = dst + sizeof(struct iq4_header) + g * k_group_chunks(LME_TYPE_IQ4_XS) * CHUNK_BYTES
                         + LANE_BYTES * r;
        for (int k = 0; k < QK / 2 / LANE_BYTES; k++)               /* as Q4_0 / Q4_1: a copy */
            memcpy(lanes + k * CHUNK_BYTES, src + 8 + 16 * g + LANE_BYTES * k, LANE_BYTES);
    }
}

static void pack_block_q4_k(const uint8_t *src, int r, uint8_t *dst) { pack_block_k(LME_TYPE_Q4_K, src, r, dst); }
static void pack_block_q5_k(const uint8_t *src, int r, uint8_t *dst) { pack_block_k(LME_TYPE_Q5_K, src, r, dst); }

typedef void (*pack_block_fn)(const uint8_t *src, int r, uint8_t *dst);

static pack_block_fn pack_block_of(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q4_K: return pack_block_q4_k;
    case LME_TYPE_Q5_K: return pack_block_q5_k;
    case LME_TYPE_Q6_K: return pack_block_q6_k;
    case LME_TYPE_IQ4_XS: return pack_block_iq4_xs;
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
    const int64_t bytes = unit_src_bytes(w_type), n_units = n_cols / unit_values(w_type);   /* per row */
    if (n_rows > 0 && n_units * bytes > INT64_MAX / n_rows)
        return LME_ERR_SHAPE;
    if (packed == 0)
        return LME_OK;
    if (w == NULL || dst == NULL)
        return LME_ERR_NULL;
    if (w_len < n_rows * n_units * bytes || dst_len < packed)
        return LME_ERR_LENGTH;
    memset(dst, 0, (size_t)packed);           /* padding rows: zero bytes, so d = m = 0 */
    const int64_t gb = group_block_bytes(w_type);
    const pack_block_fn pack_block = pack_block_of(w_type);
    for (int64_t row = 0; row < n_rows; row++) {
        const int64_t group = row / GROUP_ROWS;
        for (int64_t b = 0; b < n_units; b++)
            pack_block(w + (row * n_units + b) * bytes, (int)(row % GROUP_ROWS), dst + (group * n_units + b) * gb);
    }
    return LME_OK;
}

/* ---- reading a packed group: 32-column block b of the group starting at `group` ------------ */

/* bytes of one 16-row group of an n_cols matrix */
static ALWAYS_INLINE int64_t group_bytes(int64_t w_type, int64_t n_cols) {
    return n_cols / unit_values(w_type) * group_block_bytes(w_type);
}

/* the unit holding block b: its group block, or its group superblock */
static ALWAYS_INLINE const uint8_t *unit_of(int64_t w_type, const uint8_t *group, int64_t b) {
    return group + b / (unit_values(w_type) / QK) * group_block_bytes(w_type);
}

/* chunk 0 of block b's values (the next chunks follow, CHUNK_BYTES apart) */
static ALWAYS_INLINE const uint8_t *values_of(int64_t w_type, const uint8_t *group, int64_t b) {
    return per_superblock(w_type) ? unit_of(w_type, group, b) + k_header_bytes(w_type)
                                   + b % K_GROUPS * k_group_chunks(w_type) * CHUNK_BYTES
                             : unit_of(w_type, group, b) + values_offset(w_type);
}

struct packed_args {
    int64_t w_type; const uint8_t *p; int64_t n_rows, n_cols, row_begin, row_end;
    const int8_t *xq; int64_t xq_stride;               /* bytes from one xq row to the next */
    const float *xd, *xs; int64_t n_tok, n_terms; float *out;
};

/* ---- scalar path ----------------------------------------------------------------------------- */

/* Row r of block b of a group, per type: its 32 unsigned values u (value i at u[i]), its scale d
 * and its minimum m (w = d * u + m). */
typedef void (*unpack_row_fn)(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m);

static void unpack_row_q8_0(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    const struct group_q8_0 *g = (const struct group_q8_0 *)unit_of(LME_TYPE_Q8_0, group, b);
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

static void unpack_row_q4_0(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    const struct group_q4_0 *g = (const struct group_q4_0 *)unit_of(LME_TYPE_Q4_0, group, b);
    unpack_nibbles(g->qs, r, u);
    *d = fp16_to_fp32(load_u16(g->d[r]));
    *m = implied_min_factor(LME_TYPE_Q4_0) * *d;
}

static void unpack_row_q4_1(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    const struct group_q4_1 *g = (const struct group_q4_1 *)unit_of(LME_TYPE_Q4_1, group, b);
    unpack_nibbles(g->qs, r, u);
    *d = fp16_to_fp32(load_u16(g->d[r]));
    *m = fp16_to_fp32(load_u16(g->m[r]));
}

static void unpack_row_k(int64_t w_type, const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    const struct k_header *h = (const struct k_header *)unit_of(w_type, group, b);
    const uint8_t *chunks = values_of(w_type, group, b) + LANE_BYTES * r;
    const int64_t g = b % K_GROUPS;
    for (int j = 0; j < QK / 2; j++) {
        const uint8_t byte = chunks[j / LANE_BYTES * CHUNK_BYTES + j % LANE_BYTES];
        u[j] = byte & 0x0F;
        u[j + QK / 2] = byte >> 4;
        if (w_type == LME_TYPE_Q5_K) {             /* bit 4: bits j / 4 and 4 + j / 4 of byte j % 4 */
            const uint8_t bits = chunks[4 * CHUNK_BYTES + j % LANE_BYTES];
            u[j] |= ((bits >> (j / LANE_BYTES)) & 1) << 4;
            u[j + QK / 2] |= ((bits >> (4 + j / LANE_BYTES)) & 1) << 4;
        }
    }
    *d = fp16_to_fp32(load_u16(h->d[r])) * (float)h->sc[g][r];          /* exact: 11 x 6 bits */
    *m = -(fp16_to_fp32(load_u16(h->dmin[r])) * (float)h->mn[g][r]);
}

static void unpack_row_q4_k(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    unpack_row_k(LME_TYPE_Q4_K, group, b, r, u, d, m);
}

static void unpack_row_q5_k(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    unpack_row_k(LME_TYPE_Q5_K, group, b, r, u, d, m);
}

/* Q6_K: u = sc_s * q (signed), d = d_sb, m = 0 */
static void unpack_row_q6_k(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    const struct q6_header *h = (const struct q6_header *)unit_of(LME_TYPE_Q6_K, group, b);
    const uint8_t *chunks = values_of(LME_TYPE_Q6_K, group, b) + LANE_BYTES * r;
    const int64_t g = b % K_GROUPS;
    for (int j = 0; j < QK; j++) {
        const int k = j % (QK / 2) / LANE_BYTES, i = j % LANE_BYTES;
        const uint8_t low = chunks[k * CHUNK_BYTES + i] >> (4 * (j / (QK / 2))) & 0x0F;
        const uint8_t top = chunks[(4 + j / (QK / 2)) * CHUNK_BYTES + i] >> (2 * k) & 3;
        u[j] = h->sc[2 * g + j / (QK / 2)][r] * ((low | top << 4) - 32);
    }
    *d = fp16_to_fp32(load_u16(h->d[r]));
    *m = 0.0f;
}

/* IQ4_XS: u = kvalues[nibble] (signed), d = d_sb (sc - 32), m = 0 */
static void unpack_row_iq4_xs(const uint8_t *group, int64_t b, int r, int32_t u[QK], float *d, float *m) {
    const struct iq4_header *h = (const struct iq4_header *)unit_of(LME_TYPE_IQ4_XS, group, b);
    const uint8_t *chunks = values_of(LME_TYPE_IQ4_XS, group, b) + LANE_BYTES * r;
    for (int j = 0; j < QK / 2; j++) {
        const uint8_t byte = chunks[j / LANE_BYTES * CHUNK_BYTES + j % LANE_BYTES];
        u[j] = KVALUES_IQ4NL[byte & 0x0F];
        u[j + QK / 2] = KVALUES_IQ4NL[byte >> 4];
    }
    *d = fp16_to_fp32(load_u16(h->d[r])) * (float)h->sc[b % K_GROUPS][r];   /* exact: 11 x 6 bits */
    *m = 0.0f;
}

static unpack_row_fn unpack_row_of(int64_t w_type) {
    switch (w_type) {
    case LME_TYPE_Q8_0: return unpack_row_q8_0;
    case LME_TYPE_Q4_0: return unpack_row_q4_0;
    case LME_TYPE_Q4_K: return unpack_row_q4_k;
    case LME_TYPE_Q5_K: return unpack_row_q5_k;
    case LME_TYPE_Q6_K: return unpack_row_q6_k;
    case LME_TYPE_IQ4_XS: return unpack_row_iq4_xs;
    default: return unpack_row_q4_1;
    }
}

static void matmul_packed_scalar(const struct packed_args *a) {
    const int64_t n_blocks = a->n_cols / QK, gbytes = group_bytes(a->w_type, a->n_cols);
    const unpack_row_fn unpack_row = unpack_row_of(a->w_type);
    for (int64_t row = a->row_begin; row < a->row_end; row++) {
        const int64_t group = row / GROUP_ROWS;
        const int r = (int)(row % GROUP_ROWS);
        for (int64_t t = 0; t < a->n_tok; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < n_blocks; b++) {
                int32_t u[QK];
                float d, m;
                unpack_row(a->p + group * gbytes, b, r, u, &d, &m);
                float xs_sum = 0.0f;
                for (int64_t j = 0; j < a->n_terms; j++) {
                    const int64_t x_row = j * a->n_tok + t;
                    const int8_t *xq = a->xq + x_row * a->xq_stride + b * QK;
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
    const int64_t n_blocks = a->n_cols / QK, gbytes = group_bytes(w_type, a->n_cols);
    const int64_t stream = gbytes / n_blocks;           /* packed bytes per block */
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[TOKEN_GROUP];
    for (int t = 0; t < n_group; t++)
        acc[t] = _mm512_setzero_ps();
    const uint8_t *grp = a->p + group * gbytes;
    /* With a few tokens the products are slow enough that the hardware prefetcher falls behind
     * the weights streaming from memory (the first token group reads them; later groups find them
     * in cache): ask for them ahead. With one or two tokens reading is the bottleneck and the
     * prefetch instructions only cost issue slots. */
    const int prefetch = n_group * n_terms >= 4 && t0 == 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        if (prefetch)
            for (int64_t line = 0; line < stream; line += 64)
                _mm_prefetch((const char *)grp + b * stream + PREFETCH_BYTES + line, _MM_HINT_T0);
        const uint8_t *blk = unit_of(w_type, grp, b), *values = values_of(w_type, grp, b);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));   /* d: first */
        const __m512 m = w_type == LME_TYPE_Q4_1
                             ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + offsetof(struct group_q4_1, m))))
                             : _mm512_mul_ps(d, _mm512_set1_ps(implied_min_factor(w_type)));
        __m512i u[8];                                    /* u[k]: values 4k..4k+3 of the 16 rows */
        if (w_type == LME_TYPE_Q8_0) {
            for (int k = 0; k < 8; k++)
                u[k] = _mm512_loadu_si512(values + CHUNK_BYTES * k);
        } else {
            for (int k = 0; k < 4; k++) {
                const __m512i raw = _mm512_loadu_si512(values + CHUNK_BYTES * k);
                u[k] = _mm512_and_si512(raw, low4);
                u[k + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            }
        }
        for (int t = 0; t < n_group; t++) {
            float xs_sum = 0.0f;
            for (int j = 0; j < n_terms; j++) {
                const int64_t x_row = j * a->n_tok + t0 + t;
                const int8_t *xq = a->xq + x_row * a->xq_stride + b * QK;
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
 *     Q4_0, Q4_1, Q4_K (u <= 15): s16 = sum over k of maddubs(u_k, x_k), summed in int16: a lane
 *                            adds 16 products, at most 16 * 15 * 128 < 2^15, so it cannot
 *                            overflow; isum = madd(s16, 1)
 *     Q5_K (u <= 31):        the same in two halves (k < 4, k >= 4: 8 * 31 * 128 < 2^15 each),
 *                            isum = madd(s16_a, 1) + madd(s16_b, 1)
 *     IQ4_XS:                q_k = the codebook values of chunk k's nibbles (vpshufb), then Q8_0's
 *                            signed form
 *     Q8_0 (u = q + 128):    maddubs(u, x) pairs could reach 2 * 255 * 127 and saturate, so the
 *                            signed form, q = u - 128 and m = 0: isum = sum over k of
 *                            madd(maddubs(|q_k|, sign(x_k, q_k)), 1) (pairs at most 2 * 128 * 127),
 *                            and no m * xs term. Same value as the u-form, without its cancelling
 *                            terms; computing 128 * sum(xq) to keep the u-form cost 20%.
 * The sums run chunk by chunk over up to 8 activation rows at once (isums_avx2), each chunk's u_k
 * formed once, so the live registers are one chunk and 8 partial sums. GCC, left alone, kept every
 * product until the end of the block (spilling them: a third of the instructions were stack
 * moves); an empty asm statement pins each partial sum in its register after each add.
 * The float part is otherwise the AVX-512 kernel's (fused multiply-adds, the same order), and a
 * (row, token) result does not depend on the other tokens of the call.
 * Against the row-major kernels (one thread, a 1536 x 2048 matrix in cache, 1 / 4 / 16 / 64
 * tokens; Zen 3; GMAC/s): Q4_0 and Q4_1 x2.0 / x1.8-1.9 / x2.0-2.1 / x2.1 (86 from 16 tokens on),
 * Q8_0 x1.1 / x1.4 / x1.5 / x1.55 (58), Q4_K (against kquants.c on Q8_K activations)
 * x1.25 / x1.4 / x1.5 / x1.5 (75). */

#define HALF_ROWS 8                           /* rows per 256-bit register of int32 */
#define X_BATCH 8                             /* activation rows whose block sums are formed together */

/* 4 activation bytes (values 4k..4k+3 of a block) in every 32-bit lane */
TARGET_AVX2 static ALWAYS_INLINE __m256i broadcast4_avx2(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Q6_K's isums_avx2: the 6-bit values u_k = low 4 bits | top 2 (chunk 4 + k / 4, bits 2 (k % 4))
 * << 4, q_k = u_k - 32 in the signed form; per sub-block (chunks 0-3: values 0..15, 4-7: 16..31)
 * the int16 sum of 4 maddubs (at most 4 * 2 * 32 * 127 < 2^15), then madd with the 8 rows' scale
 * of that sub-block in both int16 halves of their lane. sub_scales: the sub-block 2g scales of
 * the half's 8 rows (sub-block 2g + 1's 16 bytes further). */
TARGET_AVX2 static ALWAYS_INLINE void q6_isums_avx2(const uint8_t *values, const int8_t *sub_scales,
                                                    const int8_t *const xr[], int n_x, __m256i isum[]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30), offset = _mm256_set1_epi8(32);
    __m256i scale[2];                                  /* int16 pairs (sc, sc) per row lane */
    for (int h = 0; h < 2; h++) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)(sub_scales + h * GROUP_ROWS));
        scale[h] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(bytes, bytes));
    }
    __m256i s16[X_BATCH];
    LME_UNROLL for (int k = 0; k < 8; k++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(values + CHUNK_BYTES * (k % 4)));
        const __m256i top = _mm256_loadu_si256((const __m256i *)(values + CHUNK_BYTES * (4 + k / 4)));
        const int shift = 4 - 2 * (k % 4);             /* bits 2 (k % 4), +1 -> bits 4, 5 */
        const __m256i high = _mm256_and_si256(shift > 0 ? _mm256_slli_epi16(top, shift)
                                              : shift < 0 ? _mm256_srli_epi16(top, -shift) : top, top2);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(k < 4 ? raw : _mm256_srli_epi16(raw, 4), low4),
                                                          high), offset);
        const __m256i abs_q = _mm256_abs_epi8(q);
        if (k == 4)                                    /* sub-block 2g done */
            for (int i = 0; i < n_x; i++)
                isum[i] = _mm256_madd_epi16(s16[i], scale[0]);
        LME_UNROLL for (int i = 0; i < n_x; i++) {
            const __m256i p = _mm256_maddubs_epi16(abs_q, _mm256_sign_epi8(broadcast4_avx2(xr[i] + 4 * k), q));
            s16[i] = k % 4 == 0 ? p : _mm256_add_epi16(s16[i], p);
            LME_KEEP_IN_REGISTER(s16[i]);
        }
    }
    for (int i = 0; i < n_x; i++)
        isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(s16[i], scale[1]));
}

/* isum[i] of the half's 8 rows with activation rows xr[i], i < n_x <= X_BATCH (a compile-time
 * constant after inlining): chunk by chunk, the chunk's values u_k (as described above; Q8_0: q,
 * signed) formed once and multiplied with the 4 bytes of every activation row, so that only one
 * chunk and the n_x partial sums are live (8 value registers and 8 tokens' sums did not fit AVX2's
 * 16 registers: the spills cost a third of the time). */
TARGET_AVX2 static ALWAYS_INLINE void isums_avx2(int64_t w_type, const uint8_t *values, const int8_t *sub_scales,
                                                 const int8_t *const xr[], int n_x, __m256i isum[]) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (w_type == LME_TYPE_Q6_K) {
        q6_isums_avx2(values, sub_scales, xr, n_x, isum);
        return;
    }
    if (w_type == LME_TYPE_Q8_0 || w_type == LME_TYPE_IQ4_XS) {
        const __m256i book = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4NL));
        for (int i = 0; i < n_x; i++)
            isum[i] = _mm256_setzero_si256();
        LME_UNROLL for (int k = 0; k < 8; k++) {       /* Q8_0: q = u - 128, flip the top bit; IQ4_XS: */
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(values + CHUNK_BYTES * (w_type == LME_TYPE_Q8_0 ? k : k % 4)));
            const __m256i q = w_type == LME_TYPE_Q8_0   /* the codebook value of each nibble */
                                  ? _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80))
                                  : _mm256_shuffle_epi8(book, _mm256_and_si256(k < 4 ? raw : _mm256_srli_epi16(raw, 4),
                                                                               _mm256_set1_epi8(0x0F)));
            const __m256i abs_q = _mm256_abs_epi8(q);
            LME_UNROLL for (int i = 0; i < n_x; i++) {
                isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(abs_q, _mm256_sign_epi8(broadcast4_avx2(xr[i] + 4 * k), q)), ones));
                LME_KEEP_IN_REGISTER(isum[i]);
            }
        }
        return;
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i bits = w_type == LME_TYPE_Q5_K ? _mm256_loadu_si256((const __m256i *)(values + 4 * CHUNK_BYTES))
                                                 : _mm256_setzero_si256();
    __m256i s16[X_BATCH];
    LME_UNROLL for (int k = 0; k < 8; k++) {           /* chunk k % 4: low nibbles, then high ones */
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(values + CHUNK_BYTES * (k % 4)));
        __m256i u = _mm256_and_si256(k < 4 ? raw : _mm256_srli_epi16(raw, 4), low4);
        if (w_type == LME_TYPE_Q5_K) {                 /* bit 4: bit k of the 5th chunk */
            u = _mm256_or_si256(u, _mm256_and_si256(k <= 4 ? _mm256_slli_epi16(bits, 4 - k) : _mm256_srli_epi16(bits, k - 4),
                                                    _mm256_set1_epi8(0x10)));
            if (k == 4)                                /* Q5_K: int16 holds only 4 chunks' sums (8 * 31 * 128) */
                for (int i = 0; i < n_x; i++)
                    isum[i] = _mm256_madd_epi16(s16[i], ones);
        }
        LME_UNROLL for (int i = 0; i < n_x; i++) {
            const __m256i p = _mm256_maddubs_epi16(u, broadcast4_avx2(xr[i] + 4 * k));
            s16[i] = k == 0 || (w_type == LME_TYPE_Q5_K && k == 4) ? p : _mm256_add_epi16(s16[i], p);
            LME_KEEP_IN_REGISTER(s16[i]);
        }
    }
    for (int i = 0; i < n_x; i++)
        isum[i] = w_type == LME_TYPE_Q5_K ? _mm256_add_epi32(isum[i], _mm256_madd_epi16(s16[i], ones))
                                          : _mm256_madd_epi16(s16[i], ones);
}

/* Half `half` (rows 8 half .. 8 half + 7) of one group of 16 rows times tokens t0 .. t0 + n_group - 1
 * (w_type, n_terms and n_group compile-time constants after inlining) */
TARGET_AVX2 static ALWAYS_INLINE void half_tokens_avx2(const struct packed_args *a, int64_t w_type, int n_terms,
                                                       int n_group, int64_t group, int half, int64_t t0) {
    const int64_t n_blocks = a->n_cols / QK, gbytes = group_bytes(w_type, a->n_cols);
    const int64_t stream = gbytes / n_blocks;           /* packed bytes per block (Q4_K: on average) */
    __m256 acc[TOKEN_GROUP];
    for (int t = 0; t < n_group; t++)
        acc[t] = _mm256_setzero_ps();
    const uint8_t *grp = a->p + group * gbytes;
    /* Unlike the AVX-512 kernel's, with any token count: the weights of one token streaming from
     * memory (2 threads, Zen 3) went from 76-89% of the read loop's bandwidth to 88-97% with it
     * (IQ4_XS 76 -> 88, Q5_K 82 -> 96, Q4_K 85 -> 96, Q6_K 84 -> 94%; Q8_0 ~105% either way) */
    const int prefetch = t0 == 0 && half == 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        if (prefetch)
            for (int64_t line = 0; line < stream; line += 64)
                _mm_prefetch((const char *)grp + b * stream + PREFETCH_BYTES + line, _MM_HINT_T0);
        const uint8_t *blk = unit_of(w_type, grp, b);
        __m256 d, m;
        const int8_t *sub_scales = NULL;
        if (w_type == LME_TYPE_IQ4_XS) {               /* d = d_sb (sc - 32): exact */
            const struct iq4_header *g = (const struct iq4_header *)blk;
            d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g->d[HALF_ROWS * half])),
                              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                  _mm_loadl_epi64((const __m128i *)&g->sc[b % K_GROUPS][HALF_ROWS * half]))));
            m = _mm256_setzero_ps();
        } else if (w_type == LME_TYPE_Q6_K) {          /* d = d_sb; the scales go into isum */
            const struct q6_header *g = (const struct q6_header *)blk;
            d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g->d[HALF_ROWS * half]));
            m = _mm256_setzero_ps();
            sub_scales = &g->sc[2 * (b % K_GROUPS)][HALF_ROWS * half];
        } else if (has_k_header(w_type)) {             /* d = d_sb sc, m = -(dmin_sb mn): exact */
            const struct k_header *g = (const struct k_header *)blk;
            const int64_t k = b % K_GROUPS;
            d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g->d[HALF_ROWS * half])),
                              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                  _mm_loadl_epi64((const __m128i *)&g->sc[k][HALF_ROWS * half]))));
            m = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g->dmin[HALF_ROWS * half])),
                                            _mm256_set1_ps(-1.0f)),
                              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                  _mm_loadl_epi64((const __m128i *)&g->mn[k][HALF_ROWS * half]))));
        } else {
            d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 2 * HALF_ROWS * half)));
            m = w_type == LME_TYPE_Q4_1
                    ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + offsetof(struct group_q4_1, m)
                                                                         + 2 * HALF_ROWS * half)))
                : w_type == LME_TYPE_Q4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(implied_min_factor(w_type)))
                                          : _mm256_setzero_ps();     /* Q8_0, signed form: no m */
        }
        const uint8_t *values = values_of(w_type, grp, b) + 4 * HALF_ROWS * half;
        __m256i isum[2 * TOKEN_GROUP];                 /* isum[t n_terms + j]: token t0 + t, term j */
        for (int i0 = 0; i0 < n_group * n_terms; i0 += X_BATCH) {
            const int n_x = n_group * n_terms - i0 < X_BATCH ? n_group * n_terms - i0 : X_BATCH;
            const int8_t *xr[X_BATCH];
            for (int i = 0; i < n_x; i++) {
                const int t = (i0 + i) / n_terms, j = (i0 + i) % n_terms;
                xr[i] = a->xq + (j * a->n_tok + t0 + t) * a->xq_stride + b * QK;
            }
            isums_avx2(w_type, values, sub_scales, xr, n_x, isum + i0);
        }
        for (int t = 0; t < n_group; t++) {
            float xs_sum = 0.0f;
            for (int j = 0; j < n_terms; j++) {
                const int64_t x_row = j * a->n_tok + t0 + t;
                const __m256 isum_f = _mm256_cvtepi32_ps(isum[t * n_terms + j]);
                acc[t] = _mm256_fmadd_ps(isum_f, _mm256_mul_ps(d, _mm256_set1_ps(a->xd[x_row * n_blocks + b])), acc[t]);
                xs_sum += a->xs[x_row * n_blocks + b];
            }
            if (!signed_form(w_type))
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
            /* X_BATCH activation rows per call: with two terms, 4 tokens (8 tokens' 16 block sums
             * and 8 accumulators did not fit the 16 registers; the spills made two terms cost
             * 2.6-3.2x one term from 8 tokens on, 2.0-2.1x now) */
            const int step = TOKEN_GROUP / n_terms;
            int64_t t0 = 0;
            for (; t0 + step <= a->n_tok; t0 += step)
                half_tokens_avx2(a, w_type, n_terms, step, group, half, t0);
            switch (a->n_tok - t0) {                      /* the last tokens: a constant count (with two terms at most 3) */
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

/* One function per (type, terms) pair: GCC allocates each one's registers on its own. (As one
 * function of all 14, a change in the two-term path moved spills into Q4_0's one-term loop,
 * which lost 40%.) */
#define GROUPS_AVX2(type, terms)                                                                   \
    TARGET_AVX2 static NEVER_INLINE void groups_avx2_##type##_##terms(const struct packed_args *a) { \
        groups_avx2(a, LME_TYPE_##type, terms);                                                    \
    }
#define GROUPS_AVX2_BOTH(type) GROUPS_AVX2(type, 1) GROUPS_AVX2(type, 2)
GROUPS_AVX2_BOTH(Q8_0)
GROUPS_AVX2_BOTH(Q4_0)
GROUPS_AVX2_BOTH(Q4_1)
GROUPS_AVX2_BOTH(Q4_K)
GROUPS_AVX2_BOTH(Q5_K)
GROUPS_AVX2_BOTH(Q6_K)
GROUPS_AVX2_BOTH(IQ4_XS)

TARGET_AVX2 static void matmul_packed_avx2(const struct packed_args *a) {
    const int two = a->n_terms == 2;
    switch (a->w_type) {
    case LME_TYPE_Q4_K: two ? groups_avx2_Q4_K_2(a) : groups_avx2_Q4_K_1(a); return;
    case LME_TYPE_Q5_K: two ? groups_avx2_Q5_K_2(a) : groups_avx2_Q5_K_1(a); return;
    case LME_TYPE_Q6_K: two ? groups_avx2_Q6_K_2(a) : groups_avx2_Q6_K_1(a); return;
    case LME_TYPE_IQ4_XS: two ? groups_avx2_IQ4_XS_2(a) : groups_avx2_IQ4_XS_1(a); return;
    case LME_TYPE_Q4_1: two ? groups_avx2_Q4_1_2(a) : groups_avx2_Q4_1_1(a); return;
    case LME_TYPE_Q4_0: two ? groups_avx2_Q4_0_2(a) : groups_avx2_Q4_0_1(a); return;
    default: two ? groups_avx2_Q8_0_2(a) : groups_avx2_Q8_0_1(a); return;
    }
}
#endif /* LME_X86 */

/* ---- entry point ----------------------------------------------------------------------------- */

int lme_matmul_packed(int64_t w_type, const uint8_t *p, int64_t p_len,
                      int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                      const int8_t *xq, int64_t xq_len, int64_t xq_stride, const float *xd, int64_t xd_len,
                      const float *xs, int64_t xs_len, int64_t n_tok, int64_t n_terms,
                      float *out, int64_t out_len) {
    const int64_t packed = lme_packed_bytes(w_type, n_rows, n_cols);
    if (packed < 0)
        return (int)packed;
    if (n_tok < 0 || (n_terms != 1 && n_terms != 2) || xq_stride < n_cols
        || (n_tok > 0 && xq_stride > INT64_MAX / 2 / n_tok) || (n_rows > 0 && n_tok > INT64_MAX / n_rows))
        return LME_ERR_SHAPE;
    if (row_begin < 0 || row_end < row_begin || row_end > n_rows || row_begin % GROUP_ROWS != 0)
        return LME_ERR_RANGE;
    if (row_begin == row_end || n_tok == 0)
        return LME_OK;
    if (p == NULL || xq == NULL || xd == NULL || xs == NULL || out == NULL)
        return LME_ERR_NULL;
    const int64_t x_rows = n_terms * n_tok, n_blocks = n_cols / QK;
    if (p_len < packed || xq_len < (x_rows - 1) * xq_stride + n_cols || xd_len < x_rows * n_blocks
        || xs_len < x_rows * n_blocks || out_len < n_tok * n_rows)
        return LME_ERR_LENGTH;
    const struct packed_args a = {w_type, p, n_rows, n_cols, row_begin, row_end, xq, xq_stride,
                                  xd, xs, n_tok, n_terms, out};
    switch (lme_get_isa()) {
#if LME_X86
    case LME_ISA_AVX512:                   /* the K types: the AVX2 kernel (no AVX-512 one yet) */
        per_superblock(w_type) ? matmul_packed_avx2(&a) : matmul_packed_avx512(&a);
        break;
    case LME_ISA_AVX2: matmul_packed_avx2(&a); break;
#endif
    default: matmul_packed_scalar(&a); break;
    }
    return LME_OK;
}
