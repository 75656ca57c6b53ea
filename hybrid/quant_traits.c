/* The quant traits table and the SIMD paths (declared in hybrid/quant_traits.h).
 *
 * Built with no target flags, as it runs before the CPU is known: the cpuid checks
 * and the row dequantisations (portable C, exact) live here. The ISA files' kernels
 * are listed only where setup.py built them (HYPROF_AVX2, HYPROF_AVX512: x86 only).
 */
#include "quant_traits.h"

#include <string.h>

#include "_fp16.h"
#include "kernels/kernels.h"

/* ---- dequantize a row of n values ---- */

static void dequantize_f32(const uint8_t *src, int64_t n, float *out) { memcpy(out, src, (size_t)n * 4); }

static void dequantize_f16(const uint8_t *src, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = fp16_to_f32(load_u16(src + 2 * i));
}

static void dequantize_bf16(const uint8_t *src, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)load_u16(src + 2 * i) << 16;
        memcpy(out + i, &bits, 4);
    }
}

/* A q8_32 type's blocks: d * q (Q5_1: + m), in float32 as ggml and gguf-py compute it. */
static inline void dequantize_q8_32_type(int type, size_t bb, const uint8_t *src, int64_t n, float *out) {
    for (int64_t b = 0; b < n / QK; b++, src += bb, out += QK) {
        const float d = fp16_to_f32(load_u16(src)), m = type == GGML_Q5_1 ? fp16_to_f32(load_u16(src + 2)) : 0.0f;
        int32_t q[QK];
        block_quants(type, src, q);
        for (int i = 0; i < QK; i++) out[i] = type == GGML_Q5_1 ? d * (float)q[i] + m : d * (float)q[i];
    }
}

/* A 256-value type's blocks: (d sc) q - (dmin m) per 16 values, in float32 in gguf-py's order. */
static inline void dequantize_k_type(int type, size_t bb, const uint8_t *src, int64_t n, float *out) {
    for (int64_t b = 0; b < n / QK_K; b++, src += bb, out += QK_K) {
        kblock_t k;
        unpack_kblock(type, src, &k);
        for (int i = 0; i < QK_K; i++)
            out[i] = k.d * (float)k.sc[i / 16] * (float)k.q[i] - k.dmin * (float)k.mn[i / 16];
    }
}

#define DEQUANTIZE(T, block, dequantize)                                    \
    static void dequantize_##T(const uint8_t *src, int64_t n, float *out) { \
        dequantize(GGML_##T, sizeof(block), src, n, out);                   \
    }
DEQUANTIZE(Q4_0, block_q4_0, dequantize_q8_32_type)
DEQUANTIZE(Q5_0, block_q5_0, dequantize_q8_32_type)
DEQUANTIZE(Q5_1, block_q5_1, dequantize_q8_32_type)
DEQUANTIZE(Q8_0, block_q8_0, dequantize_q8_32_type)
DEQUANTIZE(IQ4_NL, block_iq4_nl, dequantize_q8_32_type)
DEQUANTIZE(Q4_K, block_q4_K, dequantize_k_type)
DEQUANTIZE(Q5_K, block_q5_K, dequantize_k_type)
DEQUANTIZE(Q6_K, block_q6_K, dequantize_k_type)
DEQUANTIZE(IQ4_XS, block_iq4_xs, dequantize_k_type)

/* ---- the table ---- */

#if HYPROF_AVX2
#define AVX2_KERNELS(T) [PATH_AVX2] = &AVX2_##T,
#else
#define AVX2_KERNELS(T)
#endif
#if HYPROF_AVX512
#define AVX512_KERNELS(T) [PATH_AVX512VNNI] = &AVX512_##T,
#else
#define AVX512_KERNELS(T)
#endif

const quant_traits_t QUANT_TRAITS[] = {
    {GGML_F32, "F32", 1, 4, dequantize_f32, ACT_NONE, {NULL}},
    {GGML_F16, "F16", 1, 2, dequantize_f16, ACT_NONE, {NULL}},
    {GGML_BF16, "BF16", 1, 2, dequantize_bf16, ACT_NONE, {NULL}},
/* a type with kernels: its block of `values`, the activation its dot product takes */
#define QUANT_TYPE(T, block, values, activation)                            \
    {GGML_##T, #T, values, sizeof(block), dequantize_##T, activation,       \
     {[PATH_SCALAR] = &SCALAR_##T, AVX2_KERNELS(T) AVX512_KERNELS(T)}}
    QUANT_TYPE(Q4_0, block_q4_0, QK, ACT_Q8_32),
    QUANT_TYPE(Q5_0, block_q5_0, QK, ACT_Q8_32),
    QUANT_TYPE(Q5_1, block_q5_1, QK, ACT_Q8_32),
    QUANT_TYPE(Q8_0, block_q8_0, QK, ACT_Q8_32),
    QUANT_TYPE(IQ4_NL, block_iq4_nl, QK, ACT_Q8_32),
    QUANT_TYPE(Q4_K, block_q4_K, QK_K, ACT_Q8_K),
    QUANT_TYPE(Q5_K, block_q5_K, QK_K, ACT_Q8_K),
    QUANT_TYPE(Q6_K, block_q6_K, QK_K, ACT_Q8_K),
    QUANT_TYPE(IQ4_XS, block_iq4_xs, QK_K, ACT_Q8_K),
};
const int N_QUANT_TRAITS = sizeof(QUANT_TRAITS) / sizeof(QUANT_TRAITS[0]);

const quant_traits_t *quant_traits(int type) {
    for (int i = 0; i < N_QUANT_TRAITS; i++)
        if (QUANT_TRAITS[i].type == type) return &QUANT_TRAITS[i];
    return NULL;
}

/* ---- the paths ---- */

static int cpu_runs_scalar(void) { return 1; }

#if HYPROF_AVX2
static int cpu_runs_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

#if HYPROF_AVX512
static int cpu_runs_avx512vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

const simd_path_t SIMD_PATHS[N_PATHS] = {
    [PATH_SCALAR] = {"scalar", cpu_runs_scalar, quantize_q8_32_scalar, quantize_q8_K, NULL},
#if HYPROF_AVX2
    [PATH_AVX2] = {"avx2", cpu_runs_avx2, quantize_q8_32_avx2, quantize_q8_K, int8_macs_avx2},
#else
    [PATH_AVX2] = {"avx2", NULL, NULL, NULL, NULL},
#endif
#if HYPROF_AVX512
    [PATH_AVX512VNNI] = {"avx512vnni", cpu_runs_avx512vnni, quantize_q8_32_avx512, quantize_q8_K, int8_macs_avx512},
#else
    [PATH_AVX512VNNI] = {"avx512vnni", NULL, NULL, NULL, NULL},
#endif
};

const int PATH_PREFERENCE[N_PATHS] = {PATH_AVX512VNNI, PATH_AVX2, PATH_SCALAR};
