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

/* h[j] *= silu(g[j]) for one row of n (SwiGLU). Row by row, so that each value takes the same
 * (vector or scalar-tail) exponential whatever the other rows of the batch. */
static inline void swiglu_row(float *h, const float *g, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) h[j] *= g[j] / (1.0f + expf(-g[j]));
}

#if defined(__AVX2__) && defined(__FMA__)
/* Keeps a loaded vector in a register. GCC otherwise folds the load into every FMA that uses it
 * (a memory operand), so a weight vector shared by three rows was loaded three times: 15 loads per
 * 12 FMAs in dot_3x4, 12 per 8 in dot_4x2. Measured on a Zen 3 core, the head's 4096 x 256 matrix
 * against three rows: 1.8x one row's time from L3, 1.3x with the vector kept. */
#define KEEP(v) __asm__("" : "+x"(v))

/* Software prefetch for the tiles below. A decode step reads most weights once, from DRAM, and
 * the hardware prefetchers run too little ahead of a tile's short rows (a 1 KiB row of 256
 * columns). So each tile call also prefetches what its caller reads next: two regions, pf0 and
 * pf1, of two weight rows of the tile's length each, one cache line of each per 8 columns.
 * Measured on a Zen 3 core, the head's 4096 x 256 matrix from DRAM, prefetching the next group of
 * four rows: one row 612 -> 477 us, three rows 771 -> 468 us. A prefetch never faults, so a region
 * may run past its matrix's end (the address is computed as an integer, never dereferenced). */
#define PREFETCH2(pf0, pf1, bytes)                                                                     \
    (_mm_prefetch((const char *)((uintptr_t)(pf0) + (uintptr_t)(bytes)), _MM_HINT_T0),                    \
     _mm_prefetch((const char *)((uintptr_t)(pf1) + (uintptr_t)(bytes)), _MM_HINT_T0))
#endif

/* p + floats as an address for PREFETCH2 only: it may lie past p's array (computed as an integer,
 * so no out-of-bounds pointer arithmetic). */
static inline const float *ahead(const float *p, int64_t floats) {
    return (const float *)((uintptr_t)p + sizeof(float) * (uintptr_t)floats);
}

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

/* out[j] = x . w[j] for one row x and four weight rows w[0..3] (length n): a single decode row
 * without the 4-row tile's repeated rows. */
static inline void dot_1x4(const float *x, const float *const *w, int64_t n, float *out, const float *pf0,
                           const float *pf1) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 8 == 0) { /* the lanes and their sums as dot_4x2 has them: the same result, bit for bit */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < n; d += 8) {
            PREFETCH2(pf0, pf1, 8 * d);
            __m256 xv = _mm256_loadu_ps(x + d);
            a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[0] + d), a0);
            a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[1] + d), a1);
            a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[2] + d), a2);
            a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[3] + d), a3);
        }
        __m256 z = _mm256_setzero_ps();
        float lanes[8];
        _mm256_storeu_ps(lanes, hsum8(a0, a1, a2, a3, z, z, z, z));
        out[0] = lanes[0], out[1] = lanes[1], out[2] = lanes[2], out[3] = lanes[3];
        return;
    }
#endif
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < n; d++) {
        s0 += x[d] * w0[d];
        s1 += x[d] * w1[d];
        s2 += x[d] * w2[d];
        s3 += x[d] * w3[d];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* out[i] = x_i . w0 and out[4 + i] = x_i . w1 for the four rows x[0..3] (length n). */
static inline void dot_4x2(const float *const *x, const float *w0, const float *w1, int64_t n, float *out,
                           const float *pf0, const float *pf1) {
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t d = 0; d < n; d += 8) {
            PREFETCH2(pf0, pf1, 8 * d);
            __m256 v0 = _mm256_loadu_ps(w0 + d), v1 = _mm256_loadu_ps(w1 + d);
            KEEP(v0);
            KEEP(v1);
            __m256 x0 = _mm256_loadu_ps(x[0] + d), x1 = _mm256_loadu_ps(x[1] + d);
            __m256 x2 = _mm256_loadu_ps(x[2] + d), x3 = _mm256_loadu_ps(x[3] + d);
            KEEP(x0);
            KEEP(x1);
            KEEP(x2);
            KEEP(x3);
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
    /* portable: each row as dot_1x4 computes it, so a row's result never depends on its tile */
    const float *w[4] = {w0, w1, w0, w1};
    float r[4];
    for (int i = 0; i < TILE; i++) {
        dot_1x4(x[i], w, n, r, pf0, pf1);
        out[i] = r[0];
        out[TILE + i] = r[1];
    }
}

/* out[4 i + c] = x_i . w[c] for two or three rows x[0..rows) and four weight rows w[0..3] (length n):
 * the short tiles of a few decode rows (a speculative step's verification) read each weight row once
 * without the 4-row tile's repeated rows. Lanes and sums as in dot_4x2: the same result, bit for bit. */
static inline void dot_2x4(const float *const *x, const float *const *w, int64_t n, float *out, const float *pf0,
                           const float *pf1) {
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 8 == 0) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t d = 0; d < n; d += 8) {
            PREFETCH2(pf0, pf1, 8 * d);
            __m256 x0 = _mm256_loadu_ps(x[0] + d), x1 = _mm256_loadu_ps(x[1] + d);
            KEEP(x0);
            KEEP(x1);
            __m256 v = _mm256_loadu_ps(w[0] + d);
            KEEP(v);
            a0 = _mm256_fmadd_ps(x0, v, a0);
            b0 = _mm256_fmadd_ps(x1, v, b0);
            v = _mm256_loadu_ps(w[1] + d);
            KEEP(v);
            a1 = _mm256_fmadd_ps(x0, v, a1);
            b1 = _mm256_fmadd_ps(x1, v, b1);
            v = _mm256_loadu_ps(w[2] + d);
            KEEP(v);
            a2 = _mm256_fmadd_ps(x0, v, a2);
            b2 = _mm256_fmadd_ps(x1, v, b2);
            v = _mm256_loadu_ps(w[3] + d);
            KEEP(v);
            a3 = _mm256_fmadd_ps(x0, v, a3);
            b3 = _mm256_fmadd_ps(x1, v, b3);
        }
        _mm256_storeu_ps(out, hsum8(a0, a1, a2, a3, b0, b1, b2, b3));
        return;
    }
#endif
    dot_1x4(x[0], w, n, out, pf0, pf1);
    dot_1x4(x[1], w, n, out + 4, pf0, pf1);
}

static inline void dot_3x4(const float *const *x, const float *const *w, int64_t n, float *out, const float *pf0,
                           const float *pf1) {
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 8 == 0) { /* 12 accumulators, three rows and one weight vector: the 16 registers */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (int64_t d = 0; d < n; d += 8) {
            PREFETCH2(pf0, pf1, 8 * d);
            __m256 x0 = _mm256_loadu_ps(x[0] + d), x1 = _mm256_loadu_ps(x[1] + d), x2 = _mm256_loadu_ps(x[2] + d);
            KEEP(x0);
            KEEP(x1);
            KEEP(x2);
            __m256 v = _mm256_loadu_ps(w[0] + d);
            KEEP(v);
            a0 = _mm256_fmadd_ps(x0, v, a0);
            b0 = _mm256_fmadd_ps(x1, v, b0);
            c0 = _mm256_fmadd_ps(x2, v, c0);
            v = _mm256_loadu_ps(w[1] + d);
            KEEP(v);
            a1 = _mm256_fmadd_ps(x0, v, a1);
            b1 = _mm256_fmadd_ps(x1, v, b1);
            c1 = _mm256_fmadd_ps(x2, v, c1);
            v = _mm256_loadu_ps(w[2] + d);
            KEEP(v);
            a2 = _mm256_fmadd_ps(x0, v, a2);
            b2 = _mm256_fmadd_ps(x1, v, b2);
            c2 = _mm256_fmadd_ps(x2, v, c2);
            v = _mm256_loadu_ps(w[3] + d);
            KEEP(v);
            a3 = _mm256_fmadd_ps(x0, v, a3);
            b3 = _mm256_fmadd_ps(x1, v, b3);
            c3 = _mm256_fmadd_ps(x2, v, c3);
        }
        __m256 z = _mm256_setzero_ps();
        float lanes[8];
        _mm256_storeu_ps(out, hsum8(a0, a1, a2, a3, b0, b1, b2, b3));
        _mm256_storeu_ps(lanes, hsum8(c0, c1, c2, c3, z, z, z, z));
        out[8] = lanes[0], out[9] = lanes[1], out[10] = lanes[2], out[11] = lanes[3];
        return;
    }
#endif
    for (int i = 0; i < 3; i++) dot_1x4(x[i], w, n, out + 4 * i, pf0, pf1);
}

/* out[4 i + c] = x_i . w[c] for rows x[0..rows) (1 <= rows <= TILE) and four weight rows w[0..3]:
 * each weight row read once for all the rows, none computed twice. */
static inline void dot_rx4(const float *const *x, int rows, const float *const *w, int64_t n, float *out,
                           const float *pf0, const float *pf1) {
    float t[2 * TILE];
    switch (rows) {
    case 1: dot_1x4(x[0], w, n, out, pf0, pf1); return;
    case 2: dot_2x4(x, w, n, out, pf0, pf1); return;
    case 3: dot_3x4(x, w, n, out, pf0, pf1); return;
    default:
        dot_4x2(x, w[0], w[1], n, t, pf0, pf0);
        for (int i = 0; i < TILE; i++) out[4 * i] = t[i], out[4 * i + 1] = t[TILE + i];
        dot_4x2(x, w[2], w[3], n, t, pf1, pf1);
        for (int i = 0; i < TILE; i++) out[4 * i + 2] = t[i], out[4 * i + 3] = t[TILE + i];
    }
}

/* --- INT8 (W8A8) helpers ------------------------------------------------------------------------ */

/* Symmetric INT8 of one row x[0..n) (each value times mul[i] first when mul is not NULL):
 * q = round_half_even(v * (127 / amax)) clamped to [-127, 127]; returns the scale amax / 127 (0 for
 * an all-zero row). The same arithmetic as matrixinfer.quant.int8.quantize_rows. */
static inline float quantize_row_i8(const float *x, const float *mul, int64_t n, int8_t *q) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = mul ? x[i] * mul[i] : x[i];
        amax = fmaxf(amax, fabsf(v));
    }
    float inv = 127.0f / fmaxf(amax, 1e-30f);
    for (int64_t i = 0; i < n; i++) {
        float v = nearbyintf((mul ? x[i] * mul[i] : x[i]) * inv);
        q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
    return amax / 127.0f;
}

#if defined(__AVX2__) && defined(__FMA__)
/* Sums of eight int32 vectors, one per lane. */
static inline __m256i hsum8_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i a4, __m256i a5,
                                  __m256i a6, __m256i a7) {
    __m256i t0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    __m256i t1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31));
}

/* 32 products x*w summed in pairs into 8 int32 lanes, added to acc: maddubs takes |x| as unsigned
 * and w with x's sign; |x|, |w| <= 127 keeps each pair below 32767, so nothing saturates. */
static inline __m256i madd_i8(__m256i acc, __m256i x, __m256i w) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

/* out[i] = x_i . w0 and out[4 + i] = x_i . w1, exact int32 sums, for four int8 rows x[0..3] of length n. */
static inline void dot_i8_4x2(const int8_t *const *x, const int8_t *w0, const int8_t *w1, int64_t n, int32_t *out) {
    int64_t d = 0;
    for (int i = 0; i < 2 * TILE; i++) out[i] = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 32) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (; d + 32 <= n; d += 32) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + d));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(w1 + d));
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(x[0] + d));
            a0 = madd_i8(a0, x0, v0);
            b0 = madd_i8(b0, x0, v1);
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(x[1] + d));
            a1 = madd_i8(a1, x1, v0);
            b1 = madd_i8(b1, x1, v1);
            __m256i x2 = _mm256_loadu_si256((const __m256i *)(x[2] + d));
            a2 = madd_i8(a2, x2, v0);
            b2 = madd_i8(b2, x2, v1);
            __m256i x3 = _mm256_loadu_si256((const __m256i *)(x[3] + d));
            a3 = madd_i8(a3, x3, v0);
            b3 = madd_i8(b3, x3, v1);
        }
        _mm256_storeu_si256((__m256i *)out, hsum8_epi32(a0, a1, a2, a3, b0, b1, b2, b3));
    }
#endif
    for (; d < n; d++)
        for (int i = 0; i < TILE; i++) {
            out[i] += (int32_t)x[i][d] * w0[d];
            out[TILE + i] += (int32_t)x[i][d] * w1[d];
        }
}

/* out[j] = x . w[j], exact int32 sums, for one int8 row x and four int8 weight rows w[0..3]. */
static inline void dot_i8_1x4(const int8_t *x, const int8_t *const *w, int64_t n, int32_t *out) {
    int64_t d = 0;
    for (int j = 0; j < 4; j++) out[j] = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 32) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        const __m256i ones = _mm256_set1_epi16(1);
        for (; d + 32 <= n; d += 32) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + d));
            __m256i ax = _mm256_abs_epi8(xv);
#define MI_I8_ACC(a, wr)                                                                                        \
    a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(                       \
                                                  _mm256_loadu_si256((const __m256i *)((wr) + d)), xv)),        \
                                              ones))
            MI_I8_ACC(a0, w[0]);
            MI_I8_ACC(a1, w[1]);
            MI_I8_ACC(a2, w[2]);
            MI_I8_ACC(a3, w[3]);
#undef MI_I8_ACC
        }
        int32_t lanes[8];
        __m256i z = _mm256_setzero_si256();
        _mm256_storeu_si256((__m256i *)lanes, hsum8_epi32(a0, a1, a2, a3, z, z, z, z));
        for (int j = 0; j < 4; j++) out[j] = lanes[j];
    }
#endif
    for (; d < n; d++)
        for (int j = 0; j < 4; j++) out[j] += (int32_t)x[d] * w[j][d];
}

#endif
