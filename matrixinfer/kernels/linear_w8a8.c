/* y = x W^T with INT8 weights and activations (W8A8) for the few rows of a decode step, for CPUs.
 *
 * x [M, K] float32 is quantized per row on entry (dynamic per-token scales, optionally multiplied
 * by a smoothing vector first); W [N, K] int8 with one scale per output row; the int8 products
 * accumulate exactly in int32 and are scaled back to float32: y = acc * s_x * s_w (+ bias).
 * Reading a quarter of float32's weight bytes is what makes this faster at decode sizes, where the
 * float kernel (linear.c) streams its weights from memory. Same tiling as linear.c: each thread
 * owns a block of W's rows and reuses every 4-row tile of x against it (1 x 4 tiles for one row).
 */
#include <stdlib.h>

#include "matrixinfer.h"
#include "simd.h"

#define NBLOCK 64 /* output columns per task */

void mi_quantize_rows(const float *x, int64_t m, int64_t k, const float *mul, int8_t *q, float *scale) {
    for (int64_t r = 0; r < m; r++) scale[r] = quantize_row_i8(x + r * k, mul, k, q + r * k);
}

/* One row (a single decoding sequence): four weight rows at a time, no repeated rows. */
static void row_w8a8(const int8_t *xq, float xs, const int8_t *w, const float *w_scale, const float *bias, int64_t k,
                     int64_t n, float *y, int nthreads) {
    int64_t n_blocks = (n + NBLOCK - 1) / NBLOCK;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (n * k >= 1 << 20)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t n0 = b * NBLOCK, n1 = n0 + NBLOCK < n ? n0 + NBLOCK : n;
        int32_t dots[4];
        for (int64_t j = n0; j < n1; j += 4) {
            const int8_t *wr[4];
            for (int c = 0; c < 4; c++) wr[c] = w + (j + c < n1 ? j + c : n1 - 1) * k;
            dot_i8_1x4(xq, wr, k, dots);
            for (int c = 0; c < 4 && j + c < n1; c++)
                y[j + c] = (float)dots[c] * xs * w_scale[j + c] + (bias ? bias[j + c] : 0.0f);
        }
    }
}

/* Several rows: tiles of four rows against pairs of weight rows. */
static void tiles_w8a8(const int8_t *xq, const float *xs, int64_t m, const int8_t *w, const float *w_scale,
                       const float *bias, int64_t k, int64_t n, float *y, int nthreads) {
    int64_t n_blocks = (n + NBLOCK - 1) / NBLOCK;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (m * n * k >= 1 << 20)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t n0 = b * NBLOCK, n1 = n0 + NBLOCK < n ? n0 + NBLOCK : n;
        int32_t dots[2 * TILE];
        for (int64_t r0 = 0; r0 < m; r0 += TILE) {
            int64_t rows = m - r0 < TILE ? m - r0 : TILE;
            const int8_t *xr[TILE];
            for (int i = 0; i < TILE; i++) xr[i] = xq + (r0 + (i < rows ? i : rows - 1)) * k;
            for (int64_t j = n0; j < n1; j += 2) {
                int64_t j1 = j + 1 < n1 ? j + 1 : j;
                dot_i8_4x2(xr, w + j * k, w + j1 * k, k, dots);
                for (int i = 0; i < rows; i++) {
                    float s = xs[r0 + i];
                    float *yr = y + (r0 + i) * n;
                    yr[j] = (float)dots[i] * s * w_scale[j] + (bias ? bias[j] : 0.0f);
                    if (j1 != j) yr[j1] = (float)dots[TILE + i] * s * w_scale[j1] + (bias ? bias[j1] : 0.0f);
                }
            }
        }
    }
}

int mi_linear_w8a8(const float *x, int64_t m, int64_t k, const float *pre_scale, const int8_t *w,
                   const float *w_scale, const float *bias, int64_t n, float *y, int nthreads) {
    int8_t *xq = malloc((size_t)(m * k > 0 ? m * k : 1));
    float *xs = malloc(sizeof(float) * (m > 0 ? m : 1));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -2;
    }
    mi_quantize_rows(x, m, k, pre_scale, xq, xs);
    if (m == 1)
        row_w8a8(xq, xs[0], w, w_scale, bias, k, n, y, nthreads);
    else
        tiles_w8a8(xq, xs, m, w, w_scale, bias, k, n, y, nthreads);
    free(xq);
    free(xs);
    return 0;
}
