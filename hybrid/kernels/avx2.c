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
        int32_t init[2] = {-8 * sum, -128 * sum};
        memcpy(g + 192 + 16 * j, init, 8);
    }
}

static inline __attribute__((always_inline)) __m256i dot_u8s8_256(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* One weight row (blocks of bb bytes) x NT tokens (1..4), type and NT constants after inlining. */
static inline __attribute__((always_inline)) void
row_dot_256(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const int64_t nh = nb / GROUP_BLOCKS * 2;           /* pairs of blocks in whole groups */
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t h = 0; h < nh; h++) {
        const uint8_t *wp = w + h * 2 * bb;
        const size_t xo = (size_t)(h / 2) * GROUP_BYTES + (size_t)(h % 2) * 32;
        __m256 dw = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(load_u16(wp + bb))), _mm_set1_ps(_cvtsh_ss(load_u16(wp))));
        __m256i lo, hi;
        if (type == GGML_Q4_0) {
            __m256i q = _mm256_loadu2_m128i((const __m128i *)(wp + bb + 2), (const __m128i *)(wp + 2));
            lo = _mm256_and_si256(q, m4);
            hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        } else {
            lo = _mm256_loadu2_m128i((const __m128i *)(wp + bb + 2), (const __m128i *)(wp + 2));
            hi = _mm256_loadu2_m128i((const __m128i *)(wp + bb + 18), (const __m128i *)(wp + 18));
        }
        for (int t = 0; t < NT; t++) {
            __m256i xl = _mm256_loadu_si256((const __m256i *)(x[t] + xo));
            __m256i xh = _mm256_loadu_si256((const __m256i *)(x[t] + xo + 64));
            __m256i s;
            if (type == GGML_Q4_0) {
                s = _mm256_add_epi32(dot_u8s8_256(lo, xl), dot_u8s8_256(hi, xh));
                s = _mm256_add_epi32(s, _mm256_blend_epi32(_mm256_setzero_si256(),
                                                           _mm256_loadu_si256((const __m256i *)(x[t] + xo + 192)), 0x11));
            } else {
                s = _mm256_add_epi32(dot_u8s8_256(_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(xl, lo)),
                                     dot_u8s8_256(_mm256_sign_epi8(hi, hi), _mm256_sign_epi8(xh, hi)));
            }
            __m256 d = _mm256_mul_ps(dw, _mm256_loadu_ps((const float *)(x[t] + xo + 128)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[t]);
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

/* ---- many tokens, and one: the R16 layout (hybrid/kernels/kernels.h) ----
 *
 * The row kernel above spends most of its instructions per weight byte on shuffling each
 * row's blocks into lanes and summing them across; on AVX2 that makes a one-token matmul
 * compute-bound below memory speed. On the interleaved rows a 256-bit quad register is
 * 8 rows (the R16 block's two halves are two registers) and a broadcast activation quad
 * times it gives 8 rows' partial sums with no horizontal work.
 *
 * AVX2 has no vpdpbusd: products are vpmaddubsw's int16 pair sums. Q4_0's eight quads of
 * a row add up in int16 before one vpmaddwd, exactly: |pair| <= 2 * 15 * 127 = 3810 (the
 * activation quantiser clamps to +-127) and 8 * 3810 < 32767. Q8_0's bytes are stored
 * + 128, which would saturate, so they are flipped back once per block into `ws` and
 * multiplied by the sign trick of the row kernel, each quad widened on its own. */
static inline __attribute__((always_inline)) __m256i bcast_i32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* nb R16 blocks at r x NT tokens (1 or 2) -> res[t * 16 + row], rows in natural order. */
static inline __attribute__((always_inline)) void
r16_dot_256(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const size_t sb = R16_ROWS * bb;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[2][2];                                     /* [token][half: lanes 0-7, 8-15] */
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = r + b * sb;
        const size_t xo = (size_t)(b / GROUP_BLOCKS) * GROUP_BYTES + (size_t)(b % GROUP_BLOCKS) * 16;
        for (int h = 0; h < 2; h++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
            __m256i q[8];
            int8_t ws[8][32] __attribute__((aligned(32)));
            if (type == GGML_Q4_0) {
                for (int k = 0; k < 4; k++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 + 64 * k + 32 * h));
                    q[k] = _mm256_and_si256(v, m4);
                    q[k + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
            } else {
                for (int k = 0; k < 8; k++) {
                    __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32 + 64 * k + 32 * h)), flip);
                    _mm256_store_si256((__m256i *)ws[k], v);
                    q[k] = _mm256_abs_epi8(v);
                }
            }
            for (int t = 0; t < NT; t++) {
                const uint8_t *g = x[t] + xo;
                __m256i s;
                if (type == GGML_Q4_0) {
                    __m256i s16 = _mm256_maddubs_epi16(q[0], bcast_i32(g));
                    for (int k = 1; k < 4; k++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(q[k], bcast_i32(g + 4 * k)));
                    for (int k = 0; k < 4; k++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(q[k + 4], bcast_i32(g + 64 + 4 * k)));
                    s = _mm256_add_epi32(_mm256_madd_epi16(s16, ones), bcast_i32(g + 192));     /* -8 * sum(x) */
                } else {
                    s = _mm256_setzero_si256();
                    for (int k = 0; k < 8; k++) {
                        __m256i xs = _mm256_sign_epi8(bcast_i32(g + 64 * (k / 4) + 4 * (k % 4)),
                                                      _mm256_load_si256((const __m256i *)ws[k]));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], xs), ones));
                    }
                }
                __m256 d = _mm256_mul_ps(dw, _mm256_broadcast_ss((const float *)(g + 128)));
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[t][h]);
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        float lanes[16];
        _mm256_storeu_ps(lanes, acc[t][0]);
        _mm256_storeu_ps(lanes + 8, acc[t][1]);
        for (int p = 0; p < 16; p++) res[16 * t + r16_lane(p)] = lanes[p];     /* the transpose is its own inverse */
    }
}

/* Token pairs: two tokens' accumulators and one half's weights fill the 16 registers. */
static KEEP_ARGS void
r16_dot(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    for (int t = 0; t < nt; t += 2) {
        if (nt - t == 1) r16_dot_256(type, bb, r, nb, x + t, 1, res + 16 * t);
        else r16_dot_256(type, bb, r, nb, x + t, 2, res + 16 * t);
    }
}

/* Rows [0, n_rows) of w (row stride rb) -> R16 blocks at dst, as the AVX-512 repack does it with
 * two 128-bit lanes to a register: a[m] holds rows 4m, 4m+1 and c[m] rows 4m+2, 4m+3, 16 quant
 * bytes each, and one 4x4 dword transpose per lane puts quad k of the four rows side by side. */
static inline __attribute__((always_inline)) void
repack_r16(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
           const uint8_t *next) {
    const size_t sb = R16_ROWS * bb;
    const int halves = (int)(bb - 2) / 16;
    size_t row[16];
    for (int i = 0; i < 16; i++) row[i] = (size_t)(i < n_rows ? i : n_rows - 1) * rb;
    const __m256i flip = _mm256_set1_epi8((char)(type == GGML_Q8_0 ? 0x80 : 0));
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *s = w + b * bb;
        uint8_t *d = dst + b * sb;
        if (next)
            for (size_t o = (size_t)b * 16 * bb; o < (size_t)(b + 1) * 16 * bb; o += 64)
                _mm_prefetch((const char *)(next + o), _MM_HINT_T0);
        for (int p = 0; p < 16; p++) memcpy(d + 2 * p, s + row[r16_lane(p)], 2);
        for (int h = 0; h < halves; h++) {
            const uint8_t *q = s + 2 + 16 * h;
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
                    _mm256_storeu_si256((__m256i *)(d + 32 + 64 * (4 * h + k) + 32 * half), _mm256_xor_si256(c[k], flip));
            }
        }
    }
}

/* ---- per type ---- */

static void row_dot_q4_0(const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    row_dot(GGML_Q4_0, sizeof(block_q4_0), w, nb, x, nt, res);
}
static void row_dot_q8_0(const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    row_dot(GGML_Q8_0, sizeof(block_q8_0), w, nb, x, nt, res);
}

static void r16_dot_q4_0(const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    r16_dot(GGML_Q4_0, sizeof(block_q4_0), r, nb, x, nt, res);
}
static void r16_dot_q8_0(const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    r16_dot(GGML_Q8_0, sizeof(block_q8_0), r, nb, x, nt, res);
}
static void repack_r16_q4_0(const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst, const uint8_t *next) {
    repack_r16(GGML_Q4_0, sizeof(block_q4_0), w, rb, n_rows, nb, dst, next);
}
static void repack_r16_q8_0(const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst, const uint8_t *next) {
    repack_r16(GGML_Q8_0, sizeof(block_q8_0), w, rb, n_rows, nb, dst, next);
}

const quant_kernels_t AVX2_Q4_0 = {row_dot_q4_0, r16_dot_q4_0, repack_r16_q4_0, 1};
const quant_kernels_t AVX2_Q8_0 = {row_dot_q8_0, r16_dot_q8_0, repack_r16_q8_0, 1};
