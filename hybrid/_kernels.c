/* CPU matmuls on quantised GGUF weights as stored, at memory speed: the driver.
 *
 * Why native code: a generated token reads every selected expert's weights
 * once, so the expert matmul is bound by memory bandwidth only if the kernel
 * consumes 4-bit blocks faster than DRAM delivers them. torch has no kernel
 * for GGUF block layouts, and dequantising first multiplies the bytes moved.
 * As in ggml, the activation is quantised once to 8-bit blocks, and every dot
 * product is an int8 one (AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`), scaled
 * per block in float (32 weights; the K-quants and IQ4_XS per 16 or 32 of their 256-weight
 * blocks, with activations in blocks of 256).
 *
 * This file is what every type and SIMD path shares: the checks, the activation
 * quantisation, the walk over rows, tokens and experts, the worker pool's chunks.
 * What differs per type and path is looked up in the quant traits table
 * (hybrid/quant_traits.h): the kernels live in one file per instruction set
 * (hybrid/kernels/, layouts in kernels.h), each built with its own target flags.
 * The paths this CPU can run are a set, found by cpuid at import; HYPROF_KERNELS
 * picks the default one among them. The scalar path is portable C and the
 * reference the others are tested against.
 *
 * Buffers come in through the buffer protocol (NumPy arrays, memoryviews, the
 * np.memmap of a GGUF file), so sizes are checked here and a wrong size is a
 * ValueError, never a stray read. The GIL is released around all compute; the
 * threads of a worker pool (hybrid/_pool.c) share one call's rows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_vecmath.h"
#include "kernels/kernels.h"
#include "quant_traits.h"

#define TYPE_R16 0x100        /* flag on a type: the weight is repacked at load (repack_r16) */
#define R16_MIN_TOKENS 4      /* from this many tokens on, a path with r16_first repacks stored rows as it goes */

static int runs[N_PATHS];          /* this CPU runs path p: the set, found at import */
static int default_path;           /* HYPROF_KERNELS, else the first of PATH_PREFERENCE in the set */

static size_t weight_row_bytes(const quant_traits_t *traits, int64_t n_in) {
    return (size_t)(n_in / traits->block_values * traits->block_bytes);
}

/* Bytes of one quantised activation row of n_in values for the type's dot product. */
static size_t act_row_bytes(const quant_traits_t *traits, int64_t n_in) {
    return traits->activation == ACT_Q8_K ? q8k_row_bytes(n_in) : q8_row_bytes(n_in);
}

/* matmul_rows by the row kernel: for many tokens the loops are blocked so that a
 * block of ROW_BLOCK weight rows (L2) meets one tile of TILE tokens' activations
 * (L1) at a time, instead of every row re-reading all tokens from L2. */
#define ROW_BLOCK 16
static void matmul_rows_by_row(const quant_kernels_t *k, size_t rb, int64_t nb, const uint8_t *w, int64_t r0,
                               int64_t r1, const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots,
                               float *out, int64_t out_stride) {
    for (int64_t b0 = r0; b0 < r1; b0 += ROW_BLOCK) {
        int64_t b1 = b0 + ROW_BLOCK < r1 ? b0 + ROW_BLOCK : r1;
        for (int64_t s0 = 0; s0 < n_slots; s0 += TILE) {
            int nt = (int)(n_slots - s0 < TILE ? n_slots - s0 : TILE);
            for (int64_t r = b0; r < b1; r++) {
                float res[TILE];
                k->row_dot(w + r * rb, nb, x + s0, nt, res);
                for (int t = 0; t < nt; t++) out[slot_out[s0 + t] * out_stride + r] = res[t];
            }
        }
    }
}

/* One block of 16 rows starting at row r, already in R16 form, against n_slots tokens,
 * R16_TILE at a time; n_rows (<= 16) of it are kept. */
static void r16_block_rows(const quant_kernels_t *k, const uint8_t *rw, int64_t nb, int n_rows, int64_t r,
                           const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots, float *out,
                           int64_t out_stride) {
    for (int64_t s0 = 0; s0 < n_slots; s0 += R16_TILE) {
        int nt = (int)(n_slots - s0 < R16_TILE ? n_slots - s0 : R16_TILE);
        float res[R16_TILE * R16_ROWS];
        k->r16_dot(rw, nb, x + s0, nt, res);
        for (int t = 0; t < nt; t++)
            memcpy(out + slot_out[s0 + t] * out_stride + r, res + R16_ROWS * t, sizeof(float) * n_rows);
    }
}

/* matmul_rows by the R16 kernel on stored rows: each block of 16 rows is interleaved
 * into a buffer kept per thread, then meets the tokens. -> 0, or -1 (nothing done) if
 * no buffer. */
static int matmul_rows_r16(const quant_kernels_t *k, size_t rb, int64_t nb, const uint8_t *w, int64_t r0,
                           int64_t r1, const uint8_t *const *x, const int64_t *slot_out, int64_t n_slots,
                           float *out, int64_t out_stride) {
    static _Thread_local uint8_t *buf;
    static _Thread_local size_t cap;
    const size_t need = R16_ROWS * rb;
    if (need > cap) {
        free(buf);
        cap = 0;
        if (!(buf = malloc(need))) return -1;
        cap = need;
    }
    for (int64_t r = r0; r < r1; r += R16_ROWS) {
        const int n_rows = (int)(r1 - r < R16_ROWS ? r1 - r : R16_ROWS);
        const int64_t next = r + R16_ROWS < r1 ? r + R16_ROWS : -1;
        k->repack_r16(w + r * rb, rb, n_rows, nb, buf, next < 0 ? NULL : w + next * rb);
        r16_block_rows(k, buf, nb, n_rows, r, x, slot_out, n_slots, out, out_stride);
    }
    return 0;
}

/* One matrix against n_slots q8_32 rows: out[slot_out[s] * out_stride + r] for rows
 * [r0, r1). Each weight row is read from memory once. Repacked weights (`packed`,
 * repack_r16) take the R16 kernel in place, rows r0 and r1 multiples of 16 (a block of
 * 16 rows starts where its first row would); stored ones take it on paths where it
 * outruns the row kernel (r16_first) for prompts (n_slots >= R16_MIN_TOKENS),
 * repacking as they go, and the row kernel otherwise. A row's result depends only on
 * its index and the kernel, never on which rows share its block, so splits of the
 * rows compose.
 *
 * One token on repacked rows reads the range's two halves block by block in turn (r16_dot2),
 * where the kernels have it: a core streams more from DRAM from two distant addresses than
 * from one (a plain AVX-512 read loop, 2 threads, this Sapphire Rapids-class Xeon: ~30 GB/s
 * from one stream per thread, ~34 from two, whether they alternate every 256 B or 4 KB;
 * from the two halves of one 18 KB row block, no gain), and the kernel is bound by that. */
static void matmul_rows(const quant_kernels_t *k, const quant_traits_t *traits, int packed, const uint8_t *w,
                        int64_t n_in, int64_t r0, int64_t r1, const uint8_t *const *x, const int64_t *slot_out,
                        int64_t n_slots, float *out, int64_t out_stride) {
    const size_t rb = weight_row_bytes(traits, n_in);
    const int64_t nb = n_in / traits->block_values;
    if (packed) {
        int64_t r = r0;
        if (k->r16_dot2 && n_slots == 1) {     /* one token: two streams, the range's halves, read in turn */
            const int64_t half = (r1 - r0) / (2 * R16_ROWS) * R16_ROWS;
            for (; r < r0 + half; r += R16_ROWS) {
                float res[2 * R16_ROWS];
                k->r16_dot2(w + r * rb, w + (r + half) * rb, nb, x[0], res);
                memcpy(out + slot_out[0] * out_stride + r, res, sizeof(float) * R16_ROWS);
                memcpy(out + slot_out[0] * out_stride + r + half, res + R16_ROWS, sizeof(float) * R16_ROWS);
            }
            r += half;
        }
        for (; r < r1; r += R16_ROWS)
            r16_block_rows(k, w + r * rb, nb, R16_ROWS, r, x, slot_out, n_slots, out, out_stride);
        return;
    }
    if (k->r16_first && n_slots >= R16_MIN_TOKENS &&
        !matmul_rows_r16(k, rb, nb, w, r0, r1, x, slot_out, n_slots, out, out_stride))
        return;
    matmul_rows_by_row(k, rb, nb, w, r0, r1, x, slot_out, n_slots, out, out_stride);
}

/* ---- Python bindings ---- */

#include "_pool.h"                   /* the worker pool that `pool=` runs a call on */

/* A path argument (-1: the default) -> a path this CPU runs, or -1 with an exception. */
static int parse_path(int path) {
    if (path < 0) return default_path;
    if (path >= N_PATHS || !runs[path]) {
        PyErr_Format(PyExc_ValueError, "kernel path %d is not available on this CPU", path);
        return -1;
    }
    return path;
}

/* The traits of a type with a matmul kernel, or NULL with an exception. */
static const quant_traits_t *matmul_traits(int type, Py_ssize_t n_in) {
    const quant_traits_t *traits = quant_traits(type);
    if (!traits || traits->activation == ACT_NONE) {
        PyErr_Format(PyExc_ValueError, "ggml type %d has no CPU matmul kernel", type);
        return NULL;
    }
    if (n_in <= 0 || n_in % traits->block_values) {
        PyErr_Format(PyExc_ValueError, "n_in must be a positive multiple of %d for %s, got %zd",
                     (int)traits->block_values, traits->name, n_in);
        return NULL;
    }
    return traits;
}

/* The kernels of `traits` on `path`, with R16 ones if `packed`, or NULL with an exception. */
static const quant_kernels_t *path_kernels(const quant_traits_t *traits, int path, int packed) {
    const quant_kernels_t *k = traits->kernels[path];
    if (!k) {
        PyErr_Format(PyExc_ValueError, "%s has no kernel on the %s path", traits->name, SIMD_PATHS[path].name);
        return NULL;
    }
    if (packed && !k->r16_dot) {
        PyErr_Format(PyExc_ValueError, "repacked (R16) %s weights need a path with an R16 kernel, not %s",
                     traits->name, SIMD_PATHS[path].name);
        return NULL;
    }
    return k;
}

static int check_size(const Py_buffer *b, Py_ssize_t want, const char *name) {
    if (b->len != want) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, want, b->len);
        return -1;
    }
    return 0;
}

/* An activation argument: float32 rows of n_in, which the call quantises (as ggml's
 * CPU matmul quantises src1 first), or q8 rows already quantised for the type (uint8,
 * act_row_bytes each: one input shared by several calls). -> its number of rows, with
 * *floats set if they are float32 rows; or -1 with an exception. */
static Py_ssize_t activation_rows(const Py_buffer *view, const quant_traits_t *traits, Py_ssize_t n_in, int *floats) {
    *floats = view->format && strcmp(view->format, "f") == 0;
    if (!*floats && view->format && strcmp(view->format, "B") != 0) {
        PyErr_Format(PyExc_ValueError, "x: expected float32 rows or uint8 q8 rows, got format '%s'", view->format);
        return -1;
    }
    const Py_ssize_t row = *floats ? n_in * (Py_ssize_t)sizeof(float) : (Py_ssize_t)act_row_bytes(traits, n_in);
    if (view->len % row) {
        PyErr_Format(PyExc_ValueError, "x: %zd bytes is not a whole number of %s rows of n_in=%zd", view->len,
                     *floats ? "float32" : "q8", n_in);
        return -1;
    }
    return view->len / row;
}

static void quantize_rows(int path, const quant_traits_t *traits, const float *x, Py_ssize_t n_rows, int64_t n_in,
                          uint8_t *out) {
    const quantize_row_fn quantize_row =
        traits->activation == ACT_Q8_K ? SIMD_PATHS[path].quantize_q8_K : SIMD_PATHS[path].quantize_q8_32;
    for (Py_ssize_t r = 0; r < n_rows; r++) quantize_row(x + r * n_in, n_in, out + r * act_row_bytes(traits, n_in));
}

static PyObject *py_quantize_q8(PyObject *self, PyObject *args) {
    Py_buffer x, out;
    Py_ssize_t n_in;
    int path, type = GGML_Q4_0;
    if (!PyArg_ParseTuple(args, "y*nw*i|i", &x, &n_in, &out, &path, &type)) return NULL;
    PyObject *ret = NULL;
    const quant_traits_t *traits = matmul_traits(type, n_in);
    if (!traits) goto done;
    Py_ssize_t n_rows = x.len / (Py_ssize_t)sizeof(float) / n_in;
    if ((path = parse_path(path)) < 0) goto done;
    if (x.len != n_rows * n_in * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "x: %zd bytes is not a whole number of float32 rows of %zd", x.len, n_in);
        goto done;
    }
    if (check_size(&out, n_rows * (Py_ssize_t)act_row_bytes(traits, n_in), "out")) goto done;
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(path, traits, x.buf, n_rows, n_in, out.buf);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return ret;
}

/* MUL_MAT_ID cut into chunks for the pool (hybrid/_pool.c). The work is a sequence of
 * units, row block u % n_blocks of the (u / n_blocks)-th expert computed, consecutive in
 * memory within an expert; chunk c is units [first[c], first[c + 1]). Fused (-fmoe), the
 * chunks of the gate experts come first, then those of the up experts (into `up_out`), each
 * of which takes silu(gate) * up over its rows when its gate chunk is done. (Gate and up
 * row blocks in turn, each thread then reading two tensors at once, streamed ~1.5x slower
 * from DRAM than gate then up: bench_expert_matmul.py.) Row blocks are multiples of
 * CHUNK_ROW_ALIGN rows (the kernels' row blocks; only a range's last block is shorter),
 * sized so that one unit is about CHUNK_WORK bytes of weights times token tiles: a few
 * microseconds, so that threads finish an op within a unit of each other.
 *
 * Chunks are guided, as OpenMP's schedule(guided): each is a share of the units left
 * (1 / (CHUNK_GUIDE x threads)), at most CHUNK_MAX_UNITS, at least one. Two threads that
 * claimed alternate 64 KiB units read DRAM ~30 % slower than two reading 1 MiB runs
 * (measured here with a plain read loop: 21-24 against 29-37 GB/s); the shrinking tail
 * keeps the threads finishing together, and a thread the OS stalls holds at most a
 * chunk of ~1 MiB. */
#define CHUNK_ROW_ALIGN 16
#define CHUNK_WORK (64 * 1024)
#define CHUNK_MAX_UNITS 16
#define CHUNK_GUIDE 2

typedef struct {
    const quant_traits_t *traits;
    const quant_kernels_t *k;         /* the traits' kernels on the call's path */
    int packed;
    const uint8_t *w, *w_up;          /* expert 0's rows; expert e is e * expert_bytes further */
    size_t expert_bytes;
    int64_t n_in, n_out, r0, r1, block_rows, n_blocks;
    const int64_t *first;             /* chunk c: units [first[c], first[c + 1]) */
    int64_t n_chunks;                 /* per tensor */
    const uint8_t **xs;               /* q8 rows of the slots, grouped by expert */
    int64_t *slot_out;
    const int64_t *runs;              /* per expert computed: expert, first slot, end slot */
    int64_t n_runs;
    float *out, *up_out;              /* up_out: the up experts' products, when fused */
    _Atomic int64_t *gate_done;       /* fused: per gate chunk, 1 once done */
} mm_job_t;

static void mm_chunk(void *ctx, int64_t chunk, int thread) {
    const mm_job_t *j = ctx;
    const int64_t up = chunk >= j->n_chunks;
    chunk -= up * j->n_chunks;
    /* Fused: an up chunk's gate chunk was claimed before it (all gate chunks come first), so it is
     * done or running; then silu(gate) * up over the chunk's rows, in place, by the thread that has
     * the up rows in cache, instead of one pass on the main thread after. */
    if (up) pool_wait_count(&j->gate_done[chunk], 1);
    for (int64_t u = j->first[chunk], end; u < j->first[chunk + 1]; u = end) {   /* one expert's rows at a time */
        const int64_t i_run = u / j->n_blocks, *run = j->runs + 3 * i_run, run_end = (i_run + 1) * j->n_blocks;
        end = run_end < j->first[chunk + 1] ? run_end : j->first[chunk + 1];
        const int64_t b0 = j->r0 + (u - i_run * j->n_blocks) * j->block_rows;
        const int64_t b1_full = j->r0 + (end - i_run * j->n_blocks) * j->block_rows;
        const int64_t b1 = b1_full < j->r1 ? b1_full : j->r1;
        matmul_rows(j->k, j->traits, j->packed, (up ? j->w_up : j->w) + (size_t)run[0] * j->expert_bytes, j->n_in,
                    b0, b1, j->xs + run[1], j->slot_out + run[1], run[2] - run[1], up ? j->up_out : j->out, j->n_out);
        if (up)
            for (int64_t at = run[1]; at < run[2]; at++) {
                float *g = j->out + j->slot_out[at] * j->n_out + b0;
                swiglu_f32(g, j->up_out + j->slot_out[at] * j->n_out + b0, b1 - b0, g);
            }
    }
    if (j->gate_done && !up) atomic_store_explicit(&j->gate_done[chunk], 1, memory_order_release);
}

/* The guided cut of n_units units for n_threads threads: first[0..n] (room for n_units + 1) -> n chunks. */
static int64_t guided_chunks(int64_t n_units, int n_threads, int64_t *first) {
    int64_t n = 0;
    first[0] = 0;
    for (int64_t at = 0; at < n_units; n++) {
        int64_t size = (n_units - at) / (CHUNK_GUIDE * n_threads);
        size = size < 1 ? 1 : size > CHUNK_MAX_UNITS ? CHUNK_MAX_UNITS : size;
        at = at + size < n_units ? at + size : n_units;
        first[n + 1] = at;
    }
    return n;
}

/* Rows per chunk for n_runs experts holding n_slots slots between them. */
static int64_t chunk_rows(const mm_job_t *j, int64_t n_slots) {
    int64_t tiles = (n_slots / j->n_runs + TILE - 1) / TILE;
    int64_t row_work = (int64_t)weight_row_bytes(j->traits, j->n_in) * (tiles ? tiles : 1);
    int64_t rows = (CHUNK_WORK / row_work + CHUNK_ROW_ALIGN - 1) / CHUNK_ROW_ALIGN * CHUNK_ROW_ALIGN;
    rows = rows > CHUNK_ROW_ALIGN ? rows : CHUNK_ROW_ALIGN;
    while (2 * j->n_runs * ((j->r1 - j->r0 + rows - 1) / rows) > POOL_MAX_CHUNKS) rows *= 2;
    return rows;
}

static int parse_times(PyObject *obj, pool_t *pool, Py_buffer *view) {
    if (obj == Py_None) return 0;
    if (!pool) {
        PyErr_SetString(PyExc_ValueError, "times: given without a pool");
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len != 3 * pool_threads(pool) * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "times: expected int64 [n_threads=%d, 3], got %zd bytes", pool_threads(pool),
                     view->len);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* Expert ids as int32 [n_slots]: from int32 or int64 ids, or (None) expert 0 for
 * each of n_rows slots (a plain MUL_MAT). -> a fresh array (the caller frees it) or
 * NULL with an exception. */
static int32_t *parse_ids(PyObject *obj, Py_ssize_t n_rows, Py_ssize_t *n_slots) {
    int32_t *id;
    if (obj == Py_None) {
        *n_slots = n_rows;
        if (!(id = calloc((size_t)n_rows + 1, sizeof(int32_t)))) PyErr_NoMemory();
        return id;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    int wide = v.itemsize == 8 && v.format && strchr("lq", v.format[0]);
    if (!wide && !(v.itemsize == 4 && v.format && v.format[0] == 'i')) {
        PyErr_Format(PyExc_ValueError, "ids: expected int32 or int64, got format '%s'", v.format ? v.format : "B");
        PyBuffer_Release(&v);
        return NULL;
    }
    *n_slots = v.len / v.itemsize;
    if ((id = malloc(sizeof(int32_t) * ((size_t)*n_slots + 1)))) {
        for (Py_ssize_t s = 0; s < *n_slots; s++) {
            int64_t e = wide ? ((const int64_t *)v.buf)[s] : ((const int32_t *)v.buf)[s];
            id[s] = e < INT32_MIN || e > INT32_MAX ? -1 : (int32_t)e;
        }
    } else {
        PyErr_NoMemory();
    }
    PyBuffer_Release(&v);
    return id;
}

/* MUL_MAT_ID: slot (t, k) multiplies expert ids[t, k] by activation row t (x broadcast
 * over the used experts, as for gate/up) or row t*n_used+k (one row per slot, as for
 * down), into out[t, k, :]. Slots are grouped by expert (a counting sort), and
 * only experts whose rank among the distinct used ids is in [a0, a1) are done.
 * With a pool, every thread of the pool shares the rows [r0, r1) of those experts
 * as chunks (mm_chunk), the caller being thread 0; without, the caller does them
 * alone. The GIL is released throughout. A plain MUL_MAT is the case of one expert
 * and one slot per token (ids None). Returns the number of experts computed, which
 * is what the op read: the engine counts its bytes from it. */
static PyObject *py_mul_mat_id(PyObject *self, PyObject *args) {
    Py_buffer w, w_up, x = {0}, out, times = {0};
    int type, path;
    Py_ssize_t n_expert, n_in, n_used, r0, r1, a0, a1;
    PyObject *x_obj, *ids_obj, *pool_obj = Py_None, *times_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*y*innOOnw*nnnni|OO", &w, &w_up, &type, &n_expert, &n_in, &x_obj, &ids_obj, &n_used,
                          &out, &r0, &r1, &a0, &a1, &path, &pool_obj, &times_obj))
        return NULL;
    PyObject *ret = NULL;
    const uint8_t **xs = NULL;
    uint8_t *xq, *xq_owned = NULL;
    int32_t *id = NULL;
    int64_t *slot_out = NULL, *start = NULL, *runs = NULL, *first = NULL;
    float *up_out = NULL;
    _Atomic int64_t *gate_done = NULL;
    pool_t *pool = NULL;
    Py_ssize_t n_x = 0, n_slots = 0;
    if (pool_obj != Py_None && !(pool = pool_from_object(pool_obj))) goto done;
    if (parse_times(times_obj, pool, &times)) goto done;
    const int packed = (type & TYPE_R16) != 0;
    const quant_traits_t *traits = matmul_traits(type & ~TYPE_R16, n_in);
    const quant_kernels_t *k;
    if (!traits || (path = parse_path(path)) < 0 || !(k = path_kernels(traits, path, packed))) goto done;
    Py_ssize_t rb = (Py_ssize_t)weight_row_bytes(traits, n_in), xb = (Py_ssize_t)act_row_bytes(traits, n_in);
    if (n_expert <= 0 || n_used <= 0 || w.len % (n_expert * rb)) {
        PyErr_Format(PyExc_ValueError, "weight: %zd bytes is not %zd experts of whole rows of n_in=%zd", w.len, n_expert, n_in);
        goto done;
    }
    Py_ssize_t n_out = w.len / (n_expert * rb);
    int fused = w_up.len > 0;
    if (fused && check_size(&w_up, w.len, "w_up")) goto done;
    if (ids_obj == Py_None && (n_expert != 1 || n_used != 1)) {
        PyErr_Format(PyExc_ValueError, "ids: None (a plain matmul) needs n_expert = n_used = 1");
        goto done;
    }
    int floats;
    if (PyObject_GetBuffer(x_obj, &x, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0 ||
        (n_x = activation_rows(&x, traits, n_in, &floats)) < 0 || !(id = parse_ids(ids_obj, n_x, &n_slots)))
        goto done;
    Py_ssize_t n_tok = n_slots / n_used;
    if (n_tok * n_used != n_slots) {
        PyErr_Format(PyExc_ValueError, "ids: %zd ids is not [n_tokens, n_used=%zd]", n_slots, n_used);
        goto done;
    }
    if (n_x != n_tok && n_x != n_slots) {
        PyErr_Format(PyExc_ValueError, "x: %zd rows is neither %zd nor %zd", n_x, n_tok, n_slots);
        goto done;
    }
    if (check_size(&out, n_slots * n_out * (Py_ssize_t)sizeof(float), "out")) goto done;
    if (r0 < 0 || r1 > n_out || r0 > r1) {
        PyErr_Format(PyExc_ValueError, "row range [%zd, %zd) outside [0, %zd)", r0, r1, n_out);
        goto done;
    }
    if (packed && (n_out % 16 || r0 % 16 || r1 % 16)) {
        PyErr_Format(PyExc_ValueError, "repacked (R16) weights: rows [%zd, %zd) of %zd are not whole blocks of 16",
                     r0, r1, n_out);
        goto done;
    }
    for (Py_ssize_t s = 0; s < n_slots; s++) {
        if (id[s] < 0 || id[s] >= n_expert) {
            PyErr_Format(PyExc_ValueError, "ids[%zd] outside [0, %zd)", s, n_expert);
            goto done;
        }
    }
    xs = malloc(sizeof(*xs) * (n_slots + 1));
    slot_out = malloc(sizeof(*slot_out) * (n_slots + 1));
    start = calloc(n_expert + 1, sizeof(*start));
    runs = malloc(sizeof(*runs) * 3 * (n_expert + 1));
    xq = floats ? (xq_owned = malloc((size_t)(n_x * xb) + 1)) : x.buf;
    up_out = fused ? malloc(sizeof(float) * (size_t)(n_slots * n_out) + 1) : NULL;
    if (!xs || !slot_out || !start || !runs || !xq || (fused && !up_out)) { PyErr_NoMemory(); goto done; }
    int busy = 0, no_memory = 0;
    int64_t n_runs = 0;
    Py_BEGIN_ALLOW_THREADS
    if (floats) quantize_rows(path, traits, x.buf, n_x, n_in, xq);
    {
        for (Py_ssize_t s = 0; s < n_slots; s++) start[id[s] + 1]++;
        for (Py_ssize_t e = 0; e < n_expert; e++) start[e + 1] += start[e];
        for (Py_ssize_t s = 0; s < n_slots; s++) {            /* start[e] walks to the end of e's run */
            int64_t at = start[id[s]]++;
            xs[at] = xq + (n_x == n_slots ? s : s / n_used) * xb;
            slot_out[at] = s;
        }
        int64_t rank = 0, begin = 0, run_slots = 0;          /* start[e] is now e's end */
        for (Py_ssize_t e = 0; e < n_expert; e++) {
            int64_t end = start[e];
            if (end > begin) {
                if (rank >= a0 && rank < a1) {
                    runs[3 * n_runs] = e;
                    runs[3 * n_runs + 1] = begin;
                    runs[3 * n_runs + 2] = end;
                    n_runs++;
                    run_slots += end - begin;
                }
                rank++;
            }
            begin = end;
        }
        mm_job_t job = {traits, k, packed, w.buf, fused ? w_up.buf : NULL, (size_t)(n_out * rb), n_in, n_out, r0, r1,
                        r1 - r0, 1, NULL, 0, xs, slot_out, runs, n_runs, out.buf, up_out, NULL};
        const int64_t tensors = fused ? 2 : 1;
        if (pool && n_runs && r1 > r0) {
            job.block_rows = chunk_rows(&job, run_slots);
            job.n_blocks = (r1 - r0 + job.block_rows - 1) / job.block_rows;
        }
        const int64_t n_units = n_runs * job.n_blocks;
        if (!(job.first = first = malloc(sizeof(*first) * (size_t)(n_units + 1))) ||
            (fused && !(job.gate_done = gate_done = calloc((size_t)n_units + 1, sizeof(*gate_done)))))
            no_memory = 1;
        else if (r1 > r0) {
            job.n_chunks = guided_chunks(n_units, pool ? pool_threads(pool) : 1, first);
            if (pool && n_runs)
                busy = pool_run(pool, tensors * job.n_chunks, mm_chunk, &job, times.buf);
            else
                for (int64_t k = 0; k < tensors * job.n_chunks; k++) mm_chunk(&job, k, 0);
        }
    }
    Py_END_ALLOW_THREADS
    if (no_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "pool: already running a job");
        goto done;
    }
    ret = PyLong_FromLongLong(n_runs);
done:
    free(xs);
    free(xq_owned);
    free(up_out);
    free((void *)gate_done);
    free(first);
    free(id);
    free(slot_out);
    free(start);
    free(runs);
    if (times.obj) PyBuffer_Release(&times);
    if (x.obj) PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&w_up);
    PyBuffer_Release(&out);
    return ret;
}

/* repack_r16(w, type, n_in, out, path=-1): stored rows [n_rows, row_bytes] (n_rows a multiple
 * of 16, any leading dimensions) -> the same bytes in R16 form (hybrid/kernels/kernels.h),
 * which a path's R16 kernel reads in place for any number of tokens: AVX-512 then does 8
 * vpdpbusd per 16 rows and 32 values and no horizontal sums, where its row kernels shuffle
 * each block into its lanes (the 256-value types': unpack it through memory). Done once at load on the paths where that wins (r16_first), as
 * llama.cpp's CPU "repack" buffers and ik_llama.cpp's -rtr do. Every path's repack gives
 * the same bytes; `path` picks whose (-1: the default path's). */
static PyObject *py_repack_r16(PyObject *self, PyObject *args) {
    Py_buffer w, out;
    int type, path = -1;
    Py_ssize_t n_in;
    if (!PyArg_ParseTuple(args, "y*inw*|i", &w, &type, &n_in, &out, &path)) return NULL;
    PyObject *ret = NULL;
    const quant_traits_t *traits = matmul_traits(type, n_in);
    const quant_kernels_t *k;
    if (!traits || (path = parse_path(path)) < 0 || !(k = path_kernels(traits, path, 1))) goto done;
    const Py_ssize_t rb = (Py_ssize_t)weight_row_bytes(traits, n_in), group = R16_ROWS * rb;
    if (w.len % group) {
        PyErr_Format(PyExc_ValueError, "repack_r16: %zd bytes is not whole blocks of 16 rows of n_in=%zd", w.len, n_in);
        goto done;
    }
    if (check_size(&out, w.len, "out")) goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t at = 0; at < w.len; at += group)
        k->repack_r16((const uint8_t *)w.buf + at, (size_t)rb, R16_ROWS, n_in / traits->block_values,
                      (uint8_t *)out.buf + at, NULL);
    Py_END_ALLOW_THREADS
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_int8_macs(PyObject *self, PyObject *args) {
    int path;
    long long n;
    if (!PyArg_ParseTuple(args, "iL", &path, &n) || (path = parse_path(path)) < 0) return NULL;
    int64_t macs = 0;
    if (SIMD_PATHS[path].int8_macs) {
        Py_BEGIN_ALLOW_THREADS
        macs = SIMD_PATHS[path].int8_macs(n);
        Py_END_ALLOW_THREADS
    }
    return PyLong_FromLongLong(macs);
}

static PyObject *py_q8_row_bytes(PyObject *self, PyObject *args) {
    Py_ssize_t n_in;
    int type = GGML_Q4_0;
    if (!PyArg_ParseTuple(args, "n|i", &n_in, &type)) return NULL;
    const quant_traits_t *traits = matmul_traits(type, n_in);
    return traits ? PyLong_FromSize_t(act_row_bytes(traits, n_in)) : NULL;
}

static PyMethodDef methods[] = {
    {"quantize_q8", py_quantize_q8, METH_VARARGS,
     "quantize_q8(x_f32, n_in, out_u8, path, type=Q4_0): rows of x -> q8 rows of the activation type's dot takes"},
    {"mul_mat_id", py_mul_mat_id, METH_VARARGS,
     "mul_mat_id(w, w_up, type, n_expert, n_in, x, ids, n_used, out, r0, r1, a0, a1, path, pool=None, times=None) "
     "-> experts computed. x: float32 or q8 rows; ids: int32/int64 or None (a plain matmul); "
     "times (with a pool): int64 [n_threads, 3], per thread (first claim ns, end ns, chunks run)"},
    {"repack_r16", py_repack_r16, METH_VARARGS,
     "repack_r16(w, type, n_in, out, path=-1): stored rows (a multiple of 16) -> R16 blocks, the same size; "
     "a call on them passes type | R16"},
    {"int8_macs", py_int8_macs, METH_VARARGS,
     "int8_macs(path, n): n rounds of the path's int8 multiply-add at its throughput, the GIL released "
     "-> multiply-adds done (0: the path has none)"},
    {"q8_row_bytes", py_q8_row_bytes, METH_VARARGS,
     "q8_row_bytes(n_in, type=Q4_0): bytes of one quantised activation row for the type's dot product"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "CPU matmul kernels on GGUF blocks", -1, methods};

/* The names of the paths p with has[p] set -> a tuple, in path order. */
static PyObject *path_names(const int has[N_PATHS]) {
    PyObject *names = PyList_New(0);
    for (int p = 0; p < N_PATHS && names; p++) {
        PyObject *name = has[p] ? PyUnicode_FromString(SIMD_PATHS[p].name) : NULL;
        if (has[p] && (!name || PyList_Append(names, name) < 0)) Py_CLEAR(names);
        Py_XDECREF(name);
    }
    PyObject *tuple = names ? PyList_AsTuple(names) : NULL;
    Py_XDECREF(names);
    return tuple;
}

static PyStructSequence_Field trait_fields[] = {
    {"name", "the ggml type's name"},
    {"block_values", "values per block"},
    {"block_bytes", "bytes per block"},
    {"activation", "the activation format its dot product takes ('q8_32', 'q8_K'); None: no matmul kernel"},
    {"kernels", "the paths built with its matmul kernels"},
    {"r16", "those of them with kernels on the repacked (R16) layout"},
    {"r16_first", "those of them where R16 outruns the stored rows: the engine repacks at load"},
    {NULL, NULL},
};
static PyStructSequence_Desc trait_desc = {"hybrid._kernels.QuantTraits", "A ggml type's facts (hybrid/quant_traits.h)",
                                           trait_fields, 7};

/* The table as Python sees it: {ggml type id: QuantTraits}. */
static PyObject *traits_dict(void) {
    PyTypeObject *type = PyStructSequence_NewType(&trait_desc);
    PyObject *dict = type ? PyDict_New() : NULL;
    for (int i = 0; i < N_QUANT_TRAITS && dict; i++) {
        const quant_traits_t *t = &QUANT_TRAITS[i];
        int kernels[N_PATHS], r16[N_PATHS], r16_first[N_PATHS];
        for (int p = 0; p < N_PATHS; p++) {
            kernels[p] = t->kernels[p] != NULL;
            r16[p] = kernels[p] && t->kernels[p]->r16_dot;
            r16_first[p] = r16[p] && t->kernels[p]->r16_first;
        }
        PyObject *values[7] = {PyUnicode_FromString(t->name), PyLong_FromLongLong(t->block_values),
                               PyLong_FromLongLong(t->block_bytes),
                               t->activation == ACT_Q8_32 ? PyUnicode_FromString("q8_32")
                               : t->activation == ACT_Q8_K ? PyUnicode_FromString("q8_K") : Py_NewRef(Py_None),
                               path_names(kernels), path_names(r16), path_names(r16_first)};
        PyObject *item = PyStructSequence_New(type), *key = PyLong_FromLong(t->type);
        int ok = item && key;
        for (int f = 0; f < 7; f++) {
            ok = ok && values[f];
            if (item && values[f]) PyStructSequence_SetItem(item, f, values[f]);
            else Py_XDECREF(values[f]);
        }
        if (!ok || PyDict_SetItem(dict, key, item) < 0) Py_CLEAR(dict);
        Py_XDECREF(item);
        Py_XDECREF(key);
    }
    Py_XDECREF(type);
    return dict;
}

/* Adds `value` (a new reference, NULL: an error already set) to m as `name`. -> 0, or -1. */
static int add(PyObject *m, const char *name, PyObject *value) {
    if (value && PyModule_AddObject(m, name, value) == 0) return 0;
    Py_XDECREF(value);
    return -1;
}

PyMODINIT_FUNC PyInit__kernels(void) {
    int every_path[N_PATHS];
    for (int p = 0; p < N_PATHS; p++) {
        every_path[p] = 1;
        runs[p] = SIMD_PATHS[p].cpu_runs && SIMD_PATHS[p].cpu_runs();
    }
    for (int i = N_PATHS - 1; i >= 0; i--)
        if (runs[PATH_PREFERENCE[i]]) default_path = PATH_PREFERENCE[i];
    const char *want = getenv("HYPROF_KERNELS");
    if (want && *want && strcmp(want, "torch")) {     /* "torch": the engine's exact path, see hybrid/weights.py */
        int p = 0;
        while (p < N_PATHS && !(runs[p] && strcmp(want, SIMD_PATHS[p].name) == 0)) p++;
        if (p == N_PATHS) {
            char names[256] = "";
            for (int q = 0; q < N_PATHS; q++)
                if (runs[q]) snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", *names ? ", " : "",
                                      SIMD_PATHS[q].name);
            PyErr_Format(PyExc_ImportError, "HYPROF_KERNELS=%s: not one of the paths this CPU runs (%s)", want, names);
            return NULL;
        }
        default_path = p;
    }
    if (PyType_Ready(&PoolType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    static const pool_api_t pool_api = {pool_from_object, pool_run, pool_threads};
    static const quant_api_t quant_api = {quant_traits};
    if (add(m, "Pool", Py_NewRef((PyObject *)&PoolType)) ||
        add(m, "_pool_api", PyCapsule_New((void *)&pool_api, POOL_API_CAPSULE, NULL)) ||
        add(m, "_quant_api", PyCapsule_New((void *)&quant_api, QUANT_API_CAPSULE, NULL)) ||
        add(m, "PATHS", path_names(runs)) || add(m, "PATH_NAMES", path_names(every_path)) ||
        add(m, "DEFAULT_PATH", PyUnicode_FromString(SIMD_PATHS[default_path].name)) ||
        add(m, "R16", PyLong_FromLong(TYPE_R16)) || add(m, "TRAITS", traits_dict())) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
