/* The native CPU kernels' interface: every function and struct the library exports.
 *
 * The one source of the bindings: every .c file includes it (so the compiler checks each
 * definition against its declaration, and -Werror=missing-prototypes rejects an exported function
 * missing here), and matrixinfer/native_build.py parses it into the ctypes signatures and
 * Structure classes Python calls with. Keep to plain declarations: scalar types, <stdint.h> types
 * and pointers (see native_build.parse_header).
 *
 * Tensors are row-major float32 unless stated; nthreads is the OpenMP thread count (<= 0: one).
 */
#ifndef MATRIXINFER_H
#define MATRIXINFER_H

#include <stdint.h>

/* One decoder layer's dimensions and weights for mi_decoder_layer (nn.Linear layouts [out, in]). */
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
    /* INT8 copies of the projections (W8A8 as mi_linear_w8a8: int8 [out, in] with one scale per
     * output row; experts as mi_moe_experts_w8a8), each NULL or read instead of its float32 weight.
     * kv_b (inside the absorbed attention), the norms and the router stay float32. */
    const int8_t *q_a_q, *q_b_q, *kv_a_q, *o_proj_q, *mlp_gate_q, *mlp_up_q, *mlp_down_q;
    const int8_t *experts_gate_up_q, *experts_down_q;
    const float *q_a_s, *q_b_s, *kv_a_s, *o_proj_s, *mlp_gate_s, *mlp_up_s, *mlp_down_s;
    const float *experts_gate_up_s, *experts_down_s;
} MiLayer;

/* The per-step attention metadata every layer of a step shares. */
typedef struct {
    const float *cos, *sin;
    const int64_t *slots;
    const int32_t *block_tables, *tok_seq, *tok_nkeys;
    int64_t bt_stride, block_size;
} MiStep;

/* x [t, hidden] += attention, then += MLP or MoE, in place (layer.c), each projection from its
 * INT8 copy where L has one. Returns 0, -1 for an unsupported routing shape, -2 when out of memory. */
int mi_decoder_layer(const MiLayer *L, const MiStep *S, float *x, int64_t t, int nthreads);

/* Greedy draft steps of a DeepSeek-V3 MTP module (depth >= 1 of them) over t rows, in a single call
 * (layer.c): x = eh_proj [enorm(embed[next_ids[i]]) ; hnorm(prev[i])], x += the MTP block L (a
 * decoder layer over the paged cache, with S: every row's latent is cached, only the n_rows rows
 * rows[j] that draft run the rest of the layer), out[j] = norm(x[rows[j]]); then
 * tokens[j] = the argmax of head [vocab, hidden] applied to out[j], or with
 * head_q (not NULL) of its INT8 copy head_q [vocab, hidden] with per-row scales head_scale [vocab]
 * (W8A8, as mi_linear_w8a8); likewise eh_proj from eh_proj_q / eh_proj_s where not NULL, and the
 * block from its INT8 copies where L has them. Each further depth d (1..depth-1) drafts again from
 * row j's token and state of the depth before, one position on, with deeper's metadata rows
 * (d - 1) * n_rows + j (its block_tables those of S); out [depth, n_rows, hidden] and tokens
 * [depth, n_rows] hold every depth's. All norms use L->eps. Returns as mi_decoder_layer (-1 too
 * where depth > 1 and deeper is NULL). */
int mi_mtp_draft(const MiLayer *L, const MiStep *S, const MiStep *deeper, int64_t depth, const int64_t *next_ids,
                 const float *prev, int64_t t, const float *embed, const float *enorm, const float *hnorm,
                 const float *eh_proj, const int8_t *eh_proj_q, const float *eh_proj_s, const float *norm,
                 const float *head, const int8_t *head_q, const float *head_scale, int64_t vocab, const int64_t *rows,
                 int64_t n_rows, float *out, int64_t *tokens, int nthreads);

/* A decode-sized step of the main model in a single call (layer.c), with the kernels, in the order,
 * of the per-operator path: hidden [t, hidden] = embed [vocab, hidden] rows ids[i], each of the
 * n_layers layers (as mi_decoder_layer, all with S), the final RMSNorm (norm, eps) in place; then
 * logits [n_rows, vocab] = head [vocab, hidden] applied to hidden's rows rows[j]. Returns as
 * mi_decoder_layer (-1 too for no layers). */
int mi_model_step(const MiLayer *layers, int64_t n_layers, const MiStep *S, const int64_t *ids, int64_t t,
                  const float *embed, const float *norm, float eps, const float *head, int64_t vocab,
                  const int64_t *rows, int64_t n_rows, float *hidden, float *logits, int nthreads);

/* An MTP module's weights besides its block, as mi_mtp_draft takes them (eh_proj_q/eh_proj_s and
 * head_q/head_scale: the INT8 copies, each pair NULL or read instead of the float32 weight). */
typedef struct {
    const float *embed, *enorm, *hnorm, *eh_proj, *eh_proj_s, *norm, *head, *head_scale;
    const int8_t *eh_proj_q, *head_q;
    int64_t vocab;
} MiMtp;

/* A step of greedy MTP speculative decoding in a single call (layer.c).
 * Verification: mi_model_step over the t rows of S and ids (each id below vocab, else -3), all rows
 * sampled, where sequence s (s < n_seqs) owns rows first[s] .. first[s] + n[s] - 1 at positions
 * pos[s] ...: its last verified token, then its n[s] - 1 drafts; hidden [t, hidden] as
 * mi_model_step leaves it, target[r] = the argmax of row r's logits (as mi_argmax_rows), and
 * accepted[s] = the drafts accepted: the longest run of them each equal to the target of the row
 * before it.
 * Then, where depth > 0, the next step's drafts as mi_mtp_draft computes them (block mtp_block,
 * weights w): the catch-up rows first[s] .. first[s] + accepted[s] (each row's next token is its
 * target), every sequence drafting from its last one, depth times where each sequence's next
 * depth - 1 positions lie in the blocks it keeps once its rejected positions are rolled back (the
 * first ceil((pos[s] + accepted[s] + 1) / block_size) of its table; their rotary rows from
 * cos_table and sin_table [table_len, rope / 2]), else once: out [depth_done, n_seqs, hidden] and
 * tokens [depth_done, n_seqs], *depth_done the depths drafted (0 where depth is 0). Returns as
 * mi_mtp_draft, or -3 for a token id or a position outside the tables. */
int mi_spec_step(const MiLayer *layers, int64_t n_layers, const MiStep *S, const int64_t *ids, int64_t t,
                 const float *embed, const float *norm, float eps, const float *head, int64_t vocab, int64_t n_seqs,
                 const int64_t *first, const int64_t *n, const int64_t *pos, const MiLayer *mtp_block,
                 const MiMtp *w, int64_t depth, const float *cos_table, const float *sin_table, int64_t table_len,
                 float *hidden, int64_t *target, int64_t *accepted, float *out, int64_t *tokens, int64_t *depth_done,
                 int nthreads);

/* y [m, n] = x [m, k] w^T for w [n, k] (linear.c). */
void mi_linear(const float *x, const float *w, int64_t m, int64_t k, int64_t n, float *y, int nthreads);

/* out = weight * x / sqrt(mean(x^2) + eps) per row of n (small_ops.c). */
void mi_rmsnorm(const float *x, const float *weight, int64_t rows, int64_t n, float eps, float *out, int nthreads);

/* DeepSeek-V3 routing from logits [rows, n_experts]: ids and weights [rows, top_k]. Returns 0, or
 * -1 for an unsupported shape (small_ops.c). */
int mi_v3_route(const float *logits, const float *bias, int64_t rows, int64_t n_experts, int64_t n_group,
                int64_t topk_group, int64_t top_k, int norm, float scaling, int64_t *ids, float *weights,
                int nthreads);

/* out[r] = index of the first largest value of row r of x [rows, n] (small_ops.c). */
void mi_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out);

/* The routed experts of one MoE layer (moe.c): gate_up [E, 2I, H], down [E, H, I], out [T, H].
 * Returns 0, or -2 when out of memory. */
int mi_moe_experts(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids, const float *weights,
                   int64_t top_k, const float *gate_up, const float *down, int64_t num_experts, int64_t inter,
                   float *out, int nthreads);

/* INT8 (W8A8, linear_w8a8.c): q [m, k] int8 and scale [m] of x [m, k], quantized per row after
 * multiplying by mul [k] (NULL: by nothing): q = round_half_even(v * 127 / amax), scale = amax / 127. */
void mi_quantize_rows(const float *x, int64_t m, int64_t k, const float *mul, int8_t *q, float *scale);

/* y [m, n] = (q_x q_w^T) * scale_x * w_scale (+ bias) for x [m, k] float32 quantized per row on entry
 * (after multiplying by pre_scale [k], if not NULL), w [n, k] int8, w_scale [n], bias [n] or NULL
 * (linear_w8a8.c). Returns 0, or -2 when out of memory. */
int mi_linear_w8a8(const float *x, int64_t m, int64_t k, const float *pre_scale, const int8_t *w,
                   const float *w_scale, const float *bias, int64_t n, float *y, int nthreads);

/* The routed experts of one MoE layer with INT8 weights and activations (moe_w8a8.c): gate_up [E, 2I, H]
 * and down [E, H, I] int8, per-channel scales [E, 2I] and [E, H], optional (NULL) biases [E, 2I] /
 * [E, H] and smoothing vectors [E, H] / [E, I]; out [T, H]. Returns 0, or -2 when out of memory. */
int mi_moe_experts_w8a8(const float *x, int64_t num_tokens, int64_t hidden, const int64_t *ids,
                        const float *weights, int64_t top_k, const int8_t *gate_up, const float *gate_up_scale,
                        const float *gate_up_bias, const float *gate_up_pre, const int8_t *down,
                        const float *down_scale, const float *down_bias, const float *down_pre,
                        int64_t num_experts, int64_t inter, float *out, int nthreads);

/* Latent-space attention read straight from a paged cache (paged_mla.c). */
void mi_paged_mla(const float *q, const float *cache, const int32_t *block_tables, int64_t bt_stride,
                  const int32_t *tok_seq, const int32_t *tok_nkeys, int64_t num_tokens, int64_t heads,
                  int64_t dim, int64_t rank, int64_t block_size, float scale, const float *w_kv_b, int64_t nope,
                  int64_t v_dim, float *out, int nthreads);

/* The absorbed MLA query prolog: out [T, heads, rank + rope] (paged_mla.c). */
void mi_mla_q_prolog(const float *q, const float *w_kv_b, const float *cos, const float *sin, int64_t num_tokens,
                     int64_t heads, int64_t nope, int64_t rope, int64_t v_dim, int64_t rank, int interleaved,
                     float *out, int nthreads);

/* The MLA KV prolog: each token's latent written into cache slot slots[t] (paged_mla.c). */
void mi_mla_kv_prolog(const float *kv, const float *norm_w, float eps, const float *cos, const float *sin,
                      const int64_t *slots, int64_t num_tokens, int64_t rank, int64_t rope, int interleaved,
                      float *cache, int nthreads);

/* Pins the calling thread's OpenMP team of nthreads threads to CPUs, thread i to cpus[i % ncpus]
 * (affinity.c; Linux). Returns 0, or -1 where a thread could not be pinned. */
int mi_bind_team(const int64_t *cpus, int64_t ncpus, int nthreads);

#endif
