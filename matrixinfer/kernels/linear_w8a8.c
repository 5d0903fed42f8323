/* y = x W^T with INT8 weights and activations (W8A8) for the few rows of a decode step, for CPUs.
 *
 * x [M, K] float32 is quantized per row on entry (dynamic per-token scales, optionally multiplied
 * by a smoothing vector first), once, into per-thread scratch (w8a8.h: no allocation per call);
 * W [N, K] int8 with one scale per output row; the int8 products accumulate exactly in int32 and
 * are scaled back to float32: y = acc * s_x * s_w (+ bias). Reading a quarter of float32's weight
 * bytes is what makes this faster where weights stream from memory; where they sit in cache, the
 * int16 multiply-add (16 per instruction against float FMA's 8) is. Each thread owns an equal
 * share of W's rows (in groups of eight) and reads each group once for all of x's rows; a team
 * starts only where each thread's share is worth more than starting it (W8_THREAD_MACS).
 */
#include <stdlib.h>

#include "matrixinfer.h"
#include "simd.h"
#include "w8a8.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* A team starts only where each thread gets at least this many multiply-adds (about 3.5 us of one
 * thread's work with the tiles here). On the 2-core EPYC here, quiet, a team pays off from about 180k
 * multiply-adds a call (raw calls, warm, fastest of 40 batches: between 164k and 196k); the bar is set
 * higher, at the float kernel's 2^18 a call, because on a machine with more runnable threads than
 * cores a team can cost a scheduler slice (4 ms) where one thread costs 7 us: between 196k and 262k
 * multiply-adds one thread is up to 15% slower than a quiet team, and still 1.4x the float kernel. */
#define W8_THREAD_MACS (1 << 17)
#define W8_SPLIT_COLS 256
#define W8_SPLIT_ELEMS 4096

void mi_quantize_rows(const float *x, int64_t m, int64_t k, const float *mul, int8_t *q, float *scale) {
    for (int64_t r = 0; r < m; r++) scale[r] = quantize_row_i8(x + r * k, mul, k, q + r * k);
}

/* How many threads (at most nthreads) share W's groups of eight rows: each at least W8_THREAD_MACS
 * and one group. */
static inline int team_size(int64_t m, int64_t k, int64_t n, int nthreads) {
    int64_t macs = m * k * n, groups = (n + 7) / 8;
    int64_t nt = macs / W8_THREAD_MACS;
    if (nt > nthreads) nt = nthreads;
    if (nt > groups) nt = groups;
    return nt > 1 ? (int)nt : 1;
}

int mi_linear_w8a8(const float *x, int64_t m, int64_t k, const float *pre_scale, const int8_t *w,
                   const float *w_scale, const float *bias, int64_t n, float *y, int nthreads) {
    if (m <= 0 || n <= 0) return 0;
    size_t xq_bytes = (sizeof(int16_t) * (size_t)(m * k) + 63) & ~(size_t)63;
    size_t bytes = xq_bytes + sizeof(float) * (size_t)m;
    char *buf = w8_arena(0, bytes);
    if (!buf) return -2;
    int16_t *xq = (int16_t *)buf;
    float *xs = (float *)(buf + xq_bytes);
#ifdef _OPENMP
    int nt = team_size(m, k, n, nthreads);
#else
    int nt = 1;
    (void)nthreads;
#endif
    /* Where each thread has many output columns, quantizing is a small share of a call (a row element
     * costs about 20 multiply-adds' time) and the calling thread does it before the team starts: the
     * call then synchronises once; so it does for fewer than W8_SPLIT_ELEMS row elements (1-2 us of
     * quantizing). Otherwise (below W8_SPLIT_COLS columns a thread, the demo model's matrices at 16
     * rows and more) the team quantizes a block of rows each and meets at a barrier: 10-15% faster. Each
     * synchronisation is a point where one descheduled thread stalls the call: on a machine with more
     * runnable threads than cores, a scheduler slice (4 ms here). */
    int split = nt > 1 && n / nt < W8_SPLIT_COLS && m * k >= W8_SPLIT_ELEMS;
    if (!split)
        for (int64_t r = 0; r < m; r++) xs[r] = quantize_row_i16(x + r * k, pre_scale, k, xq + r * k);
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), tn = omp_get_num_threads();
            if (split) {
                int64_t rper = (m + tn - 1) / tn, r1 = (t + 1) * rper < m ? (t + 1) * rper : m;
                for (int64_t r = t * rper; r < r1; r++)
                    xs[r] = quantize_row_i16(x + r * k, pre_scale, k, xq + r * k);
#pragma omp barrier
            }
            int64_t groups = (n + 7) / 8, per = (groups + tn - 1) / tn;
            int64_t j0 = t * per * 8, j1 = (t + 1) * per * 8 < n ? (t + 1) * per * 8 : n;
            if (j0 < j1) w8_block(xq, xs, m, w, w_scale, bias, k, j0, j1, y, n);
        }
    } else
#endif
        w8_block(xq, xs, m, w, w_scale, bias, k, 0, n, y, n);
    w8_release(buf, bytes);
    return 0;
}
