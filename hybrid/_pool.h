/* The CPU worker pool (hybrid/_pool.c): native threads sharing one op's chunks.
 *
 * The C side, used by the kernels (hybrid/_kernels.c) to run a matmul on every
 * thread with no GIL, and the Python side, `hybrid._kernels.Pool`, used by the
 * CPU backend (hybrid/backends/cpu.py) for the splits and for ops that are Python
 * callables.
 */
#ifndef HYPROF_POOL_H
#define HYPROF_POOL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct pool pool_t;

/* Runs chunk `chunk` of a job on pool thread `thread` (0: the caller). */
typedef void (*pool_chunk_fn)(void *ctx, int64_t chunk, int thread);

#define POOL_MAX_CHUNKS ((1 << 20) - 1)

/* Runs chunks [0, n_chunks) (n_chunks <= POOL_MAX_CHUNKS) on the calling thread
 * (thread 0) and every worker, each chunk exactly once, claimed one at a time;
 * returns 0 when all are done, -1 at once if the pool is already running a job. The first
 * job after pool_end_split opens a split: blocked workers are woken, and they spin
 * until the split ends. `times`, if not NULL, gets per thread i: times[3i] = when
 * it claimed its first chunk, times[3i+1] = when it finished its last one
 * (CLOCK_MONOTONIC ns), times[3i+2] = chunks it ran (0: it ran none; the rest is
 * then 0 too). Native callers release the GIL first. */
int pool_run(pool_t *pool, int64_t n_chunks, pool_chunk_fn fn, void *ctx, int64_t *times);

/* Waits (spinning, then yielding) until *counter >= n: a chunk that needs another chunk of
 * the same job done first (claimed earlier, so running or finished) waits for it here. */
void pool_wait_count(_Atomic int64_t *counter, int64_t n);

/* The `Pool` Python type (added to hybrid._kernels by its module init), and the
 * pool_t inside a Pool object (NULL with an exception set if `obj` is not an open Pool). */
extern PyTypeObject PoolType;
pool_t *pool_from_object(PyObject *obj);

/* Pool threads: `times` buffers hold 3 * pool_threads(pool) int64. */
int pool_threads(const pool_t *pool);

/* The pool for another extension module (hybrid/_ops.c, whose attention shares its heads
 * out): hybrid._kernels holds this table in a capsule named POOL_API_CAPSULE. */
typedef struct {
    pool_t *(*from_object)(PyObject *obj);
    int (*run)(pool_t *pool, int64_t n_chunks, pool_chunk_fn fn, void *ctx, int64_t *times);
    int (*threads)(const pool_t *pool);
} pool_api_t;
#define POOL_API_CAPSULE "hybrid._kernels._pool_api"

#endif
