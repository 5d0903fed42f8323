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
#include <stdlib.h>
#include <string.h>

#include "matrixinfer.h"
#include "simd.h"

#define CHUNK 64

/* One head of one query over one chunk of keys: scores, online-softmax update of (m, l) and the
 * latent accumulator oh [rank]. sh: scratch for the chunk's scores. */
static inline void attend_chunk(const float *qh, const float *const *rows, int64_t c_n, int64_t dim, int64_t rank,
                                float scale, float *sh, float *m, float *l, float *oh) {
    float cmax = -INFINITY;
    int64_t c = 0;
#if HAVE_DOT8
    if (dim % 8 == 0)
        for (; c + 8 <= c_n; c += 8) dot8(qh, rows + c, dim, scale, sh + c);
#endif
    for (; c < c_n; c++) {
        const float *row = rows[c];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < dim; d++) acc += qh[d] * row[d];
        sh[c] = acc * scale;
    }
#pragma omp simd reduction(max : cmax)
    for (c = 0; c < c_n; c++) cmax = sh[c] > cmax ? sh[c] : cmax;
    float new_m = cmax > *m ? cmax : *m;
    float factor = expf(*m - new_m); /* 0 on the first chunk (m = -inf) */
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c2 = 0; c2 < c_n; c2++) {
        float e = expf(sh[c2] - new_m);
        sh[c2] = e;
        sum += e;
    }
    *l = *l * factor + sum;
    *m = new_m;
    int64_t r = 0;
#if HAVE_DOT8
    /* 64 output dims at a time kept in registers across the chunk's keys: eight independent
     * accumulator chains keep the FMA units busy (four would wait on FMA latency). */
    for (; r + 64 <= rank; r += 64) {
        __m256 f = _mm256_set1_ps(factor);
        __m256 o[8];
        for (int k = 0; k < 8; k++) o[k] = _mm256_mul_ps(_mm256_loadu_ps(oh + r + 8 * k), f);
        for (int64_t c2 = 0; c2 < c_n; c2++) {
            __m256 pv = _mm256_set1_ps(sh[c2]);
            const float *row = rows[c2] + r;
            for (int k = 0; k < 8; k++) o[k] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + 8 * k), o[k]);
        }
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(oh + r + 8 * k, o[k]);
    }
    for (; r + 32 <= rank; r += 32) {
        __m256 f = _mm256_set1_ps(factor);
        __m256 o0 = _mm256_mul_ps(_mm256_loadu_ps(oh + r), f);
        __m256 o1 = _mm256_mul_ps(_mm256_loadu_ps(oh + r + 8), f);
        __m256 o2 = _mm256_mul_ps(_mm256_loadu_ps(oh + r + 16), f);
        __m256 o3 = _mm256_mul_ps(_mm256_loadu_ps(oh + r + 24), f);
        for (int64_t c2 = 0; c2 < c_n; c2++) {
            __m256 pv = _mm256_set1_ps(sh[c2]);
            const float *row = rows[c2] + r;
            o0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row), o0);
            o1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + 8), o1);
            o2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + 16), o2);
            o3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + 24), o3);
        }
        _mm256_storeu_ps(oh + r, o0);
        _mm256_storeu_ps(oh + r + 8, o1);
        _mm256_storeu_ps(oh + r + 16, o2);
        _mm256_storeu_ps(oh + r + 24, o3);
    }
#endif
    for (; r < rank; r++) {
        float a = oh[r] * factor;
        for (int64_t c2 = 0; c2 < c_n; c2++) a += sh[c2] * rows[c2][r];
        oh[r] = a;
    }
}

#define GROUP 4 /* consecutive queries of one sequence (a prefill chunk) share each key chunk's loads */

/* w_kv_b: NULL, or kv_b_proj's weight [heads, nope + v_dim, rank]: then out is [T, heads, v_dim]
 * (the latent output times each head's W_UV, the absorbed form's epilogue), else [T, heads, rank]. */
void mi_paged_mla(const float *q, const float *cache, const int32_t *block_tables, int64_t bt_stride,
                  const int32_t *tok_seq, const int32_t *tok_nkeys, int64_t num_tokens, int64_t heads,
                  int64_t dim, int64_t rank, int64_t block_size, float scale, const float *w_kv_b, int64_t nope,
                  int64_t v_dim, float *out, int nthreads) {
    /* Groups of up to GROUP consecutive tokens of the same sequence. */
    int64_t *group_start = (int64_t *)malloc(sizeof(int64_t) * (num_tokens + 1));
    int64_t n_groups = 0;
    for (int64_t t = 0; t < num_tokens;) {
        int64_t u = t + 1;
        while (u < num_tokens && u - t < GROUP && tok_seq[u] == tok_seq[t]) u++;
        group_start[n_groups++] = t;
        t = u;
    }
    group_start[n_groups] = num_tokens;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        float *lat = (float *)malloc(sizeof(float) * GROUP * heads * rank);
        float *scores = (float *)malloc(sizeof(float) * CHUNK);
        float *m = (float *)malloc(sizeof(float) * GROUP * heads);
        float *l = (float *)malloc(sizeof(float) * GROUP * heads);
        const float *rows[CHUNK];
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t t0 = group_start[g], nt = group_start[g + 1] - t0;
            const int32_t *table = block_tables + (int64_t)tok_seq[t0] * bt_stride;
            int64_t n_max = 0;
            for (int64_t i = 0; i < nt; i++) {
                if (tok_nkeys[t0 + i] > n_max) n_max = tok_nkeys[t0 + i];
                for (int64_t h = 0; h < heads; h++) {
                    m[i * heads + h] = -INFINITY;
                    l[i * heads + h] = 0.0f;
                }
            }
            memset(lat, 0, sizeof(float) * nt * heads * rank);
            for (int64_t j0 = 0; j0 < n_max; j0 += CHUNK) {
                int64_t c_max = n_max - j0 < CHUNK ? n_max - j0 : CHUNK;
                for (int64_t c = 0; c < c_max; c++) {
                    int64_t j = j0 + c;
                    rows[c] = cache + ((int64_t)table[j / block_size] * block_size + j % block_size) * dim;
                }
                for (int64_t i = 0; i < nt; i++) {
                    int64_t c_n = tok_nkeys[t0 + i] - j0; /* causal: this query sees fewer keys */
                    if (c_n <= 0) continue;
                    if (c_n > c_max) c_n = c_max;
                    const float *qt = q + (t0 + i) * heads * dim;
                    for (int64_t h = 0; h < heads; h++)
                        attend_chunk(qt + h * dim, rows, c_n, dim, rank, scale, scores, m + i * heads + h,
                                     l + i * heads + h, lat + (i * heads + h) * rank);
                }
            }
            for (int64_t i = 0; i < nt; i++) {
                int64_t t = t0 + i;
                for (int64_t h = 0; h < heads; h++) {
                    float li = l[i * heads + h];
                    float inv = li > 0.0f ? 1.0f / li : 0.0f;
                    float *oh = lat + (i * heads + h) * rank;
                    if (!w_kv_b) {
                        float *dst = out + (t * heads + h) * rank;
#pragma omp simd
                        for (int64_t r = 0; r < rank; r++) dst[r] = oh[r] * inv;
                        continue;
                    }
                    const float *wv = w_kv_b + (h * (nope + v_dim) + nope) * rank;
                    float *dst = out + (t * heads + h) * v_dim;
                    for (int64_t v = 0; v < v_dim; v++) {
                        const float *wr = wv + v * rank;
                        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t r = 0; r < rank; r++) acc += oh[r] * wr[r];
                        dst[v] = acc * inv;
                    }
                }
            }
        }
        free(lat);
        free(scores);
        free(m);
        free(l);
    }
    free(group_start);
}

/* Rotate the rope dims of one vector: pairs (x[2i], x[2i+1]) when interleaved, else (x[i], x[i+half]);
 * the result is de-interleaved (first halves' rotation then second halves'), as the PyTorch path. */
static inline void rope_rotate(const float *x, const float *c, const float *s, int64_t rope, int interleaved,
                               float *out) {
    int64_t half = rope / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1 = interleaved ? x[2 * i] : x[i];
        float x2 = interleaved ? x[2 * i + 1] : x[i + half];
        out[i] = x1 * c[i] - x2 * s[i];
        out[half + i] = x2 * c[i] + x1 * s[i];
    }
}

/* The MLA query prolog of the absorbed form: out[t, h] = [q_nope[t, h] W_UK[h], rope(q_pe[t, h])].
 * q [T, heads, nope + rope]; w_kv_b [heads, nope + v_dim, rank]; cos/sin [T, rope / 2];
 * out [T, heads, rank + rope]. */
void mi_mla_q_prolog(const float *q, const float *w_kv_b, const float *cos, const float *sin, int64_t num_tokens,
                     int64_t heads, int64_t nope, int64_t rope, int64_t v_dim, int64_t rank, int interleaved,
                     float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (num_tokens >= 128)
    for (int64_t t = 0; t < num_tokens; t++) {
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = q + (t * heads + h) * (nope + rope);
            const float *wk = w_kv_b + h * (nope + v_dim) * rank;
            float *dst = out + (t * heads + h) * (rank + rope);
            memset(dst, 0, sizeof(float) * rank);
            for (int64_t d = 0; d < nope; d++) {
                float a = qh[d];
                const float *wr = wk + d * rank;
#pragma omp simd
                for (int64_t r = 0; r < rank; r++) dst[r] += a * wr[r];
            }
            rope_rotate(qh + nope, cos + t * (rope / 2), sin + t * (rope / 2), rope, interleaved, dst + rank);
        }
    }
}

/* The MLA KV prolog: normalise the compressed KV (RMSNorm with weight norm_w), rotate the shared
 * key, and write the latent [rank + rope] of token t straight into cache slot slots[t].
 * kv [T, rank + rope] (kv_a_proj_with_mqa's output); cache [num_slots, rank + rope]. */
void mi_mla_kv_prolog(const float *kv, const float *norm_w, float eps, const float *cos, const float *sin,
                      const int64_t *slots, int64_t num_tokens, int64_t rank, int64_t rope, int interleaved,
                      float *cache, int nthreads) {
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (num_tokens >= 256)
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *x = kv + t * (rank + rope);
        float *dst = cache + slots[t] * (rank + rope);
        rms_row(x, norm_w, rank, eps, dst);
        rope_rotate(x + rank, cos + t * (rope / 2), sin + t * (rope / 2), rope, interleaved, dst + rank);
    }
}
