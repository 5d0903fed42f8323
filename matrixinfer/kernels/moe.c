/* DeepSeekMoE routed experts in one call, for CPUs.
 *
 * out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]
 * with gate_up [E, 2I, H] (gate rows then up rows) and down [E, H, I], row-major float32.
 * Assignments are bucketed by expert (moe_tiles.h); tiles of up to four rows of one expert run in
 * parallel (OpenMP), each reading the expert's weights once for its rows (a tile of one to three rows
 * computes only those: at decode batch sizes most experts see a row or two). Every assignment writes its
 * own row of a scratch buffer, and a second parallel pass sums each token's rows, so no two threads
 * ever write the same memory. Returns 0, or -2 when out of memory.
 */
#include <stdlib.h>
#include <string.h>

#include "matrixinfer.h"
#include "moe_tiles.h"
#include "simd.h"

/* One expert's SwiGLU MLP for a full tile of rows xr[0..4): gate and up row j together, then pairs
 * of down rows; h/g scratch [4, inter], y [4, hidden]. (Separate functions keep each tile shape's
 * inner loops compiled as tightly as on their own.) */
static __attribute__((noinline)) void expert_tile4(const float *const *xr, const float *const *hr, const float *wg,
                                                   const float *wu, const float *wd, int64_t hidden, int64_t inter,
                                                   float *g, float *h, float *y) {
    float dots[2 * TILE];
    for (int64_t j = 0; j < inter; j++) {
        dot_4x2(xr, wg + j * hidden, wu + j * hidden, hidden, dots, ahead(wg, (j + 1) * hidden),
                ahead(wu, (j + 1) * hidden));
        for (int i = 0; i < TILE; i++) {
            g[i * inter + j] = dots[i];
            h[i * inter + j] = dots[TILE + i];
        }
    }
    for (int i = 0; i < TILE; i++) swiglu_row(h + i * inter, g + i * inter, inter);
    for (int64_t o = 0; o < hidden; o += 2) {
        const float *w1 = o + 1 < hidden ? wd + (o + 1) * inter : wd + o * inter;
        dot_4x2(hr, wd + o * inter, w1, inter, dots, ahead(wd, (o + 2) * inter), ahead(wd, (o + 4) * inter));
        for (int i = 0; i < TILE; i++) {
            y[i * hidden + o] = dots[i];
            if (o + 1 < hidden) y[i * hidden + o + 1] = dots[TILE + i];
        }
    }
}

/* The same for a tile of 1-3 rows: gate and up rows j, j + 1 together, then four down rows at a
 * time, computing only the tile's rows. */
static __attribute__((noinline)) void expert_tail(const float *const *xr, const float *const *hr, int rows,
                                                  const float *wg, const float *wu, const float *wd, int64_t hidden,
                                                  int64_t inter, float *g, float *h, float *y) {
    float dots[4 * TILE];
    for (int64_t j = 0; j < inter; j += 2) {
        int64_t j1 = j + 1 < inter ? j + 1 : j;
        const float *wr[4] = {wg + j * hidden, wg + j1 * hidden, wu + j * hidden, wu + j1 * hidden};
        dot_rx4(xr, rows, wr, hidden, dots, ahead(wg, (j + 2) * hidden), ahead(wu, (j + 2) * hidden));
        for (int i = 0; i < rows; i++) {
            g[i * inter + j] = dots[4 * i];
            h[i * inter + j] = dots[4 * i + 2];
            if (j + 1 < inter) {
                g[i * inter + j + 1] = dots[4 * i + 1];
                h[i * inter + j + 1] = dots[4 * i + 3];
            }
        }
    }
    for (int i = 0; i < rows; i++) swiglu_row(h + i * inter, g + i * inter, inter);
    for (int64_t o = 0; o < hidden; o += 4) {
        const float *wr[4];
        for (int c = 0; c < 4; c++) wr[c] = wd + (o + c < hidden ? o + c : hidden - 1) * inter;
        dot_rx4(hr, rows, wr, inter, dots, ahead(wd, (o + 4) * inter), ahead(wd, (o + 6) * inter));
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < 4 && o + c < hidden; c++) y[i * hidden + o + c] = dots[4 * i + c];
    }
}

int mi_moe_experts(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids, const float *weights,
                   int64_t top_k, const float *gate_up, const float *down, int64_t num_experts, int64_t inter,
                   float *out, int nthreads) {
    int64_t n_assign = num_tokens * top_k;
    MoeTiles tl;
    float *ys = malloc(sizeof(float) * (n_assign > 0 ? n_assign : 1) * hidden);
    if (!ys || moe_tiles_build(&tl, ids, n_assign, num_experts) != 0) {
        free(ys);
        return -2;
    }
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        float *h = malloc(sizeof(float) * TILE * inter);
        float *g = malloc(sizeof(float) * TILE * inter);
        float *y = malloc(sizeof(float) * TILE * hidden);
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < tl.n_tiles; k++) {
            int64_t e = tl.tile_expert[k], s = tl.tile_start[k];
            int rows = tl.first[e + 1] - s < TILE ? (int)(tl.first[e + 1] - s) : TILE;
            const float *xr[TILE];
            const float *hr[TILE];
            for (int i = 0; i < rows; i++) {
                xr[i] = x + (tl.order[s + i] / top_k) * hidden;
                hr[i] = h + i * inter;
            }
            const float *wg = gate_up + e * 2 * inter * hidden;
            const float *wu = wg + inter * hidden;
            const float *wd = down + e * hidden * inter;
            if (rows == TILE)
                expert_tile4(xr, hr, wg, wu, wd, hidden, inter, g, h, y);
            else
                expert_tail(xr, hr, rows, wg, wu, wd, hidden, inter, g, h, y);
            for (int i = 0; i < rows; i++) {
                int64_t a = tl.order[s + i];
                memcpy(ys + a * hidden, y + i * hidden, sizeof(float) * hidden);
            }
        }
        free(h);
        free(g);
        free(y);
    }
    moe_combine(ys, weights, num_tokens, top_k, hidden, out, nthreads);
    moe_tiles_free(&tl);
    free(ys);
    return 0;
}
