/* The small float32 ops of a forward pass, native (hybrid/ops.py is the Python side).
 *
 * Why native code: a generated token runs ~70 ops besides its matmuls (norms,
 * RoPE, softmaxes, residual adds, SwiGLU, the router, the attention over the
 * KV cache), each on a few KiB. Their
 * arithmetic takes well under a microsecond; in torch each costs 10-100 us in
 * the engine, because it runs right after a matmul has streamed hundreds of MB
 * through the caches, and torch's dispatcher (TensorIterator, the allocator,
 * kernel selection) is a lot of cold code and data to bring back. These
 * functions are a few hundred bytes of loop each, so they stay cheap when cold,
 * as ggml's own CPU ops do.
 *
 * Calling convention: tensors come as their data addresses (torch's
 * `data_ptr()`) with their sizes, and results go into outputs the caller
 * allocated. Measured cold (after streaming 8 MB), even a `.numpy()` view of a
 * tensor costs ~3 us and allocating an output ~6-9 us, more than the op; an
 * address costs ~0.4 us. So this module trusts its caller for what an address
 * cannot tell (the dtype, that the memory holds the sizes given): hybrid/ops.py
 * is the checked interface, and the only one. What the arguments themselves
 * show is checked here (sizes that must agree, indices in range, no null
 * address), as a ValueError / IndexError.
 *
 * Plain C, built with -O3 and no -march: GCC vectorises the loops for the
 * baseline ISA; where the target_clones attribute exists (GCC on x86-64 Linux)
 * the exp-heavy loops also get an AVX2 and an AVX-512 clone picked at load
 * time. Loops keep each lane independent (reductions keep separate partial
 * sums), which lets the compiler vectorise them without -ffast-math. The GIL
 * is kept: an op takes a microsecond or two, less than releasing and retaking
 * it would. The exceptions are the ops given a hybrid._kernels.Pool (reached
 * through its capsule) for its threads to share (flash_attn, matmul_f32, and a
 * prompt's add, swiglu and scale_rows), which release it while the chunks run.
 * GET_ROWS takes a type's block size and row dequantisation from the quant traits
 * table (hybrid/quant_traits.h), also through a capsule of hybrid._kernels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "_pool.h"
#include "_vecmath.h"
#include "quant_traits.h"

#define LANES 16                   /* partial sums per reduction: independent lanes the compiler vectorises */
#define MAX_COLS 4096              /* top_k's scratch: experts per token at most */

/* --- arguments --------------------------------------------------------------------------------- */

/* Positional arguments by a format, one letter each: 'p' an address (non-zero int), 'o' an
 * optional address (0: none), 'n' a size (int >= 0), 'd' a float. 0, or -1 with an exception. */
static int parse(const char *fn, PyObject *const *args, Py_ssize_t nargs, const char *fmt, ...) {
    Py_ssize_t want = (Py_ssize_t)strlen(fmt);
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", fn, want, nargs);
        return -1;
    }
    va_list ap;
    va_start(ap, fmt);
    int rc = 0;
    for (Py_ssize_t i = 0; i < want && rc == 0; i++) {
        if (fmt[i] == 'p' || fmt[i] == 'o') {
            void **p = va_arg(ap, void **);
            *p = PyLong_AsVoidPtr(args[i]);
            if (PyErr_Occurred() || (!*p && fmt[i] == 'p')) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: argument %zd is a null address", fn, i);
                rc = -1;
            }
        } else if (fmt[i] == 'n') {
            Py_ssize_t *n = va_arg(ap, Py_ssize_t *);
            *n = PyLong_AsSsize_t(args[i]);
            if (*n < 0) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: argument %zd is negative", fn, i);
                rc = -1;
            }
        } else {
            double *d = va_arg(ap, double *);
            *d = PyFloat_AsDouble(args[i]);
            if (*d == -1.0 && PyErr_Occurred()) rc = -1;
        }
    }
    va_end(ap);
    return rc;
}

static PyObject *bad(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyErr_FormatV(PyExc_ValueError, fmt, ap);
    va_end(ap);
    return NULL;
}

/* --- element functions ------------------------------------------------------------------------- */

/* --- RMS_NORM ---------------------------------------------------------------------------------- */

/* out[r] = x[r, c0:c0+n] / sqrt(mean(x^2) + eps) * w, the sum of squares in double as ggml's. */
static void rms_norm_row(const float *x, const float *w, int64_t n, float eps, float *out) {
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (double)x[i + l] * x[i + l];
    double sum = 0;
    for (; i < n; i++) sum += (double)x[i] * x[i];
    for (int l = 0; l < LANES; l++) sum += acc[l];
    const float scale = (float)(1.0 / sqrt(sum / (double)n + eps));
    for (i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* rms_norm(x, rows, row_len, c0, n, w, eps, out): x [rows, row_len] normed on columns [c0, c0+n)
 * times w [n] -> out [rows, n] */
static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *x, *w;
    float *out;
    Py_ssize_t rows, row_len, c0, n;
    double eps;
    if (parse("rms_norm", args, nargs, "pnnnnpdp", &x, &rows, &row_len, &c0, &n, &w, &eps, &out)) return NULL;
    if (n == 0 || c0 + n > row_len) return bad("rms_norm: columns [%zd, %zd) of rows of %zd", c0, c0 + n, row_len);
    for (Py_ssize_t r = 0; r < rows; r++) rms_norm_row(x + r * row_len + c0, w, n, (float)eps, out + r * n);
    Py_RETURN_NONE;
}

/* --- ROPE -------------------------------------------------------------------------------------- */

/* rope(x, rows, row_len, c0, width, r0, n_rot, rows_per_token, cos, sin, pos, n_pos, neox, out): for
 * each row of x [rows, row_len], out's row [width] is x's columns [c0, c0+width) with the pairs of
 * columns [r0, r0+n_rot) rotated by the angles of position pos[row / rows_per_token]: (a, b) -> (a cos
 * - b sin, a sin + b cos), cos/sin [n_pos, n_rot/2] a table over positions, already times the YaRN
 * magnitude. Pair p is columns (2p, 2p + 1) (ggml's NORM mode, neox 0) or (p, p + n_rot/2) (NEOX
 * mode, neox 1: Qwen, Llama-style checkpoints). */
static PyObject *py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *x, *cs, *sn;
    const int64_t *pos;
    float *out;
    Py_ssize_t rows, row_len, c0, width, r0, n_rot, per_token, n_pos, neox;
    if (parse("rope", args, nargs, "pnnnnnnnppnpnp", &x, &rows, &row_len, &c0, &width, &r0, &n_rot, &per_token, &cs,
              &sn, &pos, &n_pos, &neox, &out))
        return NULL;
    if (n_rot % 2 || r0 < c0 || r0 + n_rot > c0 + width || c0 + width > row_len)
        return bad("rope: rotated columns [%zd, %zd) and kept [%zd, %zd) do not fit rows of %zd", r0, r0 + n_rot, c0,
                   c0 + width, row_len);
    if (per_token == 0 || rows % per_token) return bad("rope: %zd rows are not whole tokens of %zd", rows, per_token);
    for (Py_ssize_t t = 0; t < rows / per_token; t++)
        if (pos[t] < 0 || pos[t] >= n_pos) {
            PyErr_Format(PyExc_IndexError, "rope: position %lld of a table of %zd", (long long)pos[t], n_pos);
            return NULL;
        }
    /* pair p: columns (p * step, p * step + second) */
    const Py_ssize_t half = n_rot / 2, step = neox ? 1 : 2, second = neox ? half : 1;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const int64_t p_row = pos[r / per_token] * half;
        const float *xr = x + r * row_len, *c = cs + p_row, *s = sn + p_row;
        float *o = out + r * width;
        memcpy(o, xr + c0, (size_t)width * sizeof(float));
        const float *a = xr + r0;
        float *y = o + (r0 - c0);
        for (Py_ssize_t p = 0; p < half; p++) {
            const Py_ssize_t i0 = p * step, i1 = i0 + second;
            float x0 = a[i0], x1 = a[i1];
            y[i0] = x0 * c[p] - x1 * s[p];
            y[i1] = x0 * s[p] + x1 * c[p];
        }
    }
    Py_RETURN_NONE;
}

/* --- SOFT_MAX and SIGMOID ---------------------------------------------------------------------- */

/* softmax(x[i] * scale) of the first n_visible of a row's n entries; the rest are left out (0). */
SIMD_CLONES
static void softmax_row(const float *x, int64_t n_visible, int64_t n, float scale, float *out) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n_visible; i++) {
        out[i] = x[i] * scale;
        mx = out[i] > mx ? out[i] : mx;
    }
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n_visible; i += LANES)
        for (int l = 0; l < LANES; l++) {
            float e = exp_f32(out[i + l] - mx);
            out[i + l] = e;
            acc[l] += e;
        }
    float sum = 0;
    for (; i < n_visible; i++) {
        out[i] = exp_f32(out[i] - mx);
        sum += out[i];
    }
    for (int l = 0; l < LANES; l++) sum += acc[l];
    const float inv = 1.0f / sum;
    for (i = 0; i < n_visible; i++) out[i] *= inv;
    memset(out + n_visible, 0, (size_t)(n - n_visible) * sizeof(float));
}

/* softmax(x, rows, n_cols, scale, n_tokens, n_past, out): softmax(x * scale) over each row of
 * x [rows, n_cols]. With n_tokens > 0 it is the attention's causal SOFT_MAX: x is [..., n_tokens,
 * n_cols] (kq), and token t, at position n_past + t, attends to columns (positions) up to its own,
 * the later ones are left out (0); with n_tokens 0, every column counts (the router). */
static PyObject *py_softmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *x;
    float *out;
    Py_ssize_t rows, n_cols, n_tokens, n_past;
    double scale;
    if (parse("softmax", args, nargs, "pnndnnp", &x, &rows, &n_cols, &scale, &n_tokens, &n_past, &out)) return NULL;
    if (n_cols == 0 || (n_tokens && rows % n_tokens))
        return bad("softmax: %zd rows of %zd are not rows of %zd tokens", rows, n_cols, n_tokens);
    for (Py_ssize_t r = 0; r < rows; r++) {
        Py_ssize_t n_visible = n_tokens ? n_past + r % n_tokens + 1 : n_cols;
        softmax_row(x + r * n_cols, n_visible < n_cols ? n_visible : n_cols, n_cols, (float)scale, out + r * n_cols);
    }
    Py_RETURN_NONE;
}

SIMD_CLONES
static void sigmoid_n(const float *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = 1.0f / (1.0f + exp_f32(-x[i]));
}

/* sigmoid(x, n, out) */
static PyObject *py_sigmoid(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *x;
    float *out;
    Py_ssize_t n;
    if (parse("sigmoid", args, nargs, "pnp", &x, &n, &out)) return NULL;
    sigmoid_n(x, n, out);
    Py_RETURN_NONE;
}

/* --- elementwise: ADD, MUL by a per-row weight, GLU ------------------------------------------- */

static void add_n(const float *a, const float *b, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static void scale_n(const float *x, float w, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * w;
}

/* sum_rows(x, rows, n_sum, n, out): out[t, :] = the sum over u of x[t, u, :], x [rows, n_sum, n]
 * (MoE: the weighted experts of each token added up, in slot order) */
static PyObject *py_sum_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *x;
    float *out;
    Py_ssize_t rows, n_sum, n;
    if (parse("sum_rows", args, nargs, "pnnnp", &x, &rows, &n_sum, &n, &out)) return NULL;
    if (n_sum == 0) return bad("sum_rows: nothing to sum");
    for (Py_ssize_t t = 0; t < rows; t++) {
        const float *xt = x + t * n_sum * n;
        float *o = out + t * n;
        memcpy(o, xt, (size_t)n * sizeof(float));
        for (Py_ssize_t u = 1; u < n_sum; u++) add_n(o, xt + u * n, n, o);
    }
    Py_RETURN_NONE;
}

/* --- attention: the KV cache's CPY, kq and kqv ------------------------------------------------- */

/* Rows [i, h] of a strided tensor whose last dimension is contiguous, at p + i * st + h * sh:
 * the views attention reads are taken in place (q_pe inside q's rows, the heads of a per-head
 * matmul's output, MLA's compressed cache that every head shares with sh 0). */
typedef struct {
    const float *p;
    Py_ssize_t st, sh;
} rows_t;

static inline const float *row(rows_t r, Py_ssize_t i, Py_ssize_t h) { return r.p + i * r.st + h * r.sh; }

/* s_j[l] += the products a[i] b_j[i] of the columns i = l (mod LANES), for four rows b_j at once:
 * one dot product alone would wait on its adds; four keep independent chains in flight and read a once. */
static inline void madd4(const float *a, const float *const b[4], Py_ssize_t n, float *s0, float *s1, float *s2,
                         float *s3) {
    const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float x = a[i + l];
            s0[l] += x * b0[i + l];
            s1[l] += x * b1[i + l];
            s2[l] += x * b2[i + l];
            s3[l] += x * b3[i + l];
        }
    for (int l = 0; i < n; i++, l++) {
        s0[l] += a[i] * b0[i];
        s1[l] += a[i] * b1[i];
        s2[l] += a[i] * b2[i];
        s3[l] += a[i] * b3[i];
    }
}

/* The sum of s[LANES] by halves (a sum in lane order would be a chain of LANES dependent adds). */
static inline float sum_lanes(float *s) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) s[l] += s[l + w];
    return s[0];
}

/* append_kv(n_past, cache, n_ctx, n_tokens, n_head, x, x_st, x_sh, n_x, tail, tail_st, tail_sh, n_tail):
 * the CPY of n_tokens new positions into a KV cache [n_ctx, n_head, n_x + n_tail] after the n_past
 * cached ones: cache[n_past + t, h] = x[t, h] followed by tail[t, h] (k_pe, with tail_sh 0 the same
 * for every head; address 0 with n_tail 0: none). n_past comes first, as in every call that
 * depends on the cache's depth (hybrid/ops.py replays them with the depth of the moment). */
static PyObject *py_append_kv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    float *cache;
    rows_t x, tail;
    Py_ssize_t n_ctx, n_past, n_tokens, n_head, n_x, n_tail;
    if (parse("append_kv", args, nargs, "npnnnpnnnonnn", &n_past, &cache, &n_ctx, &n_tokens, &n_head, &x.p, &x.st,
              &x.sh, &n_x, &tail.p, &tail.st, &tail.sh, &n_tail))
        return NULL;
    if (n_past + n_tokens > n_ctx)
        return bad("append_kv: positions [%zd, %zd) do not fit a cache of %zd", n_past, n_past + n_tokens, n_ctx);
    if (n_tail && !tail.p) return bad("append_kv: a tail of %zd columns at a null address", n_tail);
    const Py_ssize_t width = n_x + n_tail;
    for (Py_ssize_t t = 0; t < n_tokens; t++)
        for (Py_ssize_t h = 0; h < n_head; h++) {
            float *o = cache + ((n_past + t) * n_head + h) * width;
            memcpy(o, row(x, t, h), (size_t)n_x * sizeof(float));
            if (n_tail) memcpy(o + n_x, row(tail, t, h), (size_t)n_tail * sizeof(float));
        }
    Py_RETURN_NONE;
}

/* Tokens per block of the kq and kqv loops: a block's queries (outputs), up to 8 x 16 heads x 576
 * floats, stay in cache while the cached keys (values) stream past once per block. */
#define TOKEN_BLOCK 8

SIMD_CLONES
static void kq_rows(rows_t q, Py_ssize_t n_q, rows_t pe, Py_ssize_t n_pe, Py_ssize_t n_tokens, Py_ssize_t n_head,
                    rows_t k, Py_ssize_t n_rep, Py_ssize_t n_kv, float *out) {
    for (Py_ssize_t t0 = 0; t0 < n_tokens; t0 += TOKEN_BLOCK) {
        const Py_ssize_t t1 = t0 + TOKEN_BLOCK < n_tokens ? t0 + TOKEN_BLOCK : n_tokens;
        for (Py_ssize_t s = 0; s < n_kv; s += 4)
            for (Py_ssize_t h = 0; h < n_head; h++) {
                const float *ks[4], *ks_pe[4];
                for (int j = 0; j < 4; j++) {                   /* past the last key: it again, not stored */
                    ks[j] = row(k, s + j < n_kv ? s + j : n_kv - 1, h / n_rep);
                    ks_pe[j] = ks[j] + n_q;
                }
                for (Py_ssize_t t = t0; t < t1; t++) {
                    float s0[LANES] = {0}, s1[LANES] = {0}, s2[LANES] = {0}, s3[LANES] = {0};
                    madd4(row(q, t, h), ks, n_q, s0, s1, s2, s3);
                    if (n_pe) madd4(row(pe, t, h), ks_pe, n_pe, s0, s1, s2, s3);
                    const float kq[4] = {sum_lanes(s0), sum_lanes(s1), sum_lanes(s2), sum_lanes(s3)};
                    for (int j = 0; j < 4 && s + j < n_kv; j++) out[(h * n_tokens + t) * n_kv + s + j] = kq[j];
                }
            }
    }
}

/* kq(q, q_st, q_sh, n_q, pe, pe_st, pe_sh, n_pe, n_tokens, n_head, k, k_st, k_sh, n_rep, n_kv, out): the
 * attention scores out [n_head, n_tokens, n_kv], out[h, t, s] = q[t, h] . k[s, h / n_rep], each query
 * the n_q columns of q's row followed by the n_pe of pe's (MLA: q_nope absorbed, then q_pe, without
 * concatenating them; address 0 with n_pe 0: none), each key row n_q + n_pe columns. n_rep: query
 * heads per cached key head (grouped-query attention, GQA; 1: one each). */
static PyObject *py_kq(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    rows_t q, pe, k;
    float *out;
    Py_ssize_t n_q, n_pe, n_tokens, n_head, n_rep, n_kv;
    if (parse("kq", args, nargs, "pnnnonnnnnpnnnnp", &q.p, &q.st, &q.sh, &n_q, &pe.p, &pe.st, &pe.sh, &n_pe, &n_tokens,
              &n_head, &k.p, &k.st, &k.sh, &n_rep, &n_kv, &out))
        return NULL;
    if (n_pe && !pe.p) return bad("kq: a q_pe of %zd columns at a null address", n_pe);
    if (n_rep == 0 || n_head % n_rep) return bad("kq: %zd heads are not groups of %zd", n_head, n_rep);
    kq_rows(q, n_q, pe, n_pe, n_tokens, n_head, k, n_rep, n_kv, out);
    Py_RETURN_NONE;
}

/* Columns of the output that kqv_rows sums in registers, over every cached position at once. */
#define KQV_COLS (4 * LANES)

SIMD_CLONES
static void kqv_rows(const float *kq, Py_ssize_t n_tokens, Py_ssize_t n_head, Py_ssize_t n_kv, rows_t v,
                     Py_ssize_t n_rep, Py_ssize_t n_v, float *out, Py_ssize_t out_st) {
    for (Py_ssize_t t = 0; t < n_tokens; t++)
        for (Py_ssize_t h = 0; h < n_head; h++) {
            const float *p = kq + (h * n_tokens + t) * n_kv;
            float *o = out + t * out_st + h * n_v;
            Py_ssize_t c = 0;
            for (; c + KQV_COLS <= n_v; c += KQV_COLS) {
                float acc[KQV_COLS] = {0};
                for (Py_ssize_t s = 0; s < n_kv; s++) {
                    const float *vs = row(v, s, h / n_rep) + c;
                    for (int l = 0; l < KQV_COLS; l++) acc[l] += p[s] * vs[l];
                }
                memcpy(o + c, acc, sizeof acc);
            }
            for (; c < n_v; c++) {
                float acc = 0;
                for (Py_ssize_t s = 0; s < n_kv; s++) acc += p[s] * row(v, s, h / n_rep)[c];
                o[c] = acc;
            }
        }
}

/* kqv(kq, n_tokens, n_head, n_kv, v, v_st, v_sh, n_rep, n_v, out): the attention output out [n_tokens,
 * n_head, n_v], out[t, h] = the sum over s of kq[h, t, s] v[s, h / n_rep], kq [n_head, n_tokens, n_kv]
 * (the softmax), v's rows n_v columns, n_rep query heads per cached value head (as kq). */
static PyObject *py_kqv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *kq;
    rows_t v;
    float *out;
    Py_ssize_t n_tokens, n_head, n_kv, n_rep, n_v;
    if (parse("kqv", args, nargs, "pnnnpnnnnp", &kq, &n_tokens, &n_head, &n_kv, &v.p, &v.st, &v.sh, &n_rep, &n_v,
              &out))
        return NULL;
    if (n_rep == 0 || n_head % n_rep) return bad("kqv: %zd heads are not groups of %zd", n_head, n_rep);
    kqv_rows(kq, n_tokens, n_head, n_kv, v, n_rep, n_v, out, n_head * n_v);
    Py_RETURN_NONE;
}

/* --- ops the pool's threads share ---------------------------------------------------------------- */

static const pool_api_t *pool_api;                   /* hybrid._kernels' pool, imported on first use */

/* A call's trailing (pool, times): a hybrid._kernels.Pool or None (this thread alone), and None or the
 * pool's int64 [n_threads, 3] times (as its jobs fill them). 0, or -1 with an exception. */
static int pool_args(const char *fn, PyObject *pool_obj, PyObject *times_obj, pool_t **pool, Py_buffer *times) {
    *pool = NULL;
    if (pool_obj != Py_None) {
        if (!pool_api && !(pool_api = PyCapsule_Import(POOL_API_CAPSULE, 0))) return -1;
        if (!(*pool = pool_api->from_object(pool_obj))) return -1;
    }
    if (times_obj == Py_None) return 0;
    if (!*pool) return bad("%s: times given without a pool", fn), -1;
    if (PyObject_GetBuffer(times_obj, times, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (times->len != 3 * pool_api->threads(*pool) * (Py_ssize_t)sizeof(int64_t)) {
        bad("%s: times: expected int64 [n_threads=%d, 3], got %zd bytes", fn, pool_api->threads(*pool), times->len);
        PyBuffer_Release(times);
        return -1;
    }
    return 0;
}

/* Chunks [0, n) of fn on the pool (or on this thread), the GIL released; releases `times`. */
static PyObject *run_chunks(const char *name, pool_t *pool, int64_t n, pool_chunk_fn fn, void *ctx, Py_buffer *times) {
    int busy = 0;
    Py_BEGIN_ALLOW_THREADS
    if (pool) busy = pool_api->run(pool, n, fn, ctx, times->buf);
    else
        for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
    Py_END_ALLOW_THREADS
    if (times->obj) PyBuffer_Release(times);
    if (busy) return PyErr_Format(PyExc_RuntimeError, "%s: the pool is already running a job", name);
    Py_RETURN_NONE;
}

/* --- ADD, GLU and MUL (scale_rows), their rows shared by the pool for a prompt's batch ---------- */

enum { EW_ADD, EW_SWIGLU, EW_SCALE };
#define EW_CHUNK (16 * 1024)                 /* elements a chunk at least: 64 KiB of output */

typedef struct {
    int op;
    const float *a, *b;                      /* add: b repeats every `row`; scale: b[r] scales row r */
    float *out;
    int64_t n, row, per;                     /* elements; row length; elements a chunk (whole rows) */
} ew_job_t;

static void ew_chunk(void *ctx, int64_t c, int thread) {
    const ew_job_t *j = ctx;
    const int64_t i0 = c * j->per, i1 = i0 + j->per < j->n ? i0 + j->per : j->n;
    if (j->op == EW_SWIGLU) swiglu_f32(j->a + i0, j->b + i0, i1 - i0, j->out + i0);
    else if (j->op == EW_ADD && j->row == j->n) add_n(j->a + i0, j->b + i0, i1 - i0, j->out + i0);
    else
        for (int64_t i = i0; i < i1; i += j->row) {
            if (j->op == EW_ADD) add_n(j->a + i, j->b, j->row, j->out + i);
            else scale_n(j->a + i, j->b[i / j->row], j->row, j->out + i);
        }
}

/* The job on this thread (no trailing pool, times) or shared by a Pool: chunks of whole rows (of
 * `unit` elements: 1 where any cut will do) of at least EW_CHUNK elements. */
static PyObject *run_ew(const char *name, ew_job_t *j, int64_t unit, PyObject *const *args, Py_ssize_t nargs,
                        Py_ssize_t base) {
    if (nargs != base && nargs != base + 2)
        return PyErr_Format(PyExc_TypeError, "%s() takes %zd or %zd arguments (%zd given)", name, base, base + 2, nargs);
    pool_t *pool = NULL;
    Py_buffer times = {0};
    if (nargs == base + 2 && pool_args(name, args[base], args[base + 1], &pool, &times)) return NULL;
    if (!pool) {                             /* the whole op as one chunk, the GIL kept */
        j->per = j->n ? j->n : 1;
        ew_chunk(j, 0, 0);
        Py_RETURN_NONE;
    }
    j->per = (EW_CHUNK + unit - 1) / unit * unit;
    return run_chunks(name, pool, (j->n + j->per - 1) / j->per, ew_chunk, j, &times);
}

/* add(a, n_a, b, n_b, out[, pool, times]): out = a + b, b [n_b] repeated over a [n_a] (n_a a
 * multiple of n_b) */
static PyObject *py_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ew_job_t j = {EW_ADD};
    Py_ssize_t na, nb;
    if (parse("add", args, nargs < 5 ? nargs : 5, "pnpnp", &j.a, &na, &j.b, &nb, &j.out)) return NULL;
    if (nb == 0 || na % nb) return bad("add: b of %zd does not repeat over a of %zd", nb, na);
    j.n = na, j.row = nb;
    return run_ew("add", &j, nb == na ? 1 : nb, args, nargs, 5);
}

/* scale_rows(x, rows, n, w, out[, pool, times]): out[r, :] = x[r, :] * w[r] for x [rows, n], w [rows]
 * (MoE: each expert's output times its routing weight) */
static PyObject *py_scale_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ew_job_t j = {EW_SCALE};
    Py_ssize_t rows, n;
    if (parse("scale_rows", args, nargs < 5 ? nargs : 5, "pnnpp", &j.a, &rows, &n, &j.b, &j.out)) return NULL;
    j.n = rows * n, j.row = n;
    return run_ew("scale_rows", &j, n ? n : 1, args, nargs, 5);
}

/* swiglu(g, u, n, out[, pool, times]): out = silu(g) * u (GLU) */
static PyObject *py_swiglu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ew_job_t j = {EW_SWIGLU};
    Py_ssize_t n;
    if (parse("swiglu", args, nargs < 4 ? nargs : 4, "ppnp", &j.a, &j.b, &n, &j.out)) return NULL;
    j.n = n, j.row = 1;
    return run_ew("swiglu", &j, 1, args, nargs, 4);
}

/* --- FLASH_ATTN_EXT: kq, the causal softmax and kqv in one op, its heads shared by the pool ----- */

typedef struct {
    rows_t q, pe, k, v;
    Py_ssize_t n_q, n_pe, n_v, n_tokens, n_head, n_rep, n_past, n_kv;
    float scale, *out, *scores;                       /* scores: [threads][n_tokens, n_kv] */
} attn_job_t;

static inline rows_t head_rows(rows_t r, Py_ssize_t h) { return (rows_t){r.p ? row(r, 0, h) : NULL, r.st, 0}; }

/* Head h, every token: its scores in the thread's scratch, softmaxed in place, then times v (k and v
 * of the head's group, h / n_rep). */
static void attn_head(void *ctx, int64_t h, int thread) {
    const attn_job_t *j = ctx;
    float *scores = j->scores + (size_t)thread * (size_t)(j->n_tokens * j->n_kv);
    kq_rows(head_rows(j->q, h), j->n_q, head_rows(j->pe, h), j->n_pe, j->n_tokens, 1, head_rows(j->k, h / j->n_rep),
            1, j->n_kv, scores);
    for (Py_ssize_t t = 0; t < j->n_tokens; t++)
        softmax_row(scores + t * j->n_kv, j->n_past + t + 1, j->n_kv, j->scale, scores + t * j->n_kv);
    kqv_rows(scores, j->n_tokens, 1, j->n_kv, head_rows(j->v, h / j->n_rep), 1, j->n_v, j->out + h * j->n_v,
             j->n_head * j->n_v);
}

/* flash_attn(n_past, q, q_st, q_sh, n_q, pe, pe_st, pe_sh, n_pe, k, k_st, k_sh, v, v_st, v_sh, n_v, n_tokens,
 * n_head, n_rep, scale, out, pool, times): the attention of n_tokens queries at positions n_past.. over
 * the n_kv = n_past + n_tokens cached ones, out [n_tokens, n_head, n_v] = softmax(scale q k^T, causal) v,
 * each query q's n_q columns then pe's n_pe (as kq), k's rows n_q + n_pe columns and v's n_v (rows
 * as kq and kqv read them: MLA's compressed cache serves as both, with head strides 0; n_rep query
 * heads per cached head, GQA). With a
 * hybrid._kernels.Pool the threads share out the heads (GIL released); None: this thread alone.
 * times: as the pool's (int64 [n_threads, 3]) or None. */
static PyObject *py_flash_attn(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    attn_job_t j;
    double scale;
    if (nargs != 23) return PyErr_Format(PyExc_TypeError, "flash_attn() takes 23 arguments (%zd given)", nargs);
    if (parse("flash_attn", args, 21, "npnnnonnnpnnpnnnnnndp", &j.n_past, &j.q.p, &j.q.st, &j.q.sh, &j.n_q, &j.pe.p,
              &j.pe.st, &j.pe.sh, &j.n_pe, &j.k.p, &j.k.st, &j.k.sh, &j.v.p, &j.v.st, &j.v.sh, &j.n_v, &j.n_tokens,
              &j.n_head, &j.n_rep, &scale, &j.out))
        return NULL;
    if (j.n_pe && !j.pe.p) return bad("flash_attn: a q_pe of %zd columns at a null address", j.n_pe);
    if (j.n_rep == 0 || j.n_head % j.n_rep)
        return bad("flash_attn: %zd heads are not groups of %zd", j.n_head, j.n_rep);
    j.scale = (float)scale;
    j.n_kv = j.n_past + j.n_tokens;
    pool_t *pool;
    Py_buffer times = {0};
    if (pool_args("flash_attn", args[21], args[22], &pool, &times)) return NULL;
    const int n_threads = pool ? pool_api->threads(pool) : 1;
    if (!(j.scores = malloc(sizeof(float) * (size_t)(n_threads * j.n_tokens * j.n_kv + 1)))) {
        if (times.obj) PyBuffer_Release(&times);
        return PyErr_NoMemory();
    }
    PyObject *r = run_chunks("flash_attn", pool, j.n_head, attn_head, &j, &times);
    free(j.scores);
    return r;
}

/* --- the router: TOP_K and the expert weights --------------------------------------------------- */

/* The k largest of v[0..n) (skipping those with skip[i] set) in descending order, ties to the lower
 * index (a stable sort's order): k passes of a max scan, as k and n are small (6 of 64). */
static void top_k_row(const float *v, int64_t n, int64_t k, uint8_t *taken, int64_t *ids) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
        taken[best] = 1;
        ids[j] = best;
    }
}

/* top_k(sel, rows, n_cols, k, n_groups, n_groups_used, ids): per row of sel [rows, n_cols], the k
 * best columns, best first, ties to the lower index -> ids int64 [rows, k]. With n_groups > 1,
 * group-limited routing (DeepSeek-V3): the columns are n_groups equal groups scored by the sum of
 * their two best, and only the n_groups_used best groups compete. */
static PyObject *py_top_k(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *sel;
    int64_t *ids;
    Py_ssize_t rows, n_cols, k, n_groups, n_used_groups;
    if (parse("top_k", args, nargs, "pnnnnnp", &sel, &rows, &n_cols, &k, &n_groups, &n_used_groups, &ids))
        return NULL;
    if (n_groups <= 1) n_groups = n_used_groups = 1;
    Py_ssize_t per_group = n_cols / n_groups;
    if (n_cols == 0 || n_cols > MAX_COLS || n_cols % n_groups || n_used_groups == 0 || n_used_groups > n_groups ||
        k == 0 || k > per_group * n_used_groups || (n_groups > 1 && per_group < 2))
        return bad("top_k: %zd of %zd columns in %zd of %zd groups", k, n_cols, n_used_groups, n_groups);
    uint8_t taken[MAX_COLS];
    float score[MAX_COLS];
    int64_t best[MAX_COLS];
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *v = sel + r * n_cols;
        memset(taken, 0, (size_t)n_cols);
        if (n_groups > 1) {
            for (Py_ssize_t g = 0; g < n_groups; g++) {
                int64_t two[2];
                memset(taken, 0, (size_t)per_group);
                top_k_row(v + g * per_group, per_group, 2, taken, two);
                score[g] = v[g * per_group + two[0]] + v[g * per_group + two[1]];
            }
            memset(taken, 0, (size_t)n_groups);
            top_k_row(score, n_groups, n_used_groups, taken, best);
            memset(taken, 1, (size_t)n_cols);                       /* only the kept groups' columns compete */
            for (Py_ssize_t j = 0; j < n_used_groups; j++) memset(taken + best[j] * per_group, 0, (size_t)per_group);
        }
        top_k_row(v, n_cols, k, taken, ids + r * k);
    }
    Py_RETURN_NONE;
}

/* expert_weights(probs, rows, n_expert, ids, k, norm, scale, out): out[t, j] = probs[t, ids[t, j]]
 * for probs [rows, n_expert] and ids int64 [rows, k], divided by the row's sum if norm != 0, times
 * scale unless it is 0 (build_moe_ffn's weight normalisation and scale) */
static PyObject *py_expert_weights(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *probs;
    const int64_t *ids;
    float *out;
    Py_ssize_t rows, n_expert, k, norm;
    double scale;
    if (parse("expert_weights", args, nargs, "pnnpnndp", &probs, &rows, &n_expert, &ids, &k, &norm, &scale, &out))
        return NULL;
    for (Py_ssize_t i = 0; i < rows * k; i++)
        if (ids[i] < 0 || ids[i] >= n_expert) {
            PyErr_Format(PyExc_IndexError, "expert_weights: expert %lld of %zd", (long long)ids[i], n_expert);
            return NULL;
        }
    for (Py_ssize_t t = 0; t < rows; t++) {
        const int64_t *id = ids + t * k;
        float *o = out + t * k, sum = 0;
        for (Py_ssize_t j = 0; j < k; j++) sum += o[j] = probs[t * n_expert + id[j]];
        for (Py_ssize_t j = 0; j < k; j++) {
            if (norm) o[j] /= sum;
            if (scale != 0.0) o[j] *= (float)scale;
        }
    }
    Py_RETURN_NONE;
}

/* --- GET_ROWS ---------------------------------------------------------------------------------- */

static const quant_api_t *quant_api;                 /* hybrid._kernels' quant traits, imported on first use */

/* get_rows(data, n_rows, row_bytes, type, n_cols, ids, n_ids, out): rows ids int64 [n_ids] of a
 * stored tensor data [n_rows, row_bytes] of any type the quant traits table dequantises (F32,
 * F16, BF16, Q4_0, Q8_0) -> out [n_ids, n_cols] */
static PyObject *py_get_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const uint8_t *data;
    const int64_t *ids;
    float *out;
    Py_ssize_t n_rows, row_bytes, type, n_cols, n_ids;
    if (parse("get_rows", args, nargs, "pnnnnpnp", &data, &n_rows, &row_bytes, &type, &n_cols, &ids, &n_ids, &out))
        return NULL;
    if (!quant_api && !(quant_api = PyCapsule_Import(QUANT_API_CAPSULE, 0))) return NULL;
    const quant_traits_t *traits = quant_api->traits((int)type);
    if (!traits || n_cols % traits->block_values || n_cols / traits->block_values * traits->block_bytes != row_bytes)
        return bad("get_rows: rows of %zd bytes are not %zd columns of ggml type %zd (or it has no native path)",
                   row_bytes, n_cols, type);
    for (Py_ssize_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= n_rows) {
            PyErr_Format(PyExc_IndexError, "get_rows: row %lld of %zd", (long long)ids[i], n_rows);
            return NULL;
        }
    for (Py_ssize_t i = 0; i < n_ids; i++)
        traits->dequantize_row(data + ids[i] * row_bytes, n_cols, out + i * n_cols);
    Py_RETURN_NONE;
}

/* --- the module -------------------------------------------------------------------------------- */

#define FASTCALL(name, doc) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, doc}
/* --- MUL_MAT on a float32 weight ---------------------------------------------------------------- */

/* out[t, n] = sum_k x[t, k] w[n, k]: the matmuls whose weight llama.cpp's files keep in F32, the
 * MoE router (ffn_gate_inp, n_expert x n_embd: 0.5 MiB, 64 rows for V2-Lite). torch spent
 * ~200 us on it cold, for ~20 us of memory traffic; LANES partial sums vectorise. */
SIMD_CLONES static void matmul_f32_rows(const float *x, int64_t n_tok, int64_t k, const float *w, int64_t n,
                                        float *out) {
    for (int64_t r = 0; r < n; r++) {
        const float *wr = w + r * k;
        for (int64_t t = 0; t < n_tok; t++) {
            const float *xt = x + t * k;
            float acc[LANES] = {0};
            int64_t i = 0;
            for (; i + LANES <= k; i += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += xt[i + l] * wr[i + l];
            float sum = 0;
            for (; i < k; i++) sum += xt[i] * wr[i];
            for (int l = 0; l < LANES; l++) sum += acc[l];
            out[t * n + r] = sum;
        }
    }
}

/* Rows of w per chunk of a shared matmul_f32: 8 rows of 2048 floats, 64 KiB, a few microseconds. */
#define F32_CHUNK_ROWS 8

typedef struct {
    const float *x, *w;
    float *out;
    int64_t n_tok, k, n;
} f32_job_t;

/* Rows [8c, 8c + 8) of w, written into their columns of out [n_tok, n]. */
static void f32_chunk(void *ctx, int64_t c, int thread) {
    const f32_job_t *j = ctx;
    const int64_t r0 = c * F32_CHUNK_ROWS, r1 = r0 + F32_CHUNK_ROWS < j->n ? r0 + F32_CHUNK_ROWS : j->n;
    float part[F32_CHUNK_ROWS * 64];
    for (int64_t t0 = 0; t0 < j->n_tok; t0 += 64) {
        const int64_t nt = j->n_tok - t0 < 64 ? j->n_tok - t0 : 64;
        matmul_f32_rows(j->x + t0 * j->k, nt, j->k, j->w + r0 * j->k, r1 - r0, part);
        for (int64_t t = 0; t < nt; t++)
            memcpy(j->out + (t0 + t) * j->n + r0, part + t * (r1 - r0), sizeof(float) * (size_t)(r1 - r0));
    }
}

/* matmul_f32(x, n_tok, k, w, n, out, pool, times): x [n_tok, k] @ w [n, k]^T -> out [n_tok, n] (the MoE
 * router's float32 weight), with a Pool its rows shared by the threads (None: this thread alone). */
static PyObject *py_matmul_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    f32_job_t j;
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "matmul_f32() takes 8 arguments (%zd given)", nargs);
    Py_ssize_t n_tok, k, n;
    if (parse("matmul_f32", args, 6, "pnnpnp", &j.x, &n_tok, &k, &j.w, &n, &j.out)) return NULL;
    j.n_tok = n_tok, j.k = k, j.n = n;
    pool_t *pool;
    Py_buffer times = {0};
    if (pool_args("matmul_f32", args[6], args[7], &pool, &times)) return NULL;
    return run_chunks("matmul_f32", pool, (n + F32_CHUNK_ROWS - 1) / F32_CHUNK_ROWS, f32_chunk, &j, &times);
}

/* --- greedy sampling ------------------------------------------------------------------------------ */

/* The index of the largest of x[0:n], the first on ties; NaN never wins (none but NaN and -inf:
 * index of one, as good as any). One pass in GCC vector types, a lane per 16th value: each lane keeps
 * its largest value and where it first met it (the written-out loop stayed scalar: GCC does not
 * vectorise a float max reduction without -ffast-math: 42 us per 100k logits warm, now 12). */
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

SIMD_CLONES static int64_t argmax_f32(const float *x, int64_t n) {
    f32x16 m;
    i32x16 at = {0};
    for (int l = 0; l < 16; l++) m[l] = -INFINITY;
    int64_t i = 0;
    for (; i + 16 <= n && i + 16 <= INT32_MAX; i += 16) {
        f32x16 v;
        memcpy(&v, x + i, sizeof v);
        i32x16 gt = v > m;                     /* false for NaN: it never wins */
        m = (f32x16)((gt & (i32x16)v) | (~gt & (i32x16)m));
        at = (gt & (int32_t)i) | (~gt & at);
    }
    float best = -INFINITY;
    int64_t where = n - 1;
    for (int l = 0; l < 16; l++)
        if (m[l] > best || (m[l] == best && at[l] + l < where)) best = m[l], where = at[l] + l;
    for (; i < n; i++)
        if (x[i] > best) best = x[i], where = i;
    return where;
}

/* argmax(x, n) -> the index of the largest of x[0:n], the first on ties (NaN never wins):
 * the engine's greedy token over ~100k logits (torch.argmax took ~200 us of it cold). */
static PyObject *py_argmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    const float *x;
    Py_ssize_t n;
    if (parse("argmax", args, nargs, "pn", &x, &n)) return NULL;
    if (n == 0) return bad("argmax: no values");
    return PyLong_FromSsize_t((Py_ssize_t)argmax_f32(x, n));
}

static PyMethodDef methods[] = {
    FASTCALL(rms_norm, "rms_norm(x, rows, row_len, c0, n, w, eps, out)"),
    FASTCALL(rope, "rope(x, rows, row_len, c0, width, r0, n_rot, rows_per_token, cos, sin, pos, n_pos, neox, out)"),
    FASTCALL(softmax, "softmax(x, rows, n_cols, scale, n_tokens, n_past, out)"),
    FASTCALL(sigmoid, "sigmoid(x, n, out)"),
    FASTCALL(add, "add(a, n_a, b, n_b, out[, pool, times])"),
    FASTCALL(scale_rows, "scale_rows(x, rows, n, w, out[, pool, times])"),
    FASTCALL(sum_rows, "sum_rows(x, rows, n_sum, n, out)"),
    FASTCALL(swiglu, "swiglu(g, u, n, out[, pool, times])"),
    FASTCALL(append_kv,
             "append_kv(n_past, cache, n_ctx, n_tokens, n_head, x, x_st, x_sh, n_x, tail, tail_st, tail_sh, n_tail)"),
    FASTCALL(kq, "kq(q, q_st, q_sh, n_q, pe, pe_st, pe_sh, n_pe, n_tokens, n_head, k, k_st, k_sh, n_rep, n_kv, out)"),
    FASTCALL(kqv, "kqv(kq, n_tokens, n_head, n_kv, v, v_st, v_sh, n_rep, n_v, out)"),
    FASTCALL(flash_attn, "flash_attn(n_past, q, q_st, q_sh, n_q, pe, pe_st, pe_sh, n_pe, k, k_st, k_sh, v, v_st, v_sh, "
                         "n_v, n_tokens, n_head, n_rep, scale, out, pool, times)"),
    FASTCALL(top_k, "top_k(sel, rows, n_cols, k, n_groups, n_groups_used, ids)"),
    FASTCALL(expert_weights, "expert_weights(probs, rows, n_expert, ids, k, norm, scale, out)"),
    FASTCALL(get_rows, "get_rows(data, n_rows, row_bytes, type, n_cols, ids, n_ids, out)"),
    FASTCALL(matmul_f32, "matmul_f32(x, n_tok, k, w, n, out, pool, times)"),
    FASTCALL(argmax, "argmax(x, n) -> index of the largest value, the first on ties"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ops", "small float32 ops of the forward pass", -1,
                                    methods};

PyMODINIT_FUNC PyInit__ops(void) { return PyModule_Create(&module); }
