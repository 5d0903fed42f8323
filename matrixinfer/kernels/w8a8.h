/* What the INT8 (W8A8) kernels (linear_w8a8.c, moe_w8a8.c) share: activation rows quantized once
 * into per-thread scratch, and the register tiles of exact int32 dot products.
 *
 * Activations are quantized to the int8 values of quantize_row_i8 (simd.h) but stored widened to
 * int16, and each 16 weights are sign-extended once per tile (vpmovsxbw) and multiplied with
 * vpmaddwd: 16 multiply-adds per instruction, exact (|x|, |w| <= 127, so a pair sums to at most
 * 32258 in an int32 lane), with no saturation and no per-pair sign fix-up. Without VNNI this is as
 * many multiply-adds per instruction as vpmaddubsw + vpmaddwd and fewer instructions per tile.
 * Accumulators stay in int32 vector lanes across the whole row and eight outputs are reduced at
 * once by one transpose-add (hsum8_epi32). Portable loops where the CPU lacks AVX2.
 */
#ifndef MATRIXINFER_W8A8_H
#define MATRIXINFER_W8A8_H

#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* Per-thread scratch that grows to the largest request and is kept (no malloc on the hot path).
 * Slot 0: a call's own buffers (the calling thread); slot 1: per-thread work inside a parallel
 * region (every thread of the team, the calling one included). Requests above W8_ARENA_MAX are not
 * kept: the caller frees them (w8_release). */
#define W8_ARENA_MAX ((size_t)16 << 20)

static inline void *w8_arena(int slot, size_t bytes) {
    static _Thread_local void *buf[2];
    static _Thread_local size_t cap[2];
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes > W8_ARENA_MAX) return aligned_alloc(64, bytes);
    if (cap[slot] < bytes) {
        void *p = aligned_alloc(64, bytes);
        if (!p) return NULL;
        free(buf[slot]);
        buf[slot] = p;
        cap[slot] = bytes;
    }
    return buf[slot];
}

/* Frees what w8_arena(slot, bytes) returned if it was not kept. */
static inline void w8_release(void *p, size_t bytes) {
    if (((bytes + 63) & ~(size_t)63) > W8_ARENA_MAX) free(p);
}

/* quantize_row_i8's values (times mul[i] first when mul is not NULL) into int16 q[0..n), bit for
 * bit: the same float operations, vectorised; returns the row's scale amax / 127. */
static inline float quantize_row_i16(const float *x, const float *mul, int64_t n, int16_t *q) {
    float amax = 0.0f;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        if (mul) v = _mm256_mul_ps(v, _mm256_loadu_ps(mul + i));
        vmax = _mm256_max_ps(_mm256_and_ps(v, abs_mask), vmax); /* a NaN is skipped, as fmaxf does */
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) amax = fmaxf(amax, lanes[l]);
#endif
    for (; i < n; i++) amax = fmaxf(amax, fabsf(mul ? x[i] * mul[i] : x[i]));
    float inv = 127.0f / fmaxf(amax, 1e-30f);
    i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        if (mul) {
            a = _mm256_mul_ps(a, _mm256_loadu_ps(mul + i));
            b = _mm256_mul_ps(b, _mm256_loadu_ps(mul + i + 8));
        }
        a = _mm256_round_ps(_mm256_mul_ps(a, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        b = _mm256_round_ps(_mm256_mul_ps(b, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        a = _mm256_max_ps(_mm256_min_ps(a, hi), lo);
        b = _mm256_max_ps(_mm256_min_ps(b, hi), lo);
        __m256i p = _mm256_packs_epi32(_mm256_cvttps_epi32(a), _mm256_cvttps_epi32(b));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permute4x64_epi64(p, 0xD8)); /* undo packs' lane order */
    }
#endif
    for (; i < n; i++) {
        float v = nearbyintf((mul ? x[i] * mul[i] : x[i]) * inv);
        q[i] = (int16_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
    return amax / 127.0f;
}

#if defined(__AVX2__) && defined(__FMA__)
/* 16 int8 weights sign-extended to int16. */
static inline __m256i w8_load16(const int8_t *w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)); }
/* acc += the int32 sums of adjacent int16 products of a and b. With VNNI one instruction
 * (vpdpwssd, wrapping as the add does: the same arithmetic bit for bit), else vpmaddwd + vpaddd. */
#if defined(__AVXVNNI__)
#define W8_MAC(acc, a, b) acc = _mm256_dpwssd_avx_epi32(acc, a, b)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define W8_MAC(acc, a, b) acc = _mm256_dpwssd_epi32(acc, a, b)
#else
#define W8_MAC(acc, a, b) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif
#endif

/* out[c] = x . w[c] for c < 8: one int16 activation row, eight int8 weight rows (length k). Also
 * prefetches the 8k bytes from pf (what the caller reads next; see PREFETCH2 in simd.h). */
static inline void w8_dot_1x8(const int16_t *x, const int8_t *const *w, int64_t k, int32_t *out, const int8_t *pf) {
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (; d + 16 <= k; d += 16) {
        PREFETCH2(pf, (uintptr_t)pf + 64, 8 * d);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + d));
        W8_MAC(a0, xv, w8_load16(w[0] + d));
        W8_MAC(a1, xv, w8_load16(w[1] + d));
        W8_MAC(a2, xv, w8_load16(w[2] + d));
        W8_MAC(a3, xv, w8_load16(w[3] + d));
        W8_MAC(a4, xv, w8_load16(w[4] + d));
        W8_MAC(a5, xv, w8_load16(w[5] + d));
        W8_MAC(a6, xv, w8_load16(w[6] + d));
        W8_MAC(a7, xv, w8_load16(w[7] + d));
    }
    _mm256_storeu_si256((__m256i *)out, hsum8_epi32(a0, a1, a2, a3, a4, a5, a6, a7));
#else
    for (int c = 0; c < 8; c++) out[c] = 0;
#endif
    for (; d < k; d++)
        for (int c = 0; c < 8; c++) out[c] += (int32_t)x[d] * w[c][d];
}

/* out[4 r + c] = x_r . w[c] for r < 2, c < 4: two activation rows, four weight rows. Also prefetches
 * the 4k bytes from pf. */
static inline void w8_dot_2x4(const int16_t *x0, const int16_t *x1, const int8_t *const *w, int64_t k,
                              int32_t *out, const int8_t *pf) {
    int64_t d = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; d + 16 <= k; d += 16) {
        _mm_prefetch((const char *)((uintptr_t)pf + 4 * (uintptr_t)d), _MM_HINT_T0);
        __m256i w0 = w8_load16(w[0] + d), w1 = w8_load16(w[1] + d);
        __m256i w2 = w8_load16(w[2] + d), w3 = w8_load16(w[3] + d);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x0 + d));
        W8_MAC(a0, xv, w0);
        W8_MAC(a1, xv, w1);
        W8_MAC(a2, xv, w2);
        W8_MAC(a3, xv, w3);
        xv = _mm256_loadu_si256((const __m256i *)(x1 + d));
        W8_MAC(b0, xv, w0);
        W8_MAC(b1, xv, w1);
        W8_MAC(b2, xv, w2);
        W8_MAC(b3, xv, w3);
    }
    _mm256_storeu_si256((__m256i *)out, hsum8_epi32(a0, a1, a2, a3, b0, b1, b2, b3));
#else
    for (int c = 0; c < 8; c++) out[c] = 0;
#endif
    for (; d < k; d++)
        for (int c = 0; c < 4; c++) {
            out[c] += (int32_t)x0[d] * w[c][d];
            out[4 + c] += (int32_t)x1[d] * w[c][d];
        }
}

/* out[r + 4 c] = x_r . w[c] for r < 4, c < 2: four activation rows (ldx apart), two weight rows; also
 * prefetches the 2k bytes from pf. The
 * tile for four rows and more: each sign-extended weight vector feeds four multiply-adds (the 2 x 4
 * tile's feed two), so a multiply-add costs 2.25 instructions per 16 products instead of 2.75. */
static inline void w8_dot_4x2(const int16_t *x, int64_t ldx, const int8_t *w0, const int8_t *w1, int64_t k,
                              int32_t *out, const int8_t *pf) {
    int64_t d = 0;
    const int16_t *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
#if defined(__AVX2__) && defined(__FMA__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; d + 16 <= k; d += 16) {
        _mm_prefetch((const char *)((uintptr_t)pf + 2 * (uintptr_t)d), _MM_HINT_T0);
        __m256i v0 = w8_load16(w0 + d), v1 = w8_load16(w1 + d);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x0 + d));
        W8_MAC(a0, xv, v0);
        W8_MAC(b0, xv, v1);
        xv = _mm256_loadu_si256((const __m256i *)(x1 + d));
        W8_MAC(a1, xv, v0);
        W8_MAC(b1, xv, v1);
        xv = _mm256_loadu_si256((const __m256i *)(x2 + d));
        W8_MAC(a2, xv, v0);
        W8_MAC(b2, xv, v1);
        xv = _mm256_loadu_si256((const __m256i *)(x3 + d));
        W8_MAC(a3, xv, v0);
        W8_MAC(b3, xv, v1);
    }
    _mm256_storeu_si256((__m256i *)out, hsum8_epi32(a0, a1, a2, a3, b0, b1, b2, b3));
#else
    for (int c = 0; c < 8; c++) out[c] = 0;
#endif
    for (; d < k; d++) {
        out[0] += (int32_t)x0[d] * w0[d], out[4] += (int32_t)x0[d] * w1[d];
        out[1] += (int32_t)x1[d] * w0[d], out[5] += (int32_t)x1[d] * w1[d];
        out[2] += (int32_t)x2[d] * w0[d], out[6] += (int32_t)x2[d] * w1[d];
        out[3] += (int32_t)x3[d] * w0[d], out[7] += (int32_t)x3[d] * w1[d];
    }
}

/* y[c] = dots[c] * s * w_scale[c] (+ bias[c]) for c < cols. */
static inline void w8_store(const int32_t *dots, int cols, float s, const float *w_scale, const float *bias, float *y) {
#if defined(__AVX2__) && defined(__FMA__)
    if (cols == 8) {
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)dots)),
                                               _mm256_set1_ps(s)),
                                 _mm256_loadu_ps(w_scale));
        _mm256_storeu_ps(y, bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias)) : v);
        return;
    }
    if (cols == 4) {
        __m128 v = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)dots)), _mm_set1_ps(s)),
                              _mm_loadu_ps(w_scale));
        _mm_storeu_ps(y, bias ? _mm_add_ps(v, _mm_loadu_ps(bias)) : v);
        return;
    }
#endif
    for (int c = 0; c < cols; c++) {
        float v = (float)dots[c] * s;
        v *= w_scale[c];
        y[c] = bias ? v + bias[c] : v;
    }
}

/* w8_block for the rows r0 <= r < m, where m - r0 < 4 (pairs of rows take 2 x 4 tiles, an odd last
 * row 1 x 8), against the eight weight rows wr of the group at column j (cols of them real). */
static inline void w8_group_tail(const int16_t *xq, const float *xs, int64_t r0, int64_t m, const int8_t *const *wr,
                                 int64_t k, int64_t j, int cols, const float *w_scale, const float *bias, float *y,
                                 int64_t ldy) {
    int32_t dots[8];
    const float *bj = bias ? bias + j : NULL;
    uintptr_t next = (uintptr_t)wr[0] + 8 * (uintptr_t)k; /* the next group's rows (an address to prefetch) */
    int64_t r = r0;
    for (; r + 2 <= m; r += 2)
        for (int h = 0; h < 2 && 4 * h < cols; h++) {
            int hc = cols - 4 * h < 4 ? cols - 4 * h : 4;
            w8_dot_2x4(xq + r * k, xq + (r + 1) * k, wr + 4 * h, k, dots, (const int8_t *)(next + 4 * h * k));
            for (int i = 0; i < 2; i++)
                w8_store(dots + 4 * i, hc, xs[r + i], w_scale + j + 4 * h, bj ? bj + 4 * h : NULL,
                         y + (r + i) * ldy + j + 4 * h);
        }
    if (r < m) {
        w8_dot_1x8(xq + r * k, wr, k, dots, (const int8_t *)next);
        w8_store(dots, cols, xs[r], w_scale + j, bj, y + r * ldy + j);
    }
}

/* The eight weight rows of the group at column j (the last repeated to fill a short group). */
static inline void w8_group_rows(const int8_t *w, int64_t k, int64_t j, int cols, const int8_t **wr) {
    for (int c = 0; c < 8; c++) wr[c] = w + (j + (c < cols ? c : cols - 1)) * k;
}

/* w8_block for four rows and more: four rows at a time take 4 x 2 tiles, then the last 1-3 rows as
 * w8_group_tail does, each group of weight rows read once for all rows. Kept out of line: inlined
 * beside the few-row path it crowds that path's registers (GCC then carries an accumulator of the
 * 1 x 8 tile through the stack, and a decode step's single row takes 1.15x longer). */
static __attribute__((noinline)) void w8_block_rows4(const int16_t *xq, const float *xs, int64_t m, const int8_t *w,
                                                     const float *w_scale, const float *bias, int64_t k, int64_t j0,
                                                     int64_t j1, float *y, int64_t ldy) {
    for (int64_t j = j0; j < j1; j += 8) {
        int cols = j1 - j < 8 ? (int)(j1 - j) : 8;
        const int8_t *wr[8];
        w8_group_rows(w, k, j, cols, wr);
        int64_t r = 0;
        for (; r + 4 <= m; r += 4) {
            int32_t tile[8], rows4[4][8];
            for (int h = 0; h < 4; h++) {
                w8_dot_4x2(xq + r * k, k, wr[2 * h], wr[2 * h + 1], k, tile,
                           (const int8_t *)((uintptr_t)wr[2 * h] + 8 * (uintptr_t)k));
                for (int i = 0; i < 4; i++) rows4[i][2 * h] = tile[i], rows4[i][2 * h + 1] = tile[4 + i];
            }
            for (int i = 0; i < 4; i++)
                w8_store(rows4[i], cols, xs[r + i], w_scale + j, bias ? bias + j : NULL, y + (r + i) * ldy + j);
        }
        if (r < m) w8_group_tail(xq, xs, r, m, wr, k, j, cols, w_scale, bias, y, ldy);
    }
}

/* y[r, j] = (xq_r . w_j) * xs[r] * w_scale[j] (+ bias[j]) for rows r < m of xq [m, k] (int16) and
 * output columns j0 <= j < j1 of w [n, k] (int8); y rows ldy apart. Each group of eight weight rows
 * is read once from memory for all the rows: four rows at a time take 4 x 2 tiles, the last pair of
 * rows 2 x 4 tiles, an odd last row 1 x 8. The sums are exact, so a row's result is the same bits
 * whichever tile computed it (a speculative step's rows match the plain step's single row). */
static inline void w8_block(const int16_t *xq, const float *xs, int64_t m, const int8_t *w, const float *w_scale,
                            const float *bias, int64_t k, int64_t j0, int64_t j1, float *y, int64_t ldy) {
    if (m >= 4) {
        w8_block_rows4(xq, xs, m, w, w_scale, bias, k, j0, j1, y, ldy);
        return;
    }
    for (int64_t j = j0; j < j1; j += 8) {
        int cols = j1 - j < 8 ? (int)(j1 - j) : 8;
        const int8_t *wr[8];
        w8_group_rows(w, k, j, cols, wr);
        w8_group_tail(xq, xs, 0, m, wr, k, j, cols, w_scale, bias, y, ldy);
    }
}

#endif
