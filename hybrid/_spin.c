/* Spin-waiting without the GIL, for the CPU worker pool (hybrid/backends/cpu.py).
 *
 * A Python thread that spins on a shared variable holds the GIL between its
 * checks, and every other thread that needs the GIL (the main thread coming back
 * from a torch kernel, the device thread) then waits up to the interpreter's
 * switch interval, 5 ms. This loop spins with the GIL released, on a 64-bit
 * counter in a buffer both sides share (a NumPy int64 array), and returns as
 * soon as the counter differs from the value the caller last saw: the waker pays
 * one memory store, the waiter a few hundred nanoseconds plus taking the GIL.
 *
 * After PURE_SPIN_NS of pure spinning it calls sched_yield() between checks, so
 * that on an oversubscribed machine the thread it waits for, if it shares this
 * core, gets to run instead of waiting a whole time slice.
 *
 * wait_change(buffer, index, seen, timeout_ns) -> the counter's value, which
 * equals `seen` only if the timeout passed first (the caller then checks for
 * Ctrl-C or shutdown and waits again).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

#define PURE_SPIN_NS 2000

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static PyObject *wait_change(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t index;
    long long seen, timeout_ns;
    if (!PyArg_ParseTuple(args, "w*nLL", &view, &index, &seen, &timeout_ns))
        return NULL;
    if (index < 0 || (index + 1) * (Py_ssize_t)sizeof(int64_t) > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_IndexError, "wait_change: index outside the buffer");
        return NULL;
    }
    const int64_t *p = (const int64_t *)view.buf + index;
    int64_t value;
    Py_BEGIN_ALLOW_THREADS
    int64_t start = now_ns(), t = start;
    int yielding = 0;
    for (unsigned i = 1;; i++) {
        value = __atomic_load_n(p, __ATOMIC_ACQUIRE);
        if (value != seen)
            break;
        if (yielding)
            sched_yield();
        else
            CPU_RELAX();
        if (yielding || (i & 255) == 0) {
            t = now_ns();
            if (t - start >= timeout_ns)
                break;
            yielding = t - start >= PURE_SPIN_NS;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(value);
}

static PyMethodDef methods[] = {
    {"wait_change", wait_change, METH_VARARGS,
     "wait_change(buffer, index, seen, timeout_ns) -> int: spin without the GIL until "
     "the int64 at buffer[index] differs from seen, or the timeout passes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spin", NULL, -1, methods};

PyMODINIT_FUNC PyInit__spin(void) { return PyModule_Create(&module); }
