/* The scalar path: portable C, built with no target flags, the reference the SIMD paths
 * are tested against. Its R16 kernels are plain loops that give exactly the products of
 * its row kernel: they exist so that the repacked layout (its repack, its row ranges in
 * whole blocks of 16, its refusals) is testable on every CPU; on this path the engine
 * reads weights as stored (r16_first 0). */
#include <math.h>

#include "kernels.h"

void quantize_q8_32_scalar(const float *x, int64_t n_in, uint8_t *out) {
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

static inline void row_dot(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt,
                           float *res) {
    for (int t = 0; t < nt; t++) res[t] = 0.0f;
    q8_blocks_dot(type, bb, w, 0, nb, x, nt, res);
}

/* ---- R16 ---- */

/* Where quant byte q of the row in lane p sits in an R16 block (quad q / 4 of lane p); Q8_0's
 * bytes are stored + 128 (`flip`). */
static inline size_t r16_quant_at(int p, size_t q) { return 32 + 64 * (q / 4) + 4 * (size_t)p + q % 4; }
static inline uint8_t r16_flip(int type) { return type == GGML_Q8_0 ? 0x80 : 0; }

static inline void repack_r16(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb,
                              uint8_t *dst) {
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *d = dst + b * R16_ROWS * bb;
        for (int i = 0; i < R16_ROWS; i++) {
            const uint8_t *s = w + (size_t)(i < n_rows ? i : n_rows - 1) * rb + b * bb;
            const int p = r16_lane(i);
            memcpy(d + 2 * p, s, 2);
            for (size_t q = 0; q < bb - 2; q++) d[r16_quant_at(p, q)] = s[2 + q] ^ r16_flip(type);
        }
    }
}

/* Each row's block taken back out of its lane, then the row kernel's block dot, in its order. */
static inline void r16_dot(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt,
                           float *res) {
    uint8_t block[bb];
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < R16_ROWS; i++) {
            const int p = r16_lane(i);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *s = r + b * R16_ROWS * bb;
                memcpy(block, s + 2 * p, 2);
                for (size_t q = 0; q < bb - 2; q++) block[2 + q] = s[r16_quant_at(p, q)] ^ r16_flip(type);
                acc += q8_block_dot(type, block, x[t] + (b / GROUP_BLOCKS) * GROUP_BYTES, (int)(b % GROUP_BLOCKS));
            }
            res[R16_ROWS * t + i] = acc;
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
    repack_r16(GGML_Q4_0, sizeof(block_q4_0), w, rb, n_rows, nb, dst);
}
static void repack_r16_q8_0(const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst, const uint8_t *next) {
    repack_r16(GGML_Q8_0, sizeof(block_q8_0), w, rb, n_rows, nb, dst);
}

const quant_kernels_t SCALAR_Q4_0 = {row_dot_q4_0, r16_dot_q4_0, repack_r16_q4_0, 0};
const quant_kernels_t SCALAR_Q8_0 = {row_dot_q8_0, r16_dot_q8_0, repack_r16_q8_0, 0};
