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
 *   [ 64..127] int8: values 16..31 of blocks 0..3 (the Q4_0 high nibbles' partners)
 *   [128..191] float32[16]: block scale d_j repeated 4 times (one 128-bit lane per block)
 *   [192..255] int32[16]: lane 4j holds -8 * sum(values of block j), lane 4j+1
 *             -128 * sum(values of block j), the other two 0
 * so one 512-bit register holds the low halves of four blocks, and the Q4_0
 * weights (nibble - 8) need no per-weight subtraction: the -8 enters as that
 * precomputed sum (-128 serves the R16 Q8_0 kernels, whose weights are offset by
 * +128 to be unsigned). A row with a block count not divisible by 4 is padded with
 * zero blocks. Every path reads this same layout and computes the same integer
 * block sums; only the float summation order differs.
 *
 * Repacked layout ("R16"): 16 weight rows interleaved, one row per 32-bit lane, so
 * that one `vpdpbusd` of a quad register with a broadcast activation quad gives 16
 * rows' partial sums at once, with no horizontal sum. For each 32-weight block b
 * of the 16 rows (16 blocks' bytes: a block of 16 rows starts where its first row would):
 *   [ 0.. 31] fp16[16]: the 16 rows' scales
 *   [32.. ]   quads: 64 bytes per quad k, 4 consecutive weights of each of the
 *             16 rows (Q4_0: 4 quads, quad k in the low nibbles and quad k+4 in
 *             the high ones; Q8_0: 8 quads, values + 128)
 * The rows sit in the lanes in a transposed order (lane 4i+m holds row 4m+i: what
 * a 4x4 dword transpose gives), undone once per output. A short row block (fewer
 * than 16 rows) repeats its last row in the spare lanes.
 */
#ifndef HYPROF_KERNELS_H
#define HYPROF_KERNELS_H

#include <stdint.h>
#include <string.h>

#include "../_fp16.h"
#include "../quant_traits.h"

#define QK 32                 /* values per block of the q8_32 activation, and of Q4_0 / Q8_0 */
#define GROUP_BLOCKS 4        /* blocks per q8_32 activation group */
#define GROUP_BYTES 256
#define TILE 4                /* tokens per row_dot call, at most */
#define R16_TILE 8            /* tokens per r16_dot call, at most */
#define R16_ROWS 16

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

/* Integer dot of Q4_0 or Q8_0 block `wb` (its ggml type a constant where inlined) with block
 * j of q8_32 group `g`, times both scales: the reference every path agrees with. */
static inline float q8_block_dot(int type, const uint8_t *wb, const uint8_t *g, int j) {
    const int8_t *lo = (const int8_t *)(g + 16 * j), *hi = (const int8_t *)(g + 64 + 16 * j);
    float dx, dw = fp16_to_f32(load_u16(wb));
    memcpy(&dx, g + 128 + 16 * j, 4);
    int32_t s = 0;
    if (type == GGML_Q4_0) {
        const uint8_t *qs = wb + 2;
        memcpy(&s, g + 192 + 16 * j, 4);                /* -8 * sum(x) */
        for (int i = 0; i < 16; i++) s += (qs[i] & 15) * lo[i] + (qs[i] >> 4) * hi[i];
    } else {
        const int8_t *qs = (const int8_t *)(wb + 2);
        for (int i = 0; i < 16; i++) s += qs[i] * lo[i] + qs[16 + i] * hi[i];
    }
    return dw * dx * (float)s;
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

/* What each ISA file exports: its activation quantiser (the same bytes on every path) and
 * per type its kernels. The table (hybrid/quant_traits.c) is their one reader. */
void quantize_q8_32_scalar(const float *x, int64_t n_in, uint8_t *out);
extern const quant_kernels_t SCALAR_Q4_0, SCALAR_Q8_0;
#if HYPROF_AVX2
void quantize_q8_32_avx2(const float *x, int64_t n_in, uint8_t *out);
extern const quant_kernels_t AVX2_Q4_0, AVX2_Q8_0;
#endif
#if HYPROF_AVX512
void quantize_q8_32_avx512(const float *x, int64_t n_in, uint8_t *out);
extern const quant_kernels_t AVX512_Q4_0, AVX512_Q8_0;
#endif

#endif
