/* SIMD helpers shared by the native kernels (AVX2 + FMA where the CPU has them, portable loops
 * otherwise). */
#ifndef MATRIXINFER_SIMD_H
#define MATRIXINFER_SIMD_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define TILE 4 /* rows per register tile of dot_4x2 */

/* out = weight * x / sqrt(mean(x^2) + eps) for one float32 row of length n (RMSNorm). */
static inline void rms_row(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's libmvec has vector expf (declared by math.h only under -ffast-math): let the
 * vectoriser call it for the softmax exponentials. */
__attribute__((simd("notinbranch"))) float expf(float);
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* Sums of eight vectors, one per lane: [sum(a0), ..., sum(a7)]. */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* Eight dot products of q with rows[0..7] (dim a multiple of 8), times scale, into out[0..7]. */
static inline void dot8(const float *q, const float *const *rows, int64_t dim, float scale, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < dim; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[0] + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[1] + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[2] + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[3] + d), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[4] + d), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[5] + d), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[6] + d), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[7] + d), a7);
    }
    _mm256_storeu_ps(out, _mm256_mul_ps(hsum8(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(scale)));
}
#define HAVE_DOT8 1
#else
#define HAVE_DOT8 0
#endif

/* out[i] = x_i . w0 and out[4 + i] = x_i . w1 for the four rows x[0..3] (length n). */
static inline void dot_4x2(const float *const *x, const float *w0, const float *w1, int64_t n, float *out) {
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (; d < n; d += 8) {
            __m256 v0 = _mm256_loadu_ps(w0 + d), v1 = _mm256_loadu_ps(w1 + d);
            __m256 x0 = _mm256_loadu_ps(x[0] + d), x1 = _mm256_loadu_ps(x[1] + d);
            __m256 x2 = _mm256_loadu_ps(x[2] + d), x3 = _mm256_loadu_ps(x[3] + d);
            a0 = _mm256_fmadd_ps(x0, v0, a0);
            a1 = _mm256_fmadd_ps(x1, v0, a1);
            a2 = _mm256_fmadd_ps(x2, v0, a2);
            a3 = _mm256_fmadd_ps(x3, v0, a3);
            b0 = _mm256_fmadd_ps(x0, v1, b0);
            b1 = _mm256_fmadd_ps(x1, v1, b1);
            b2 = _mm256_fmadd_ps(x2, v1, b2);
            b3 = _mm256_fmadd_ps(x3, v1, b3);
        }
        _mm256_storeu_ps(out, hsum8(a0, a1, a2, a3, b0, b1, b2, b3));
        return;
    }
#endif
    for (int i = 0; i < TILE; i++) {
        float s0 = 0.0f, s1 = 0.0f;
        const float *xi = x[i];
#pragma omp simd reduction(+ : s0, s1)
        for (d = 0; d < n; d++) {
            s0 += xi[d] * w0[d];
            s1 += xi[d] * w1[d];
        }
        out[i] = s0;
        out[TILE + i] = s1;
    }
}

#endif
