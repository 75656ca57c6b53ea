/* The AVX2 path (Haswell, Zen 2 and later: AVX2, FMA, F16C), built with -mavx2 -mfma -mf16c:
 * a q8_32 group as two 256-bit halves of 2 blocks each, int8 products by `vpmaddubsw`. */
#include <immintrin.h>

#include "kernels.h"

/* Same bytes as quantize_q8_32_scalar (x * (1/d) in float, then round-to-nearest-even, the
 * default MXCSR mode nearbyintf also uses). */
void quantize_q8_32_avx2(const float *x, int64_t n_in, uint8_t *out) {
    int64_t nb = n_in / QK;
    memset(out, 0, q8_row_bytes(n_in));
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *g = out + (b / GROUP_BLOCKS) * GROUP_BYTES;
        int j = (int)(b % GROUP_BLOCKS);
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, order);             /* undo the per-lane packing */
        _mm_storeu_si128((__m128i *)(g + 16 * j), _mm256_castsi256_si128(bytes));
        _mm_storeu_si128((__m128i *)(g + 64 + 16 * j), _mm256_extracti128_si256(bytes, 1));
        _mm_storeu_ps((float *)(g + 128 + 16 * j), _mm_set1_ps(d));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
        const int32_t init[2] = {-8 * sum, -128 * sum};
        const float dsum = d * (float)sum;
        memcpy(g + 192 + 16 * j, init, 8);
        memcpy(g + 200 + 16 * j, &dsum, 4);
    }
}

/* IQ4_NL's levels (signed) in each 128-bit lane: a nibble's `vpshufb` index. */
static inline __attribute__((always_inline)) __m256i iq4nl_levels_256(void) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4NL));
}

static inline __attribute__((always_inline)) __m256i dot_u8s8_256(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* Signed x signed (|w| <= 127, so no pair of products saturates): |w| as the unsigned operand, x
 * with w's sign as the signed one. */
static inline __attribute__((always_inline)) __m256i dot_s8s8_256(__m256i w, __m256i x) {
    return dot_u8s8_256(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* The fifth bits of two 5-bit blocks' 16 values: bits 0..15 of a -> bytes 0..15 of the low lane,
 * of b -> the high lane, each 16 where set, else 0. */
static inline __attribute__((always_inline)) __m256i fifth_bits_256(uint32_t a, uint32_t b) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    __m256i v = _mm256_set_m128i(_mm_set1_epi16((short)b), _mm_set1_epi16((short)a));
    v = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(16));
}

/* One weight row (blocks of bb bytes) x NT tokens (1..4), type and NT constants after inlining.
 * Two blocks per step: lo holds values 0..15 of each (one per 128-bit lane), hi values 16..31. */
static inline __attribute__((always_inline)) void
row_dot_256(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const int64_t nh = nb / GROUP_BLOCKS * 2;           /* pairs of blocks in whole groups */
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i kvalues = iq4nl_levels_256();
    const size_t qs = type == GGML_Q5_0 ? 6 : type == GGML_Q5_1 ? 8 : 2;     /* offset of the quants */
    __m256 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t h = 0; h < nh; h++) {
        const uint8_t *wp = w + h * 2 * bb;
        const size_t xo = (size_t)(h / 2) * GROUP_BYTES + (size_t)(h % 2) * 32;
        __m256 dw = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(load_u16(wp + bb))), _mm_set1_ps(_cvtsh_ss(load_u16(wp))));
        __m256 dm = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(load_u16(wp + bb + 2))),       /* Q5_1's mins */
                                    _mm_set1_ps(_cvtsh_ss(load_u16(wp + 2))));
        __m256i lo, hi;
        if (type == GGML_Q8_0) {
            lo = _mm256_loadu2_m128i((const __m128i *)(wp + bb + 2), (const __m128i *)(wp + 2));
            hi = _mm256_loadu2_m128i((const __m128i *)(wp + bb + 18), (const __m128i *)(wp + 18));
        } else {
            __m256i q = _mm256_loadu2_m128i((const __m128i *)(wp + bb + qs), (const __m128i *)(wp + qs));
            lo = _mm256_and_si256(q, m4);
            hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        }
        if (type == GGML_Q5_0 || type == GGML_Q5_1) {
            const uint32_t qa = load_u32(wp + qs - 4), qb = load_u32(wp + bb + qs - 4);
            lo = _mm256_or_si256(lo, fifth_bits_256(qa & 0xffff, qb & 0xffff));
            hi = _mm256_or_si256(hi, fifth_bits_256(qa >> 16, qb >> 16));
        } else if (type == GGML_IQ4_NL) {
            lo = _mm256_shuffle_epi8(kvalues, lo);
            hi = _mm256_shuffle_epi8(kvalues, hi);
        }
        for (int t = 0; t < NT; t++) {
            __m256i xl = _mm256_loadu_si256((const __m256i *)(x[t] + xo));
            __m256i xh = _mm256_loadu_si256((const __m256i *)(x[t] + xo + 64));
            __m256i s;
            if (type == GGML_Q8_0 || type == GGML_IQ4_NL) {
                s = _mm256_add_epi32(dot_s8s8_256(lo, xl), dot_s8s8_256(hi, xh));
            } else {
                s = _mm256_add_epi32(dot_u8s8_256(lo, xl), dot_u8s8_256(hi, xh));
                if (type != GGML_Q5_1) {                       /* -8 * sum(x) (Q5_0: twice it), lanes 0 and 4 */
                    __m256i init = _mm256_blend_epi32(_mm256_setzero_si256(),
                                                      _mm256_loadu_si256((const __m256i *)(x[t] + xo + 192)), 0x11);
                    s = _mm256_add_epi32(s, type == GGML_Q5_0 ? _mm256_slli_epi32(init, 1) : init);
                }
            }
            __m256 d = _mm256_mul_ps(dw, _mm256_loadu_ps((const float *)(x[t] + xo + 128)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[t]);
            if (type == GGML_Q5_1)                             /* m * d_x * sum(x), lanes 2 and 6 */
                acc[t] = _mm256_fmadd_ps(dm, _mm256_blend_ps(_mm256_setzero_ps(),
                                                             _mm256_loadu_ps((const float *)(x[t] + xo + 192)), 0x44),
                                         acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        res[t] = _mm_cvtss_f32(v);
    }
    q8_blocks_dot(type, bb, w, nh * 2, nb, x, NT, res);
}

static inline __attribute__((always_inline)) void
row_dot(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: row_dot_256(type, bb, w, nb, x, 1, res); break;
    case 2: row_dot_256(type, bb, w, nb, x, 2, res); break;
    case 3: row_dot_256(type, bb, w, nb, x, 3, res); break;
    default: row_dot_256(type, bb, w, nb, x, 4, res); break;
    }
}

/* The int8 peak: `vpmaddubsw` (32 multiply-adds) summed in int16 by `vpaddw`, as the kernels sum
 * several quads before widening, on 12 independent accumulators. */
int64_t int8_macs_avx2(int64_t n) {
    __m256i acc[12], a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
    for (int k = 0; k < 12; k++) acc[k] = _mm256_set1_epi16((short)k);
    for (int64_t i = 0; i < n; i++) {
        __asm__ volatile("" : "+x"(a), "+x"(b));             /* (no folding of the constant operands) */
        for (int k = 0; k < 12; k++) acc[k] = _mm256_add_epi16(acc[k], _mm256_maddubs_epi16(a, b));
    }
    for (int k = 1; k < 12; k++) acc[0] = _mm256_add_epi16(acc[0], acc[k]);
    volatile int sink = _mm256_extract_epi16(acc[0], 0);
    (void)sink;
    return n * 12 * 32;
}

/* ---- many tokens, and one: the R16 layout (hybrid/kernels/kernels.h) ----
 *
 * The row kernel above spends most of its instructions per weight byte on shuffling each
 * row's blocks into lanes and summing them across; on AVX2 that makes a one-token matmul
 * compute-bound below memory speed. On the interleaved rows a 256-bit quad register is
 * 8 rows (the R16 block's two halves are two registers) and a broadcast activation quad
 * times it gives 8 rows' partial sums with no horizontal work.
 *
 * AVX2 has no vpdpbusd: products are vpmaddubsw's int16 pair sums, which saturate. Unsigned
 * weights (Q4_0's nibbles, Q5_0's and Q5_1's 5-bit values) add several quads up in int16
 * before one vpmaddwd, as many as stay exact: |pair| <= 2 * 15 * 127 = 3810 for Q4_0 (the
 * activation quantiser clamps to +-127), 8 * 3810 < 32767; 2 * 31 * 127 = 7874 for Q5, so
 * 4 quads (31496). Their offset enters as a multiple of sum(x) (kernels.h). Weights that
 * are signed bytes (Q8_0's, stored + 128 and flipped back once per block; IQ4_NL's levels,
 * up to +-127) would saturate as unsigned ones: they are multiplied by a sign trick, each
 * quad widened on its own. */
static inline __attribute__((always_inline)) __m256i bcast_i32(const uint8_t *p) {
    return _mm256_castps_si256(_mm256_broadcast_ss((const float *)p));   /* a load (set1 of an int: a GPR, vmovd, vpbroadcastd) */
}

static inline __attribute__((always_inline)) __m256i bcast_i64(const uint8_t *p) {
    long long v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}

/* R16 mask k (both halves' 64 bits, broadcast) -> half h's 32 bytes, byte j 16 where bit 32h + j is
 * set, else 0 (the Q5 types' fifth bits). */
static inline __attribute__((always_inline)) __m256i fifth_bits_half(__m256i mask, int h) {
    const int b = 4 * h;
    const __m256i spread = _mm256_setr_epi8(b, b, b, b, b, b, b, b, b + 1, b + 1, b + 1, b + 1, b + 1, b + 1, b + 1, b + 1,
                                            b + 2, b + 2, b + 2, b + 2, b + 2, b + 2, b + 2, b + 2,
                                            b + 3, b + 3, b + 3, b + 3, b + 3, b + 3, b + 3, b + 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    const __m256i v = _mm256_shuffle_epi8(mask, spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}

/* NT tokens' accumulators of the two halves' lanes -> res[t * 16 + row], rows in natural order. */
static inline __attribute__((always_inline)) void r16_store_lanes_256(__m256 acc[][2], const int NT, float *res) {
    for (int t = 0; t < NT; t++) {
        float lanes[16];
        _mm256_storeu_ps(lanes, acc[t][0]);
        _mm256_storeu_ps(lanes + 8, acc[t][1]);
        for (int p = 0; p < 16; p++) res[16 * t + r16_lane(p)] = lanes[p];     /* the transpose is its own inverse */
    }
}

/* Quad register k of half h of R16 block p (a 32-value type): values 4k..4k+3 of its 8 lanes as
 * bytes (Q8_0's and IQ4_NL's signed). mask: R16 mask k, broadcast (the 5-bit types). */
static inline __attribute__((always_inline)) __m256i r16_quants(int type, const uint8_t *p, int h, int k, __m256i mask) {
    const r16_form_t form = r16_form(type);
    if (type == GGML_Q8_0)
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + r16_quant_at(form, 0, 4 * k) + 32 * h)),
                                _mm256_set1_epi8((char)0x80));
    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + r16_quant_at(form, 0, 4 * (k % 4)) + 32 * h));
    __m256i q = _mm256_and_si256(k < 4 ? v : _mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
    if (form.masks) q = _mm256_or_si256(q, fifth_bits_half(mask, h));
    return type == GGML_IQ4_NL ? _mm256_shuffle_epi8(iq4nl_levels_256(), q) : q;
}

/* Half h of R16 block p (a 32-value type): its lanes' integer sums s against the activation group
 * at g, with the type's offset and scales, added to acc. */
static inline __attribute__((always_inline)) __m256 r16_half_fma(int type, const uint8_t *p, int h, const uint8_t *g,
                                                                 __m256i s, __m256 acc) {
    if (type == GGML_Q4_0) s = _mm256_add_epi32(s, bcast_i32(g + 192));                     /* -8 * sum(x) */
    if (type == GGML_Q5_0) s = _mm256_add_epi32(s, _mm256_slli_epi32(bcast_i32(g + 192), 1));
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_broadcast_ss((const float *)(g + 128))), acc);
    if (type == GGML_Q5_1)                                /* m * d_x * sum(x) */
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h))),
                              _mm256_broadcast_ss((const float *)(g + 200)), acc);
    return acc;
}

/* nb Q4_0 R16 blocks at r x NT tokens (2..4) -> res[t * 16 + row]: a half at a time, its 8 quad
 * registers unpacked once for the tokens. r16_dot_256's order, both halves inside the quad loop,
 * keeps NT x 2 int16 sums live, which spill for 4 tokens: Q4_0 pp64 ran 5 % slower end to end
 * (the other types measured no faster this way: Q5_0 -16 %, Q8_0 -5 %, in cache). */
static inline __attribute__((always_inline)) void
q4_0_r16_dot_tokens(size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const size_t sb = R16_ROWS * bb;
    const __m256i ones = _mm256_set1_epi16(1), none = _mm256_setzero_si256();
    __m256 acc[4][2];                                     /* [token][half] */
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = r16_block_at(r, NULL, 0, b, sb);
        prefetch_ahead(p, sb);
        const size_t xo = (size_t)(b / GROUP_BLOCKS) * GROUP_BYTES + (size_t)(b % GROUP_BLOCKS) * 16;
        for (int h = 0; h < 2; h++) {
            __m256i q[8];
            for (int k = 0; k < 8; k++) q[k] = r16_quants(GGML_Q4_0, p, h, k, none);
            for (int t = 0; t < NT; t++) {
                const uint8_t *g = x[t] + xo;
                __m256i s16 = _mm256_setzero_si256();     /* 8 quads of nibbles: exact in int16 (above) */
                for (int k = 0; k < 8; k++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(q[k], bcast_i32(g + 64 * (k / 4) + 4 * (k % 4))));
                acc[t][h] = r16_half_fma(GGML_Q4_0, p, h, g, _mm256_madd_epi16(s16, ones), acc[t][h]);
            }
        }
    }
    r16_store_lanes_256(acc, NT, res);
}

/* nb R16 blocks at r x NT tokens (1..4) -> res[t * 16 + row], rows in natural order; with PAIR (2,
 * NT 1) the blocks at r2 too, block by block in turn, -> res[16 + row]. The type, NT and PAIR
 * constants after inlining. The two halves inside the quad loop: an activation quad is broadcast
 * once for both (and IQ4_NL's |x| taken once: |x| times the level with x's sign, the level
 * being at least -127; Q8_0's bytes can be -128, so |w| times x with w's sign), a mask once. */
static inline __attribute__((always_inline)) void
r16_dot_256(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *const *x, const int NT,
            float *res, const int PAIR) {
    const size_t sb = R16_ROWS * bb;
    const int q5 = type == GGML_Q5_0 || type == GGML_Q5_1;
    const int iq4 = type == GGML_IQ4_NL, q8 = type == GGML_Q8_0;
    const size_t masks = r16_masks_at(r16_form(type));
    const int run = q5 ? 4 : 8;                          /* unsigned quads summed in int16 */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][2];                                     /* [token][half: lanes 0-7, 8-15] */
    for (int t = 0; t < NT * PAIR; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pb[2];                             /* the pair's blocks: their quads meet the same x */
        for (int i = 0; i < PAIR; i++) {
            pb[i] = r16_block_at(r, r2, i, b, sb);
            prefetch_ahead(pb[i], sb);
        }
        const size_t xo = (size_t)(b / GROUP_BLOCKS) * GROUP_BYTES + (size_t)(b % GROUP_BLOCKS) * 16;
        __m256i isum[4][2], s16[4][2];                    /* [pair block + token][half] */
        for (int u = 0; u < NT * PAIR; u++) isum[u][0] = isum[u][1] = s16[u][0] = s16[u][1] = _mm256_setzero_si256();
        #pragma GCC unroll 8        /* k a constant: the nibble, the run's ends, the masks' offsets */
        for (int k = 0; k < 8; k++) {
            __m256i xq[4], xa[4];
            for (int t = 0; t < NT; t++) {
                xq[t] = bcast_i32(x[t] + xo + 64 * (k / 4) + 4 * (k % 4));
                if (iq4) xa[t] = _mm256_abs_epi8(xq[t]);
            }
            for (int i = 0; i < PAIR; i++) {
                const __m256i mask = q5 ? bcast_i64(pb[i] + masks + 8 * k) : _mm256_setzero_si256();
                for (int h = 0; h < 2; h++) {
                    const __m256i q = r16_quants(type, pb[i], h, k, mask);
                    for (int t = 0; t < NT; t++) {
                        __m256i *is = &isum[i + t][h], *s = &s16[i + t][h];
                        if (iq4 || q8) {
                            const __m256i p16 = iq4 ? _mm256_maddubs_epi16(xa[t], _mm256_sign_epi8(q, xq[t]))
                                                    : _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xq[t], q));
                            *is = _mm256_add_epi32(*is, _mm256_madd_epi16(p16, ones));
                        } else {
                            *s = _mm256_add_epi16(k % run ? *s : _mm256_setzero_si256(), _mm256_maddubs_epi16(q, xq[t]));
                            if (k % run == run - 1) *is = _mm256_add_epi32(*is, _mm256_madd_epi16(*s, ones));
                        }
                    }
                }
            }
        }
        for (int i = 0; i < PAIR; i++)
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < NT; t++) acc[i + t][h] = r16_half_fma(type, pb[i], h, x[t] + xo, isum[i + t][h], acc[i + t][h]);
    }
    r16_store_lanes_256(acc, NT * PAIR, res);
}

/* ---- the 256-value types on the R16 layout (kernels.h) ----
 * Per sub-block and half of 8 rows: the quants' vpmaddubsw products with 8 broadcast activation
 * quads, summed in int16 as far as they stay exact (Q4_K's nibbles: 8 quads, 8 x 2 x 15 x 127 =
 * 30480; Q5_K's 5-bit values: 4; Q6_K's 6-bit: 2), then one vpmaddwd by the lane's scale as an
 * int16 pair, which both widens and scales. IQ4_XS's levels are signed (up to +-127): each quad's
 * products by the sign trick, scaled on their own (no offset, so no mins). The mins as vpmaddwd
 * of a lane's (m_2j, m_2j+1) pair by the activation's sums of sub-blocks 2j and 2j+1.
 *
 * What makes it keep up with memory: the two halves inside the quad loop, so that an activation
 * quad is broadcast once for both (and IQ4_XS's |x| taken once); the scales and mins decoded
 * once per half into bytes (a byte per sub-block in each lane), so that a sub-block's scale pair
 * is one vpshufb, where decoding each sub-block's 6 bits from the packed fields cost 6-10. */

/* A vpshufb index that gives every dword lane bytes b0..b3 of its own dword (0x80: a zero byte). */
static inline __attribute__((always_inline)) __m256i in_dword(int b0, int b1, int b2, int b3) {
    return _mm256_setr_epi8(b0, b1, b2, b3, b0 + 4, b1 + 4, b2 + 4, b3 + 4, b0 + 8, b1 + 8, b2 + 8, b3 + 8,
                            b0 + 12, b1 + 12, b2 + 12, b3 + 12, b0, b1, b2, b3, b0 + 4, b1 + 4, b2 + 4, b3 + 4,
                            b0 + 8, b1 + 8, b2 + 8, b3 + 8, b0 + 12, b1 + 12, b2 + 12, b3 + 12);
}

/* The 8 sub-blocks' scales of half h of block p, a byte each in every lane: Q4_K, Q5_K: scales 0..3
 * in `lo`, 4..7 in `hi` (get_scale_min_k4 on bytes); IQ4_XS: ls of sub-blocks 0, 2, 4, 6 in `lo`,
 * 1, 3, 5, 7 in `hi` (its scales_l nibbles with the 2-bit fields of scales_h, spread to bytes by
 * vpshufb: (a, a, b, b) per lane, a and b the two bytes of scales_h). Q6_K: none (its 16 signed
 * scales are read per sub-block). */
typedef struct { __m256i lo, hi; } k_scales_256_t;

static inline __attribute__((always_inline)) k_scales_256_t k_r16_scales_256(int type, const uint8_t *p, int h) {
    const __m256i d0 = _mm256_loadu_si256((const __m256i *)(p + 64 + 32 * h)), m4 = _mm256_set1_epi8(15);
    const __m256i b45 = _mm256_set1_epi8(0x30);
    if (type == GGML_IQ4_XS) {
        const __m256i sh = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h))),
                                               _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                                                8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15));
        const __m256i even = _mm256_set1_epi16(0x30), odd = _mm256_set1_epi16(0x3000);   /* bytes 0, 2 / 1, 3 */
        const __m256i e = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(sh, 4), even), _mm256_and_si256(sh, odd));
        const __m256i o = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(sh, 2), even),
                                          _mm256_and_si256(_mm256_srli_epi16(sh, 2), odd));
        return (k_scales_256_t){_mm256_or_si256(_mm256_and_si256(d0, m4), e),
                                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(d0, 4), m4), o)};
    }
    if (type == GGML_Q6_K) return (k_scales_256_t){_mm256_setzero_si256(), _mm256_setzero_si256()};
    const __m256i d2 = _mm256_loadu_si256((const __m256i *)(p + 192 + 32 * h));
    return (k_scales_256_t){_mm256_and_si256(d0, _mm256_set1_epi8(63)),
                            _mm256_or_si256(_mm256_and_si256(d2, m4), _mm256_and_si256(_mm256_srli_epi16(d0, 2), b45))};
}

/* The int16 pair (sc, sc) in every lane of half h, sc the scale of sub-block s (Q6_K: of group s). */
static inline __attribute__((always_inline)) __m256i k_r16_scale_pair(int type, const uint8_t *p, int h, k_scales_256_t sc,
                                                                       int s) {
    if (type == GGML_Q6_K) {                                      /* the signed byte as a high byte, shifted down */
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + k_r16_q6_scales_at(s) + 32 * h));
        return _mm256_srai_epi16(_mm256_shuffle_epi8(v, in_dword(0x80, s % 4, 0x80, s % 4)), 8);
    }
    if (type == GGML_IQ4_XS)                                      /* ls - 32, the levels being signed here */
        return _mm256_sub_epi16(_mm256_shuffle_epi8(s % 2 ? sc.hi : sc.lo, in_dword(s / 2, 0x80, s / 2, 0x80)),
                                _mm256_set1_epi16(32));
    return _mm256_shuffle_epi8(s < 4 ? sc.lo : sc.hi, in_dword(s % 4, 0x80, s % 4, 0x80));
}

/* Sum over the 8 sub-blocks of the lanes' mins times the activation's sums, half h of block p, as
 * int32 (Q6_K: its offset 32 times the scale of each 16). xs2: the q8_K block's sums of 32 as
 * int16 pairs (sub-blocks 2j, 2j+1 in dword j). */
static inline __attribute__((always_inline)) __m256i k_r16_mins(int type, const uint8_t *p, int h, const uint8_t *xb,
                                                                const int32_t *xs2) {
    __m256i msum = _mm256_setzero_si256();
    if (type == GGML_Q6_K) {
        for (int s = 0; s < 8; s++) {                             /* (32 sc_2s, 32 sc_2s+1): high bytes >> 3 */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + k_r16_q6_scales_at(2 * s) + 32 * h));
            const __m256i m = _mm256_srai_epi16(_mm256_shuffle_epi8(v, in_dword(0x80, 2 * s % 4, 0x80, 2 * s % 4 + 1)), 3);
            msum = _mm256_add_epi32(msum, _mm256_madd_epi16(m, bcast_i32(xb + Q8K_SUMS + 4 * s)));
        }
        return msum;
    }
    const __m256i d1 = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
    const __m256i d2 = _mm256_loadu_si256((const __m256i *)(p + 192 + 32 * h));
    const __m256i m03 = _mm256_and_si256(d1, _mm256_set1_epi8(63));                 /* mins 0..3, 4..7 as bytes */
    const __m256i m47 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(d2, 4), _mm256_set1_epi8(15)),
                                        _mm256_and_si256(_mm256_srli_epi16(d1, 2), _mm256_set1_epi8(0x30)));
    for (int j = 0; j < 4; j++) {
        const __m256i m = _mm256_shuffle_epi8(j < 2 ? m03 : m47, in_dword(2 * (j % 2), 0x80, 2 * (j % 2) + 1, 0x80));
        msum = _mm256_add_epi32(msum, _mm256_madd_epi16(m, _mm256_set1_epi32(xs2[j])));
    }
    return msum;
}

/* Quad register k of sub-block s, half h of block p: values 4k..4k+3 of its 8 lanes as bytes (IQ4_XS:
 * its signed levels). */
static inline __attribute__((always_inline)) __m256i k_r16_quants(int type, const uint8_t *p, int h, int s, int k) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + k_r16_quants_at(type) + 64 * k_r16_quad(type, s, k) + 32 * h));
    __m256i q = _mm256_and_si256(k_r16_nibble(type, s, k) ? _mm256_srli_epi16(v, 4) : v, m4);
    if (type == GGML_Q5_K || type == GGML_Q6_K) {                 /* the high bits -> bits 4 (and 5) */
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + k_r16_high_at(type, s, k) + 32 * h));
        const int up = 4 - k_r16_high_bit(type, s);
        q = _mm256_or_si256(q, _mm256_and_si256(up >= 0 ? _mm256_slli_epi32(qh, up) : _mm256_srli_epi32(qh, -up),
                                                _mm256_set1_epi8(type == GGML_Q6_K ? 0x30 : 0x10)));
    }
    return type == GGML_IQ4_XS ? _mm256_shuffle_epi8(iq4nl_levels_256(), q) : q;
}

/* nb R16 blocks of a 256-value type at r x NT tokens (1..4) -> res[t * 16 + row], rows in natural order;
 * with PAIR (2, NT 1) the blocks at r2 too, in turn, -> res[16 + row]. */
static inline __attribute__((always_inline)) void
k_r16_dot_256(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *const *x, const int NT,
              float *res, const int PAIR) {
    const size_t sb = R16_ROWS * bb;
    const int iq4 = type == GGML_IQ4_XS, run = type == GGML_Q6_K ? 2 : type == GGML_Q5_K ? 4 : 8;
    const int per16 = type == GGML_Q6_K;                          /* scales per 16 values */
    __m256 acc[4][2];                                             /* [token][half: lanes 0-7, 8-15] */
    for (int t = 0; t < NT * PAIR; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        int32_t xs2[4][4];                                        /* per token: the sums of 32 as int16 pairs */
        for (int t = 0; t < NT && !iq4 && !per16; t++) {
            const uint8_t *xb = x[t] + b * Q8K_BLOCK_BYTES;
            _mm_storeu_si128((__m128i *)xs2[t], _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)(xb + Q8K_SUMS)),
                                                               _mm_loadu_si128((const __m128i *)(xb + Q8K_SUMS + 16))));
        }
        const uint8_t *pb[2];                                     /* the pair's blocks: their quads meet the same x */
        k_scales_256_t scales[2][2];
        __m256i isum[4][2];                                       /* [pair block + token][half] */
        for (int i = 0; i < PAIR; i++) {
            pb[i] = r16_block_at(r, r2, i, b, sb);
            for (int h = 0; h < 2; h++) scales[i][h] = k_r16_scales_256(type, pb[i], h);
        }
        for (int u = 0; u < NT * PAIR; u++) isum[u][0] = isum[u][1] = _mm256_setzero_si256();
        #pragma GCC unroll 8            /* s a constant: quads, nibbles and the scales' vpshufb indices as immediates */
        for (int s = 0; s < 8; s++) {
            for (int i = 0; i < PAIR; i++) prefetch_part(pb[i], sb, s, 8);
            __asm__ volatile("");         /* (a scheduling barrier: GCC would issue all parts at the block's start) */
            __m256i sc[2][2][2];                                  /* [block][half][values 0..15, 16..31]: Q6_K's two */
            for (int i = 0; i < PAIR; i++)
                for (int h = 0; h < 2; h++) {
                    sc[i][h][0] = k_r16_scale_pair(type, pb[i], h, scales[i][h], per16 ? 2 * s : s);
                    sc[i][h][1] = per16 ? k_r16_scale_pair(type, pb[i], h, scales[i][h], 2 * s + 1) : sc[i][h][0];
                }
            __m256i s16[4][2];                                    /* int16 sums of the current run of quads */
            for (int u = 0; u < NT * PAIR; u++) s16[u][0] = s16[u][1] = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {
                __m256i xq[4], xa[4];
                for (int t = 0; t < NT; t++) {
                    xq[t] = bcast_i32(x[t] + b * Q8K_BLOCK_BYTES + 32 * s + 4 * k);
                    if (iq4) xa[t] = _mm256_abs_epi8(xq[t]);
                }
                for (int i = 0; i < PAIR; i++)
                    for (int h = 0; h < 2; h++) {
                        const __m256i q = k_r16_quants(type, pb[i], h, s, k);
                        for (int t = 0; t < NT; t++) {
                            if (iq4) {                            /* |x| times the level with x's sign */
                                const __m256i p16 = _mm256_maddubs_epi16(xa[t], _mm256_sign_epi8(q, xq[t]));
                                isum[i + t][h] = _mm256_add_epi32(isum[i + t][h], _mm256_madd_epi16(p16, sc[i][h][0]));
                            } else {
                                const __m256i p16 = _mm256_maddubs_epi16(q, xq[t]);
                                s16[i + t][h] = _mm256_add_epi16(k % run ? s16[i + t][h] : _mm256_setzero_si256(), p16);
                            }
                        }
                    }
                if (!iq4 && k % run == run - 1)
                    for (int i = 0; i < PAIR; i++)
                        for (int t = 0; t < NT; t++)
                            for (int h = 0; h < 2; h++)
                                isum[i + t][h] = _mm256_add_epi32(isum[i + t][h],
                                                                  _mm256_madd_epi16(s16[i + t][h], sc[i][h][k / 4]));
            }
        }
        for (int i = 0; i < PAIR; i++)
            for (int h = 0; h < 2; h++) {
                const uint8_t *p = pb[i];
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
                const __m256 dmin = per16 ? d : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 16 * h)));
                for (int t = 0; t < NT; t++) {
                    const uint8_t *xb = x[t] + b * Q8K_BLOCK_BYTES;
                    const __m256 dx = _mm256_broadcast_ss((const float *)(xb + Q8K_D));
                    acc[i + t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i + t][h]), _mm256_mul_ps(d, dx), acc[i + t][h]);
                    if (!iq4)                                     /* - dmin sum_g m_g sum(x of g) */
                        acc[i + t][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(k_r16_mins(type, p, h, xb, xs2[t])),
                                                         _mm256_mul_ps(dmin, dx), acc[i + t][h]);
                }
            }
    }
    r16_store_lanes_256(acc, NT * PAIR, res);
}

/* One tile of NT tokens on the R16 layout: the 256-value types' kernel or the 32-value types' one. */
static inline __attribute__((always_inline)) void
r16_dot_tile(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *const *x, const int NT,
             float *res, const int PAIR) {
    if (k_type(type)) k_r16_dot_256(type, bb, r, r2, nb, x, NT, res, PAIR);
    else if (type == GGML_Q4_0 && NT > 1) q4_0_r16_dot_tokens(bb, r, nb, x, NT, res);
    else r16_dot_256(type, bb, r, r2, nb, x, NT, res, PAIR);
}

/* Tiles of 4 tokens: each quad register, once unpacked, serves 4 tokens; each type's kernel
 * specialised for it. Against token pairs (and, for Q4_0 and Q8_0, their former shared kernel
 * of a run-time type), in cache, 1 thread, this Xeon: 4 and 8 tokens 20-28 % faster (IQ4_NL
 * 10 %), 1 token Q8_0 25 % faster, the others 2-5 % slower (measured when a tile unpacked a
 * half's 8 quad registers before its tokens; with both halves inside the quad loop, 4 tokens'
 * int16 sums of both halves outgrow the registers: Q4_0 4 tokens ~12 % slower than that). */
static inline __attribute__((always_inline)) void
r16_dot(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    for (int t = 0; t < nt; t += 4) {
        switch (nt - t) {
        case 1: r16_dot_tile(type, bb, r, NULL, nb, x + t, 1, res + 16 * t, 1); break;
        case 2: r16_dot_tile(type, bb, r, NULL, nb, x + t, 2, res + 16 * t, 1); break;
        case 3: r16_dot_tile(type, bb, r, NULL, nb, x + t, 3, res + 16 * t, 1); break;
        default: r16_dot_tile(type, bb, r, NULL, nb, x + t, 4, res + 16 * t, 1); break;
        }
    }
}

static inline __attribute__((always_inline)) void
r16_dot2(int type, size_t bb, const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *x, float *res) {
    r16_dot_tile(type, bb, r, r2, nb, &x, 1, res, 2);
}

/* Rows [0, n_rows) of w (row stride rb) -> R16 blocks at dst, as the AVX-512 repack does it with
 * two 128-bit lanes to a register: a[m] holds rows 4m, 4m+1 and c[m] rows 4m+2, 4m+3, 16 quant
 * bytes each, and one 4x4 dword transpose per lane puts quad k of the four rows side by side.
 * The 5-bit types' masks: mask k's nibble p is nibble k of the qh of the row in lane p. */
static inline __attribute__((always_inline)) void
repack_r16(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
           const uint8_t *next) {
    const size_t sb = R16_ROWS * bb;
    const r16_form_t form = r16_form(type);
    const size_t qs = r16_stored_quants(form);
    const size_t masks = r16_masks_at(form), quads = r16_quant_at(form, 0, 0);
    const int halves = (int)form.quants / 16;
    size_t row[16], lane_row[16];
    for (int i = 0; i < 16; i++) row[i] = (size_t)(i < n_rows ? i : n_rows - 1) * rb;
    for (int p = 0; p < 16; p++) lane_row[p] = row[r16_lane(p)];
    const __m256i flip = _mm256_set1_epi8((char)form.flip);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *s = w + b * bb;
        uint8_t *d = dst + b * sb;
        if (next)
            for (size_t o = (size_t)b * 16 * bb; o < (size_t)(b + 1) * 16 * bb; o += 64)
                _mm_prefetch((const char *)(next + o), _MM_HINT_T0);
        for (int f = 0; f < form.halves; f++)
            for (int p = 0; p < 16; p++) memcpy(d + 32 * f + 2 * p, s + lane_row[p] + form.fields_at + 2 * f, 2);
        if (form.masks) {
            uint32_t qh[16];
            for (int p = 0; p < 16; p++) qh[p] = load_u32(s + lane_row[p] + qs - 4);
            for (int k = 0; k < 8; k++) {
                uint64_t m = 0;
                for (int p = 0; p < 16; p++) m |= (uint64_t)((qh[p] >> 4 * k) & 15) << 4 * p;
                memcpy(d + masks + 8 * k, &m, 8);
            }
        }
        for (int h = 0; h < halves; h++) {
            const uint8_t *q = s + qs + 16 * h;
            for (int half = 0; half < 2; half++) {                  /* lanes 0-7: rows 4m+0,1; 8-15: 4m+2,3 */
                __m256i a[4];
                for (int m = 0; m < 4; m++)
                    a[m] = _mm256_loadu2_m128i((const __m128i *)(q + row[4 * m + 2 * half + 1]),
                                               (const __m128i *)(q + row[4 * m + 2 * half]));
                __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
                __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
                __m256i c[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                                _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_si256((__m256i *)(d + quads + 64 * (4 * h + k) + 32 * half), _mm256_xor_si256(c[k], flip));
            }
        }
        r16_copy_quads(form, s, lane_row, 16 * (size_t)halves, d);
    }
}

/* ---- the 256-value types: each block unpacked once (kernels.h), then against NT q8_K rows ----
 * Per 32 values (two 16-value groups, one per 128-bit lane): |q| x (x with q's sign) by
 * `vpmaddubsw` (|q| <= 127, so no pair saturates), then `vpmaddwd` with the groups' scales. */
static inline __attribute__((always_inline)) void
k_row_dot_256(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const int mins = type == GGML_Q4_K || type == GGML_Q5_K;
    __m256 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        kblock_t k;
        prefetch_ahead(w + b * bb, bb);
        unpack_kblock(type, w + b * bb, &k);
        __m256i q[8], sc[8];
        for (int c = 0; c < 8; c++) {
            q[c] = _mm256_loadu_si256((const __m256i *)(k.q + 32 * c));
            sc[c] = _mm256_set_m128i(_mm_set1_epi16(k.sc[2 * c + 1]), _mm_set1_epi16(k.sc[2 * c]));
        }
        const __m256i mn = _mm256_loadu_si256((const __m256i *)k.mn);
        for (int t = 0; t < NT; t++) {
            const uint8_t *xb = x[t] + b * Q8K_BLOCK_BYTES;
            __m256i s = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xb + 32 * c));
                const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q[c], q[c]), _mm256_sign_epi8(xv, q[c]));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(p, sc[c]));
            }
            float dx;
            memcpy(&dx, xb + Q8K_D, 4);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(k.d * dx), acc[t]);
            if (mins) {                                       /* - dmin sum_g m_g sum(x of g) */
                const __m256i m = _mm256_madd_epi16(mn, _mm256_loadu_si256((const __m256i *)(xb + Q8K_SUMS)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(-k.dmin * dx), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        res[t] = _mm_cvtss_f32(v);
    }
}

static inline __attribute__((always_inline)) void
k_row_dot(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: k_row_dot_256(type, bb, w, nb, x, 1, res); break;
    case 2: k_row_dot_256(type, bb, w, nb, x, 2, res); break;
    case 3: k_row_dot_256(type, bb, w, nb, x, 3, res); break;
    default: k_row_dot_256(type, bb, w, nb, x, 4, res); break;
    }
}

/* ---- per type ---- */

R16_PAIR_KERNELS(AVX2, Q4_0, block_q4_0, row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, Q8_0, block_q8_0, row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, Q5_0, block_q5_0, row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, Q5_1, block_q5_1, row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, IQ4_NL, block_iq4_nl, row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, Q4_K, block_q4_K, k_row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, Q5_K, block_q5_K, k_row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, Q6_K, block_q6_K, k_row_dot, r16_dot, r16_dot2, repack_r16, 1)
R16_PAIR_KERNELS(AVX2, IQ4_XS, block_iq4_xs, k_row_dot, r16_dot, r16_dot2, repack_r16, 1)
