/* One whole decoder layer of a decode step in a single call, for CPUs: the per-operator
 * dispatch of the PyTorch path costs about as much as the arithmetic at decode batch sizes.
 *
 * x [T, hidden] is the residual stream, updated in place:
 *   x += o_proj(MLA(rmsnorm(x)))      (absorbed MLA over the paged latent cache)
 *   x += MLP(rmsnorm(x))              (a dense SwiGLU MLP, or DeepSeek-V3 routed + shared experts)
 * It composes the kernels of the other files; every buffer it needs is its own.
 */
#include <stdlib.h>
#include <string.h>

#include "simd.h"

typedef struct {
    int64_t hidden, heads, q_lora, nope, rope, v_dim, rank;
    float eps, scale;
    int interleaved;
    const float *in_norm, *q_a, *q_a_norm, *q_b, *kv_a, *kv_a_norm, *kv_b, *o_proj, *post_norm;
    /* Dense MLP, or the shared experts of a MoE layer (mlp_inter 0: none). */
    const float *mlp_gate, *mlp_up, *mlp_down;
    int64_t mlp_inter;
    /* MoE (n_experts 0: a dense layer). */
    const float *router, *router_bias, *experts_gate_up, *experts_down;
    int64_t n_experts, n_group, topk_group, top_k, moe_inter;
    int norm_topk;
    float scaling;
    float *cache; /* this layer's [num_slots, rank + rope] */
} MiLayer;

typedef struct {
    const float *cos, *sin;
    const int64_t *slots;
    const int32_t *block_tables, *tok_seq, *tok_nkeys;
    int64_t bt_stride, block_size;
} MiStep;

void mi_linear(const float *x, const float *w, int64_t m, int64_t k, int64_t n, float *y, int nthreads);
void mi_rmsnorm(const float *x, const float *weight, int64_t rows, int64_t n, float eps, float *out, int nthreads);
void mi_mla_kv_prolog(const float *kv, const float *norm_w, float eps, const float *cos, const float *sin,
                      const int64_t *slots, int64_t num_tokens, int64_t rank, int64_t rope, int interleaved,
                      float *cache, int nthreads);
void mi_mla_q_prolog(const float *q, const float *w_kv_b, const float *cos, const float *sin, int64_t num_tokens,
                     int64_t heads, int64_t nope, int64_t rope, int64_t v_dim, int64_t rank, int interleaved,
                     float *out, int nthreads);
void mi_paged_mla(const float *q, const float *cache, const int32_t *block_tables, int64_t bt_stride,
                  const int32_t *tok_seq, const int32_t *tok_nkeys, int64_t num_tokens, int64_t heads,
                  int64_t dim, int64_t rank, int64_t block_size, float scale, const float *w_kv_b, int64_t nope,
                  int64_t v_dim, float *out, int nthreads);
int mi_v3_route(const float *logits, const float *bias, int64_t rows, int64_t n_experts, int64_t n_group,
                int64_t topk_group, int64_t top_k, int norm, float scaling, int64_t *ids, float *weights,
                int nthreads);
void mi_moe_experts(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids, const float *weights,
                    int64_t top_k, const float *gate_up, const float *down, int64_t num_experts, int64_t inter,
                    float *out, int nthreads);

/* out = down(silu(gate(h)) * up(h)); scratch holds 2 * T * inter floats. */
static void swiglu_mlp(const float *h, int64_t t, int64_t hidden, const float *gate, const float *up,
                       const float *down, int64_t inter, float *scratch, float *out, int nthreads) {
    float *g = scratch, *u = scratch + t * inter;
    mi_linear(h, gate, t, hidden, inter, g, nthreads);
    mi_linear(h, up, t, hidden, inter, u, nthreads);
#pragma omp simd
    for (int64_t i = 0; i < t * inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    mi_linear(g, down, t, inter, hidden, out, nthreads);
}

int mi_decoder_layer(const MiLayer *L, const MiStep *S, float *x, int64_t t, int nthreads) {
    int64_t hd = L->hidden, qk = L->nope + L->rope, lat = L->rank + L->rope;
    int64_t inter_max = L->mlp_inter > L->moe_inter ? L->mlp_inter : L->moe_inter;
    float *h = malloc(sizeof(float) * t * hd);
    float *qa = malloc(sizeof(float) * t * L->q_lora);
    float *q = malloc(sizeof(float) * t * L->heads * qk);
    float *kv = malloc(sizeof(float) * t * lat);
    float *qf = malloc(sizeof(float) * t * L->heads * lat);
    float *o = malloc(sizeof(float) * t * L->heads * L->v_dim);
    float *a = malloc(sizeof(float) * t * hd);
    float *m = malloc(sizeof(float) * t * hd);
    float *scratch = malloc(sizeof(float) * (2 * t * (inter_max > 0 ? inter_max : 1) + t * (L->n_experts + 1)));
    int64_t *ids = malloc(sizeof(int64_t) * t * (L->top_k > 0 ? L->top_k : 1));
    float *w = malloc(sizeof(float) * t * (L->top_k > 0 ? L->top_k : 1));
    int rc = 0;
    if (!h || !qa || !q || !kv || !qf || !o || !a || !m || !scratch || !ids || !w) {
        rc = -2;
        goto done;
    }
    /* Attention. */
    mi_rmsnorm(x, L->in_norm, t, hd, L->eps, h, nthreads);
    mi_linear(h, L->q_a, t, hd, L->q_lora, qa, nthreads);
    mi_rmsnorm(qa, L->q_a_norm, t, L->q_lora, L->eps, qa, nthreads);
    mi_linear(qa, L->q_b, t, L->q_lora, L->heads * qk, q, nthreads);
    mi_linear(h, L->kv_a, t, hd, lat, kv, nthreads);
    mi_mla_kv_prolog(kv, L->kv_a_norm, L->eps, S->cos, S->sin, S->slots, t, L->rank, L->rope, L->interleaved,
                     L->cache, nthreads);
    mi_mla_q_prolog(q, L->kv_b, S->cos, S->sin, t, L->heads, L->nope, L->rope, L->v_dim, L->rank, L->interleaved,
                    qf, nthreads);
    mi_paged_mla(qf, L->cache, S->block_tables, S->bt_stride, S->tok_seq, S->tok_nkeys, t, L->heads, lat, L->rank,
                 S->block_size, L->scale, L->kv_b, L->nope, L->v_dim, o, nthreads);
    mi_linear(o, L->o_proj, t, L->heads * L->v_dim, hd, a, nthreads);
    for (int64_t i = 0; i < t * hd; i++) x[i] += a[i];
    /* MLP or MoE. */
    mi_rmsnorm(x, L->post_norm, t, hd, L->eps, h, nthreads);
    if (L->n_experts > 0) {
        float *logits = scratch + 2 * t * (inter_max > 0 ? inter_max : 1);
        mi_linear(h, L->router, t, hd, L->n_experts, logits, nthreads);
        rc = mi_v3_route(logits, L->router_bias, t, L->n_experts, L->n_group, L->topk_group, L->top_k, L->norm_topk,
                         L->scaling, ids, w, nthreads);
        if (rc != 0) goto done;
        mi_moe_experts(h, t, hd, ids, w, L->top_k, L->experts_gate_up, L->experts_down, L->n_experts, L->moe_inter,
                       m, nthreads);
        if (L->mlp_inter > 0) { /* shared experts, summed before the residual as the PyTorch path does */
            swiglu_mlp(h, t, hd, L->mlp_gate, L->mlp_up, L->mlp_down, L->mlp_inter, scratch, a, nthreads);
            for (int64_t i = 0; i < t * hd; i++) m[i] += a[i];
        }
    } else {
        swiglu_mlp(h, t, hd, L->mlp_gate, L->mlp_up, L->mlp_down, L->mlp_inter, scratch, m, nthreads);
    }
    for (int64_t i = 0; i < t * hd; i++) x[i] += m[i];
done:
    free(h);
    free(qa);
    free(q);
    free(kv);
    free(qf);
    free(o);
    free(a);
    free(m);
    free(scratch);
    free(ids);
    free(w);
    return rc;
}
