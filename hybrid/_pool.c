/* The CPU worker pool: native threads that share one op's chunks, as ggml's thread pool does.
 *
 * Why native: a worker written in Python must take the GIL to pick up its part
 * of each op, and on a busy machine that made it start 50-300 us after the main
 * thread, every op. Here a job is a C function over chunks [0, n): the calling
 * (main) thread is worker 0, `n_threads - 1` pthreads are the others, and each
 * thread claims the next chunk with one compare-and-swap until none is left.
 * Claiming is dynamic because the machine is shared: a thread the OS stalls
 * simply takes fewer chunks instead of leaving the others idle at a static cut.
 *
 * The claim word packs (job generation, n_chunks, next chunk) into 64 bits, so a
 * worker that wakes after its job is over cannot claim from the next job by
 * mistake: its compare-and-swap names the old generation and fails. A chunk,
 * once claimed, keeps its job alive: the main thread returns only when every
 * claimed chunk is done, so a late worker never delays an op it took no part in.
 *
 * Waiting follows ggml and today's `--poll`: inside a split (between ops)
 * workers spin; between splits they spin for up to `spin_ns` and then sleep on a
 * condition variable, woken when the next split's first job is posted. The bound
 * is ggml's too (its poll level counts spin rounds): a token's splits follow each
 * other within microseconds, so workers stay awake through a run, but an engine
 * left idle (between tests, in a user's program) gives its cores back instead of
 * burning them. Spinning is `pause` for PURE_SPIN_NS, then sched_yield(), so that
 * on an oversubscribed machine the thread being waited for gets the core instead
 * of a time slice later.
 *
 * A worker notes when it first sees each split (its wakeup) and when it claims and
 * finishes chunks (the caller's `times`), on CLOCK_MONOTONIC, the clock of Python's
 * time.perf_counter_ns on Linux: hybrid/backends/cpu.py turns these into events.
 *
 * Python callables (ops without a native kernel) run as chunks too: the thread
 * running one takes the GIL for it (`Pool.run_tasks`). Workers block SIGINT and
 * SIGTERM from birth, so Ctrl-C always reaches the main thread.
 */
#include "_pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define PURE_SPIN_NS 2000
#define CACHE_LINE 64
#define CHUNK_BITS 20                        /* claim word: gen (24) | n_chunks (20) | next (20), */
                                             /* so POOL_MAX_CHUNKS = 2^20 - 1 */
#define CHUNK_MASK ((UINT64_C(1) << CHUNK_BITS) - 1)
#define GEN_SHIFT (2 * CHUNK_BITS)
#define MAX_THREADS 1024

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

typedef struct {
    _Alignas(CACHE_LINE) _Atomic uint64_t split_seen;   /* the last split this worker saw */
    int64_t wake_ns;                                      /* when it saw it */
    pthread_t thread;
    PyThreadState *tstate;                                /* for Python tasks, made on the first */
    PyGILState_STATE gil_state;
    struct pool *pool;
    int index;
} worker_t;

struct pool {
    /* written by the main thread only; every change is followed by a bump of seq */
    _Alignas(CACHE_LINE) _Atomic uint32_t seq;
    _Atomic uint64_t split_gen;
    _Atomic int split_open;
    _Atomic int stopping;
    int n_threads;
    int64_t spin_ns;                                      /* between splits, then sleep */
    int64_t dispatch_ns;
    uint64_t job_gen;
    pool_chunk_fn fn;                                     /* the current job */
    void *ctx;
    int64_t *times;
    _Atomic int running;                                  /* a caller is inside pool_run/end_split */
    _Atomic int sleepers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    worker_t *workers;                                    /* [n_threads]; [0] is the caller's slot */
    int n_started;
    _Alignas(CACHE_LINE) _Atomic uint64_t claim;
    _Alignas(CACHE_LINE) _Atomic int64_t done;           /* chunks of the current job finished */
};

int pool_threads(const pool_t *p) { return p->n_threads; }

/* Wait until *word != seen, spinning: pause first, then yield the core; give up
 * after about limit_ns (< 0: never). Returns whether the word changed. */
static int spin_while_u32(_Atomic uint32_t *word, uint32_t seen, int64_t limit_ns) {
    int64_t start = 0;
    for (unsigned i = 1; atomic_load_explicit(word, memory_order_acquire) == seen; i++) {
        if (i < 256 || (i & 63)) { CPU_RELAX(); continue; }
        const int64_t t = now_ns();
        if (!start) start = t;
        else if (limit_ns >= 0 && t - start >= limit_ns) return 0;
        else if (t - start >= PURE_SPIN_NS) sched_yield();
    }
    return 1;
}

static void spin_until_done(_Atomic int64_t *done, int64_t n) {
    int64_t start = 0;
    for (unsigned i = 1; atomic_load_explicit(done, memory_order_acquire) < n; i++) {
        if (i < 256 || (i & 63)) { CPU_RELAX(); continue; }
        if (!start) start = now_ns();
        else if (now_ns() - start >= PURE_SPIN_NS) sched_yield();
    }
}

void pool_wait_count(_Atomic int64_t *counter, int64_t n) { spin_until_done(counter, n); }

/* Tell the workers the state changed; wake the sleeping ones. seq_cst on both sides
 * (here: bump, then read sleepers; a sleeper: count itself, then read seq) means either
 * this sees the sleeper or the sleeper sees the new seq: no wakeup is lost. */
static void bump(pool_t *p) {
    atomic_fetch_add(&p->seq, 1);
    if (atomic_load(&p->sleepers)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

static void sleep_while_u32(pool_t *p, uint32_t seen) {
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleepers, 1);
    while (atomic_load(&p->seq) == seen) pthread_cond_wait(&p->cv, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
}

/* Claim and run chunks of the current job until none is left (or the job is another). */
static void work_on_job(pool_t *p, int thread) {
    uint64_t w = atomic_load_explicit(&p->claim, memory_order_acquire);
    const uint64_t gen = w >> GEN_SHIFT;
    int64_t count = 0;
    for (;;) {
        uint64_t n = (w >> CHUNK_BITS) & CHUNK_MASK, next = w & CHUNK_MASK;
        if (w >> GEN_SHIFT != gen || next >= n) return;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* chunk `next` is ours: the job's fields stay valid until `done` reaches n */
        int64_t *times = p->times;
        if (times && !count) times[3 * thread] = now_ns();
        p->fn(p->ctx, (int64_t)next, thread);
        count++;
        if (times) {
            times[3 * thread + 1] = now_ns();
            times[3 * thread + 2] = count;
        }
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
        w = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

static void *worker_main(void *arg) {
    worker_t *self = arg;
    pool_t *p = self->pool;
    uint64_t split_seen = 0;
    for (;;) {
        uint32_t seq = atomic_load_explicit(&p->seq, memory_order_acquire);  /* before the state */
        if (atomic_load(&p->stopping)) break;
        uint64_t split = atomic_load_explicit(&p->split_gen, memory_order_acquire);
        if (split != split_seen) {
            split_seen = split;
            self->wake_ns = now_ns();
            atomic_store_explicit(&self->split_seen, split, memory_order_release);
        }
        work_on_job(p, self->index);
        if (atomic_load(&p->split_open)) spin_while_u32(&p->seq, seq, -1);
        else if (!p->spin_ns || !spin_while_u32(&p->seq, seq, p->spin_ns)) sleep_while_u32(p, seq);
    }
    if (self->tstate) {                       /* give back the thread state of its Python tasks */
        PyEval_RestoreThread(self->tstate);
        PyGILState_Release(self->gil_state);
    }
    return NULL;
}

int pool_run(pool_t *p, int64_t n_chunks, pool_chunk_fn fn, void *ctx, int64_t *times) {
    if (atomic_exchange(&p->running, 1)) return -1;
    if (times) memset(times, 0, sizeof(int64_t) * 3 * (size_t)p->n_threads);
    if (n_chunks > 0) {
        p->fn = fn;
        p->ctx = ctx;
        p->times = times;
        atomic_store_explicit(&p->done, 0, memory_order_relaxed);
        p->job_gen = (p->job_gen + 1) & ((UINT64_C(1) << (64 - GEN_SHIFT)) - 1);
        int opening = p->n_threads > 1 && !atomic_load(&p->split_open);
        if (opening) p->dispatch_ns = now_ns();
        atomic_store_explicit(&p->claim, p->job_gen << GEN_SHIFT | (uint64_t)n_chunks << CHUNK_BITS,
                              memory_order_release);
        if (opening) {
            atomic_store(&p->split_open, 1);
            atomic_fetch_add_explicit(&p->split_gen, 1, memory_order_release);
        }
        if (p->n_threads > 1) bump(p);
        work_on_job(p, 0);
        spin_until_done(&p->done, n_chunks);
    }
    atomic_store(&p->running, 0);
    return 0;
}

/* End the open split (if any): wait until every worker has seen it, so that each
 * one's wakeup is known, then let them go back to waiting between splits. Returns
 * the split's dispatch time and fills wake_ns[i] for workers i >= 1; 0 if no split
 * was open. */
static int64_t pool_end_split(pool_t *p, int64_t *wake_ns) {
    if (!atomic_load(&p->split_open)) return 0;
    uint64_t split = atomic_load(&p->split_gen);
    for (int i = 1; i < p->n_threads; i++) {
        worker_t *w = &p->workers[i];
        int64_t start = 0;
        for (unsigned k = 1; atomic_load_explicit(&w->split_seen, memory_order_acquire) != split; k++) {
            if (k < 256 || (k & 63)) { CPU_RELAX(); continue; }
            if (!start) start = now_ns();
            else if (now_ns() - start >= PURE_SPIN_NS) sched_yield();
        }
        wake_ns[i] = w->wake_ns;
    }
    wake_ns[0] = p->dispatch_ns;
    atomic_store(&p->split_open, 0);
    bump(p);
    return p->dispatch_ns;
}

static void pool_stop(pool_t *p) {
    atomic_store(&p->stopping, 1);
    bump(p);
    pthread_mutex_lock(&p->mu);              /* a sleeper that counted itself after the bump */
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_started; i++) pthread_join(p->workers[i].thread, NULL);
    p->n_started = 0;
}

static void pool_free(pool_t *p) {
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->workers);
    free(p);
}

/* ---- Python tasks: a job whose chunks are Python callables ---- */

typedef struct {
    PyObject *tasks;                 /* a tuple of callables */
    pool_t *pool;
    PyThreadState *main_tstate;      /* the calling thread's, saved while it waits */
    _Atomic int failed;              /* once set, the remaining tasks are skipped */
    PyObject *exc_type, *exc_value, *exc_tb;
} tasks_job_t;

static void run_task(void *ctx, int64_t chunk, int thread) {
    tasks_job_t *job = ctx;
    if (atomic_load(&job->failed)) return;
    worker_t *w = &job->pool->workers[thread];
    if (thread == 0) PyEval_RestoreThread(job->main_tstate);
    else if (w->tstate) PyEval_RestoreThread(w->tstate);
    else {
        w->gil_state = PyGILState_Ensure();
        w->tstate = PyThreadState_Get();
    }
    PyObject *r = PyObject_CallNoArgs(PyTuple_GET_ITEM(job->tasks, chunk));
    if (r) Py_DECREF(r);
    else if (job->exc_type) PyErr_Clear();      /* the first error is the one raised */
    else {
        PyErr_Fetch(&job->exc_type, &job->exc_value, &job->exc_tb);
        atomic_store(&job->failed, 1);
    }
    if (thread == 0) job->main_tstate = PyEval_SaveThread();
    else PyEval_SaveThread();
}

/* ---- the Python type ---- */

typedef struct {
    PyObject_HEAD
    pool_t *pool;
} PoolObject;

static int check_times(PoolObject *self, PyObject *obj, Py_buffer *view, Py_ssize_t want, const char *name) {
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len != want * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd int64 (n_threads=%d), got %zd bytes", name, want,
                     self->pool->n_threads, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

pool_t *pool_from_object(PyObject *obj) {
    if (!PyObject_TypeCheck(obj, &PoolType)) {
        PyErr_Format(PyExc_TypeError, "pool: expected a hybrid._kernels.Pool, got %s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    pool_t *p = ((PoolObject *)obj)->pool;
    if (!p) PyErr_SetString(PyExc_ValueError, "pool: closed");
    return p;
}

static PyObject *busy_error(void) {
    PyErr_SetString(PyExc_RuntimeError, "pool: already running a job (a task may not use its own pool)");
    return NULL;
}

static int Pool_init(PoolObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n_threads", "spin_ns", NULL};
    int n_threads;
    long long spin_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iL", kwlist, &n_threads, &spin_ns)) return -1;
    if (self->pool) {
        PyErr_SetString(PyExc_RuntimeError, "Pool: already initialised");
        return -1;
    }
    if (n_threads < 1 || n_threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "n_threads must be in [1, %d], got %d", MAX_THREADS, n_threads);
        return -1;
    }
    if (spin_ns < 0) {
        PyErr_Format(PyExc_ValueError, "spin_ns must be >= 0, got %lld", spin_ns);
        return -1;
    }
    pool_t *p = calloc(1, sizeof(*p));
    worker_t *workers = p ? aligned_alloc(CACHE_LINE, sizeof(worker_t) * (size_t)n_threads) : NULL;
    if (!workers) {
        free(p);
        PyErr_NoMemory();
        return -1;
    }
    memset(workers, 0, sizeof(worker_t) * (size_t)n_threads);
    p->workers = workers;
    p->n_threads = n_threads;
    p->spin_ns = (int64_t)spin_ns;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    sigset_t block, old;                      /* workers inherit a mask without SIGINT/SIGTERM */
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int err = 0;
    for (p->n_started = 1; p->n_started < n_threads; p->n_started++) {
        worker_t *w = &workers[p->n_started];
        w->pool = p;
        w->index = p->n_started;
        if ((err = pthread_create(&w->thread, NULL, worker_main, w))) break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        Py_BEGIN_ALLOW_THREADS
        pool_stop(p);
        Py_END_ALLOW_THREADS
        pool_free(p);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->pool = p;
    return 0;
}

static PyObject *Pool_close(PoolObject *self, PyObject *unused) {
    pool_t *p = self->pool;
    if (p) {
        self->pool = NULL;
        Py_BEGIN_ALLOW_THREADS                /* a worker may need the GIL to finish */
        pool_stop(p);
        Py_END_ALLOW_THREADS
        pool_free(p);
    }
    Py_RETURN_NONE;
}

static void Pool_dealloc(PoolObject *self) {
    Py_XDECREF(Pool_close(self, NULL));
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Pool_run_tasks(PoolObject *self, PyObject *args) {
    PyObject *tasks_in, *times_obj = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &tasks_in, &times_obj)) return NULL;
    pool_t *p = pool_from_object((PyObject *)self);
    if (!p) return NULL;
    tasks_job_t job = {.pool = p};
    if (!(job.tasks = PySequence_Tuple(tasks_in))) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(job.tasks);
    Py_buffer times = {0};
    PyObject *ret = NULL;
    if (n > POOL_MAX_CHUNKS) {
        PyErr_Format(PyExc_ValueError, "run_tasks: %zd tasks, at most %zd", n, (Py_ssize_t)POOL_MAX_CHUNKS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyCallable_Check(PyTuple_GET_ITEM(job.tasks, i))) {
            PyErr_Format(PyExc_TypeError, "run_tasks: task %zd is not callable", i);
            goto done;
        }
    }
    if (check_times(self, times_obj, &times, 3 * (Py_ssize_t)p->n_threads, "times")) goto done;
    job.main_tstate = PyEval_SaveThread();
    int busy = pool_run(p, n, run_task, &job, times.buf);
    PyEval_RestoreThread(job.main_tstate);
    if (busy) busy_error();
    else if (job.exc_type) PyErr_Restore(job.exc_type, job.exc_value, job.exc_tb);
    else ret = Py_NewRef(Py_None);
done:
    if (times.obj) PyBuffer_Release(&times);
    Py_DECREF(job.tasks);
    return ret;
}

static PyObject *Pool_end_split(PoolObject *self, PyObject *arg) {
    pool_t *p = pool_from_object((PyObject *)self);
    Py_buffer wake;
    if (!p || check_times(self, arg, &wake, p->n_threads, "wake_ns")) return NULL;
    if (arg == Py_None) {
        PyErr_SetString(PyExc_TypeError, "end_split: wake_ns must be an int64 array of n_threads");
        return NULL;
    }
    int64_t dispatch = 0;
    int busy;
    Py_BEGIN_ALLOW_THREADS
    busy = atomic_exchange(&p->running, 1);
    if (!busy) {
        dispatch = pool_end_split(p, wake.buf);
        atomic_store(&p->running, 0);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&wake);
    return busy ? busy_error() : PyLong_FromLongLong(dispatch);
}

static PyObject *Pool_get_n_threads(PoolObject *self, void *closure) {
    pool_t *p = pool_from_object((PyObject *)self);
    return p ? PyLong_FromLong(p->n_threads) : NULL;
}

static PyObject *Pool_get_spin_ns(PoolObject *self, void *closure) {
    pool_t *p = pool_from_object((PyObject *)self);
    return p ? PyLong_FromLongLong(p->spin_ns) : NULL;
}

static PyMethodDef Pool_methods[] = {
    {"run_tasks", (PyCFunction)Pool_run_tasks, METH_VARARGS,
     "run_tasks(tasks, times=None): call every callable once, shared by all threads (each takes the GIL per "
     "task); the first exception is raised here after all have stopped. times: int64 [n_threads, 3] or None, "
     "per thread (first claim ns, end ns, tasks run), CLOCK_MONOTONIC."},
    {"end_split", (PyCFunction)Pool_end_split, METH_O,
     "end_split(wake_ns) -> dispatch ns of the split that ends (0: none was open). Waits until every worker "
     "has seen the split; wake_ns[i] (int64 [n_threads]) = when worker i did (wake_ns[0] = the dispatch). "
     "Workers then wait as between splits: spinning for up to spin_ns, then asleep."},
    {"close", (PyCFunction)Pool_close, METH_NOARGS, "close(): stop and join the workers (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pool_getset[] = {
    {"n_threads", (getter)Pool_get_n_threads, NULL, "threads, the caller included", NULL},
    {"spin_ns", (getter)Pool_get_spin_ns, NULL, "how long workers spin between splits before they sleep", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hybrid._kernels.Pool",
    .tp_doc = "Pool(n_threads, spin_ns): the caller plus n_threads - 1 native worker threads "
              "(see hybrid/_pool.c). Native kernels take it as `pool=`; Python callables run with run_tasks.",
    .tp_basicsize = sizeof(PoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pool_init,
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
};
