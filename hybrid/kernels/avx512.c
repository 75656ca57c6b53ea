/* The AVX-512 VNNI path (Cascade Lake, Zen 4 and later: AVX-512 F, BW, VL and VNNI, with FMA
 * and F16C), built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -mf16c: a q8_32
 * group of 4 blocks per 512-bit register, int8 products by `vpdpbusd`; and the R16 kernels,
 * which the engine repacks weights for at load. */
#include <immintrin.h>

#include "kernels.h"

static inline __attribute__((always_inline)) __m512i loadu_512(const uint8_t *p) {
    return _mm512_loadu_si512((const void *)p);
}

/* The same rounding as quantize_q8_32_scalar (x * (1/d) in float, then round-to-nearest-even,
 * the default MXCSR mode nearbyintf also uses), so both give identical bytes. */
void quantize_q8_32_avx512(const float *x, int64_t n_in, uint8_t *out) {
    int64_t nb = n_in / QK;
    memset(out, 0, q8_row_bytes(n_in));
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *g = out + (b / GROUP_BLOCKS) * GROUP_BYTES;
        int j = (int)(b % GROUP_BLOCKS);
        __m512 v0 = _mm512_loadu_ps(x + b * QK), v1 = _mm512_loadu_ps(x + b * QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(g + 16 * j), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(g + 64 + 16 * j), _mm512_cvtsepi32_epi8(q1));
        _mm_storeu_ps((float *)(g + 128 + 16 * j), _mm_set1_ps(d));
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)), init[2] = {-8 * sum, -128 * sum};
        const float dsum = d * (float)sum;
        memcpy(g + 192 + 16 * j, init, 8);
        memcpy(g + 200 + 16 * j, &dsum, 4);
    }
}

/* The int8 peak: `vpdpbusd` (64 multiply-adds) on 12 independent accumulators, more than its
 * latency times its throughput, so nothing but its issue rate bounds the loop. */
int64_t int8_macs_avx512(int64_t n) {
    __m512i acc[12], a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
    for (int k = 0; k < 12; k++) acc[k] = _mm512_set1_epi32(k);
    for (int64_t i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(a), "+v"(b));             /* (no folding of the constant operands) */
        for (int k = 0; k < 12; k++) acc[k] = _mm512_dpbusd_epi32(acc[k], a, b);
    }
    for (int k = 1; k < 12; k++) acc[0] = _mm512_add_epi32(acc[0], acc[k]);
    volatile int sink = _mm512_reduce_add_epi32(acc[0]);
    (void)sink;
    return n * 12 * 64;
}

/* Four 16-byte pieces at p, p+bb, p+2bb, p+3bb -> one register, a block per 128-bit lane.
 * (Measured: these narrow loads stream from DRAM about 1.7x faster than two 64-byte
 * loads per group unpacked with VBMI byte permutes, though the permutes win in cache.) */
static inline __attribute__((always_inline)) __m512i load_x4_512(const uint8_t *p, size_t bb) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + bb)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * bb)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * bb)), 3);
}

/* fp16 scales of 4 blocks (stride bb) -> each repeated over its 128-bit lane. */
static inline __attribute__((always_inline)) __m512 scales_x4_512(const uint8_t *w, size_t bb) {
    __m128i h = _mm_setr_epi16((short)load_u16(w), (short)load_u16(w + bb), (short)load_u16(w + 2 * bb),
                               (short)load_u16(w + 3 * bb), 0, 0, 0, 0);
    const __m512i bcast = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(bcast, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

/* IQ4_NL's levels + 128 (unsigned, for vpdpbusd) in each 128-bit lane: a nibble's `vpshufb` index. */
static inline __attribute__((always_inline)) __m512i iq4nl_levels_512(void) {
    return _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)KVALUES_IQ4NL)),
                            _mm512_set1_epi8((char)0x80));
}

/* The fifth bits of 4 blocks (qh at p, stride bb) as byte masks: *lo bit 16j + i = bit i of block
 * j's qh (values 0..15, lane j of the low-nibble register), *hi bit 16j + i = bit 16 + i. */
static inline __attribute__((always_inline)) void fifth_bits_x4(const uint8_t *p, size_t bb, __mmask64 *lo,
                                                                 __mmask64 *hi) {
    uint64_t l = 0, h = 0;
    for (int j = 0; j < 4; j++) {
        const uint64_t qh = load_u32(p + j * bb);
        l |= (qh & 0xffff) << 16 * j;
        h |= (qh >> 16) << 16 * j;
    }
    *lo = _cvtu64_mask64(l);
    *hi = _cvtu64_mask64(h);
}

/* One weight row x NT tokens (1..4, a constant after inlining). One row at a time:
 * two rows sharing the activation loads ran faster in cache but ~2x slower from DRAM. */
static inline __attribute__((always_inline)) void
row_dot_512(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const int64_t ng = nb / GROUP_BLOCKS;
    const __m512i m4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512(), sixteen = _mm512_set1_epi8(16);
    const __m512i levels = iq4nl_levels_512();
    const size_t qs = type == GGML_Q5_0 ? 6 : type == GGML_Q5_1 ? 8 : 2;     /* offset of the quants */
    __m512 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wg = w + g * GROUP_BLOCKS * bb;
        const size_t xo = (size_t)g * GROUP_BYTES;
        __m512 dw = scales_x4_512(wg, bb);
        if (type == GGML_Q8_0) {
            /* signed x signed: |w| as the unsigned operand, x with w's sign as the signed one */
            __m512i lo = load_x4_512(wg + 2, bb), hi = load_x4_512(wg + 18, bb);
            __mmask64 nlo = _mm512_movepi8_mask(lo), nhi = _mm512_movepi8_mask(hi);
            lo = _mm512_abs_epi8(lo);
            hi = _mm512_abs_epi8(hi);
            for (int t = 0; t < NT; t++) {
                __m512i xl = loadu_512(x[t] + xo), xh = loadu_512(x[t] + xo + 64);
                __m512i s = _mm512_dpbusd_epi32(zero, lo, _mm512_mask_sub_epi8(xl, nlo, zero, xl));
                s = _mm512_dpbusd_epi32(s, hi, _mm512_mask_sub_epi8(xh, nhi, zero, xh));
                __m512 d = _mm512_mul_ps(dw, _mm512_loadu_ps((const float *)(x[t] + xo + 128)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
            }
        } else {
            /* unsigned weights: the 4-bit types' nibbles (IQ4_NL's levels + 128), Q5's with their fifth
             * bit; their offset enters as a multiple of sum(x) (kernels.h) */
            __m512i q = load_x4_512(wg + qs, bb);
            __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            __m512 dm = _mm512_setzero_ps();
            if (type == GGML_Q5_0 || type == GGML_Q5_1) {
                __mmask64 blo, bhi;
                fifth_bits_x4(wg + qs - 4, bb, &blo, &bhi);
                lo = _mm512_mask_add_epi8(lo, blo, lo, sixteen);
                hi = _mm512_mask_add_epi8(hi, bhi, hi, sixteen);
                if (type == GGML_Q5_1) dm = scales_x4_512(wg + 2, bb);
            } else if (type == GGML_IQ4_NL) {
                lo = _mm512_shuffle_epi8(levels, lo);
                hi = _mm512_shuffle_epi8(levels, hi);
            }
            for (int t = 0; t < NT; t++) {
                __m512i s;
                if (type == GGML_Q4_0) s = _mm512_maskz_loadu_epi32(0x1111, x[t] + xo + 192);    /* -8 * sum(x) */
                else if (type == GGML_Q5_0) s = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(0x1111, x[t] + xo + 192), 1);
                else if (type == GGML_IQ4_NL) s = _mm512_maskz_loadu_epi32(0x2222, x[t] + xo + 192);   /* -128 * sum */
                else s = zero;
                s = _mm512_dpbusd_epi32(s, lo, loadu_512(x[t] + xo));
                s = _mm512_dpbusd_epi32(s, hi, loadu_512(x[t] + xo + 64));
                __m512 d = _mm512_mul_ps(dw, _mm512_loadu_ps((const float *)(x[t] + xo + 128)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
                if (type == GGML_Q5_1)                                  /* m * d_x * sum(x): lanes 4j + 2 */
                    acc[t] = _mm512_fmadd_ps(dm, _mm512_maskz_loadu_ps(0x4444, x[t] + xo + 192), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) res[t] = _mm512_reduce_add_ps(acc[t]);
    q8_blocks_dot(type, bb, w, ng * GROUP_BLOCKS, nb, x, NT, res);
}

static inline __attribute__((always_inline)) void
row_dot(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: row_dot_512(type, bb, w, nb, x, 1, res); break;
    case 2: row_dot_512(type, bb, w, nb, x, 2, res); break;
    case 3: row_dot_512(type, bb, w, nb, x, 3, res); break;
    default: row_dot_512(type, bb, w, nb, x, 4, res); break;
    }
}

/* ---- many tokens: the R16 layout (hybrid/kernels/kernels.h) ----
 *
 * For prompts the row kernel above is compute-bound: per token it re-loads the
 * activation, and the row's sum needs the block scales applied lane by lane. On
 * 16 interleaved rows, one quad register times a broadcast activation quad is 16
 * rows' partial sums, and the block's 16 scales are one register: per token and
 * block 8 vpdpbusd and 3 float ops for 512 multiply-adds, the unpacked weights
 * kept in registers across a tile of R16_TILE tokens. For one token it wins too
 * (no shuffling of each row's blocks into lanes), so weights are repacked at load. */
static inline __attribute__((always_inline)) int32_t load_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* Rows [0, n_rows) of w (row stride rb, n_rows <= 16), nb blocks -> R16 blocks at dst
 * (a short block repeats its last row in the spare lanes). The 16 rows are read
 * as 16 strided streams, too many for the hardware prefetcher to run far enough
 * ahead; so, as it goes, this prefetches the next row block (16 rb bytes from
 * `next`, NULL if none) in one linear sweep, a whole repack ahead of its use. */
static inline __attribute__((always_inline)) void
repack_r16_body(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
                const uint8_t *next, const int full) {
    const size_t sb = R16_ROWS * bb;
    const r16_form_t form = r16_form(type);
    const size_t qs = r16_stored_quants(form);
    const size_t masks = r16_masks_at(form), quads = r16_quant_at(form, 0, 0);
    const int halves = (int)form.quants / 16;             /* 16-byte halves of the quants */
    size_t row[16], idx[16];                   /* idx[p]: row r16_lane(p) (the transpose is its own inverse) */
    for (int i = 0; i < 16; i++) row[i] = (size_t)(full || i < n_rows ? i : n_rows - 1) * rb;
    for (int p = 0; p < 16; p++) idx[p] = row[r16_lane(p)];
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *s = w + b * bb;
        uint8_t *d = dst + b * sb;
        if (next)
            for (size_t o = (size_t)b * 16 * bb; o < (size_t)(b + 1) * 16 * bb; o += 64)
                _mm_prefetch((const char *)(next + o), _MM_HINT_T0);
        for (int f = 0; f < form.halves; f++)
            for (int p = 0; p < 16; p++) memcpy(d + 32 * f + 2 * p, s + idx[p] + form.fields_at + 2 * f, 2);   /* (faster than a gather) */
        if (form.masks) {
            uint32_t qh[16];
            for (int p = 0; p < 16; p++) qh[p] = load_u32(s + idx[p] + qs - 4);
            const __m512i v = _mm512_loadu_si512(qh), m4 = _mm512_set1_epi32(15);
            for (int k = 0; k < 8; k++) {       /* mask k: nibble k of each lane's qh, lane p at bit 4p */
                __m128i n = _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srli_epi32(v, 4 * k), m4));
                n = _mm_maddubs_epi16(n, _mm_set1_epi16(0x1001));                 /* pairs: n[2i] + 16 n[2i+1] */
                _mm_storel_epi64((__m128i *)(d + masks + 8 * k), _mm_packus_epi16(n, n));
            }
        }
        for (int h = 0; h < halves; h++) {
            const uint8_t *q = s + qs + 16 * h;
            __m512i a[4];                          /* a[m], lane i: 16 quant bytes of row 4m+i */
            for (int m = 0; m < 4; m++) {
                if (full) {
                    a[m] = load_x4_512(q + 4 * m * rb, rb);
                } else {
                    a[m] = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(q + row[4 * m])));
                    for (int i = 1; i < 4; i++)
                        a[m] = _mm512_inserti32x4(a[m], _mm_loadu_si128((const __m128i *)(q + row[4 * m + i])), i);
                }
            }
            __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
            __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
            __m512i c[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                            _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
            for (int k = 0; k < 4; k++)
                _mm512_storeu_si512(d + quads + 64 * (4 * h + k), form.flip ? _mm512_xor_si512(c[k], flip) : c[k]);
        }
        r16_copy_quads(form, s, idx, 16 * (size_t)halves, d);
    }
}

static inline __attribute__((always_inline)) void
repack_r16(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
           const uint8_t *next) {
    if (n_rows == 16) repack_r16_body(type, bb, w, rb, 16, nb, dst, next, 1);
    else repack_r16_body(type, bb, w, rb, n_rows, nb, dst, next, 0);
}

/* 64 bytes as two 32-byte loads: an R16 block of Q4_0 (288 bytes) or Q8_0 (544) puts every other
 * block's quads across cache lines, and a 64-byte load there is a split load. */
static inline __attribute__((always_inline)) __m512i load_halves_512(const uint8_t *p) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                              _mm256_loadu_si256((const __m256i *)(p + 32)), 1);
}

/* nb R16 blocks at r x NT tokens -> res[t * 16 + row], rows in natural order; with PAIR (2, NT 1)
 * the blocks at r2 too, block by block in turn, -> res[16 + row]. With Q4_OR_Q8 (a constant) the
 * type is Q4_0 or Q8_0 and may be a run-time value (see r16_dot_q4_or_q8): the other types' steps
 * are then compiled out; else the type is a constant after inlining. */
static inline __attribute__((always_inline)) void
r16_dot_512(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *const *x, const int NT,
            float *res, const int Q4_OR_Q8, const int PAIR) {
    const size_t sb = R16_ROWS * bb;
    const int q5 = !Q4_OR_Q8 && (type == GGML_Q5_0 || type == GGML_Q5_1), q5_1 = !Q4_OR_Q8 && type == GGML_Q5_1;
    const int iq4 = !Q4_OR_Q8 && type == GGML_IQ4_NL;
    const r16_form_t form = r16_form(q5_1 ? GGML_Q5_1 : q5 ? GGML_Q5_0 : GGML_Q4_0);   /* (Q8_0's: no masks) */
    const size_t masks = r16_masks_at(form), quads = r16_quant_at(form, 0, 0);
    const __m512i m4 = _mm512_set1_epi8(15), sixteen = _mm512_set1_epi8(16), levels = iq4nl_levels_512();
    __m512 acc[R16_TILE];
    for (int t = 0; t < NT * PAIR; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
    for (int h = 0; h < PAIR; h++) {
        const uint8_t *p = r16_block_at(r, r2, h, b, sb);
        prefetch_ahead(p, sb);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 dm = q5_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32))) : _mm512_setzero_ps();
        __m512i q[8];
        if (type == GGML_Q8_0) {
            for (int k = 0; k < 8; k++) q[k] = load_halves_512(p + quads + 64 * k);
        } else {
            for (int k = 0; k < 4; k++) {
                __m512i v = load_halves_512(p + quads + 64 * k);
                q[k] = _mm512_and_si512(v, m4);
                q[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
        }
        if (q5)
            for (int k = 0; k < 8; k++) {
                uint64_t bits;
                memcpy(&bits, p + masks + 8 * k, 8);
                q[k] = _mm512_mask_add_epi8(q[k], _cvtu64_mask64(bits), q[k], sixteen);
            }
        if (iq4)
            for (int k = 0; k < 8; k++) q[k] = _mm512_shuffle_epi8(levels, q[k]);
        const size_t xo = (size_t)(b / GROUP_BLOCKS) * GROUP_BYTES + (size_t)(b % GROUP_BLOCKS) * 16;
        for (int t = 0; t < NT; t++) {
            const uint8_t *g = x[t] + xo;
            /* the weights' offset times sum(x): -8 (Q4_0), -16 (Q5_0), -128 (Q8_0 and IQ4_NL stored + 128) */
            const int32_t init = Q4_OR_Q8 ? load_i32(g + (type == GGML_Q4_0 ? 192 : 196))
                               : type == GGML_Q4_0 ? load_i32(g + 192) : type == GGML_Q5_0 ? 2 * load_i32(g + 192)
                               : type == GGML_Q5_1 ? 0 : load_i32(g + 196);
            __m512i s = _mm512_set1_epi32(init);
            for (int k = 0; k < 4; k++) s = _mm512_dpbusd_epi32(s, q[k], _mm512_set1_epi32(load_i32(g + 4 * k)));
            for (int k = 0; k < 4; k++) s = _mm512_dpbusd_epi32(s, q[k + 4], _mm512_set1_epi32(load_i32(g + 64 + 4 * k)));
            __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(*(const float *)(g + 128)));
            acc[h + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[h + t]);
            if (q5_1) acc[h + t] = _mm512_fmadd_ps(dm, _mm512_set1_ps(*(const float *)(g + 200)), acc[h + t]);
        }
    }
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int t = 0; t < NT * PAIR; t++) _mm512_storeu_ps(res + 16 * t, _mm512_permutexvar_ps(order, acc[t]));
}

/* ---- the 256-value types on the R16 layout (kernels.h) ----
 *
 * As for the 32-value types, with sub-blocks of 32 in place of blocks: per token and sub-block, 8
 * vpdpbusd of the unsigned quants (Q4_K's nibbles, Q5_K's 5-bit values, Q6_K's 6-bit ones, IQ4_XS's
 * levels + 128) by broadcast activation quads give 16 rows' integer dots, times the lane's scale
 * (vpmulld; Q6_K: per 16 values), summed over the block in int32 (Q4_K at most 8 x 63 x 32 x 15 x
 * 127, Q6_K 16 x 128 x 16 x 63 x 127, < 2^31); then the mins (IQ4_XS: its +128 offset, Q6_K: its
 * -32) from the activation's sums of 16 by vpdpwssd, and the fp16 d, dmin
 * of the 16 rows as one register each. Nothing is unpacked through memory, and a sub-block's
 * unpacked quants serve a tile of R16_TILE tokens.
 *
 * Port 0 bounds a one-token block (vpdpbusd, vpmulld's two uops and every shift issue there on
 * Intel's 512-bit units; ands, adds and vpshufb also on port 5), so shifts are kept off the
 * per-sub-block work: the 8 scales and 8 mins of the 16 rows are decoded once per block into byte
 * registers (k_r16_scales_512), and each sub-block takes its own with one vpshufb; Q4_K's high
 * nibbles are taken in place (v & 0xf0, 16 times the value) and the low nibbles' scales times 16
 * to match (2 x 4 x 16 x 63 x 32 x 15 x 127 < 2^31), d over 16 at the block's end. */

/* A vpshufb index that gives every dword lane bytes b0..b3 of its own dword (0x80: a zero byte), as
 * in_dword on the AVX2 path. */
static inline __attribute__((always_inline)) __m512i in_dword_512(int b0, int b1, int b2, int b3) {
    const uint32_t d = (uint32_t)b0 | (uint32_t)b1 << 8 | (uint32_t)b2 << 16 | (uint32_t)b3 << 24, next = 0x04040404;
    return _mm512_set4_epi32((int)(d + 3 * next), (int)(d + 2 * next), (int)(d + next), (int)d);   /* (no byte carries) */
}

/* Sub-block s's scale and min bytes of 16 rows, byte s % 4 of each lane of sc[s / 4] and mn[s / 4];
 * IQ4_XS's ls - 32 (signed) in sc[s % 2], byte s / 2 (its scales_l are nibbles), mn unused. */
typedef struct {
    __m512i sc[2], mn[2];
} k_scales_512_t;

static inline __attribute__((always_inline)) k_scales_512_t k_r16_scales_512(int type, const uint8_t *p) {
    const __m512i m63 = _mm512_set1_epi8(63), m15 = _mm512_set1_epi8(15), m48 = _mm512_set1_epi8(0x30);
    k_scales_512_t k;
    if (type == GGML_IQ4_XS) {                        /* ls = scales_l nibble | 2 bits of scales_h << 4 */
        const __m512i l = loadu_512(p + 64);
        /* scales_h (u16 per row) -> bytes 0, 0, 1, 1 of each lane: sub-blocks 4i..4i+3's high bits */
        const __m512i hb = _mm512_shuffle_epi8(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 32))),
                                               in_dword_512(0, 0, 1, 1));
        const __mmask64 odd = 0xaaaaaaaaaaaaaaaa;     /* bytes 1 and 3: their bits 4, 5 (and 6, 7) */
        const __m512i he = _mm512_mask_blend_epi8(odd, _mm512_slli_epi16(hb, 4), hb);
        const __m512i ho = _mm512_mask_blend_epi8(odd, _mm512_slli_epi16(hb, 2), _mm512_srli_epi16(hb, 2));
        const __m512i thirty_two = _mm512_set1_epi8(32);
        k.sc[0] = _mm512_sub_epi8(_mm512_ternarylogic_epi32(_mm512_and_si512(l, m15), he, m48, 0xf8), thirty_two);
        k.sc[1] = _mm512_sub_epi8(_mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(l, 4), m15), ho, m48, 0xf8),
                                  thirty_two);
        k.mn[0] = k.mn[1] = _mm512_setzero_si512();
        return k;
    }
    /* Q4_K, Q5_K: ggml's get_scale_min_k4 on 16 rows: dword 0 of the 12 bytes holds sc0..3 (6 bits) and
     * the top 2 bits of sc4..7, dword 1 likewise for the mins, dword 2 the low 4 bits of sc4..7 and mn4..7 */
    const __m512i a = loadu_512(p + 64), b = loadu_512(p + 128), c = loadu_512(p + 192);
    k.sc[0] = _mm512_and_si512(a, m63);
    k.mn[0] = _mm512_and_si512(b, m63);
    k.sc[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(c, m15), _mm512_srli_epi16(a, 2), m48, 0xf8);
    k.mn[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(c, 4), m15), _mm512_srli_epi16(b, 2), m48, 0xf8);
    return k;
}

/* Sub-block s's scale in each lane, as int32 (IQ4_XS: sign-extended from the top byte). */
static inline __attribute__((always_inline)) __m512i k_r16_scale_512(int type, const k_scales_512_t *k, int s) {
    if (type == GGML_IQ4_XS)
        return _mm512_srai_epi32(_mm512_shuffle_epi8(k->sc[s % 2], in_dword_512(0x80, 0x80, 0x80, s / 2)), 24);
    return _mm512_shuffle_epi8(k->sc[s / 4], in_dword_512(s % 4, 0x80, 0x80, 0x80));
}

/* Sub-block s's min as an int16 pair (m, m) in each lane, a vpdpwssd operand against the
 * activation's pair of sums of 16; IQ4_XS's: 128 (ls - 32), its levels' +128 offset. */
static inline __attribute__((always_inline)) __m512i k_r16_min_pair_512(int type, const k_scales_512_t *k, int s) {
    if (type == GGML_IQ4_XS)                          /* (ls - 32) << 8, >> 1 */
        return _mm512_srai_epi16(_mm512_shuffle_epi8(k->sc[s % 2], in_dword_512(0x80, s / 2, 0x80, s / 2)), 1);
    return _mm512_shuffle_epi8(k->mn[s / 4], in_dword_512(s % 4, 0x80, s % 4, 0x80));
}

/* Q6_K's signed scale of 16-value group g in each lane, as int32 (min: 32 times it, the quants' offset). */
static inline __attribute__((always_inline)) __m512i q6_k_r16_scale_512(const uint8_t *p, int g, int min) {
    const int r = 8 * (g % 4);
    const __m512i sc = _mm512_srai_epi32(_mm512_slli_epi32(loadu_512(p + k_r16_q6_scales_at(g)), 24 - r), 24);
    return min ? _mm512_slli_epi32(sc, 5) : sc;
}

/* Quad register k of sub-block s of R16 block p: values 4k..4k+3 of the 16 rows as unsigned bytes
 * (IQ4_XS: its levels + 128; Q4_K's high nibbles in place, 16 times the value). */
static inline __attribute__((always_inline)) __m512i k_r16_quants_512(int type, const uint8_t *p, int s, int k) {
    const __m512i v = loadu_512(p + k_r16_quants_at(type) + 64 * k_r16_quad(type, s, k));
    const int upper = k_r16_nibble(type, s, k);
    if (type == GGML_Q4_K) return _mm512_and_si512(v, _mm512_set1_epi8(upper ? (char)0xf0 : 15));
    __m512i q = _mm512_and_si512(upper ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(15));
    if (type == GGML_Q5_K || type == GGML_Q6_K) {     /* the high bits -> bits 4 (and 5) (0xf8: a | b & c) */
        const __m512i h = loadu_512(p + k_r16_high_at(type, s, k));
        const int up = 4 - k_r16_high_bit(type, s);
        q = _mm512_ternarylogic_epi32(q, up >= 0 ? _mm512_slli_epi32(h, up) : _mm512_srli_epi32(h, -up),
                                      _mm512_set1_epi8(type == GGML_Q6_K ? 0x30 : 0x10), 0xf8);
    }
    return type == GGML_IQ4_XS ? _mm512_shuffle_epi8(iq4nl_levels_512(), q) : q;
}

/* nb R16 blocks of a 256-value type at r x NT tokens -> res[t * 16 + row], rows in natural order; with
 * PAIR (2, NT 1) the blocks at r2 too, in turn, -> res[16 + row]. The row blocks inside the quad
 * loop: an activation quad is broadcast once for both (a load uop each: the loads, not the
 * arithmetic, were the most of a one-token block's uops). */
static inline __attribute__((always_inline)) void
k_r16_dot_512(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *const *x, const int NT,
              float *res, const int PAIR) {
    const size_t sb = R16_ROWS * bb;
    const int per16 = type == GGML_Q6_K;                  /* scales per 16 values */
    const int has_dmin = type == GGML_Q4_K || type == GGML_Q5_K;          /* (else the offset's scale is d) */
    __m512 acc[R16_TILE];
    for (int t = 0; t < NT * PAIR; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p[2];
        k_scales_512_t ks[2];
        for (int i = 0; i < PAIR; i++) {
            p[i] = r16_block_at(r, r2, i, b, sb);
            ks[i] = per16 ? (k_scales_512_t){0} : k_r16_scales_512(type, p[i]);
        }
        __m512i isum[R16_TILE];                           /* [i + t] */
        for (int t = 0; t < NT * PAIR; t++) isum[t] = _mm512_setzero_si512();
        #pragma GCC unroll 8        /* s a constant: quads, nibbles and scale patterns as immediates */
        for (int s = 0; s < 8; s++) {
            for (int i = 0; i < PAIR; i++) prefetch_part(p[i], sb, s, 8);
            __asm__ volatile("");         /* (a scheduling barrier: GCC would gather the parts at a block's start) */
            __m512i dot[R16_TILE];                        /* [i + t] */
            for (int t = 0; t < NT * PAIR; t++) dot[t] = _mm512_setzero_si512();
            #pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const int k = type == GGML_IQ4_XS ? j % 2 * 4 + j / 2 : j;    /* (IQ4_XS: k, k + 4 from one load) */
                __m512i q[2];
                for (int i = 0; i < PAIR; i++) q[i] = k_r16_quants_512(type, p[i], s, k);
                for (int t = 0; t < NT; t++) {
                    const __m512i xq = _mm512_set1_epi32(load_i32(x[t] + b * Q8K_BLOCK_BYTES + 32 * s + 4 * k));
                    for (int i = 0; i < PAIR; i++) dot[i + t] = _mm512_dpbusd_epi32(dot[i + t], q[i], xq);
                }
                if (j % 4 < 3 || (!per16 && j < 4)) continue;
                for (int i = 0; i < PAIR; i++) {          /* the end of a scale's values: 32, Q6_K's 16 */
                    __m512i sc = per16 ? q6_k_r16_scale_512(p[i], 2 * s + k / 4, 0) : k_r16_scale_512(type, &ks[i], s);
                    if (type == GGML_Q4_K && s % 2 == 0) sc = _mm512_slli_epi32(sc, 4);   /* (against the high nibbles' 16) */
                    for (int t = 0; t < NT; t++) {
                        isum[i + t] = _mm512_add_epi32(isum[i + t], _mm512_mullo_epi32(dot[i + t], sc));
                        dot[i + t] = _mm512_setzero_si512();
                    }
                }
            }
        }
        for (int i = 0; i < PAIR; i++) {
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p[i]));
            const __m512 dmin = has_dmin ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p[i] + 32))) : d;
            const __m512 d_isum = type == GGML_Q4_K ? _mm512_mul_ps(d, _mm512_set1_ps(1.0f / 16)) : d;
            __m512i msum[R16_TILE];                       /* sum_g m_g sum(x of g): the mins' pair by the sums' */
            for (int t = 0; t < NT; t++) msum[t] = _mm512_setzero_si512();
            #pragma GCC unroll 8
            for (int s = 0; s < 8; s++) {
                const __m512i m = per16 ? _mm512_mask_blend_epi16(0xaaaaaaaa, q6_k_r16_scale_512(p[i], 2 * s, 1),
                                                                   _mm512_slli_epi32(q6_k_r16_scale_512(p[i], 2 * s + 1, 1), 16))
                                        : k_r16_min_pair_512(type, &ks[i], s);
                for (int t = 0; t < NT; t++)
                    msum[t] = _mm512_dpwssd_epi32(msum[t], m, _mm512_set1_epi32(load_i32(x[t] + b * Q8K_BLOCK_BYTES + Q8K_SUMS + 4 * s)));
            }
            for (int t = 0; t < NT; t++) {
                const __m512 dx = _mm512_set1_ps(*(const float *)(x[t] + b * Q8K_BLOCK_BYTES + Q8K_D));
                acc[i + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i + t]), _mm512_mul_ps(d_isum, dx), acc[i + t]);
                acc[i + t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[t]), _mm512_mul_ps(dmin, dx), acc[i + t]);
            }
        }
    }
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int t = 0; t < NT * PAIR; t++) _mm512_storeu_ps(res + 16 * t, _mm512_permutexvar_ps(order, acc[t]));
}

/* One tile of NT tokens on the R16 layout: the 256-value types' kernel or the 32-value types' one. */
static inline __attribute__((always_inline)) void
r16_dot_tile(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *const *x, const int NT,
             float *res, const int Q4_OR_Q8, const int PAIR) {
    if (!Q4_OR_Q8 && k_type(type)) k_r16_dot_512(type, bb, r, r2, nb, x, NT, res, PAIR);
    else r16_dot_512(type, bb, r, r2, nb, x, NT, res, Q4_OR_Q8, PAIR);
}

static inline __attribute__((always_inline)) void
r16_dot_tiles(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res,
              const int Q4_OR_Q8) {
    switch (nt) {
    case 1: r16_dot_tile(type, bb, r, NULL, nb, x, 1, res, Q4_OR_Q8, 1); break;
    case 2: r16_dot_tile(type, bb, r, NULL, nb, x, 2, res, Q4_OR_Q8, 1); break;
    case 3: r16_dot_tile(type, bb, r, NULL, nb, x, 3, res, Q4_OR_Q8, 1); break;
    case 4: r16_dot_tile(type, bb, r, NULL, nb, x, 4, res, Q4_OR_Q8, 1); break;
    case 5: r16_dot_tile(type, bb, r, NULL, nb, x, 5, res, Q4_OR_Q8, 1); break;
    case 6: r16_dot_tile(type, bb, r, NULL, nb, x, 6, res, Q4_OR_Q8, 1); break;
    case 7: r16_dot_tile(type, bb, r, NULL, nb, x, 7, res, Q4_OR_Q8, 1); break;
    default: r16_dot_tile(type, bb, r, NULL, nb, x, 8, res, Q4_OR_Q8, 1); break;
    }
}

/* Q4_0 and Q8_0 share one R16 kernel, their type a run-time argument (KEEP_ARGS), as before the
 * per-type entry points: GCC's schedule of the loop specialised per type ran 10-13 % slower in
 * cache (Q4_0, 1-4 tokens); and with the later types' steps compiled in as run-time branches,
 * 4 tokens ran ~15 % slower. */
static KEEP_ARGS void
r16_dot_q4_or_q8(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    r16_dot_tiles(type, bb, r, nb, x, nt, res, 1);
}

static KEEP_ARGS void
r16_dot2_q4_or_q8(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *x, float *res) {
    r16_dot_tile(type, bb, r, r2, nb, &x, 1, res, 1, 2);
}

/* The later types' R16 kernels, each specialised for its type. */
static inline __attribute__((always_inline)) void
r16_dot_typed(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    r16_dot_tiles(type, bb, r, nb, x, nt, res, 0);
}

static inline __attribute__((always_inline)) void
r16_dot2_typed(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *x, float *res) {
    r16_dot_tile(type, bb, r, r2, nb, &x, 1, res, 0, 2);
}

/* ---- the 256-value types: each block unpacked once (kernels.h), then against NT q8_K rows ----
 * Per 64 values (four 16-value groups, one per 128-bit lane): |q| x (x with q's sign) by
 * `vpdpbusd`, times each lane's group scale (so each lane holds its true partial sum, and float
 * sums no large offsets); the mins as - dmin sum_g m_g sum(x of g), from the activation's sums
 * by `vpmaddwd`. */
static inline __attribute__((always_inline)) void
k_row_dot_512(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const int mins = type == GGML_Q4_K || type == GGML_Q5_K;          /* (and their quants are >= 0) */
    const __m512i zero = _mm512_setzero_si512();
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), four = _mm512_set1_epi32(4);
    __m512 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        kblock_t k;
        prefetch_ahead(w + b * bb, bb);
        unpack_kblock(type, w + b * bb, &k);
        __m512i q[4], sc[4];
        __mmask64 neg[4];
        const __m512i sc_all = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)k.sc));   /* one load */
        __m512i at = spread;
        for (int c = 0; c < 4; c++, at = _mm512_add_epi32(at, four)) {
            /* (two 32-byte loads: the unpack stored 32 bytes at a time, and a 64-byte load of them
             * would wait for the stores to retire instead of forwarding from them) */
            q[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(k.q + 64 * c))),
                                      _mm256_loadu_si256((const __m256i *)(k.q + 64 * c + 32)), 1);
            neg[c] = mins ? 0 : _mm512_movepi8_mask(q[c]);
            q[c] = mins ? q[c] : _mm512_abs_epi8(q[c]);
            sc[c] = _mm512_permutexvar_epi32(at, sc_all);                   /* lane l: sc[4c + l / 4] */
        }
        const __m256i mn16 = _mm256_loadu_si256((const __m256i *)k.mn);
        for (int t = 0; t < NT; t++) {
            const uint8_t *xb = x[t] + b * Q8K_BLOCK_BYTES;
            __m512i s = zero;
            for (int c = 0; c < 4; c++) {
                __m512i xv = loadu_512(xb + 64 * c);
                if (!mins) xv = _mm512_mask_sub_epi8(xv, neg[c], zero, xv);
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, q[c], xv), sc[c]));
            }
            float dx;
            memcpy(&dx, xb + Q8K_D, 4);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(k.d * dx), acc[t]);
            if (mins) {
                const __m256i sums = _mm256_loadu_si256((const __m256i *)(xb + Q8K_SUMS));
                const __m512i m = _mm512_zextsi256_si512(_mm256_madd_epi16(mn16, sums));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), _mm512_set1_ps(-k.dmin * dx), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) res[t] = _mm512_reduce_add_ps(acc[t]);
}

static inline __attribute__((always_inline)) void
k_row_dot(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: k_row_dot_512(type, bb, w, nb, x, 1, res); break;
    case 2: k_row_dot_512(type, bb, w, nb, x, 2, res); break;
    case 3: k_row_dot_512(type, bb, w, nb, x, 3, res); break;
    default: k_row_dot_512(type, bb, w, nb, x, 4, res); break;
    }
}

/* ---- per type ---- */

R16_PAIR_KERNELS(AVX512, Q4_0, block_q4_0, row_dot, r16_dot_q4_or_q8, r16_dot2_q4_or_q8, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, Q8_0, block_q8_0, row_dot, r16_dot_q4_or_q8, r16_dot2_q4_or_q8, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, Q5_0, block_q5_0, row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, Q5_1, block_q5_1, row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, IQ4_NL, block_iq4_nl, row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)

R16_PAIR_KERNELS(AVX512, Q4_K, block_q4_K, k_row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, Q5_K, block_q5_K, k_row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, Q6_K, block_q6_K, k_row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)
R16_PAIR_KERNELS(AVX512, IQ4_XS, block_iq4_xs, k_row_dot, r16_dot_typed, r16_dot2_typed, repack_r16, 1)
