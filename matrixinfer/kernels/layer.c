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

#include "matrixinfer.h"
#include "simd.h"

/* y [m, n] = x [m, k] w^T from the INT8 copy wq (per-row scales ws) where the layer has one, else
 * from the float32 weight w. Returns 0, or -2 when out of memory. */
static int lin(const float *x, const float *w, const int8_t *wq, const float *ws, int64_t m, int64_t k, int64_t n,
               float *y, int nthreads) {
    if (wq) return mi_linear_w8a8(x, m, k, NULL, wq, ws, NULL, n, y, nthreads);
    mi_linear(x, w, m, k, n, y, nthreads);
    return 0;
}

/* out = down(silu(gate(h)) * up(h)) with L's dense MLP (or shared experts); scratch holds 2 * T *
 * inter floats. Returns as lin. */
static int swiglu_mlp(const MiLayer *L, const float *h, int64_t t, float *scratch, float *out, int nthreads) {
    int64_t hidden = L->hidden, inter = L->mlp_inter;
    float *g = scratch, *u = scratch + t * inter;
    int rc = lin(h, L->mlp_gate, L->mlp_gate_q, L->mlp_gate_s, t, hidden, inter, g, nthreads);
    if (rc == 0) rc = lin(h, L->mlp_up, L->mlp_up_q, L->mlp_up_s, t, hidden, inter, u, nthreads);
    if (rc != 0) return rc;
    /* silu(gate) * up, into u */
    for (int64_t r = 0; r < t; r++) swiglu_row(u + r * inter, g + r * inter, inter);
    return lin(u, L->mlp_down, L->mlp_down_q, L->mlp_down_s, t, inter, hidden, out, nthreads);
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
    if ((rc = lin(h, L->q_a, L->q_a_q, L->q_a_s, t, hd, L->q_lora, qa, nthreads)) != 0) goto done;
    mi_rmsnorm(qa, L->q_a_norm, t, L->q_lora, L->eps, qa, nthreads);
    if ((rc = lin(qa, L->q_b, L->q_b_q, L->q_b_s, t, L->q_lora, L->heads * qk, q, nthreads)) != 0) goto done;
    if ((rc = lin(h, L->kv_a, L->kv_a_q, L->kv_a_s, t, hd, lat, kv, nthreads)) != 0) goto done;
    mi_mla_kv_prolog(kv, L->kv_a_norm, L->eps, S->cos, S->sin, S->slots, t, L->rank, L->rope, L->interleaved,
                     L->cache, nthreads);
    mi_mla_q_prolog(q, L->kv_b, S->cos, S->sin, t, L->heads, L->nope, L->rope, L->v_dim, L->rank, L->interleaved,
                    qf, nthreads);
    mi_paged_mla(qf, L->cache, S->block_tables, S->bt_stride, S->tok_seq, S->tok_nkeys, t, L->heads, lat, L->rank,
                 S->block_size, L->scale, L->kv_b, L->nope, L->v_dim, o, nthreads);
    if ((rc = lin(o, L->o_proj, L->o_proj_q, L->o_proj_s, t, L->heads * L->v_dim, hd, a, nthreads)) != 0) goto done;
    for (int64_t i = 0; i < t * hd; i++) x[i] += a[i];
    /* MLP or MoE. */
    mi_rmsnorm(x, L->post_norm, t, hd, L->eps, h, nthreads);
    if (L->n_experts > 0) {
        float *logits = scratch + 2 * t * (inter_max > 0 ? inter_max : 1);
        mi_linear(h, L->router, t, hd, L->n_experts, logits, nthreads);
        rc = mi_v3_route(logits, L->router_bias, t, L->n_experts, L->n_group, L->topk_group, L->top_k, L->norm_topk,
                         L->scaling, ids, w, nthreads);
        if (rc != 0) goto done;
        if (L->experts_gate_up_q && L->experts_down_q)
            rc = mi_moe_experts_w8a8(h, t, hd, ids, w, L->top_k, L->experts_gate_up_q, L->experts_gate_up_s, NULL,
                                     NULL, L->experts_down_q, L->experts_down_s, NULL, NULL, L->n_experts,
                                     L->moe_inter, m, nthreads);
        else
            rc = mi_moe_experts(h, t, hd, ids, w, L->top_k, L->experts_gate_up, L->experts_down, L->n_experts,
                                L->moe_inter, m, nthreads);
        if (rc != 0) goto done;
        if (L->mlp_inter > 0) { /* shared experts, summed before the residual as the PyTorch path does */
            if ((rc = swiglu_mlp(L, h, t, scratch, a, nthreads)) != 0) goto done;
            for (int64_t i = 0; i < t * hd; i++) m[i] += a[i];
        }
    } else {
        if ((rc = swiglu_mlp(L, h, t, scratch, m, nthreads)) != 0) goto done;
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

/* The MTP block over t rows of which only rows[0..n_rows) go on: every row's latent is written
 * into the cache (the KV prolog), and only the kept rows run the rest of the layer (queries,
 * attention, o_proj, MoE), gathered into xs [n_rows, hidden] with their step metadata. A catch-up
 * row before a sequence's last exists only to give later positions its key: its attention output
 * and MoE would be discarded (at batch 1 with an accepted draft, half the block's work). */
static int mtp_block_rows(const MiLayer *L, const MiStep *S, const float *x, int64_t t, const int64_t *rows,
                          int64_t n_rows, float *xs, int nthreads) {
    int64_t hd = L->hidden, lat = L->rank + L->rope, half = L->rope / 2;
    float *h = malloc(sizeof(float) * t * hd), *kv = malloc(sizeof(float) * t * lat);
    float *cs = malloc(sizeof(float) * n_rows * half * 2);
    int64_t *slots = malloc(sizeof(int64_t) * n_rows);
    int32_t *tok = malloc(sizeof(int32_t) * n_rows * 2);
    int rc = 0;
    if (!h || !kv || !cs || !slots || !tok) {
        rc = -2;
        goto done;
    }
    if (n_rows < t) { /* the dropped rows' latents (the kept ones are written again, identically, below) */
        mi_rmsnorm(x, L->in_norm, t, hd, L->eps, h, nthreads);
        if ((rc = lin(h, L->kv_a, L->kv_a_q, L->kv_a_s, t, hd, lat, kv, nthreads)) != 0) goto done;
        mi_mla_kv_prolog(kv, L->kv_a_norm, L->eps, S->cos, S->sin, S->slots, t, L->rank, L->rope, L->interleaved,
                         L->cache, nthreads);
    }
    for (int64_t j = 0; j < n_rows; j++) {
        int64_t r = rows[j];
        memcpy(xs + j * hd, x + r * hd, sizeof(float) * hd);
        memcpy(cs + j * half, S->cos + r * half, sizeof(float) * half);
        memcpy(cs + (n_rows + j) * half, S->sin + r * half, sizeof(float) * half);
        slots[j] = S->slots[r];
        tok[j] = S->tok_seq[r];
        tok[n_rows + j] = S->tok_nkeys[r];
    }
    MiStep sub = *S;
    sub.cos = cs;
    sub.sin = cs + n_rows * half;
    sub.slots = slots;
    sub.tok_seq = tok;
    sub.tok_nkeys = tok + n_rows;
    rc = mi_decoder_layer(L, &sub, xs, n_rows, nthreads);
done:
    free(h);
    free(kv);
    free(cs);
    free(slots);
    free(tok);
    return rc;
}

int mi_mtp_draft(const MiLayer *L, const MiStep *S, const MiStep *deeper, int64_t depth, const int64_t *next_ids,
                 const float *prev, int64_t t, const float *embed, const float *enorm, const float *hnorm,
                 const float *eh_proj, const int8_t *eh_proj_q, const float *eh_proj_s, const float *norm,
                 const float *head, const int8_t *head_q, const float *head_scale, int64_t vocab, const int64_t *rows,
                 int64_t n_rows, float *out, int64_t *tokens, int nthreads) {
    int64_t hd = L->hidden, half = L->rope / 2, tmax = t > n_rows ? t : n_rows;
    float *cat = malloc(sizeof(float) * (tmax > 0 ? tmax : 1) * 2 * hd);
    float *x = malloc(sizeof(float) * (tmax > 0 ? tmax : 1) * hd);
    float *logits = malloc(sizeof(float) * (n_rows > 0 ? n_rows : 1) * vocab);
    int rc = 0;
    if (!cat || !x || !logits) {
        rc = -2;
        goto done;
    }
    if (depth > 1 && !deeper) {
        rc = -1;
        goto done;
    }
    for (int64_t d = 0; d < depth; d++) {
        /* depth 0: the t rows given; deeper: each drafting row's previous token and state, one
         * position on (deeper's rows [(d - 1) n_rows, d n_rows)) */
        const int64_t *ids = d == 0 ? next_ids : tokens + (d - 1) * n_rows;
        const float *pv = d == 0 ? prev : out + (d - 1) * n_rows * hd;
        int64_t td = d == 0 ? t : n_rows;
        float *od = out + d * n_rows * hd;
        for (int64_t i = 0; i < td; i++) { /* [enorm(embed(next token)) ; hnorm(previous hidden state)] */
            rms_row(embed + ids[i] * hd, enorm, hd, L->eps, cat + i * 2 * hd);
            rms_row(pv + i * hd, hnorm, hd, L->eps, cat + i * 2 * hd + hd);
        }
        if ((rc = lin(cat, eh_proj, eh_proj_q, eh_proj_s, td, 2 * hd, hd, x, nthreads)) != 0) goto done;
        if (n_rows == 0) goto done;
        if (d == 0) {
            rc = mtp_block_rows(L, S, x, t, rows, n_rows, od, nthreads);
        } else {
            MiStep sub = *deeper;
            int64_t r0 = (d - 1) * n_rows;
            sub.cos = deeper->cos + r0 * half;
            sub.sin = deeper->sin + r0 * half;
            sub.slots = deeper->slots + r0;
            sub.tok_seq = deeper->tok_seq + r0;
            sub.tok_nkeys = deeper->tok_nkeys + r0;
            memcpy(od, x, sizeof(float) * n_rows * hd);
            rc = mi_decoder_layer(L, &sub, od, n_rows, nthreads);
        }
        if (rc != 0) goto done;
        mi_rmsnorm(od, norm, n_rows, hd, L->eps, od, nthreads); /* row by row: in place is safe */
        if (head_q) { /* the INT8 copy of the head: a quarter of the bytes, drafts only */
            rc = mi_linear_w8a8(od, n_rows, hd, NULL, head_q, head_scale, NULL, vocab, logits, nthreads);
            if (rc != 0) goto done;
        } else {
            mi_linear(od, head, n_rows, hd, vocab, logits, nthreads);
        }
        mi_argmax_rows(logits, n_rows, vocab, tokens + d * n_rows);
    }
done:
    free(cat);
    free(x);
    free(logits);
    return rc;
}

int mi_model_step(const MiLayer *layers, int64_t n_layers, const MiStep *S, const int64_t *ids, int64_t t,
                  const float *embed, const float *norm, float eps, const float *head, int64_t vocab,
                  const int64_t *rows, int64_t n_rows, float *hidden, float *logits, int nthreads) {
    if (n_layers < 1) return -1;
    int64_t hd = layers[0].hidden;
    for (int64_t i = 0; i < t; i++) memcpy(hidden + i * hd, embed + ids[i] * hd, sizeof(float) * hd);
    for (int64_t l = 0; l < n_layers; l++) {
        int rc = mi_decoder_layer(&layers[l], S, hidden, t, nthreads);
        if (rc != 0) return rc;
    }
    mi_rmsnorm(hidden, norm, t, hd, eps, hidden, nthreads); /* row by row: in place is safe */
    if (n_rows == 0) return 0;
    int contiguous = 1; /* rows r0, r0 + 1, ...: the head reads them where they are */
    for (int64_t j = 1; j < n_rows && contiguous; j++) contiguous = rows[j] == rows[0] + j;
    if (contiguous) {
        mi_linear(hidden + rows[0] * hd, head, n_rows, hd, vocab, logits, nthreads);
        return 0;
    }
    float *sel = malloc(sizeof(float) * n_rows * hd);
    if (!sel) return -2;
    for (int64_t j = 0; j < n_rows; j++) memcpy(sel + j * hd, hidden + rows[j] * hd, sizeof(float) * hd);
    mi_linear(sel, head, n_rows, hd, vocab, logits, nthreads);
    free(sel);
    return 0;
}

/* The catch-up rows of mi_spec_step's draft (each sequence's verified rows, gathered from S) and
 * the metadata of its deeper drafts, in one allocation. */
typedef struct {
    float *prev, *cs, *dcs;
    int64_t *next, *slots, *sel, *dslots;
    int32_t *tok, *dtok;
    void *mem;
} SpecRows;

static int spec_rows_alloc(SpecRows *r, int64_t total, int64_t n_seqs, int64_t deeper_rows, int64_t hd,
                           int64_t half) {
    size_t f = sizeof(float), i64 = sizeof(int64_t), i32 = sizeof(int32_t);
    size_t bytes = f * (total * hd + 2 * total * half + 2 * deeper_rows * half) +
                   i64 * (2 * total + n_seqs + deeper_rows) + i32 * (2 * total + 2 * deeper_rows) + 64;
    char *p = malloc(bytes);
    if (!p) return -2;
    r->mem = p; /* the 8-byte arrays first, so that every array is aligned to its type */
    r->next = (int64_t *)p, p += i64 * total;
    r->slots = (int64_t *)p, p += i64 * total;
    r->sel = (int64_t *)p, p += i64 * n_seqs;
    r->dslots = (int64_t *)p, p += i64 * deeper_rows;
    r->prev = (float *)p, p += f * total * hd;
    r->cs = (float *)p, p += f * 2 * total * half;
    r->dcs = (float *)p, p += f * 2 * deeper_rows * half;
    r->tok = (int32_t *)p, p += i32 * 2 * total;
    r->dtok = (int32_t *)p;
    return 0;
}

int mi_spec_step(const MiLayer *layers, int64_t n_layers, const MiStep *S, const int64_t *ids, int64_t t,
                 const float *embed, const float *norm, float eps, const float *head, int64_t vocab, int64_t n_seqs,
                 const int64_t *first, const int64_t *n, const int64_t *pos, const MiLayer *mtp_block,
                 const MiMtp *w, int64_t depth, const float *cos_table, const float *sin_table, int64_t table_len,
                 float *hidden, int64_t *target, int64_t *accepted, float *out, int64_t *tokens, int64_t *depth_done,
                 int nthreads) {
    *depth_done = 0;
    if (n_layers < 1) return -1;
    for (int64_t i = 0; i < t; i++)
        if (ids[i] < 0 || ids[i] >= vocab) return -3;
    int64_t hd = layers[0].hidden, half = layers[0].rope / 2, bs = S->block_size;
    float *logits = malloc(sizeof(float) * (t > 0 ? t : 1) * vocab);
    int64_t *all = malloc(sizeof(int64_t) * (t > 0 ? t : 1));
    if (!logits || !all) {
        free(logits);
        free(all);
        return -2;
    }
    for (int64_t i = 0; i < t; i++) all[i] = i;
    int rc = mi_model_step(layers, n_layers, S, ids, t, embed, norm, eps, head, vocab, all, t, hidden, logits,
                           nthreads);
    if (rc == 0) mi_argmax_rows(logits, t, vocab, target);
    free(logits);
    free(all);
    if (rc != 0) return rc;
    int64_t total = 0;
    for (int64_t s = 0; s < n_seqs; s++) {
        int64_t a = 0, r = first[s];
        while (a < n[s] - 1 && target[r + a] == ids[r + a + 1]) a++;
        accepted[s] = a;
        total += a + 1;
    }
    if (depth <= 0 || n_seqs == 0) return 0;
    int64_t dd = depth; /* every sequence's deeper positions in the blocks it keeps, or depth 1 */
    for (int64_t s = 0; s < n_seqs && dd > 1; s++) {
        int64_t last = pos[s] + accepted[s], kept = (last + 1 + bs - 1) / bs;
        if ((last + depth - 1) / bs >= kept) dd = 1;
    }
    for (int64_t s = 0; s < n_seqs && dd > 1; s++)
        if (pos[s] + accepted[s] + depth - 1 >= table_len) return -3;
    SpecRows R;
    if (spec_rows_alloc(&R, total, n_seqs, (dd - 1) * n_seqs, hd, half) != 0) return -2;
    for (int64_t s = 0, j = 0; s < n_seqs; s++) {
        for (int64_t k = 0; k <= accepted[s]; k++, j++) {
            int64_t r = first[s] + k;
            memcpy(R.prev + j * hd, hidden + r * hd, sizeof(float) * hd);
            memcpy(R.cs + j * half, S->cos + r * half, sizeof(float) * half);
            memcpy(R.cs + (total + j) * half, S->sin + r * half, sizeof(float) * half);
            R.next[j] = target[r];
            R.slots[j] = S->slots[r];
            R.tok[j] = S->tok_seq[r];
            R.tok[total + j] = S->tok_nkeys[r];
        }
        R.sel[s] = j - 1;
    }
    MiStep cu = *S, dp = *S;
    cu.cos = R.cs;
    cu.sin = R.cs + total * half;
    cu.slots = R.slots;
    cu.tok_seq = R.tok;
    cu.tok_nkeys = R.tok + total;
    int64_t drows = (dd - 1) * n_seqs;
    for (int64_t d = 1; d < dd; d++)
        for (int64_t s = 0; s < n_seqs; s++) {
            int64_t j = (d - 1) * n_seqs + s, p = pos[s] + accepted[s] + d, row = S->tok_seq[first[s]];
            R.dslots[j] = (int64_t)S->block_tables[row * S->bt_stride + p / bs] * bs + p % bs;
            memcpy(R.dcs + j * half, cos_table + p * half, sizeof(float) * half);
            memcpy(R.dcs + (drows + j) * half, sin_table + p * half, sizeof(float) * half);
            R.dtok[j] = (int32_t)row;
            R.dtok[drows + j] = (int32_t)(p + 1);
        }
    dp.cos = R.dcs;
    dp.sin = R.dcs + drows * half;
    dp.slots = R.dslots;
    dp.tok_seq = R.dtok;
    dp.tok_nkeys = R.dtok + drows;
    rc = mi_mtp_draft(mtp_block, &cu, dd > 1 ? &dp : NULL, dd, R.next, R.prev, total, w->embed, w->enorm, w->hnorm,
                      w->eh_proj, w->eh_proj_q, w->eh_proj_s, w->norm, w->head, w->head_q, w->head_scale, w->vocab,
                      R.sel, n_seqs, out, tokens, nthreads);
    free(R.mem);
    if (rc == 0) *depth_done = dd;
    return rc;
}
