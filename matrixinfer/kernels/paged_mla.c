/* Paged MLA attention in the latent space (the weight-absorbed form), fused, for CPUs.
 *
 * For every query token t of a flat batch and every head h it computes
 *     out[t, h, :R] = sum_j softmax_j(scale * q[t, h, :] . K[j, :]) * K[j, :R]
 * over the keys j = 0 .. nkeys[t]-1 of the token's sequence, where key j is the cached latent at
 * slot block_table[seq[t]][j / block_size] * block_size + j % block_size of one layer's cache
 * ([num_slots, D] floats: R normalised compressed-KV values then the rotated shared key).
 * Keys are read straight from the paged cache (no gather), once per token for all heads, in
 * chunks with an online softmax. Tokens run in parallel with OpenMP.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 64

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's libmvec has vector expf (declared by math.h only under -ffast-math): let the
 * vectoriser call it for the softmax exponentials. */
__attribute__((simd("notinbranch"))) float expf(float);
#endif

int mi_paged_mla_version(void) { return 1; }

void mi_paged_mla(const float *q, const float *cache, const int32_t *block_tables, int64_t bt_stride,
                  const int32_t *tok_seq, const int32_t *tok_nkeys, int64_t num_tokens, int64_t heads,
                  int64_t dim, int64_t rank, int64_t block_size, float scale, float *out, int nthreads) {
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        float *scores = (float *)malloc(sizeof(float) * heads * CHUNK);
        float *m = (float *)malloc(sizeof(float) * heads);
        float *l = (float *)malloc(sizeof(float) * heads);
        const float *rows[CHUNK];
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_tokens; t++) {
            const float *qt = q + t * heads * dim;
            float *ot = out + t * heads * rank;
            const int32_t *table = block_tables + (int64_t)tok_seq[t] * bt_stride;
            int64_t n = tok_nkeys[t];
            memset(ot, 0, sizeof(float) * heads * rank);
            for (int64_t h = 0; h < heads; h++) {
                m[h] = -INFINITY;
                l[h] = 0.0f;
            }
            for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
                int64_t c_n = n - j0 < CHUNK ? n - j0 : CHUNK;
                for (int64_t c = 0; c < c_n; c++) {
                    int64_t j = j0 + c;
                    rows[c] = cache + ((int64_t)table[j / block_size] * block_size + j % block_size) * dim;
                }
                for (int64_t h = 0; h < heads; h++) {
                    const float *qh = qt + h * dim;
                    float *sh = scores + h * CHUNK;
                    float cmax = -INFINITY;
                    int64_t c = 0;
                    for (; c + 4 <= c_n; c += 4) { /* four independent dot products at a time */
                        const float *r0 = rows[c], *r1 = rows[c + 1], *r2 = rows[c + 2], *r3 = rows[c + 3];
                        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                        for (int64_t d = 0; d < dim; d++) {
                            a0 += qh[d] * r0[d];
                            a1 += qh[d] * r1[d];
                            a2 += qh[d] * r2[d];
                            a3 += qh[d] * r3[d];
                        }
                        sh[c] = a0 * scale;
                        sh[c + 1] = a1 * scale;
                        sh[c + 2] = a2 * scale;
                        sh[c + 3] = a3 * scale;
                    }
                    for (; c < c_n; c++) {
                        const float *row = rows[c];
                        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t d = 0; d < dim; d++) acc += qh[d] * row[d];
                        sh[c] = acc * scale;
                    }
                    for (c = 0; c < c_n; c++)
                        if (sh[c] > cmax) cmax = sh[c];
                    float new_m = cmax > m[h] ? cmax : m[h];
                    float factor = expf(m[h] - new_m); /* 0 on the first chunk (m = -inf) */
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t c = 0; c < c_n; c++) {
                        float e = expf(sh[c] - new_m);
                        sh[c] = e;
                        sum += e;
                    }
                    l[h] = l[h] * factor + sum;
                    m[h] = new_m;
                    float *oh = ot + h * rank;
                    if (factor != 1.0f) {
#pragma omp simd
                        for (int64_t r = 0; r < rank; r++) oh[r] *= factor;
                    }
                    for (int64_t c = 0; c < c_n; c++) {
                        const float *row = rows[c];
                        float p = sh[c];
#pragma omp simd
                        for (int64_t r = 0; r < rank; r++) oh[r] += p * row[r];
                    }
                }
            }
            for (int64_t h = 0; h < heads; h++) {
                float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
                float *oh = ot + h * rank;
#pragma omp simd
                for (int64_t r = 0; r < rank; r++) oh[r] *= inv;
            }
        }
        free(scores);
        free(m);
        free(l);
    }
}
