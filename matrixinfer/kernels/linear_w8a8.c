/* y = x W^T with INT8 weights and activations (W8A8) for the few rows of a decode step, for CPUs.
 *
 * x [M, K] float32 is quantized per row on entry (dynamic per-token scales, optionally multiplied
 * by a smoothing vector first), once, into per-thread scratch (w8a8.h: no allocation per call);
 * W [N, K] int8 with one scale per output row; the int8 products accumulate exactly in int32 and
 * are scaled back to float32: y = acc * s_x * s_w (+ bias). Reading a quarter of float32's weight
 * bytes is what makes this faster where weights stream from memory; where they sit in cache, the
 * int16 multiply-add (16 per instruction against float FMA's 8) is. Each thread owns an equal
 * share of W's rows (in groups of eight) and reads each group once for all of x's rows.
 */
#include <stdlib.h>

#include "matrixinfer.h"
#include "simd.h"
#include "w8a8.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many multiply-adds one thread finishes before a team would start. */
#define W8_PARALLEL_MACS (1 << 19)

void mi_quantize_rows(const float *x, int64_t m, int64_t k, const float *mul, int8_t *q, float *scale) {
    for (int64_t r = 0; r < m; r++) scale[r] = quantize_row_i8(x + r * k, mul, k, q + r * k);
}

/* Thread t of nt: quantize its share of x's rows, wait for the others', then compute an equal share
 * of whole groups of eight outputs. */
static void linear_share(int t, int nt, const float *x, int64_t m, int64_t k, const float *pre_scale,
                         const int8_t *w, const float *w_scale, const float *bias, int64_t n, float *y,
                         int16_t *xq, float *xs) {
    for (int64_t r = t; r < m; r += nt) xs[r] = quantize_row_i16(x + r * k, pre_scale, k, xq + r * k);
    if (nt > 1) {
#pragma omp barrier
    }
    int64_t groups = (n + 7) / 8, per = (groups + nt - 1) / nt;
    int64_t j0 = t * per * 8, j1 = (t + 1) * per * 8 < n ? (t + 1) * per * 8 : n;
    if (j0 < j1) w8_block(xq, xs, m, w, w_scale, bias, k, j0, j1, y, n);
}

int mi_linear_w8a8(const float *x, int64_t m, int64_t k, const float *pre_scale, const int8_t *w,
                   const float *w_scale, const float *bias, int64_t n, float *y, int nthreads) {
    if (m <= 0 || n <= 0) return 0;
    size_t xq_bytes = (sizeof(int16_t) * (size_t)(m * k) + 63) & ~(size_t)63;
    size_t bytes = xq_bytes + sizeof(float) * (size_t)m;
    char *buf = w8_arena(0, bytes);
    if (!buf) return -2;
    int16_t *xq = (int16_t *)buf;
    float *xs = (float *)(buf + xq_bytes);
#ifdef _OPENMP
    if (nthreads > 1 && m * n * k >= W8_PARALLEL_MACS && n >= 16) {
#pragma omp parallel num_threads(nthreads)
        linear_share(omp_get_thread_num(), omp_get_num_threads(), x, m, k, pre_scale, w, w_scale, bias, n, y, xq,
                     xs);
    } else
#endif
        linear_share(0, 1, x, m, k, pre_scale, w, w_scale, bias, n, y, xq, xs);
    (void)nthreads;
    w8_release(buf, bytes);
    return 0;
}
