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
        const int32_t init[2] = {-8 * sum, -128 * sum};
        const float dsum = d * (float)sum;
        memcpy(g + 192 + 16 * j, init, 8);
        memcpy(g + 200 + 16 * j, &dsum, 4);
    }
}

void quantize_q8_K(const float *x, int64_t n_in, uint8_t *out) { quantize_q8_K_row(x, n_in, out); }

static inline void row_dot(int type, size_t bb, const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt,
                           float *res) {
    for (int t = 0; t < nt; t++) res[t] = 0.0f;
    q8_blocks_dot(type, bb, w, 0, nb, x, nt, res);
}

/* ---- R16 ---- */

/* Stored block b of a row (of a type a constant where inlined) against activation row xt: the row
 * kernels' block dot. */
static inline float block_dot(int type, const uint8_t *block, const uint8_t *xt, int64_t b) {
    if (k_type(type)) {
        kblock_t k;
        unpack_kblock(type, block, &k);
        return kblock_dot(&k, xt + b * Q8K_BLOCK_BYTES);
    }
    return q8_block_dot(type, block, xt + (b / GROUP_BLOCKS) * GROUP_BYTES, (int)(b % GROUP_BLOCKS));
}

/* Each row's block taken back out of its lane, then the row kernel's block dot, in its order. */
static inline void r16_dot(int type, size_t bb, const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt,
                           float *res) {
    uint8_t block[bb];
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < R16_ROWS; i++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                r16_unpack_block(type, r + b * R16_ROWS * bb, r16_lane(i), block);
                acc += block_dot(type, block, x[t], b);
            }
            res[R16_ROWS * t + i] = acc;
        }
}

/* ---- per type ---- */

static inline void repack_r16(int type, size_t bb, const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
                              const uint8_t *next) {
    r16_repack_rows(type, bb, w, rb, n_rows, nb, dst);
}

R16_KERNELS(SCALAR, Q4_0, block_q4_0, row_dot, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, Q5_0, block_q5_0, row_dot, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, Q5_1, block_q5_1, row_dot, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, Q8_0, block_q8_0, row_dot, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, IQ4_NL, block_iq4_nl, row_dot, r16_dot, repack_r16, 0)

R16_KERNELS(SCALAR, Q4_K, block_q4_K, k_row_dot_portable, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, Q5_K, block_q5_K, k_row_dot_portable, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, Q6_K, block_q6_K, k_row_dot_portable, r16_dot, repack_r16, 0)
R16_KERNELS(SCALAR, IQ4_XS, block_iq4_xs, k_row_dot_portable, r16_dot, repack_r16, 0)
