/* Float math that vectorises, shared by the native modules (hybrid/_ops.c, hybrid/_kernels.c).
 *
 * Both are built without -march flags: SIMD_CLONES asks GCC (on x86-64 Linux) for AVX2 and
 * AVX-512 clones of a loop, picked at load time, and exp_f32 is branch-free so that a loop
 * calling it vectorises, where libm's expf keeps it scalar. swiglu_f32 is the one GLU loop
 * of both: the GLU op (hybrid/_ops.c) and the fused gate+up's last step (hybrid/_kernels.c). */
#ifndef HYPROF_VECMATH_H
#define HYPROF_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIMD_CLONES
#endif

/* e^x to ~1 ulp, branch-free so that loops calling it vectorise (Cephes' expf polynomial):
 * x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n put in the exponent bits.
 * Below -87.3 it is 0 and above 88.7 inf, as expf (no subnormal results). */
static inline float exp_f32(float x) {
    const float hi = 88.7f, lo = -87.3f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    const float magic = 12582912.0f;                   /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - n * 0.693359375f;                   /* ln2 in two parts, so r is exact */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    float y = p * scale;
    y = x < lo ? 0.0f : y;
    return x > hi ? INFINITY : y;
}

/* out = silu(g) * u = g / (1 + e^-g) * u over n values (GLU); out may be g itself. */
SIMD_CLONES static void swiglu_f32(const float *g, const float *u, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
}

#endif
