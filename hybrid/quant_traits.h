/* The facts of each ggml type the native code reads, in one table (hybrid/quant_traits.c).
 *
 * Per type: its block (values and bytes), the row dequantisation GET_ROWS uses
 * (hybrid/_ops.c), the activation format its dot product takes, and per SIMD path
 * its kernels (hybrid/kernels/<path>.c), NULL where that path has none or was not
 * built. Per path: its name, whether this CPU runs it, and its activation quantiser.
 * The matmul driver (hybrid/_kernels.c) reads both tables; hybrid._kernels exports
 * them to Python as TRAITS and PATHS, and to hybrid/_ops.c through a capsule.
 *
 * A new quant type adds its entry to the table and its kernels to the ISA files; a
 * new instruction set adds its file, its path here and its column in the table.
 */
#ifndef HYPROF_QUANT_TRAITS_H
#define HYPROF_QUANT_TRAITS_H

#include <stddef.h>
#include <stdint.h>

enum {                                                        /* ggml type ids */
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q4_K = 12,
    GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_IQ4_NL = 20, GGML_IQ4_XS = 23, GGML_BF16 = 30
};

/* The blocks of the quantised types with kernels, as ggml stores them (ggml-common.h): 32 weights
 * each, fp16 scales first. 4-bit quants pack values j and j+16 in byte j's low and high nibbles;
 * the 5-bit ones add bit j of qh (little-endian) as value j's fifth bit. */
typedef struct { uint16_t d; uint8_t qs[16]; } block_q4_0;                   /* (q - 8) * d */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;   /* (q - 16) * d */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1; /* q * d + m */
typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;                    /* qs * d */
typedef struct { uint16_t d; uint8_t qs[16]; } block_iq4_nl;                 /* KVALUES_IQ4NL[q] * d */

/* The K-quants and IQ4_XS: 256 weights per block in sub-blocks of 32 (Q6_K: 16) with scales of
 * their own, 6-bit scales and mins packed in 12 bytes for Q4_K and Q5_K (see k_scales_mins). */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;   /* d sc q - dmin m */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;   /* d sc (q - 32) */
typedef struct { uint16_t d, scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;  /* d (ls - 32) kv[q] */

/* IQ4_NL's 16 levels (ggml's kvalues_iq4nl): a non-linear 4-bit grid, denser near zero. */
static const int8_t KVALUES_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* The activation a type's dot product takes (layouts in hybrid/kernels/kernels.h): "q8_32", 8-bit
 * blocks of 32 in groups of four, with each block's sum; "q8_K", 8-bit blocks of 256 with the sums
 * of each 16 values (as ggml's Q8_K), for the types with 256-value blocks. */
enum { ACT_NONE = 0, ACT_Q8_32 = 1, ACT_Q8_K = 2 };

/* SIMD paths; a path is in the CPU's set when it was built and cpuid reports its features. */
enum { PATH_SCALAR, PATH_AVX2, PATH_AVX512VNNI, N_PATHS };

/* res[t] = dot(weight row w of nb blocks, activation row x[t]) for t < nt <= TILE. */
typedef void (*row_dot_fn)(const uint8_t *w, int64_t nb, const uint8_t *const *x, int nt, float *res);
/* res[16 t + i] = dot(row i of the R16 row block r of nb blocks, x[t]) for t < nt <= R16_TILE. */
typedef void (*r16_dot_fn)(const uint8_t *r, int64_t nb, const uint8_t *const *x, int nt, float *res);
/* Rows [0, n_rows) (n_rows <= 16, row stride rb) of nb blocks -> one R16 row block at dst;
 * `next`, if not NULL, is the next row block's first row, to prefetch. */
typedef void (*repack_r16_fn)(const uint8_t *w, size_t rb, int n_rows, int64_t nb, uint8_t *dst,
                              const uint8_t *next);
/* res[i] = dot(row i of R16 row block r, x), res[16 + i] = the same of row block r2: two row blocks
 * in one pass, their blocks in turn, for one token (see matmul_rows). */
typedef void (*r16_dot2_fn)(const uint8_t *r, const uint8_t *r2, int64_t nb, const uint8_t *x, float *res);
typedef void (*dequantize_row_fn)(const uint8_t *src, int64_t n, float *out);
typedef void (*quantize_row_fn)(const float *x, int64_t n_in, uint8_t *out);

/* One type's kernels on one path. */
typedef struct {
    row_dot_fn row_dot;             /* on the blocks as stored */
    r16_dot_fn r16_dot;             /* on the R16 layout; NULL: none */
    repack_r16_fn repack_r16;       /* stored -> R16; set with r16_dot */
    int r16_first;                  /* R16 outruns the row kernel: weights are repacked at load and
                                       prompts repack as they go (else R16 serves explicit calls only) */
    r16_dot2_fn r16_dot2;           /* NULL: r16_dot on each row block */
} quant_kernels_t;

typedef struct {
    int type;                       /* ggml type id */
    const char *name;
    int64_t block_values, block_bytes;
    dequantize_row_fn dequantize_row;            /* n values (whole blocks) -> float32 */
    int activation;                              /* ACT_NONE: no matmul kernel */
    const quant_kernels_t *kernels[N_PATHS];     /* per path; NULL: none */
} quant_traits_t;

typedef struct {
    const char *name;
    int (*cpu_runs)(void);          /* NULL: not built here */
    quantize_row_fn quantize_q8_32; /* float32 row -> q8_32 activation row */
    quantize_row_fn quantize_q8_K;  /* float32 row -> q8_K activation row */
    int64_t (*int8_macs)(int64_t n);  /* n rounds of the path's int8 multiply-add at its throughput -> the
                                         multiply-adds done: what a core's int8 peak is measured by (NULL: none) */
} simd_path_t;

extern const quant_traits_t QUANT_TRAITS[];
extern const int N_QUANT_TRAITS;
extern const simd_path_t SIMD_PATHS[N_PATHS];
/* The default path is the first of these that the CPU runs. */
extern const int PATH_PREFERENCE[N_PATHS];

/* The traits of ggml type `type`, or NULL if the native code does not read it. */
const quant_traits_t *quant_traits(int type);

/* The table for another extension module (hybrid/_ops.c): hybrid._kernels holds this in a
 * capsule named QUANT_API_CAPSULE. */
typedef struct {
    const quant_traits_t *(*traits)(int type);
} quant_api_t;
#define QUANT_API_CAPSULE "hybrid._kernels._quant_api"

#endif
