/* What the matmul driver (hybrid/_kernels.c) and the kernels of each instruction set
 * (hybrid/kernels/scalar.c, avx2.c, avx512.c) share: the two data layouts, the scalar
 * block dot every path is checked against, and what each file exports.
 *
 * Each ISA file is compiled with its own target flags (setup.py), so every function
 * defined here is `static inline`: one with external linkage would be compiled for
 * AVX-512 in one file, and the linker could pick that copy for all.
 *
 * Activation layout ("q8_32 rows"): each row of n_in floats becomes groups of
 * four 32-value blocks, 256 bytes per group, laid out for the SIMD kernels:
 *   [  0.. 63] int8: values 0..15 of block 0, of block 1, of block 2, of block 3
 *   [ 64..127] int8: values 16..31 of blocks 0..3 (the 4-bit types' high nibbles' partners)
 *   [128..191] float32[16]: block scale d_j repeated 4 times (one 128-bit lane per block)
 *   [192..255] per block j, lanes 4j..4j+3: int32 -8 * sum(values of block j), int32
 *             -128 * sum(values), float32 d_j * sum(values), 0
 * so one 512-bit register holds the low halves of four blocks, and weights stored
 * with an offset need no per-weight subtraction: Q4_0's (nibble - 8) takes the -8
 * as that precomputed sum (Q5_0's -16 as twice it; -128 serves the kernels whose
 * weights are offset by +128 to be unsigned), and Q5_1's min m enters as m times
 * d_j * sum. A row with a block count not divisible by 4 is padded with zero
 * blocks. Every path reads this same layout and computes the same integer block
 * sums; only the float summation order differs.
 *
 * Repacked layout ("R16"): 16 weight rows interleaved, one row per 32-bit lane, so
 * that one `vpdpbusd` of a quad register with a broadcast activation quad gives 16
 * rows' partial sums at once, with no horizontal sum. For each 32-weight block b
 * of the 16 rows (16 blocks' bytes: a block of 16 rows starts where its first row would):
 *   fp16[16] per fp16 field of the block (d; Q5_1: d, then m): the 16 rows' values
 *   5-bit types: 8 uint64 masks, mask k bit 4p+i = the fifth bit of value 4k+i of the
 *             row in lane p (a `vpaddb` under mask k adds the 16 to quad k below)
 *   quads: 64 bytes per quad k, 4 consecutive weights of each of the 16 rows
 *             (4-bit quants: 4 quads, quad k in the low nibbles and quad k+4 in the
 *             high ones, so quad k holds values 4k..4k+3 either way; Q8_0: 8 quads,
 *             values + 128)
 * The rows sit in the lanes in a transposed order (lane 4i+m holds row 4m+i: what
 * a 4x4 dword transpose gives), undone once per output. A short row block (fewer
 * than 16 rows) repeats its last row in the spare lanes.
 *
 * The 256-value types take the same form per 256-weight block b of 16 rows (2304 bytes
 * for Q4_K, 2816 Q5_K, 2176 IQ4_XS): their two leading 16-bit fields as fp16[16] each
 * (Q4_K, Q5_K: d, dmin; IQ4_XS: d, then scales_h), then every further 4 bytes of the
 * stored block as one quad, stored order kept: Q4_K's 12 scale bytes are quads 0..2
 * (so a quad register of them gives 16 rows' 6-bit scales and mins with shifts and
 * masks), its 128 quant bytes quads 3..34 (quad 3 + 8c + k: values 4k..4k+3 of
 * sub-block 2c in the low nibbles, of 2c + 1 in the high ones); Q5_K's 32 qh bytes are
 * quads 3..10 (bit s of a byte: the fifth bit of that value of sub-block s) before its
 * quants; IQ4_XS's scales_l quad 0, then its quants as IQ4_NL's, 16 bytes per sub-block.
 * Q6_K (3360 bytes), whose d is stored last: d, then its ql (quads 0..31), qh (32..47) and
 * 16 signed scales (48..51), one per 16 values.
 * No block is unpacked through memory: a kernel takes each sub-block's 32 values of 16
 * rows as 8 quad registers, their 8-bit products with 8 broadcast activation quads
 * summed per lane, times the lane's scale of that sub-block.
 *
 * Activation layout of the 256-value types ("q8_K rows", as ggml's block_q8_K): per
 * 256 values, 320 bytes: [0..255] int8 values, [256..287] int16[16] the sum of each
 * 16 values, [288..291] float32 d = amax / 127, the rest 0. Their weight blocks are
 * unpacked per block (unpack_kblock) into int8 quants in value order and integer
 * scales (and mins) per 16 values, which every path's dot product reads.
 */
#ifndef HYPROF_KERNELS_H
#define HYPROF_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../_fp16.h"
#include "../quant_traits.h"
#if defined(__AVX2__)
#include <immintrin.h>            /* the SIMD paths' unpacking of 256-value blocks (unpack_kblock) */
#endif

#define QK 32                 /* values per block of the q8_32 activation, and of the types that take it */
#define GROUP_BLOCKS 4        /* blocks per q8_32 activation group */
#define GROUP_BYTES 256
#define TILE 4                /* tokens per row_dot call, at most */
#define R16_TILE 8            /* tokens per r16_dot call, at most */
#define R16_ROWS 16
/* How far ahead the SIMD kernels that stream weights (R16, and the K-quants' row kernels) prefetch:
 * the hardware streamer alone left one-token Q4_0 at ~66 % of the triad from DRAM (Q8_0 ~83 %);
 * 2 KB ahead, ~81 % (Q8_0 ~93 %), 1 or 4 KB ahead less (bench_expert_matmul.py, AVX-512, 2 threads,
 * a Sapphire Rapids-class Xeon); Q4_K rows +25-50 %. Past a row block's (or row's) end it
 * prefetches the next one's start, most often the next unit the same thread takes. */
#define STREAM_PREFETCH 2048

/* Prefetch the n bytes that lie STREAM_PREFETCH past the block at p, which a kernel is about to read. */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t *p, size_t n) {
    for (size_t o = 0; o < n; o += 64) __builtin_prefetch(p + STREAM_PREFETCH + o, 0, 3);
}

/* Part `part` of `parts` of prefetch_ahead(p, n). A 256-value type's R16 block is 34-53 lines:
 * prefetched all at once where it starts, the requests queue for the line fill buffers ahead
 * of the block's own loads; spread over its sub-blocks (with a scheduling barrier, or GCC gathers
 * them again), one-token Q4_K and IQ4_XS read 9-14 % faster from DRAM on AVX2 and 3-5 % on AVX-512
 * (bench_expert_matmul.py, 2 threads, a Sapphire Rapids-class Xeon). */
static inline __attribute__((always_inline)) void prefetch_part(const uint8_t *p, size_t n, int part, int parts) {
    const size_t lines = (n + 63) / 64;
    for (size_t l = lines * part / parts; l < lines * (part + 1) / parts; l++)
        __builtin_prefetch(p + STREAM_PREFETCH + 64 * l, 0, 3);
}

/* Block b (of sb bytes) of R16 row block r, or of r2 for the second of a pair (i = 1; r16_dot2_fn):
 * where each R16 kernel's block loop starts (its caller prefetches ahead of it). */
static inline __attribute__((always_inline)) const uint8_t *r16_block_at(const uint8_t *r, const uint8_t *r2, int i,
                                                                         int64_t b, size_t sb) {
    return (i ? r2 : r) + b * sb;
}

static inline size_t q8_row_bytes(int64_t n_in) {
    return (size_t)((n_in / QK + GROUP_BLOCKS - 1) / GROUP_BLOCKS) * GROUP_BYTES;
}

/* A kernel whose arguments stay run-time values: neither inlined into its callers nor cloned
 * for their constants (GCC's noipa; Clang does not clone). */
#if defined(__clang__)
#define KEEP_ARGS __attribute__((noinline))
#else
#define KEEP_ARGS __attribute__((noipa))
#endif

/* The R16 lane that holds row i of its block (see above). */
static inline int r16_lane(int i) { return 4 * (i % 4) + i / 4; }

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The 32 quants of block wb (a q8_32 type, its ggml id a constant where inlined) as the integers
 * its scale multiplies, in value order: a weight is d * q[i] (Q5_1: plus m). */
static inline void block_quants(int type, const uint8_t *wb, int32_t q[QK]) {
    const uint8_t *qs = wb + (type == GGML_Q5_0 ? 6 : type == GGML_Q5_1 ? 8 : 2);
    const uint32_t qh = type == GGML_Q5_0 ? load_u32(wb + 2) : type == GGML_Q5_1 ? load_u32(wb + 4) : 0;
    for (int i = 0; i < QK / 2; i++) {
        int lo = qs[i] & 15, hi = qs[i] >> 4;
        switch (type) {
        case GGML_Q8_0: q[i] = (int8_t)wb[2 + i]; q[i + 16] = (int8_t)wb[18 + i]; break;
        case GGML_Q4_0: q[i] = lo - 8; q[i + 16] = hi - 8; break;
        case GGML_IQ4_NL: q[i] = KVALUES_IQ4NL[lo]; q[i + 16] = KVALUES_IQ4NL[hi]; break;
        default:                                                        /* Q5_0, Q5_1 */
            q[i] = lo | (int)((qh >> i) & 1) << 4;
            q[i + 16] = hi | (int)((qh >> (i + 16)) & 1) << 4;
            if (type == GGML_Q5_0) q[i] -= 16, q[i + 16] -= 16;
        }
    }
}

/* Dot of weight block `wb` (its ggml type a constant where inlined) with block j of q8_32 group
 * `g`: the integer sum times both scales (Q5_1: plus m times d_j * sum(x)). The reference
 * every path agrees with. */
static inline float q8_block_dot(int type, const uint8_t *wb, const uint8_t *g, int j) {
    const int8_t *lo = (const int8_t *)(g + 16 * j), *hi = (const int8_t *)(g + 64 + 16 * j);
    float dx, xsum, dw = fp16_to_f32(load_u16(wb));
    memcpy(&dx, g + 128 + 16 * j, 4);
    int32_t q[QK], s = 0;
    block_quants(type, wb, q);
    for (int i = 0; i < 16; i++) s += q[i] * lo[i] + q[i + 16] * hi[i];
    if (type != GGML_Q5_1) return dw * dx * (float)s;
    memcpy(&xsum, g + 200 + 16 * j, 4);
    return dw * dx * (float)s + fp16_to_f32(load_u16(wb + 2)) * xsum;
}

/* Blocks [b0, nb) (of bb bytes) of one weight row against nt q8_32 rows, added into
 * res[0..nt): the scalar row kernel, and the SIMD ones' blocks short of a whole group. */
static inline void q8_blocks_dot(int type, size_t bb, const uint8_t *w, int64_t b0, int64_t nb,
                                 const uint8_t *const *x, int nt, float *res) {
    for (int t = 0; t < nt; t++) {
        float acc = 0.0f;
        for (int64_t b = b0; b < nb; b++)
            acc += q8_block_dot(type, w + b * bb, x[t] + (b / GROUP_BLOCKS) * GROUP_BYTES, (int)(b % GROUP_BLOCKS));
        res[t] += acc;
    }
}

/* ---- the R16 layout, portably: the scalar path's repack, and the reference of the others' ---- */

/* A type's R16 block: its fp16 fields, whether it has 5th-bit masks, its quant bytes (after the
 * fp16 fields and qh in the stored block), and what is xor-ed into them; where the fields are in
 * the stored block (0: first; Q6_K's d is last, after its quant bytes). */
typedef struct { int halves, masks; size_t quants; uint8_t flip; size_t fields_at; } r16_form_t;

static inline r16_form_t r16_form(int type) {
    switch (type) {
    case GGML_Q8_0: return (r16_form_t){1, 0, 32, 0x80};
    case GGML_Q5_0: return (r16_form_t){1, 1, 16, 0};
    case GGML_Q5_1: return (r16_form_t){2, 1, 16, 0};
    case GGML_Q4_K: return (r16_form_t){2, 0, 140, 0};            /* (the 256-value types: see above) */
    case GGML_Q5_K: return (r16_form_t){2, 0, 172, 0};
    case GGML_IQ4_XS: return (r16_form_t){2, 0, 132, 0};
    case GGML_Q6_K: return (r16_form_t){1, 0, 208, 0, 208};
    default: return (r16_form_t){1, 0, 16, 0};                     /* Q4_0, IQ4_NL */
    }
}

/* Where the quant bytes start in a stored block. */
static inline size_t r16_stored_quants(r16_form_t f) {
    return f.fields_at ? 0 : 2 * (size_t)f.halves + 4 * (size_t)f.masks;
}

/* Offsets in an R16 block: of the masks, and of quant byte q of the row in lane p (in quad q / 4). */
static inline size_t r16_masks_at(r16_form_t f) { return 32 * (size_t)f.halves; }
static inline size_t r16_quant_at(r16_form_t f, int p, size_t q) {
    return r16_masks_at(f) + 64 * (size_t)f.masks + 64 * (q / 4) + 4 * (size_t)p + q % 4;
}

/* One stored block s <-> lane p of R16 block d (whose masks the caller zeroed before packing). */
static inline void r16_pack_block(int type, const uint8_t *s, uint8_t *d, int p) {
    const r16_form_t f = r16_form(type);
    for (int h = 0; h < f.halves; h++) memcpy(d + 32 * h + 2 * p, s + f.fields_at + 2 * h, 2);
    const uint8_t *qs = s + r16_stored_quants(f);
    if (f.masks) {
        const uint32_t qh = load_u32(s + 2 * f.halves);
        for (int v = 0; v < QK; v++)                   /* value v = 4k + i: bit 4p + i of mask k */
            d[r16_masks_at(f) + 8 * (v / 4) + p / 2] |= (uint8_t)(((qh >> v) & 1) << (4 * (p % 2) + v % 4));
    }
    for (size_t q = 0; q < f.quants; q++) d[r16_quant_at(f, p, q)] = qs[q] ^ f.flip;
}

static inline void r16_unpack_block(int type, const uint8_t *d, int p, uint8_t *s) {
    const r16_form_t f = r16_form(type);
    for (int h = 0; h < f.halves; h++) memcpy(s + f.fields_at + 2 * h, d + 32 * h + 2 * p, 2);
    uint8_t *qs = s + r16_stored_quants(f);
    if (f.masks) {
        uint32_t qh = 0;
        for (int v = 0; v < QK; v++)
            qh |= (uint32_t)((d[r16_masks_at(f) + 8 * (v / 4) + p / 2] >> (4 * (p % 2) + v % 4)) & 1) << v;
        memcpy(s + 2 * f.halves, &qh, 4);
    }
    for (size_t q = 0; q < f.quants; q++) qs[q] = d[r16_quant_at(f, p, q)] ^ f.flip;
}

/* Quant bytes [q0, quants) of stored block s (the row in lane p at s + lane_row[p]) into R16
 * block d, a quad at a time: the SIMD repacks' tail past their whole 16-byte pieces (the
 * 256-value types' last 12 or 4 bytes). */
static inline void r16_copy_quads(r16_form_t f, const uint8_t *s, const size_t lane_row[16], size_t q0, uint8_t *d) {
    const size_t qs = r16_stored_quants(f);
    for (size_t q = q0; q < f.quants; q += 4)
        for (int p = 0; p < R16_ROWS; p++) memcpy(d + r16_quant_at(f, p, q), s + lane_row[p] + qs + q, 4);
}

/* Rows [0, n_rows) (row stride rb, n_rows <= 16) of nb blocks of bb bytes -> R16 blocks at dst. */
static inline void r16_repack_rows(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb,
                                   uint8_t *dst) {
    const r16_form_t f = r16_form(type);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *d = dst + b * R16_ROWS * bb;
        memset(d + r16_masks_at(f), 0, 64 * (size_t)f.masks);
        for (int i = 0; i < R16_ROWS; i++)
            r16_pack_block(type, w + (size_t)(i < n_rows ? i : n_rows - 1) * rb + b * bb, d, r16_lane(i));
    }
}

/* ---- the 256-value types (K-quants, IQ4_XS) and the q8_K activation ---- */

#define QK_K 256
#define Q8K_BLOCK_BYTES 320
#define Q8K_SUMS 256          /* offsets in a q8_K block */
#define Q8K_D 288

static inline size_t q8k_row_bytes(int64_t n_in) { return (size_t)(n_in / QK_K) * Q8K_BLOCK_BYTES; }

/* Whether ggml type `type` has 256-value blocks (and takes q8_K rows). */
static inline int k_type(int type) {
    return type == GGML_Q4_K || type == GGML_Q5_K || type == GGML_Q6_K || type == GGML_IQ4_XS;
}

/* The portable quantiser of every path (the same rounding as the q8_32 ones): the activation's
 * quantisation is a small part of an op on these types, whose dot products unpack weights. */
static inline void quantize_q8_K_row(const float *x, int64_t n_in, uint8_t *out) {
    for (int64_t b = 0; b < n_in / QK_K; b++, x += QK_K, out += Q8K_BLOCK_BYTES) {
        float amax = 0.0f;
        for (int i = 0; i < QK_K; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int16_t sums[16] = {0};
        for (int i = 0; i < QK_K; i++) {
            float v = nearbyintf(x[i] * id);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            out[i] = (uint8_t)(int8_t)v;
            sums[i / 16] += (int16_t)v;
        }
        memcpy(out + Q8K_SUMS, sums, sizeof sums);
        memcpy(out + Q8K_D, &d, 4);
        memset(out + Q8K_D + 4, 0, Q8K_BLOCK_BYTES - Q8K_D - 4);
    }
}

/* A 256-value block unpacked: value i is d * sc[i / 16] * q[i] - dmin * mn[i / 16]. */
typedef struct {
    int8_t q[QK_K];
    int16_t sc[16], mn[16];
    float d, dmin;
} kblock_t;

/* 8 signed bytes (byte s of `eight`: sub-block s's scale) -> out[16], each repeated for the two
 * 16-value halves of its 32-value sub-block. On the SIMD paths one 32-byte store, so that the
 * kernels' vector loads of out forward from it (a load spanning several narrower stores waits
 * for them to retire: ~2x on AVX-512's Q4_K, measured in cache). */
static inline void store_scales8(uint64_t eight, int16_t *out) {
#if defined(__AVX2__)
    const __m128i w = _mm_cvtepi8_epi16(_mm_cvtsi64_si128((long long)eight));
    _mm256_storeu_si256((__m256i *)out, _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w)));
#else
    for (int s = 0; s < 8; s++) out[2 * s] = out[2 * s + 1] = (int8_t)(eight >> 8 * s);
#endif
}

/* Q6_K's 16 signed scales, one per 16 values -> out[16], as store_scales8 stores. */
static inline void store_scales16(const uint8_t *in, int16_t *out) {
#if defined(__AVX2__)
    _mm256_storeu_si256((__m256i *)out, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)in)));
#else
    for (int g = 0; g < 16; g++) out[g] = (int8_t)in[g];
#endif
}

/* Q4_K's and Q5_K's 12 bytes -> 8 six-bit scales and mins (ggml's get_scale_min_k4), as bytes. */
static inline void k_scales_mins(const uint8_t *s, kblock_t *k) {
    uint64_t sc = 0, mn = 0;
    for (int j = 0; j < 4; j++) {
        sc |= (uint64_t)(s[j] & 63) << 8 * j | (uint64_t)((s[j + 8] & 15) | (s[j] >> 6) << 4) << 8 * (j + 4);
        mn |= (uint64_t)(s[j + 4] & 63) << 8 * j | (uint64_t)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4) << 8 * (j + 4);
    }
    store_scales8(sc, k->sc);
    store_scales8(mn, k->mn);
}

/* The quants' unpacking, in portable C and, in the files built for AVX2 or AVX-512 (both have
 * AVX2), 32 bytes at a time: the compiler turns neither the table lookups nor these bit moves
 * into vector code on its own (measured in cache: IQ4_XS ~1 GB/s, Q4_K ~9 on AVX2, 2.5 on
 * AVX-512 before). */

/* 32 bytes of nibbles at qs -> lo[32] (low nibbles), hi[32] (high). */
static inline void split_nibbles32(const uint8_t *qs, int8_t *lo, int8_t *hi) {
#if defined(__AVX2__)
    const __m256i v = _mm256_loadu_si256((const __m256i *)qs), m4 = _mm256_set1_epi8(15);
    _mm256_storeu_si256((__m256i *)lo, _mm256_and_si256(v, m4));
    _mm256_storeu_si256((__m256i *)hi, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
#else
    for (int i = 0; i < 32; i++) {
        lo[i] = (int8_t)(qs[i] & 15);
        hi[i] = (int8_t)(qs[i] >> 4);
    }
#endif
}

/* Two 16-byte IQ4_NL-style sub-blocks at qs -> their 64 levels in value order (low nibbles of
 * each, then its high ones). */
static inline void iq4_levels32(const uint8_t *qs, int8_t *q) {
#if defined(__AVX2__)
    const __m256i v = _mm256_loadu_si256((const __m256i *)qs), m4 = _mm256_set1_epi8(15);
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4NL));
    const __m256i l = _mm256_shuffle_epi8(t, _mm256_and_si256(v, m4));
    const __m256i h = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
    _mm256_storeu_si256((__m256i *)q, _mm256_permute2x128_si256(l, h, 0x20));
    _mm256_storeu_si256((__m256i *)(q + 32), _mm256_permute2x128_si256(l, h, 0x31));
#else
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < 16; i++) {
            q[32 * s + i] = KVALUES_IQ4NL[qs[16 * s + i] & 15];
            q[32 * s + 16 + i] = KVALUES_IQ4NL[qs[16 * s + i] >> 4];
        }
#endif
}

/* q[l] |= 16 where bit `bit` of qh[l] is set, l < 32 (Q5_K's fifth bits). */
static inline void add_fifth_bits32(const uint8_t *qh, int bit, int8_t *q) {
#if defined(__AVX2__)
    const __m256i h = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)qh), bit),
                                       _mm256_set1_epi8(1));
    _mm256_storeu_si256((__m256i *)q, _mm256_or_si256(_mm256_loadu_si256((const __m256i *)q), _mm256_slli_epi16(h, 4)));
#else
    for (int l = 0; l < 32; l++) q[l] |= (int8_t)(((qh[l] >> bit) & 1) << 4);
#endif
}

/* Block wb of a 256-value type (a constant where inlined) -> *k. */
static inline void unpack_kblock(int type, const uint8_t *wb, kblock_t *k) {
    switch (type) {
    case GGML_Q4_K:
    case GGML_Q5_K: {
        const uint8_t *qs = wb + (type == GGML_Q5_K ? 48 : 16), *qh = wb + 16;
        k->d = fp16_to_f32(load_u16(wb));
        k->dmin = fp16_to_f32(load_u16(wb + 2));
        k_scales_mins(wb + 4, k);
        for (int c = 0; c < 4; c++)               /* 32 bytes: sub-block 2c in low nibbles, 2c + 1 in high */
            split_nibbles32(qs + 32 * c, k->q + 64 * c, k->q + 64 * c + 32);
        if (type == GGML_Q5_K)                    /* bit s of qh[l]: the fifth bit of value l of sub-block s */
            for (int s = 0; s < 8; s++) add_fifth_bits32(qh, s, k->q + 32 * s);
        break;
    }
    case GGML_Q6_K: {
        const uint8_t *ql = wb, *qh = wb + 128;
        k->d = fp16_to_f32(load_u16(wb + 208));
        k->dmin = 0.0f;
        store_scales16(wb + 192, k->sc);
        store_scales8(0, k->mn);
        for (int h = 0; h < 2; h++)               /* value 128h + 32j + l: 4 low bits, 2 high bits */
            for (int l = 0; l < 32; l++) {
                const uint8_t *lo = ql + 64 * h, hi = qh[32 * h + l];
                k->q[128 * h + l] = (int8_t)(((lo[l] & 15) | (hi & 3) << 4) - 32);
                k->q[128 * h + 32 + l] = (int8_t)(((lo[32 + l] & 15) | ((hi >> 2) & 3) << 4) - 32);
                k->q[128 * h + 64 + l] = (int8_t)(((lo[l] >> 4) | ((hi >> 4) & 3) << 4) - 32);
                k->q[128 * h + 96 + l] = (int8_t)(((lo[32 + l] >> 4) | (hi >> 6) << 4) - 32);
            }
        break;
    }
    default: {                                    /* IQ4_XS: sub-block s as an IQ4_NL block, scale ls - 32 */
        const uint16_t sh = load_u16(wb + 2);
        const uint8_t *qs = wb + 8;
        k->d = fp16_to_f32(load_u16(wb));
        k->dmin = 0.0f;
        uint64_t sc = 0;
        for (int s = 0; s < 8; s++) {
            const int ls = ((wb[4 + s / 2] >> 4 * (s % 2)) & 15) | ((sh >> 2 * s) & 3) << 4;
            sc |= (uint64_t)(uint8_t)(ls - 32) << 8 * s;
        }
        store_scales8(sc, k->sc);
        store_scales8(0, k->mn);
        for (int s = 0; s < 8; s += 2) iq4_levels32(qs + 16 * s, k->q + 32 * s);
    }
    }
}

/* Dot of an unpacked block with q8_K block xb: dx (d S1 - dmin S2), S1 = sum over 16-value groups
 * g of sc[g] times the group's integer dot, S2 = sum of mn[g] times the group's activation sum.
 * The reference every path agrees with. */
static inline float kblock_dot(const kblock_t *k, const uint8_t *xb) {
    const int8_t *xq = (const int8_t *)xb;
    int16_t sums[16];
    float dx;
    memcpy(sums, xb + Q8K_SUMS, sizeof sums);
    memcpy(&dx, xb + Q8K_D, 4);
    int32_t s1 = 0, s2 = 0;
    for (int g = 0; g < 16; g++) {
        int32_t dot = 0;
        for (int i = 16 * g; i < 16 * g + 16; i++) dot += k->q[i] * xq[i];
        s1 += k->sc[g] * dot;
        s2 += k->mn[g] * sums[g];
    }
    return dx * (k->d * (float)s1 - k->dmin * (float)s2);
}

/* The R16 form of a 256-value type (kernels' side; the layout is described at the top): the offset of
 * its quant quads in a block of 16 rows, and which quant quad and nibble hold values 4k..4k+3
 * (k < 8) of sub-block s, the values that meet activation bytes 32 s + 4 k; the quad that holds
 * their high bits (Q5_K's fifth, Q6_K's fifth and sixth), and at which bit of each byte. */
static inline size_t k_r16_quants_at(int type) {
    return type == GGML_Q6_K ? 32 : 64 + 64 * (size_t)(type == GGML_Q4_K ? 3 : type == GGML_Q5_K ? 11 : 1);
}
static inline int k_r16_quad(int type, int s, int k) {
    switch (type) {
    case GGML_IQ4_XS: return 4 * s + k % 4;
    case GGML_Q6_K: return 16 * (s / 4) + 8 * (s % 2) + k;         /* ql: 64 bytes per 128 values */
    default: return 8 * (s / 2) + k;
    }
}
static inline int k_r16_nibble(int type, int s, int k) {
    return type == GGML_IQ4_XS ? k / 4 : type == GGML_Q6_K ? s % 4 / 2 : s % 2;
}
static inline size_t k_r16_high_at(int type, int s, int k) {
    return type == GGML_Q6_K ? 32 + 64 * (size_t)(32 + 8 * (s / 4) + k) : 256 + 64 * (size_t)k;
}
static inline int k_r16_high_bit(int type, int s) { return type == GGML_Q6_K ? 2 * (s % 4) : s; }
/* Q6_K's signed scale of 16-value group g: byte g % 4 of this quad. */
static inline size_t k_r16_q6_scales_at(int g) { return 32 + 64 * (size_t)(48 + g / 4); }

/* Blocks of a 256-value type (a constant where inlined), each unpacked once, against nt q8_K rows:
 * the scalar path's row kernel. */
static inline void k_row_dot_portable(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt,
                                      float *res) {
    for (int t = 0; t < nt; t++) res[t] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        kblock_t k;
        unpack_kblock(type, w + b * bb, &k);
        for (int t = 0; t < nt; t++) res[t] += kblock_dot(&k, x[t] + b * Q8K_BLOCK_BYTES);
    }
}

/* An ISA file's kernels are written with the type as an argument (a constant after inlining); these
 * bind them to type T as the table's function types: row_dot_T, r16_dot_T and repack_r16_T, and r16_dot2_T. */
#define BIND_ROW_DOT(T, block, row_dot)                                                                 \
    static void row_dot_##T(const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) { \
        row_dot(GGML_##T, sizeof(block), w, nb, x, nt, res);                                            \
    }
/* A path's kernels of type T with R16 ones (r16_first: repacked at load), PATH_T. */
#define R16_KERNELS(PATH, T, block, row_dot, r16_dot, repack, r16_first) \
    BIND_ROW_DOT(T, block, row_dot)                                         \
    BIND_R16(T, block, r16_dot, repack)                                     \
    const quant_kernels_t PATH##_##T = {row_dot_##T, r16_dot_##T, repack_r16_##T, r16_first};
/* The same with a kernel of two row blocks in one pass (r16_dot2: see r16_dot2_fn). */
#define R16_PAIR_KERNELS(PATH, T, block, row_dot, r16_dot, r16_dot2, repack, r16_first)                    \
    BIND_ROW_DOT(T, block, row_dot)                                                                     \
    BIND_R16(T, block, r16_dot, repack)                                                                 \
    static void r16_dot2_##T(const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *x, float *res) { \
        r16_dot2(GGML_##T, sizeof(block), r, r2, nb, x, res);                                           \
    }                                                                                                   \
    const quant_kernels_t PATH##_##T = {row_dot_##T, r16_dot_##T, repack_r16_##T, r16_first, r16_dot2_##T};
#define BIND_R16(T, block, r16_dot, repack)                                                              \
    static void r16_dot_##T(const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) { \
        r16_dot(GGML_##T, sizeof(block), r, nb, x, nt, res);                                            \
    }                                                                                                   \
    static void repack_r16_##T(const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,        \
                               const uint8_t *next) {                                                   \
        repack(GGML_##T, sizeof(block), w, rb, n_rows, nb, dst, next);                                  \
    }

/* What each ISA file exports: its q8_32 activation quantiser (the same bytes on every path; the
 * q8_K one is the scalar file's on every path) and per type its kernels. The table (hybrid/quant_traits.c) is their one reader. */
void quantize_q8_32_scalar(const float *x, int64_t n_in, uint8_t *out);
void quantize_q8_K(const float *x, int64_t n_in, uint8_t *out);
extern const quant_kernels_t SCALAR_Q4_0, SCALAR_Q5_0, SCALAR_Q5_1, SCALAR_Q8_0, SCALAR_IQ4_NL;
extern const quant_kernels_t SCALAR_Q4_K, SCALAR_Q5_K, SCALAR_Q6_K, SCALAR_IQ4_XS;
#if HYPROF_AVX2
void quantize_q8_32_avx2(const float *x, int64_t n_in, uint8_t *out);
int64_t int8_macs_avx2(int64_t n);
extern const quant_kernels_t AVX2_Q4_0, AVX2_Q5_0, AVX2_Q5_1, AVX2_Q8_0, AVX2_IQ4_NL;
extern const quant_kernels_t AVX2_Q4_K, AVX2_Q5_K, AVX2_Q6_K, AVX2_IQ4_XS;
#endif
#if HYPROF_AVX512
void quantize_q8_32_avx512(const float *x, int64_t n_in, uint8_t *out);
int64_t int8_macs_avx512(int64_t n);
extern const quant_kernels_t AVX512_Q4_0, AVX512_Q5_0, AVX512_Q5_1, AVX512_Q8_0, AVX512_IQ4_NL;
extern const quant_kernels_t AVX512_Q4_K, AVX512_Q5_K, AVX512_Q6_K, AVX512_IQ4_XS;
#endif

#endif
