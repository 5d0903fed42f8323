/* What the routed-experts kernels (moe.c, moe_w8a8.c) share: assignments bucketed by expert and cut
 * into tiles of up to TILE rows of one expert, and the weighted combine of each token's rows. */
#ifndef MATRIXINFER_MOE_TILES_H
#define MATRIXINFER_MOE_TILES_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* Assignment a = t * top_k + j (token t's j-th expert) sorted by expert: order[first[e] .. first[e + 1])
 * are expert e's assignments; tile k covers order[tile_start[k] ..] (at most TILE) of tile_expert[k]. */
typedef struct {
    int64_t *first, *order, *tile_expert, *tile_start;
    int64_t n_tiles;
} MoeTiles;

static inline void moe_tiles_free(MoeTiles *t) {
    free(t->first);
    free(t->order);
    free(t->tile_expert);
    free(t->tile_start);
}

/* Returns 0, or -2 when out of memory (nothing left allocated). */
static inline int moe_tiles_build(MoeTiles *t, const int64_t *ids, int64_t n_assign, int64_t num_experts) {
    t->first = calloc(num_experts + 1, sizeof(int64_t));
    t->order = malloc(sizeof(int64_t) * (n_assign > 0 ? n_assign : 1));
    int64_t *fill = malloc(sizeof(int64_t) * (num_experts > 0 ? num_experts : 1));
    t->tile_expert = t->tile_start = NULL;
    if (!t->first || !t->order || !fill) {
        free(fill);
        moe_tiles_free(t);
        return -2;
    }
    for (int64_t a = 0; a < n_assign; a++) t->first[ids[a] + 1]++;
    for (int64_t e = 0; e < num_experts; e++) t->first[e + 1] += t->first[e];
    memcpy(fill, t->first, sizeof(int64_t) * num_experts);
    for (int64_t a = 0; a < n_assign; a++) t->order[fill[ids[a]]++] = a;
    free(fill);
    t->n_tiles = 0;
    for (int64_t e = 0; e < num_experts; e++) t->n_tiles += (t->first[e + 1] - t->first[e] + TILE - 1) / TILE;
    t->tile_expert = malloc(sizeof(int64_t) * (t->n_tiles > 0 ? t->n_tiles : 1));
    t->tile_start = malloc(sizeof(int64_t) * (t->n_tiles > 0 ? t->n_tiles : 1));
    if (!t->tile_expert || !t->tile_start) {
        moe_tiles_free(t);
        return -2;
    }
    for (int64_t e = 0, k = 0; e < num_experts; e++)
        for (int64_t s = t->first[e]; s < t->first[e + 1]; s += TILE) {
            t->tile_expert[k] = e;
            t->tile_start[k++] = s;
        }
    return 0;
}

/* out[t] = sum_j weights[t, j] * ys[t * top_k + j], in parallel over tokens (each writes its own row). */
static inline void moe_combine(const float *ys, const float *weights, int64_t num_tokens, int64_t top_k,
                               int64_t hidden, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (num_tokens * hidden >= 65536)
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

#endif
