/* DeepSeekMoE routed experts in one call, for CPUs.
 *
 * out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]
 * with gate_up [E, 2I, H] (gate rows then up rows) and down [E, H, I], row-major float32.
 * Assignments are bucketed by expert; tiles of up to four rows of one expert run in parallel
 * (OpenMP), each reading the expert's weights once for its rows. Every assignment writes its own
 * row of a scratch buffer, and a second parallel pass sums each token's rows, so no two threads
 * ever write the same memory.
 */
#include <stdlib.h>
#include <string.h>

#include "matrixinfer.h"
#include "simd.h"

void mi_moe_experts(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids, const float *weights,
                    int64_t top_k, const float *gate_up, const float *down, int64_t num_experts, int64_t inter,
                    float *out, int nthreads) {
    int64_t n_assign = num_tokens * top_k;
    int64_t *counts = calloc(num_experts + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (n_assign > 0 ? n_assign : 1));
    float *ys = malloc(sizeof(float) * (n_assign > 0 ? n_assign : 1) * hidden);
    for (int64_t a = 0; a < n_assign; a++) counts[ids[a] + 1]++;
    for (int64_t e = 0; e < num_experts; e++) counts[e + 1] += counts[e]; /* counts[e] = first slot */
    int64_t *fill = malloc(sizeof(int64_t) * (num_experts > 0 ? num_experts : 1));
    memcpy(fill, counts, sizeof(int64_t) * num_experts);
    for (int64_t a = 0; a < n_assign; a++) order[fill[ids[a]]++] = a;
    /* Tiles: (expert, first row) pairs. */
    int64_t n_tiles = 0;
    for (int64_t e = 0; e < num_experts; e++) n_tiles += (counts[e + 1] - counts[e] + TILE - 1) / TILE;
    int64_t *tile_expert = malloc(sizeof(int64_t) * (n_tiles > 0 ? n_tiles : 1));
    int64_t *tile_start = malloc(sizeof(int64_t) * (n_tiles > 0 ? n_tiles : 1));
    for (int64_t e = 0, k = 0; e < num_experts; e++)
        for (int64_t s = counts[e]; s < counts[e + 1]; s += TILE) {
            tile_expert[k] = e;
            tile_start[k++] = s;
        }
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        float *h = malloc(sizeof(float) * TILE * inter);
        float *g = malloc(sizeof(float) * TILE * inter);
        float *y = malloc(sizeof(float) * TILE * hidden);
        float dots[2 * TILE];
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n_tiles; k++) {
            int64_t e = tile_expert[k], s = tile_start[k];
            int64_t rows = counts[e + 1] - s < TILE ? counts[e + 1] - s : TILE;
            const float *xr[TILE];
            const float *hr[TILE];
            for (int i = 0; i < TILE; i++) { /* short tiles repeat their last row */
                int64_t a = order[s + (i < rows ? i : rows - 1)];
                xr[i] = x + (a / top_k) * hidden;
                hr[i] = h + i * inter;
            }
            const float *wg = gate_up + e * 2 * inter * hidden;
            const float *wu = wg + inter * hidden;
            for (int64_t j = 0; j < inter; j++) {
                dot_4x2(xr, wg + j * hidden, wu + j * hidden, hidden, dots);
                for (int i = 0; i < TILE; i++) {
                    g[i * inter + j] = dots[i];
                    h[i * inter + j] = dots[TILE + i];
                }
            }
#pragma omp simd
            for (int64_t j = 0; j < TILE * inter; j++) h[j] *= g[j] / (1.0f + expf(-g[j])); /* SwiGLU */
            const float *wd = down + e * hidden * inter;
            for (int64_t o = 0; o < hidden; o += 2) {
                const float *w1 = o + 1 < hidden ? wd + (o + 1) * inter : wd + o * inter;
                dot_4x2(hr, wd + o * inter, w1, inter, dots);
                for (int i = 0; i < TILE; i++) {
                    y[i * hidden + o] = dots[i];
                    if (o + 1 < hidden) y[i * hidden + o + 1] = dots[TILE + i];
                }
            }
            for (int i = 0; i < rows; i++) {
                int64_t a = order[s + i];
                memcpy(ys + a * hidden, y + i * hidden, sizeof(float) * hidden);
            }
        }
        free(h);
        free(g);
        free(y);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            float *ot = out + t * hidden;
            memset(ot, 0, sizeof(float) * hidden);
            for (int64_t j = 0; j < top_k; j++) {
                float w = weights[t * top_k + j];
                const float *yr = ys + (t * top_k + j) * hidden;
#pragma omp simd
                for (int64_t d = 0; d < hidden; d++) ot[d] += w * yr[d];
            }
        }
    }
    free(counts);
    free(order);
    free(ys);
    free(fill);
    free(tile_expert);
    free(tile_start);
}
