/* DeepSeekMoE routed experts with INT8 weights and activations (W8A8) in one call, for CPUs.
 *
 * The float kernel (moe.c) with int8 dot products: per tile of up to four rows of one expert, the
 * rows are quantized per token (times the expert's smoothing vector, if any), both projections run
 * as exact int32 sums scaled by the row and channel scales (plus the error-compensation bias, if
 * any), and the SwiGLU output is quantized again per row before the down projection. Layouts:
 * gate_up [E, 2I, H] int8 with scales [E, 2I]; down [E, H, I] int8 with scales [E, H]; optional
 * biases [E, 2I] / [E, H] and smoothing vectors [E, H] / [E, I] (NULL: none).
 */
#include <stdlib.h>
#include <string.h>

#include "matrixinfer.h"
#include "moe_tiles.h"
#include "simd.h"

int mi_moe_experts_w8a8(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids,
                        const float *weights, int64_t top_k, const int8_t *gate_up, const float *gate_up_scale,
                        const float *gate_up_bias, const float *gate_up_pre, const int8_t *down,
                        const float *down_scale, const float *down_bias, const float *down_pre,
                        int64_t num_experts, int64_t inter, float *out, int nthreads) {
    int64_t n_assign = num_tokens * top_k;
    MoeTiles tl;
    float *ys = malloc(sizeof(float) * (n_assign > 0 ? n_assign : 1) * hidden);
    if (!ys || moe_tiles_build(&tl, ids, n_assign, num_experts) != 0) {
        free(ys);
        return -2;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        int stop;
        int8_t *xq = malloc((size_t)(TILE * hidden));
        int8_t *hq = malloc((size_t)(TILE * inter));
        float *g = malloc(sizeof(float) * TILE * inter);
        float *h = malloc(sizeof(float) * TILE * inter);
        float *y = malloc(sizeof(float) * TILE * hidden);
        float xs[TILE], hs[TILE];
        int32_t dots[2 * TILE];
        if (!xq || !hq || !g || !h || !y) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < tl.n_tiles; k++) {
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            int64_t e = tl.tile_expert[k], s = tl.tile_start[k];
            int64_t rows = tl.first[e + 1] - s < TILE ? tl.first[e + 1] - s : TILE;
            const int8_t *xr[TILE], *hr[TILE];
            for (int i = 0; i < TILE; i++) { /* short tiles repeat their last row */
                int r = i < rows ? i : (int)rows - 1;
                xr[i] = xq + r * hidden;
                hr[i] = hq + r * inter;
            }
            for (int i = 0; i < rows; i++)
                xs[i] = quantize_row_i8(x + (tl.order[s + i] / top_k) * hidden,
                                        gate_up_pre ? gate_up_pre + e * hidden : NULL, hidden, xq + i * hidden);
            const int8_t *wg = gate_up + e * 2 * inter * hidden, *wu = wg + inter * hidden;
            const float *sg = gate_up_scale + e * 2 * inter, *su = sg + inter;
            const float *bg = gate_up_bias ? gate_up_bias + e * 2 * inter : NULL, *bu = bg ? bg + inter : NULL;
            for (int64_t j = 0; j < inter; j++) {
                dot_i8_4x2(xr, wg + j * hidden, wu + j * hidden, hidden, dots);
                for (int i = 0; i < rows; i++) {
                    g[i * inter + j] = (float)dots[i] * xs[i] * sg[j] + (bg ? bg[j] : 0.0f);
                    h[i * inter + j] = (float)dots[TILE + i] * xs[i] * su[j] + (bu ? bu[j] : 0.0f);
                }
            }
            for (int64_t j = 0; j < rows * inter; j++) h[j] *= g[j] / (1.0f + expf(-g[j])); /* SwiGLU */
            for (int i = 0; i < rows; i++)
                hs[i] = quantize_row_i8(h + i * inter, down_pre ? down_pre + e * inter : NULL, inter, hq + i * inter);
            const int8_t *wd = down + e * hidden * inter;
            const float *sd = down_scale + e * hidden, *bd = down_bias ? down_bias + e * hidden : NULL;
            for (int64_t o = 0; o < hidden; o += 2) {
                int64_t o1 = o + 1 < hidden ? o + 1 : o;
                dot_i8_4x2(hr, wd + o * inter, wd + o1 * inter, inter, dots);
                for (int i = 0; i < rows; i++) {
                    y[i * hidden + o] = (float)dots[i] * hs[i] * sd[o] + (bd ? bd[o] : 0.0f);
                    if (o1 != o) y[i * hidden + o1] = (float)dots[TILE + i] * hs[i] * sd[o1] + (bd ? bd[o1] : 0.0f);
                }
            }
            for (int i = 0; i < rows; i++)
                memcpy(ys + tl.order[s + i] * hidden, y + i * hidden, sizeof(float) * hidden);
        }
        free(xq);
        free(hq);
        free(g);
        free(h);
        free(y);
    }
    if (!failed) moe_combine(ys, weights, num_tokens, top_k, hidden, out, nthreads);
    moe_tiles_free(&tl);
    free(ys);
    return failed ? -2 : 0;
}
