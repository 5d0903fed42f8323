/* y = x W^T for the few rows of a decode step, for CPUs.
 *
 * x [M, K], W [N, K] (nn.Linear's layout), y [M, N], float32. A BLAS GEMM packs W for every call,
 * which at a handful of rows costs more than the arithmetic; here each thread streams its block of
 * W's rows once and reuses every 4-row tile of x against it (register tiles of 4 rows x 2 outputs;
 * the last 1-3 rows take 1-3 x 4 tiles instead of repeating a row to fill a 4-row one, so the two
 * rows of a speculative step's verification cost little more than one).
 */
#include "matrixinfer.h"
#include "simd.h"

#define NBLOCK 64 /* output columns per task: their weight rows stay in cache across the row tiles */

/* Rows x[0..4) against weight rows n0..n1: pairs of weight rows (the register tile 4 x 2). */
static __attribute__((noinline)) void block_tile4(const float *const *xr, const float *w, int64_t k, int64_t n0,
                                                  int64_t n1, float *y, int64_t n) {
    float dots[2 * TILE];
    for (int64_t j = n0; j < n1; j += 2) {
        const float *w1 = j + 1 < n1 ? w + (j + 1) * k : w + j * k;
        dot_4x2(xr, w + j * k, w1, k, dots, ahead(w, (j + 2) * k), ahead(w, (j + 4) * k));
        for (int i = 0; i < TILE; i++) {
            y[i * n + j] = dots[i];
            if (j + 1 < n1) y[i * n + j + 1] = dots[TILE + i];
        }
    }
}

/* The last 1-3 rows against weight rows n0..n1: four weight rows at a time, no repeated rows. */
static __attribute__((noinline)) void block_tail(const float *const *xr, int rows, const float *w, int64_t k,
                                                 int64_t n0, int64_t n1, float *y, int64_t n) {
    float dots[4 * TILE];
    for (int64_t j = n0; j < n1; j += 4) {
        const float *wr[4];
        for (int c = 0; c < 4; c++) wr[c] = w + (j + c < n1 ? j + c : n1 - 1) * k;
        dot_rx4(xr, rows, wr, k, dots, ahead(w, (j + 4) * k), ahead(w, (j + 6) * k));
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < 4 && j + c < n1; c++) y[i * n + j + c] = dots[4 * i + c];
    }
}

void mi_linear(const float *x, const float *w, int64_t m, int64_t k, int64_t n, float *y, int nthreads) {
    int64_t n_blocks = (n + NBLOCK - 1) / NBLOCK;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (m * n * k >= 1 << 18)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t n0 = b * NBLOCK, n1 = n0 + NBLOCK < n ? n0 + NBLOCK : n;
        for (int64_t r0 = 0; r0 < m; r0 += TILE) {
            int rows = m - r0 < TILE ? (int)(m - r0) : TILE;
            const float *xr[TILE];
            for (int i = 0; i < TILE; i++) xr[i] = x + (r0 + (i < rows ? i : rows - 1)) * k;
            if (rows == TILE)
                block_tile4(xr, w, k, n0, n1, y + r0 * n, n);
            else
                block_tail(xr, rows, w, k, n0, n1, y + r0 * n, n);
        }
    }
}
