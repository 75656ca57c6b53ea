/* CPU matmuls on GGUF Q4_0 / Q8_0 blocks as stored, at memory speed.
 *
 * Why native code: a generated token reads every selected expert's weights
 * once, so the expert matmul is bound by memory bandwidth only if the kernel
 * consumes 4-bit blocks faster than DRAM delivers them. torch has no kernel
 * for GGUF block layouts, and dequantising first multiplies the bytes moved.
 * As in ggml, the activation is quantised once to 8-bit blocks, and every dot
 * product is an int8 one (AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`), scaled
 * per 32-weight block in float. The SIMD path is picked at import from what the
 * CPU reports (AVX-512 needs F, BW, VL and VNNI: Cascade Lake, Zen 4 and later),
 * so the module is built without -march flags and runs anywhere; the scalar
 * path is portable C and the reference the others are tested against.
 *
 * Activation layout ("q8 rows"): each row of n_in floats becomes groups of
 * four 32-value blocks, 256 bytes per group, laid out for the SIMD kernels:
 *   [  0.. 63] int8: values 0..15 of block 0, of block 1, of block 2, of block 3
 *   [ 64..127] int8: values 16..31 of blocks 0..3 (the Q4_0 high nibbles' partners)
 *   [128..191] float32[16]: block scale d_j repeated 4 times (one 128-bit lane per block)
 *   [192..255] int32[16]: lane 4j holds -8 * sum(values of block j), lane 4j+1
 *             -128 * sum(values of block j), the other two 0
 * so one 512-bit register holds the low halves of four blocks, and the Q4_0
 * weights (nibble - 8) need no per-weight subtraction: the -8 enters as that
 * precomputed sum (-128 serves the interleaved Q8_0 kernel below, whose
 * weights are offset by +128 to be unsigned). A row with a block count not divisible by 4 is padded with
 * zero blocks. Every path (scalar, AVX2, AVX-512) reads this same layout and
 * computes the same integer block sums; only the float summation order differs.
 *
 * Buffers come in through the buffer protocol (NumPy arrays, memoryviews, the
 * np.memmap of a GGUF file), so sizes are checked here and a wrong size is a
 * ValueError, never a stray read. The GIL is released around all compute; the
 * threads of a worker pool (hybrid/_pool.c) share one call's rows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_fp16.h"
#include "_vecmath.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_SIMD 1
#include <immintrin.h>
#else
#define HAVE_X86_SIMD 0
#endif

#define QK 32                 /* weights per block, Q4_0 and Q8_0 */
#define GROUP_BLOCKS 4        /* blocks per q8 activation group */
#define GROUP_BYTES 256
#define TILE 4                /* tokens computed together per weight row */

enum { TYPE_Q4_0 = 2, TYPE_Q8_0 = 8 };                 /* ggml type ids */
#define TYPE_R16 0x100        /* flag on a type: the weight is repacked at load (repack_r16) */
enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512VNNI = 2, N_PATHS = 3 };
static const char *const path_names[N_PATHS] = {"scalar", "avx2", "avx512vnni"};
static int best_path = PATH_SCALAR;                     /* what this CPU supports */
static int default_path = PATH_SCALAR;                  /* best_path unless HYPROF_KERNELS says less */

static size_t weight_row_bytes(int type, int64_t n_in) {
    return (size_t)(n_in / QK) * (type == TYPE_Q4_0 ? 18 : 34);
}

static size_t q8_row_bytes(int64_t n_in) {
    return (size_t)((n_in / QK + GROUP_BLOCKS - 1) / GROUP_BLOCKS) * GROUP_BYTES;
}

/* ---- activation quantisation: the portable reference (the SIMD ones give the same bytes) ---- */

static void quantize_row_q8(const float *x, int64_t n_in, uint8_t *out) {
    int64_t nb = n_in / QK;
    memset(out, 0, q8_row_bytes(n_in));
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        uint8_t *g = out + (b / GROUP_BLOCKS) * GROUP_BYTES;
        int j = (int)(b % GROUP_BLOCKS);
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        int8_t q[QK];
        for (int i = 0; i < QK; i++) {
            float v = nearbyintf(xb[i] * id);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            q[i] = (int8_t)v;
            sum += q[i];
        }
        memcpy(g + 16 * j, q, 16);
        memcpy(g + 64 + 16 * j, q + 16, 16);
        for (int l = 0; l < 4; l++) memcpy(g + 128 + 16 * j + 4 * l, &d, 4);
        int32_t init[2] = {-8 * sum, -128 * sum};
        memcpy(g + 192 + 16 * j, init, 8);
    }
}

/* ---- scalar block dots: the reference every SIMD path must agree with ---- */

/* Integer dot of weight block `wb` with block j of q8 group `g`, times both scales. */
static float block_dot_scalar(int type, const uint8_t *wb, const uint8_t *g, int j) {
    const int8_t *lo = (const int8_t *)(g + 16 * j), *hi = (const int8_t *)(g + 64 + 16 * j);
    float dx, dw = fp16_to_f32(load_u16(wb));
    memcpy(&dx, g + 128 + 16 * j, 4);
    int32_t s = 0;
    if (type == TYPE_Q4_0) {
        const uint8_t *qs = wb + 2;
        memcpy(&s, g + 192 + 16 * j, 4);                /* -8 * sum(x) */
        for (int i = 0; i < 16; i++) s += (qs[i] & 15) * lo[i] + (qs[i] >> 4) * hi[i];
    } else {
        const int8_t *qs = (const int8_t *)(wb + 2);
        for (int i = 0; i < 16; i++) s += qs[i] * lo[i] + qs[16 + i] * hi[i];
    }
    return dw * dx * (float)s;
}

/* Blocks [b0, nb) of one weight row against nt q8 rows, added into res[0..nt). */
static void row_dot_scalar(int type, const uint8_t *w, int64_t b0, int64_t nb,
                           const uint8_t *const *x, int nt, float *res) {
    size_t bb = type == TYPE_Q4_0 ? 18 : 34;
    for (int t = 0; t < nt; t++) {
        float acc = 0.0f;
        for (int64_t b = b0; b < nb; b++)
            acc += block_dot_scalar(type, w + b * bb, x[t] + (b / GROUP_BLOCKS) * GROUP_BYTES, (int)(b % GROUP_BLOCKS));
        res[t] += acc;
    }
}

#if HAVE_X86_SIMD
/* ---- AVX-512 VNNI: one group of 4 blocks per 512-bit register ---- */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

static inline __attribute__((always_inline)) T512 __m512i loadu_512(const uint8_t *p) {
    return _mm512_loadu_si512((const void *)p);
}

/* The same rounding as quantize_row_q8 (x * (1/d) in float, then round-to-nearest-even,
 * the default MXCSR mode nearbyintf also uses), so both give identical bytes. */
static T512 void quantize_row_q8_avx512(const float *x, int64_t n_in, uint8_t *out) {
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
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)), init[2] = {-8 * sum, -128 * sum};
        memcpy(g + 192 + 16 * j, init, 8);
    }
}

/* Four 16-byte pieces at p, p+bb, p+2bb, p+3bb -> one register, a block per 128-bit lane.
 * (Measured: these narrow loads stream from DRAM about 1.7x faster than two 64-byte
 * loads per group unpacked with VBMI byte permutes, though the permutes win in cache.) */
static inline __attribute__((always_inline)) T512 __m512i load_x4_512(const uint8_t *p, size_t bb) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + bb)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * bb)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * bb)), 3);
}

/* fp16 scales of 4 blocks (stride bb) -> each repeated over its 128-bit lane. */
static inline __attribute__((always_inline)) T512 __m512 scales_x4_512(const uint8_t *w, size_t bb) {
    __m128i h = _mm_setr_epi16((short)load_u16(w), (short)load_u16(w + bb), (short)load_u16(w + 2 * bb),
                               (short)load_u16(w + 3 * bb), 0, 0, 0, 0);
    const __m512i bcast = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(bcast, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

/* One weight row x NT tokens (1..4, a constant after inlining). One row at a time:
 * two rows sharing the activation loads ran faster in cache but ~2x slower from DRAM. */
static inline __attribute__((always_inline)) T512 void
row_dot_512(int type, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const size_t bb = type == TYPE_Q4_0 ? 18 : 34;
    const int64_t ng = nb / GROUP_BLOCKS;
    const __m512i m4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *wg = w + g * GROUP_BLOCKS * bb;
        const size_t xo = (size_t)g * GROUP_BYTES;
        __m512 dw = scales_x4_512(wg, bb);
        if (type == TYPE_Q4_0) {
            __m512i q = load_x4_512(wg + 2, bb);
            __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            for (int t = 0; t < NT; t++) {
                __m512i s = _mm512_maskz_loadu_epi32(0x1111, x[t] + xo + 192);   /* -8 * sum(x) */
                s = _mm512_dpbusd_epi32(s, lo, loadu_512(x[t] + xo));
                s = _mm512_dpbusd_epi32(s, hi, loadu_512(x[t] + xo + 64));
                __m512 d = _mm512_mul_ps(dw, _mm512_loadu_ps((const float *)(x[t] + xo + 128)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
            }
        } else {
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
        }
    }
    for (int t = 0; t < NT; t++) res[t] = _mm512_reduce_add_ps(acc[t]);
    row_dot_scalar(type, w, ng * GROUP_BLOCKS, nb, x, NT, res);
}

static T512 void row_dot_avx512(int type, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: row_dot_512(type, w, nb, x, 1, res); break;
    case 2: row_dot_512(type, w, nb, x, 2, res); break;
    case 3: row_dot_512(type, w, nb, x, 3, res); break;
    default: row_dot_512(type, w, nb, x, 4, res); break;
    }
}

/* ---- AVX-512 VNNI, many tokens: 16 weight rows interleaved, one row per 32-bit lane ----
 *
 * For prompts the kernel above is compute-bound: per token it re-loads the
 * activation, and the row's sum needs the block scales applied lane by lane.
 * Here a block of 16 rows is first interleaved ("R16", into a per-thread
 * buffer, once, then reused by every token): for each 32-weight block b,
 *   [ 0.. 31] fp16[16]: the 16 rows' scales
 *   [32.. ]   quads: 64 bytes per quad k, 4 consecutive weights of each of
 *             the 16 rows (Q4_0: 4 registers, quad k in the low nibbles and
 *             quad k+4 in the high ones; Q8_0: 8 registers, values + 128)
 * so `vpdpbusd` of one quad register with a broadcast activation quad gives
 * 16 rows' partial sums at once, with no horizontal sum, and the block's 16
 * scales are one register. Per token and block that is 8 vpdpbusd and 3 float
 * ops for 512 multiply-adds; the unpacked weights stay in registers across a
 * tile of R16_TILE tokens. The rows sit in the lanes in a transposed order
 * (lane 4i+m holds row 4m+i: what a 4x4 dword transpose gives), undone once
 * per output. */
#define R16_TILE 8            /* tokens per pass over a repacked row block */
#define R16_MIN_TOKENS 4      /* below this the row kernel is faster (no repack to pay) */

static size_t r16_block_bytes(int type) { return type == TYPE_Q4_0 ? 32 + 4 * 64 : 32 + 8 * 64; }

static inline __attribute__((always_inline)) int32_t load_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* Rows [0, n_rows) of w (row stride rb, n_rows <= 16), nb blocks -> R16 blocks at dst
 * (a short block repeats its last row in the spare lanes). The 16 rows are read
 * as 16 strided streams, too many for the hardware prefetcher to run far enough
 * ahead; so, as it goes, this prefetches the next row block (16 rb bytes from
 * `next`, NULL if none) in one linear sweep, a whole repack ahead of its use. */
static inline __attribute__((always_inline)) T512 void
repack_r16_body(int type, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst, const uint8_t *next,
                const int full) {
    const size_t bb = type == TYPE_Q4_0 ? 18 : 34, sb = r16_block_bytes(type);
    const int halves = type == TYPE_Q4_0 ? 1 : 2;
    int32_t idx[16];                                       /* lane p: row 4 (p % 4) + p / 4 */
    size_t row[16];
    for (int i = 0; i < 16; i++) row[i] = (size_t)(full || i < n_rows ? i : n_rows - 1) * rb;
    for (int p = 0; p < 16; p++) idx[p] = (int32_t)row[4 * (p % 4) + p / 4];
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *s = w + b * bb;
        uint8_t *d = dst + b * sb;
        if (next)
            for (size_t o = (size_t)b * 16 * bb; o < (size_t)(b + 1) * 16 * bb; o += 64)
                _mm_prefetch((const char *)(next + o), _MM_HINT_T0);
        for (int p = 0; p < 16; p++) memcpy(d + 2 * p, s + idx[p], 2);     /* (faster than a gather) */
        for (int h = 0; h < halves; h++) {
            const uint8_t *q = s + 2 + 16 * h;
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
                _mm512_storeu_si512(d + 32 + 64 * (4 * h + k), type == TYPE_Q4_0 ? c[k] : _mm512_xor_si512(c[k], flip));
        }
    }
}

static T512 void repack_r16_512(int type, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
                                const uint8_t *next) {
    if (n_rows == 16) repack_r16_body(type, w, rb, 16, nb, dst, next, 1);
    else repack_r16_body(type, w, rb, n_rows, nb, dst, next, 0);
}

/* nb R16 blocks at r x NT tokens -> res[t * 16 + row], rows in natural order. */
static inline __attribute__((always_inline)) T512 void
r16_dot_512(int type, const uint8_t *r, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const size_t sb = r16_block_bytes(type);
    const __m512i m4 = _mm512_set1_epi8(15);
    const int init = type == TYPE_Q4_0 ? 192 : 196;           /* -8 or -128 times sum(x) */
    __m512 acc[R16_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = r + b * sb;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        __m512i q[8];
        if (type == TYPE_Q4_0) {
            for (int k = 0; k < 4; k++) {
                __m512i v = loadu_512(p + 32 + 64 * k);
                q[k] = _mm512_and_si512(v, m4);
                q[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
        } else {
            for (int k = 0; k < 8; k++) q[k] = loadu_512(p + 32 + 64 * k);
        }
        const size_t xo = (size_t)(b / GROUP_BLOCKS) * GROUP_BYTES + (size_t)(b % GROUP_BLOCKS) * 16;
        for (int t = 0; t < NT; t++) {
            const uint8_t *g = x[t] + xo;
            __m512i s = _mm512_set1_epi32(load_i32(g + init));
            for (int k = 0; k < 4; k++) s = _mm512_dpbusd_epi32(s, q[k], _mm512_set1_epi32(load_i32(g + 4 * k)));
            for (int k = 0; k < 4; k++) s = _mm512_dpbusd_epi32(s, q[k + 4], _mm512_set1_epi32(load_i32(g + 64 + 4 * k)));
            __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(*(const float *)(g + 128)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[t]);
        }
    }
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(res + 16 * t, _mm512_permutexvar_ps(order, acc[t]));
}

static T512 void r16_dot_avx512(int type, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: r16_dot_512(type, r, nb, x, 1, res); break;
    case 2: r16_dot_512(type, r, nb, x, 2, res); break;
    case 3: r16_dot_512(type, r, nb, x, 3, res); break;
    case 4: r16_dot_512(type, r, nb, x, 4, res); break;
    case 5: r16_dot_512(type, r, nb, x, 5, res); break;
    case 6: r16_dot_512(type, r, nb, x, 6, res); break;
    case 7: r16_dot_512(type, r, nb, x, 7, res); break;
    default: r16_dot_512(type, r, nb, x, 8, res); break;
    }
}

/* ---- AVX2: a group as two 256-bit halves of 2 blocks each ---- */
#define T256 __attribute__((target("avx2,fma,f16c")))

/* Same bytes as quantize_row_q8 (see quantize_row_q8_avx512). */
static T256 void quantize_row_q8_avx2(const float *x, int64_t n_in, uint8_t *out) {
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

static inline __attribute__((always_inline)) T256 __m256i dot_u8s8_256(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

static inline __attribute__((always_inline)) T256 void
row_dot_256(int type, const uint8_t *w, int64_t nb, const uint8_t *const *x, const int NT, float *res) {
    const size_t bb = type == TYPE_Q4_0 ? 18 : 34;
    const int64_t nh = nb / GROUP_BLOCKS * 2;           /* pairs of blocks in whole groups */
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 acc[TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t h = 0; h < nh; h++) {
        const uint8_t *wp = w + h * 2 * bb;
        const size_t xo = (size_t)(h / 2) * GROUP_BYTES + (size_t)(h % 2) * 32;
        __m256 dw = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(load_u16(wp + bb))), _mm_set1_ps(_cvtsh_ss(load_u16(wp))));
        __m256i lo, hi;
        if (type == TYPE_Q4_0) {
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
            if (type == TYPE_Q4_0) {
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
    row_dot_scalar(type, w, nh * 2, nb, x, NT, res);
}

static T256 void row_dot_avx2(int type, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
    switch (nt) {
    case 1: row_dot_256(type, w, nb, x, 1, res); break;
    case 2: row_dot_256(type, w, nb, x, 2, res); break;
    case 3: row_dot_256(type, w, nb, x, 3, res); break;
    default: row_dot_256(type, w, nb, x, 4, res); break;
    }
}
#endif

/* res[t] = dot(weight row w, q8 row x[t]) for t < nt <= TILE. */
static void row_dot(int path, int type, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res) {
#if HAVE_X86_SIMD
    if (path == PATH_AVX512VNNI) { row_dot_avx512(type, w, nb, x, nt, res); return; }
    if (path == PATH_AVX2) { row_dot_avx2(type, w, nb, x, nt, res); return; }
#endif
    for (int t = 0; t < nt; t++) res[t] = 0.0f;
    row_dot_scalar(type, w, 0, nb, x, nt, res);
}

/* matmul_rows by the row kernel: for many tokens the loops are blocked so that a
 * block of ROW_BLOCK weight rows (L2) meets one tile of TILE tokens' activations
 * (L1) at a time, instead of every row re-reading all tokens from L2. */
#define ROW_BLOCK 16
static void matmul_rows_by_row(int path, int type, const uint8_t *w, int64_t n_in, int64_t r0, int64_t r1,
                               const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots, float *out,
                               int64_t out_stride) {
    const size_t rb = weight_row_bytes(type, n_in);
    const int64_t nb = n_in / QK;
    for (int64_t b0 = r0; b0 < r1; b0 += ROW_BLOCK) {
        int64_t b1 = b0 + ROW_BLOCK < r1 ? b0 + ROW_BLOCK : r1;
        for (int64_t s0 = 0; s0 < n_slots; s0 += TILE) {
            int nt = (int)(n_slots - s0 < TILE ? n_slots - s0 : TILE);
            for (int64_t r = b0; r < b1; r++) {
                float res[TILE];
                row_dot(path, type, w + r * rb, nb, x + s0, nt, res);
                for (int t = 0; t < nt; t++) out[slot_out[s0 + t] * out_stride + r] = res[t];
            }
        }
    }
}

#if HAVE_X86_SIMD
/* One block of 16 rows starting at row r, already in R16 form, against n_slots tokens,
 * R16_TILE at a time; n_rows (<= 16) of it are kept. */
static T512 void r16_block_rows(int type, const uint8_t *rw, int64_t nb, int n_rows, int64_t r,
                                const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots, float *out,
                                int64_t out_stride) {
    for (int64_t s0 = 0; s0 < n_slots; s0 += R16_TILE) {
        int nt = (int)(n_slots - s0 < R16_TILE ? n_slots - s0 : R16_TILE);
        float res[R16_TILE * 16];
        r16_dot_avx512(type, rw, nb, x + s0, nt, res);
        for (int t = 0; t < nt; t++) memcpy(out + slot_out[s0 + t] * out_stride + r, res + 16 * t, sizeof(float) * n_rows);
    }
}

/* matmul_rows by the R16 kernel (AVX-512) on stored rows: each block of 16 rows is
 * interleaved into a buffer kept per thread, then meets the tokens. -> 0, or -1
 * (nothing done) if no buffer. */
static T512 int matmul_rows_r16(int type, const uint8_t *w, int64_t n_in, int64_t r0, int64_t r1,
                                const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots, float *out,
                                int64_t out_stride) {
    static _Thread_local uint8_t *buf;
    static _Thread_local size_t cap;
    const size_t rb = weight_row_bytes(type, n_in);
    const int64_t nb = n_in / QK;
    const size_t need = (size_t)nb * r16_block_bytes(type);
    if (need > cap) {
        free(buf);
        cap = 0;
        if (!(buf = malloc(need))) return -1;
        cap = need;
    }
    for (int64_t r = r0; r < r1; r += 16) {
        const int n_rows = (int)(r1 - r < 16 ? r1 - r : 16);
        const int64_t next = r + 16 < r1 ? r + 16 : -1;
        repack_r16_512(type, w + r * rb, rb, n_rows, nb, buf, next < 0 ? NULL : w + next * rb);
        r16_block_rows(type, buf, nb, n_rows, r, x, slot_out, n_slots, out, out_stride);
    }
    return 0;
}

/* matmul_rows on weights repacked at load (`repack_r16`): rows [r0, r1), both multiples
 * of 16, read in place, for any number of tokens. A block of 16 rows is 16 rows' bytes,
 * so block r / 16 starts where row r would. */
static T512 void matmul_rows_packed(int type, const uint8_t *w, int64_t n_in, int64_t r0, int64_t r1,
                                    const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots, float *out,
                                    int64_t out_stride) {
    const size_t rb = weight_row_bytes(type, n_in);
    for (int64_t r = r0; r < r1; r += 16)
        r16_block_rows(type, w + r * rb, n_in / QK, 16, r, x, slot_out, n_slots, out, out_stride);
}
#endif

/* One matrix against n_slots q8 rows: out[slot_out[s] * out_stride + r] for rows
 * [r0, r1). Each weight row is read from memory once. Repacked weights (`packed`,
 * AVX-512 only) take the R16 kernel in place; stored ones take it for prompts
 * (n_slots >= R16_MIN_TOKENS), repacking as they go, and the row kernel for
 * generation. A row's result depends only on its index and the kernel, never on
 * which rows share its block, so splits of the rows compose. */
static void matmul_rows(int path, int type, int packed, const uint8_t *w, int64_t n_in, int64_t r0, int64_t r1,
                        const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots, float *out,
                        int64_t out_stride) {
#if HAVE_X86_SIMD
    if (packed) {
        matmul_rows_packed(type, w, n_in, r0, r1, x, slot_out, n_slots, out, out_stride);
        return;
    }
    if (path == PATH_AVX512VNNI && n_slots >= R16_MIN_TOKENS &&
        !matmul_rows_r16(type, w, n_in, r0, r1, x, slot_out, n_slots, out, out_stride))
        return;
#else
    (void)packed;                                     /* never set: repack_r16 needs AVX-512 */
#endif
    matmul_rows_by_row(path, type, w, n_in, r0, r1, x, slot_out, n_slots, out, out_stride);
}

/* ---- Python bindings ---- */

#include "_pool.h"                   /* the worker pool that `pool=` runs a call on */

static int parse_path(int path) {
    if (path < 0) return default_path;
    if (path >= N_PATHS || path > best_path) {
        PyErr_Format(PyExc_ValueError, "kernel path %d is not available on this CPU (best: %s)", path, path_names[best_path]);
        return -1;
    }
    return path;
}

static int check_type_and_n_in(int type, Py_ssize_t n_in) {
    if (type != TYPE_Q4_0 && type != TYPE_Q8_0) {
        PyErr_Format(PyExc_ValueError, "ggml type %d not supported (only Q4_0=2 and Q8_0=8)", type);
        return -1;
    }
    if (n_in <= 0 || n_in % QK) {
        PyErr_Format(PyExc_ValueError, "n_in must be a positive multiple of %d, got %zd", QK, n_in);
        return -1;
    }
    return 0;
}

static int check_size(const Py_buffer *b, Py_ssize_t want, const char *name) {
    if (b->len != want) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, want, b->len);
        return -1;
    }
    return 0;
}

/* An activation argument: float32 rows of n_in, which the call quantises (as ggml's
 * CPU matmul quantises src1 first), or q8 rows already quantised (uint8,
 * q8_row_bytes(n_in) each: one input shared by several calls). -> its number of
 * rows, with *floats set if they are float32 rows; or -1 with an exception. */
static Py_ssize_t activation_rows(const Py_buffer *view, Py_ssize_t n_in, int *floats) {
    *floats = view->format && strcmp(view->format, "f") == 0;
    if (!*floats && view->format && strcmp(view->format, "B") != 0) {
        PyErr_Format(PyExc_ValueError, "x: expected float32 rows or uint8 q8 rows, got format '%s'", view->format);
        return -1;
    }
    const Py_ssize_t row = *floats ? n_in * (Py_ssize_t)sizeof(float) : (Py_ssize_t)q8_row_bytes(n_in);
    if (view->len % row) {
        PyErr_Format(PyExc_ValueError, "x: %zd bytes is not a whole number of %s rows of n_in=%zd", view->len,
                     *floats ? "float32" : "q8", n_in);
        return -1;
    }
    return view->len / row;
}

static void quantize_rows(int path, const float *x, Py_ssize_t n_rows, int64_t n_in, uint8_t *out) {
    void (*quantize_row)(const float *, int64_t, uint8_t *) = quantize_row_q8;
#if HAVE_X86_SIMD
    if (path == PATH_AVX512VNNI) quantize_row = quantize_row_q8_avx512;
    if (path == PATH_AVX2) quantize_row = quantize_row_q8_avx2;
#endif
    for (Py_ssize_t r = 0; r < n_rows; r++) quantize_row(x + r * n_in, n_in, out + r * q8_row_bytes(n_in));
}

static PyObject *py_quantize_q8(PyObject *self, PyObject *args) {
    Py_buffer x, out;
    Py_ssize_t n_in;
    int path;
    if (!PyArg_ParseTuple(args, "y*nw*i", &x, &n_in, &out, &path)) return NULL;
    PyObject *ret = NULL;
    if (n_in <= 0 || n_in % QK) {
        PyErr_Format(PyExc_ValueError, "n_in must be a positive multiple of %d, got %zd", QK, n_in);
        goto done;
    }
    Py_ssize_t n_rows = x.len / (Py_ssize_t)sizeof(float) / n_in;
    if ((path = parse_path(path)) < 0) goto done;
    if (x.len != n_rows * n_in * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "x: %zd bytes is not a whole number of float32 rows of %zd", x.len, n_in);
        goto done;
    }
    if (check_size(&out, n_rows * (Py_ssize_t)q8_row_bytes(n_in), "out")) goto done;
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(path, x.buf, n_rows, n_in, out.buf);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return ret;
}

/* MUL_MAT_ID cut into chunks for the pool (hybrid/_pool.c). The work is a sequence of
 * units, row block u % n_blocks of the (u / n_blocks)-th expert computed, consecutive in
 * memory within an expert; chunk c is units [first[c], first[c + 1]). Fused (-fmoe), the
 * chunks of the gate experts come first, then those of the up experts (into `up_out`), each
 * of which takes silu(gate) * up over its rows when its gate chunk is done. (Gate and up
 * row blocks in turn, each thread then reading two tensors at once, streamed ~1.5x slower
 * from DRAM than gate then up: bench_expert_matmul.py.) Row blocks are multiples of
 * CHUNK_ROW_ALIGN rows (the kernels' row blocks; only a range's last block is shorter),
 * sized so that one unit is about CHUNK_WORK bytes of weights times token tiles: a few
 * microseconds, so that threads finish an op within a unit of each other.
 *
 * Chunks are guided, as OpenMP's schedule(guided): each is a share of the units left
 * (1 / (CHUNK_GUIDE x threads)), at most CHUNK_MAX_UNITS, at least one. Two threads that
 * claimed alternate 64 KiB units read DRAM ~30 % slower than two reading 1 MiB runs
 * (measured here with a plain read loop: 21-24 against 29-37 GB/s); the shrinking tail
 * keeps the threads finishing together, and a thread the OS stalls holds at most a
 * chunk of ~1 MiB. */
#define CHUNK_ROW_ALIGN 16
#define CHUNK_WORK (64 * 1024)
#define CHUNK_MAX_UNITS 16
#define CHUNK_GUIDE 2

typedef struct {
    int path, type, packed;
    const uint8_t *w, *w_up;          /* expert 0's rows; expert e is e * expert_bytes further */
    size_t expert_bytes;
    int64_t n_in, n_out, r0, r1, block_rows, n_blocks;
    const int64_t *first;             /* chunk c: units [first[c], first[c + 1]) */
    int64_t n_chunks;                 /* per tensor */
    const uint8_t **xs;               /* q8 rows of the slots, grouped by expert */
    int64_t *slot_out;
    const int64_t *runs;              /* per expert computed: expert, first slot, end slot */
    int64_t n_runs;
    float *out, *up_out;              /* up_out: the up experts' products, when fused */
    _Atomic int64_t *gate_done;       /* fused: per gate chunk, 1 once done */
} mm_job_t;

static void mm_chunk(void *ctx, int64_t chunk, int thread) {
    const mm_job_t *j = ctx;
    const int64_t up = chunk >= j->n_chunks;
    chunk -= up * j->n_chunks;
    /* Fused: an up chunk's gate chunk was claimed before it (all gate chunks come first), so it is
     * done or running; then silu(gate) * up over the chunk's rows, in place, by the thread that has
     * the up rows in cache, instead of one pass on the main thread after. */
    if (up) pool_wait_count(&j->gate_done[chunk], 1);
    for (int64_t u = j->first[chunk], end; u < j->first[chunk + 1]; u = end) {   /* one expert's rows at a time */
        const int64_t i_run = u / j->n_blocks, *run = j->runs + 3 * i_run, run_end = (i_run + 1) * j->n_blocks;
        end = run_end < j->first[chunk + 1] ? run_end : j->first[chunk + 1];
        const int64_t b0 = j->r0 + (u - i_run * j->n_blocks) * j->block_rows;
        const int64_t b1_full = j->r0 + (end - i_run * j->n_blocks) * j->block_rows;
        const int64_t b1 = b1_full < j->r1 ? b1_full : j->r1;
        matmul_rows(j->path, j->type, j->packed, (up ? j->w_up : j->w) + (size_t)run[0] * j->expert_bytes, j->n_in,
                    b0, b1, j->xs + run[1], j->slot_out + run[1], run[2] - run[1], up ? j->up_out : j->out, j->n_out);
        if (up)
            for (int64_t at = run[1]; at < run[2]; at++) {
                float *g = j->out + j->slot_out[at] * j->n_out + b0;
                swiglu_f32(g, j->up_out + j->slot_out[at] * j->n_out + b0, b1 - b0, g);
            }
    }
    if (j->gate_done && !up) atomic_store_explicit(&j->gate_done[chunk], 1, memory_order_release);
}

/* The guided cut of n_units units for n_threads threads: first[0..n] (room for n_units + 1) -> n chunks. */
static int64_t guided_chunks(int64_t n_units, int n_threads, int64_t *first) {
    int64_t n = 0;
    first[0] = 0;
    for (int64_t at = 0; at < n_units; n++) {
        int64_t size = (n_units - at) / (CHUNK_GUIDE * n_threads);
        size = size < 1 ? 1 : size > CHUNK_MAX_UNITS ? CHUNK_MAX_UNITS : size;
        at = at + size < n_units ? at + size : n_units;
        first[n + 1] = at;
    }
    return n;
}

/* Rows per chunk for n_runs experts holding n_slots slots between them. */
static int64_t chunk_rows(const mm_job_t *j, int64_t n_slots) {
    int64_t tiles = (n_slots / j->n_runs + TILE - 1) / TILE;
    int64_t row_work = (int64_t)weight_row_bytes(j->type, j->n_in) * (tiles ? tiles : 1);
    int64_t rows = (CHUNK_WORK / row_work + CHUNK_ROW_ALIGN - 1) / CHUNK_ROW_ALIGN * CHUNK_ROW_ALIGN;
    rows = rows > CHUNK_ROW_ALIGN ? rows : CHUNK_ROW_ALIGN;
    while (2 * j->n_runs * ((j->r1 - j->r0 + rows - 1) / rows) > POOL_MAX_CHUNKS) rows *= 2;
    return rows;
}

static int parse_times(PyObject *obj, pool_t *pool, Py_buffer *view) {
    if (obj == Py_None) return 0;
    if (!pool) {
        PyErr_SetString(PyExc_ValueError, "times: given without a pool");
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len != 3 * pool_threads(pool) * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "times: expected int64 [n_threads=%d, 3], got %zd bytes", pool_threads(pool),
                     view->len);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* Expert ids as int32 [n_slots]: from int32 or int64 ids, or (None) expert 0 for
 * each of n_rows slots (a plain MUL_MAT). -> a fresh array (the caller frees it) or
 * NULL with an exception. */
static int32_t *parse_ids(PyObject *obj, Py_ssize_t n_rows, Py_ssize_t *n_slots) {
    int32_t *id;
    if (obj == Py_None) {
        *n_slots = n_rows;
        if (!(id = calloc((size_t)n_rows + 1, sizeof(int32_t)))) PyErr_NoMemory();
        return id;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    int wide = v.itemsize == 8 && v.format && strchr("lq", v.format[0]);
    if (!wide && !(v.itemsize == 4 && v.format && v.format[0] == 'i')) {
        PyErr_Format(PyExc_ValueError, "ids: expected int32 or int64, got format '%s'", v.format ? v.format : "B");
        PyBuffer_Release(&v);
        return NULL;
    }
    *n_slots = v.len / v.itemsize;
    if ((id = malloc(sizeof(int32_t) * ((size_t)*n_slots + 1)))) {
        for (Py_ssize_t s = 0; s < *n_slots; s++) {
            int64_t e = wide ? ((const int64_t *)v.buf)[s] : ((const int32_t *)v.buf)[s];
            id[s] = e < INT32_MIN || e > INT32_MAX ? -1 : (int32_t)e;
        }
    } else {
        PyErr_NoMemory();
    }
    PyBuffer_Release(&v);
    return id;
}

/* MUL_MAT_ID: slot (t, k) multiplies expert ids[t, k] by activation row t (x broadcast
 * over the used experts, as for gate/up) or row t*n_used+k (one row per slot, as for
 * down), into out[t, k, :]. Slots are grouped by expert (a counting sort), and
 * only experts whose rank among the distinct used ids is in [a0, a1) are done.
 * With a pool, every thread of the pool shares the rows [r0, r1) of those experts
 * as chunks (mm_chunk), the caller being thread 0; without, the caller does them
 * alone. The GIL is released throughout. A plain MUL_MAT is the case of one expert
 * and one slot per token (ids None). Returns the number of experts computed, which
 * is what the op read: the engine counts its bytes from it. */
static PyObject *py_mul_mat_id(PyObject *self, PyObject *args) {
    Py_buffer w, w_up, x = {0}, out, times = {0};
    int type, path;
    Py_ssize_t n_expert, n_in, n_used, r0, r1, a0, a1;
    PyObject *x_obj, *ids_obj, *pool_obj = Py_None, *times_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*y*innOOnw*nnnni|OO", &w, &w_up, &type, &n_expert, &n_in, &x_obj, &ids_obj, &n_used,
                          &out, &r0, &r1, &a0, &a1, &path, &pool_obj, &times_obj))
        return NULL;
    PyObject *ret = NULL;
    const uint8_t **xs = NULL;
    uint8_t *xq, *xq_owned = NULL;
    int32_t *id = NULL;
    int64_t *slot_out = NULL, *start = NULL, *runs = NULL, *first = NULL;
    float *up_out = NULL;
    _Atomic int64_t *gate_done = NULL;
    pool_t *pool = NULL;
    Py_ssize_t n_x = 0, n_slots = 0;
    if (pool_obj != Py_None && !(pool = pool_from_object(pool_obj))) goto done;
    if (parse_times(times_obj, pool, &times)) goto done;
    const int packed = (type & TYPE_R16) != 0;
    type &= ~TYPE_R16;
    if (check_type_and_n_in(type, n_in) || (path = parse_path(path)) < 0) goto done;
    if (packed && path != PATH_AVX512VNNI) {
        PyErr_Format(PyExc_ValueError, "repacked (R16) weights need the avx512vnni path, not %s", path_names[path]);
        goto done;
    }
    Py_ssize_t rb = (Py_ssize_t)weight_row_bytes(type, n_in), xb = (Py_ssize_t)q8_row_bytes(n_in);
    if (n_expert <= 0 || n_used <= 0 || w.len % (n_expert * rb)) {
        PyErr_Format(PyExc_ValueError, "weight: %zd bytes is not %zd experts of whole rows of n_in=%zd", w.len, n_expert, n_in);
        goto done;
    }
    Py_ssize_t n_out = w.len / (n_expert * rb);
    int fused = w_up.len > 0;
    if (fused && check_size(&w_up, w.len, "w_up")) goto done;
    if (ids_obj == Py_None && (n_expert != 1 || n_used != 1)) {
        PyErr_Format(PyExc_ValueError, "ids: None (a plain matmul) needs n_expert = n_used = 1");
        goto done;
    }
    int floats;
    if (PyObject_GetBuffer(x_obj, &x, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0 ||
        (n_x = activation_rows(&x, n_in, &floats)) < 0 || !(id = parse_ids(ids_obj, n_x, &n_slots)))
        goto done;
    Py_ssize_t n_tok = n_slots / n_used;
    if (n_tok * n_used != n_slots) {
        PyErr_Format(PyExc_ValueError, "ids: %zd ids is not [n_tokens, n_used=%zd]", n_slots, n_used);
        goto done;
    }
    if (n_x != n_tok && n_x != n_slots) {
        PyErr_Format(PyExc_ValueError, "x: %zd rows is neither %zd nor %zd", n_x, n_tok, n_slots);
        goto done;
    }
    if (check_size(&out, n_slots * n_out * (Py_ssize_t)sizeof(float), "out")) goto done;
    if (r0 < 0 || r1 > n_out || r0 > r1) {
        PyErr_Format(PyExc_ValueError, "row range [%zd, %zd) outside [0, %zd)", r0, r1, n_out);
        goto done;
    }
    if (packed && (n_out % 16 || r0 % 16 || r1 % 16)) {
        PyErr_Format(PyExc_ValueError, "repacked (R16) weights: rows [%zd, %zd) of %zd are not whole blocks of 16",
                     r0, r1, n_out);
        goto done;
    }
    for (Py_ssize_t s = 0; s < n_slots; s++) {
        if (id[s] < 0 || id[s] >= n_expert) {
            PyErr_Format(PyExc_ValueError, "ids[%zd] outside [0, %zd)", s, n_expert);
            goto done;
        }
    }
    xs = malloc(sizeof(*xs) * (n_slots + 1));
    slot_out = malloc(sizeof(*slot_out) * (n_slots + 1));
    start = calloc(n_expert + 1, sizeof(*start));
    runs = malloc(sizeof(*runs) * 3 * (n_expert + 1));
    xq = floats ? (xq_owned = malloc((size_t)(n_x * xb) + 1)) : x.buf;
    up_out = fused ? malloc(sizeof(float) * (size_t)(n_slots * n_out) + 1) : NULL;
    if (!xs || !slot_out || !start || !runs || !xq || (fused && !up_out)) { PyErr_NoMemory(); goto done; }
    int busy = 0, no_memory = 0;
    int64_t n_runs = 0;
    Py_BEGIN_ALLOW_THREADS
    if (floats) quantize_rows(path, x.buf, n_x, n_in, xq);
    {
        for (Py_ssize_t s = 0; s < n_slots; s++) start[id[s] + 1]++;
        for (Py_ssize_t e = 0; e < n_expert; e++) start[e + 1] += start[e];
        for (Py_ssize_t s = 0; s < n_slots; s++) {            /* start[e] walks to the end of e's run */
            int64_t at = start[id[s]]++;
            xs[at] = xq + (n_x == n_slots ? s : s / n_used) * xb;
            slot_out[at] = s;
        }
        int64_t rank = 0, begin = 0, run_slots = 0;          /* start[e] is now e's end */
        for (Py_ssize_t e = 0; e < n_expert; e++) {
            int64_t end = start[e];
            if (end > begin) {
                if (rank >= a0 && rank < a1) {
                    runs[3 * n_runs] = e;
                    runs[3 * n_runs + 1] = begin;
                    runs[3 * n_runs + 2] = end;
                    n_runs++;
                    run_slots += end - begin;
                }
                rank++;
            }
            begin = end;
        }
        mm_job_t job = {path, type, packed, w.buf, fused ? w_up.buf : NULL, (size_t)(n_out * rb), n_in, n_out, r0, r1,
                        r1 - r0, 1, NULL, 0, xs, slot_out, runs, n_runs, out.buf, up_out, NULL};
        const int64_t tensors = fused ? 2 : 1;
        if (pool && n_runs && r1 > r0) {
            job.block_rows = chunk_rows(&job, run_slots);
            job.n_blocks = (r1 - r0 + job.block_rows - 1) / job.block_rows;
        }
        const int64_t n_units = n_runs * job.n_blocks;
        if (!(job.first = first = malloc(sizeof(*first) * (size_t)(n_units + 1))) ||
            (fused && !(job.gate_done = gate_done = calloc((size_t)n_units + 1, sizeof(*gate_done)))))
            no_memory = 1;
        else if (r1 > r0) {
            job.n_chunks = guided_chunks(n_units, pool ? pool_threads(pool) : 1, first);
            if (pool && n_runs)
                busy = pool_run(pool, tensors * job.n_chunks, mm_chunk, &job, times.buf);
            else
                for (int64_t k = 0; k < tensors * job.n_chunks; k++) mm_chunk(&job, k, 0);
        }
    }
    Py_END_ALLOW_THREADS
    if (no_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "pool: already running a job");
        goto done;
    }
    ret = PyLong_FromLongLong(n_runs);
done:
    free(xs);
    free(xq_owned);
    free(up_out);
    free((void *)gate_done);
    free(first);
    free(id);
    free(slot_out);
    free(start);
    free(runs);
    if (times.obj) PyBuffer_Release(&times);
    if (x.obj) PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&w_up);
    PyBuffer_Release(&out);
    return ret;
}

/* repack_r16(w, type, n_in, out): stored Q4_0/Q8_0 rows [n_rows, row_bytes] (n_rows a
 * multiple of 16, any leading dimensions) -> the same bytes in R16 form (the interleaved
 * 16-row blocks of the prompt kernel, see above), which the AVX-512 kernel reads in place
 * for any number of tokens: generation then does 8 vpdpbusd per 16 rows and block and no
 * horizontal sums, where the row kernel shuffles each block into its lanes. Done once at
 * load, as llama.cpp's CPU "repack" buffers and ik_llama.cpp's -rtr do. */
static PyObject *py_repack_r16(PyObject *self, PyObject *args) {
    Py_buffer w, out;
    int type;
    Py_ssize_t n_in;
    if (!PyArg_ParseTuple(args, "y*inw*", &w, &type, &n_in, &out)) return NULL;
    PyObject *ret = NULL;
    if (check_type_and_n_in(type, n_in)) goto done;
    if (best_path != PATH_AVX512VNNI) {
        PyErr_Format(PyExc_ValueError, "repack_r16: needs AVX-512 VNNI (this CPU: %s)", path_names[best_path]);
        goto done;
    }
    const Py_ssize_t rb = (Py_ssize_t)weight_row_bytes(type, n_in), group = 16 * rb;
    if (w.len % group) {
        PyErr_Format(PyExc_ValueError, "repack_r16: %zd bytes is not whole blocks of 16 rows of n_in=%zd", w.len, n_in);
        goto done;
    }
    if (check_size(&out, w.len, "out")) goto done;
#if HAVE_X86_SIMD
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at < w.len; at += group)
        repack_r16_512(type, (const uint8_t *)w.buf + at, (size_t)rb, 16, n_in / QK, (uint8_t *)out.buf + at, NULL);
    Py_END_ALLOW_THREADS
#endif
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_q8_row_bytes(PyObject *self, PyObject *arg) {
    Py_ssize_t n_in = PyLong_AsSsize_t(arg);
    if (n_in == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromSize_t(q8_row_bytes(n_in));
}

static PyMethodDef methods[] = {
    {"quantize_q8", py_quantize_q8, METH_VARARGS, "quantize_q8(x_f32, n_in, out_u8, path): rows of x -> q8 rows"},
    {"mul_mat_id", py_mul_mat_id, METH_VARARGS,
     "mul_mat_id(w, w_up, type, n_expert, n_in, x, ids, n_used, out, r0, r1, a0, a1, path, pool=None, times=None) "
     "-> experts computed. x: float32 or q8 rows; ids: int32/int64 or None (a plain matmul); "
     "times (with a pool): int64 [n_threads, 3], per thread (first claim ns, end ns, chunks run)"},
    {"repack_r16", py_repack_r16, METH_VARARGS,
     "repack_r16(w, type, n_in, out): stored rows (a multiple of 16) -> R16 blocks, the same size; "
     "a call on them passes type | R16"},
    {"q8_row_bytes", py_q8_row_bytes, METH_O, "q8_row_bytes(n_in): bytes of one quantised activation row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "GGUF Q4_0/Q8_0 CPU matmul kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#if HAVE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        best_path = PATH_AVX2;
    if (best_path == PATH_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        best_path = PATH_AVX512VNNI;
#endif
    default_path = best_path;
    const char *want = getenv("HYPROF_KERNELS");
    if (want && *want && strcmp(want, "torch")) {     /* "torch": the engine's exact path, see hybrid/weights.py */
        int p = 0;
        while (p < N_PATHS && strcmp(want, path_names[p])) p++;
        if (p == N_PATHS || p > best_path) {
            PyErr_Format(PyExc_ImportError, "HYPROF_KERNELS=%s: not one of the paths this CPU runs (scalar..%s)", want,
                         path_names[best_path]);
            return NULL;
        }
        default_path = p;
    }
    if (PyType_Ready(&PoolType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    static const pool_api_t pool_api = {pool_from_object, pool_run, pool_threads};
    if (PyModule_AddObject(m, "_pool_api", PyCapsule_New((void *)&pool_api, POOL_API_CAPSULE, NULL)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *names = PyTuple_New(best_path + 1);
    for (int p = 0; p <= best_path && names; p++) PyTuple_SET_ITEM(names, p, PyUnicode_FromString(path_names[p]));
    if (!names || PyModule_AddObject(m, "PATHS", names) < 0 || PyModule_AddIntConstant(m, "DEFAULT_PATH", default_path) < 0 ||
        PyModule_AddIntConstant(m, "R16", TYPE_R16) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
