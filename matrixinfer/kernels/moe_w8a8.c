/* DeepSeekMoE routed experts with INT8 weights and activations (W8A8) in one call, for CPUs.
 *
 * The float kernel (moe.c) with int8 dot products: per tile of up to four rows of one expert, the
 * rows are quantized per token (times the expert's smoothing vector, if any) into per-thread
 * scratch, gate and up run as one [2I, H] projection (exact int32 sums scaled by the row and channel
 * scales, plus the error-compensation bias, if any), and the SwiGLU output is quantized again per
 * row before the down projection. A tile computes only its own rows (w8_block: 2 x 4 and 1 x 8
 * register tiles), so the one row a decode token gives most experts costs one row. Layouts:
 * gate_up [E, 2I, H] int8 with scales [E, 2I]; down [E, H, I] int8 with scales [E, H]; optional
 * biases [E, 2I] / [E, H] and smoothing vectors [E, H] / [E, I] (NULL: none).
 */
#include <stdlib.h>
#include <string.h>

#include "matrixinfer.h"
#include "moe_tiles.h"
#include "simd.h"
#include "w8a8.h"

#define A64(b) (((b) + 63) & ~(size_t)63)

int mi_moe_experts_w8a8(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids,
                        const float *weights, int64_t top_k, const int8_t *gate_up, const float *gate_up_scale,
                        const float *gate_up_bias, const float *gate_up_pre, const int8_t *down,
                        const float *down_scale, const float *down_bias, const float *down_pre,
                        int64_t num_experts, int64_t inter, float *out, int nthreads) {
    int64_t n_assign = num_tokens * top_k;
    MoeTiles tl;
    size_t ys_bytes = sizeof(float) * (size_t)(n_assign > 0 ? n_assign : 1) * (size_t)hidden;
    float *ys = w8_arena(0, ys_bytes);
    if (!ys) return -2;
    if (moe_tiles_build(&tl, ids, n_assign, num_experts) != 0) {
        w8_release(ys, ys_bytes);
        return -2;
    }
    /* per-thread scratch: xq [TILE, H] and hq [TILE, I] int16, gu [TILE, 2I] and y [TILE, H] float */
    size_t o_hq = A64(sizeof(int16_t) * TILE * hidden), o_gu = o_hq + A64(sizeof(int16_t) * TILE * inter);
    size_t o_y = o_gu + A64(sizeof(float) * TILE * 2 * inter), scratch = o_y + A64(sizeof(float) * TILE * hidden);
    int failed = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        int stop;
        char *buf = w8_arena(1, scratch);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        int16_t *xq = (int16_t *)buf, *hq = (int16_t *)(buf + o_hq);
        float *gu = (float *)(buf + o_gu), *y = (float *)(buf + o_y);
        float xs[TILE], hs[TILE];
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < tl.n_tiles; k++) {
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            int64_t e = tl.tile_expert[k], s = tl.tile_start[k];
            int64_t rows = tl.first[e + 1] - s < TILE ? tl.first[e + 1] - s : TILE;
            for (int i = 0; i < rows; i++)
                xs[i] = quantize_row_i16(x + (tl.order[s + i] / top_k) * hidden,
                                         gate_up_pre ? gate_up_pre + e * hidden : NULL, hidden, xq + i * hidden);
            w8_block(xq, xs, rows, gate_up + e * 2 * inter * hidden, gate_up_scale + e * 2 * inter,
                     gate_up_bias ? gate_up_bias + e * 2 * inter : NULL, hidden, 0, 2 * inter, gu, 2 * inter);
            for (int i = 0; i < rows; i++) {
                float *g = gu + i * 2 * inter, *h = g + inter;
                swiglu_row(h, g, inter); /* h = up * silu(gate) */
                hs[i] = quantize_row_i16(h, down_pre ? down_pre + e * inter : NULL, inter, hq + i * inter);
            }
            w8_block(hq, hs, rows, down + e * hidden * inter, down_scale + e * hidden,
                     down_bias ? down_bias + e * hidden : NULL, inter, 0, hidden, y, hidden);
            for (int i = 0; i < rows; i++)
                memcpy(ys + tl.order[s + i] * hidden, y + i * hidden, sizeof(float) * hidden);
        }
        if (buf) w8_release(buf, scratch);
    }
    if (!failed) moe_combine(ys, weights, num_tokens, top_k, hidden, out, nthreads);
    moe_tiles_free(&tl);
    w8_release(ys, ys_bytes);
    return failed ? -2 : 0;
}
