/* Pins the calling thread's OpenMP team to CPUs, one each (Linux).
 *
 * An engine thread whose team of threads had gone idle (its workers asleep) often found the woken
 * worker placed on its own core: the first step after idle then waited ~10 ms for a core while the
 * other one sat idle (a 160-token prefill of the demo model: 31-33 ms against 22.5 ms back to back,
 * all of the difference run-queue wait), until the scheduler moved one of them. With each team
 * thread pinned to a core of its own that wait is gone.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>

#include "matrixinfer.h"

#ifdef _OPENMP
#include <omp.h>
#endif

int mi_bind_team(const int64_t *cpus, int64_t ncpus, int nthreads) {
    int failed = 0;
    if (ncpus < 1) return -1;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
#ifdef _OPENMP
        int i = omp_get_thread_num();
#else
        int i = 0;
#endif
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cpus[i % ncpus], &set);
        if (sched_setaffinity(0, sizeof(set), &set) != 0) {
#pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -1 : 0;
}
