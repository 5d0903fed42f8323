/* Small per-token operators fused into one call each, for CPUs: at decode batch sizes their
 * PyTorch forms cost more in per-operator overhead than in arithmetic.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "matrixinfer.h"
#include "simd.h"

/* out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), float32 rows of length n. */
void mi_rmsnorm(const float *x, const float *weight, int64_t rows, int64_t n, float eps, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (rows * n >= 65536)
    for (int64_t t = 0; t < rows; t++) rms_row(x + t * n, weight, n, eps, out + t * n);
}

/* Index of the largest value among v[0..n) with mask[i] != 0 (first one on ties), -1 if none. */
static int64_t argmax_masked(const float *v, const unsigned char *mask, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (mask[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* DeepSeek-V3 router after the gate matmul (topk_method noaux_tc, sigmoid scores):
 * selection scores = sigmoid(logits) + bias; keep the topk_group groups with the largest sum of
 * their two best selection scores; pick top_k experts among them; weights are the unbiased
 * sigmoid scores, renormalised when norm is set, times scaling. ids [T, top_k], weights [T, top_k].
 * Scratch: 2 * n_experts floats + n_experts + n_group bytes per token, on the stack (n_experts <= 1024).
 */
int mi_v3_route(const float *logits, const float *bias, int64_t rows, int64_t n_experts, int64_t n_group,
                int64_t topk_group, int64_t top_k, int norm, float scaling, int64_t *ids, float *weights,
                int nthreads) {
    if (n_experts > 1024 || n_group < 1 || n_experts % n_group != 0 || top_k > n_experts ||
        topk_group > n_group || top_k > topk_group * (n_experts / n_group))
        return -1;
    int64_t per_group = n_experts / n_group;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (rows >= 256)
    for (int64_t t = 0; t < rows; t++) {
        float score[1024], choice[1024], gscore[1024];
        unsigned char allowed[1024], gkeep[1024];
        const float *lt = logits + t * n_experts;
        for (int64_t e = 0; e < n_experts; e++) {
            score[e] = 1.0f / (1.0f + expf(-lt[e]));
            choice[e] = score[e] + bias[e];
        }
        if (n_group > 1) {
            for (int64_t g = 0; g < n_group; g++) {
                const float *c = choice + g * per_group;
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t i = 0; i < per_group; i++) {
                    if (c[i] > b1) {
                        b2 = b1;
                        b1 = c[i];
                    } else if (c[i] > b2) {
                        b2 = c[i];
                    }
                }
                gscore[g] = per_group > 1 ? b1 + b2 : b1;
                gkeep[g] = 1;
            }
            unsigned char chosen[1024];
            memset(chosen, 0, (size_t)n_group);
            for (int64_t k = 0; k < topk_group; k++) {
                int64_t g = argmax_masked(gscore, gkeep, n_group);
                chosen[g] = 1;
                gkeep[g] = 0;
            }
            for (int64_t e = 0; e < n_experts; e++) allowed[e] = chosen[e / per_group];
        } else {
            memset(allowed, 1, (size_t)n_experts);
        }
        float sum = 0.0f;
        for (int64_t k = 0; k < top_k; k++) {
            int64_t e = argmax_masked(choice, allowed, n_experts);
            allowed[e] = 0;
            ids[t * top_k + k] = e;
            weights[t * top_k + k] = score[e];
            sum += score[e];
        }
        float f = norm ? scaling / (sum + 1e-20f) : scaling;
        for (int64_t k = 0; k < top_k; k++) weights[t * top_k + k] *= f;
    }
    return 0;
}

/* out[r] = the index of the first largest value of row r of x [rows, n] (greedy sampling). */
void mi_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float best = -INFINITY;
#pragma omp simd reduction(max : best)
        for (int64_t i = 0; i < n; i++) best = xr[i] > best ? xr[i] : best;
        int64_t idx = 0;
        while (idx < n - 1 && !(xr[idx] == best)) idx++;
        out[r] = idx;
    }
}
