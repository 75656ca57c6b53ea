/* The recorder's lanes, native: each event appended as 64-bit cells, turned into JSON lines at the drain.

   configure(kinds)     once, from profiler/recorder.py: per event type, in the order of Lane's
                        methods (op, copy, split, wakeup, sync, phase, graph, test, route), (name, fields)
                        with fields a tuple of (prefix: bytes, flags: int) per value, the prefix
                        being what its line has before the value (`{"type":"op","ts":` first,
                        `,"name":` after). flags: STR, a JSON string; OPTIONAL, None leaves the
                        field out; OBJECT, the value is kept as it is and the line made by the
                        caller (a test's free-form fields, a route's expert ids). Other values are
                        integers.
   Lane(tid)            lane.op(ts, dur, ...), lane.copy(...), ...: append one event, its values
                        in field order; take() -> Batch or None: the events since the last take;
                        clear(): forget them.
   Batch                len(batch); batch.tid; batch.rows() -> [(type, values)], in recording order.
   format_events(batches, fallback) -> bytes
                        every event's line, sorted by ts, then the longest dur first (an outer event
                        before those it contains), then batch order, then recording order. A dur
                        below zero is written as 0. An event holding a value kept as an object (an
                        OBJECT field; a float, None or other text-less value where the field takes
                        an integer or text) is written as `fallback(type, tid, values)` returns it.
   pool_op(lanes, times, t0, ts, graph, split, backend, op, name, layer, bytes, flops, n_tokens)
                        one op the CPU worker pool ran (hybrid/backends/cpu.py), as an op event on
                        each lane whose thread ran chunks of it: times int64 [n_lanes, 3] per thread
                        (first claim, end, chunks run; ns of the clock whose t0 is given), its bytes
                        and flops the thread's share (chunks it ran / all, rounded down), lane 0 from
                        ts (the op's start), the others from their first chunk.

   Why: in generation each token streams hundreds of MB of weights through the caches, so the
   recorder's Python objects (a tuple per event, an int per value) come back from DRAM at the
   drain, and the drain, formatting and freeing them cost ~0.4 ms of a 14 ms token on the all-CPU
   mini model. Cells are contiguous and strings are interned (each distinct text escaped once),
   so the drain reads memory in order; ts and dur are checked to be integers when recorded. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { INT = 0, STR = 1, OPTIONAL = 2, OBJECT = 4 };
enum { N_KINDS = 9, MAX_FIELDS = 16, OP = 0 };
static const char *kind_names[N_KINDS] = {"op", "copy", "split", "wakeup", "sync", "phase", "graph", "test", "route"};

/* An event's cells: a header, then one cell per value: the integer, the interned string's id,
   or (kept as an object) a new reference. The header holds the type, the value count, and one
   bit per value for "kept as an object" and for "None, left out". */
#define HEADER(kind, n, objects, nones) \
    ((int64_t)(kind) | (int64_t)(n) << 8 | (int64_t)(objects) << 16 | (int64_t)(nones) << 32)
#define KIND_OF(h) ((int)((h) & 0xff))
#define N_OF(h) ((int)(((h) >> 8) & 0xff))
#define OBJECTS_OF(h) ((uint32_t)(((h) >> 16) & 0xffff))
#define NONES_OF(h) ((uint32_t)(((h) >> 32) & 0xffff))

typedef struct {
    PyObject *name;                 /* str */
    int n;
    PyObject *prefix[MAX_FIELDS];   /* bytes */
    int flags[MAX_FIELDS];
} Kind;

static Kind kinds[N_KINDS];
static int configured;

/* --- growable text -------------------------------------------------------------------------------- */

typedef struct { char *p; size_t len, cap; } Buf;

static int reserve(Buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1 << 14;
    while (cap < b->len + more) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const char *s, size_t n) {
    if (reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

/* Two digits at a time: a generated token's lines are ~40 % digits. */
static const char digit_pairs[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static int put_int(Buf *b, long long v) {
    char tmp[24], *end = tmp + sizeof tmp, *s = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    while (u >= 100) {
        s -= 2;
        memcpy(s, digit_pairs + 2 * (u % 100), 2);
        u /= 100;
    }
    if (u >= 10) {
        s -= 2;
        memcpy(s, digit_pairs + 2 * u, 2);
    } else {
        *--s = (char)('0' + u);
    }
    if (v < 0) *--s = '-';
    return put(b, s, (size_t)(end - s));
}

/* s[0:n] (UTF-8) as a JSON string, quotes included. */
static int put_json_string(Buf *b, const char *s, Py_ssize_t n) {
    static const char hex[] = "0123456789abcdef";
    if (reserve(b, (size_t)n * 6 + 2) < 0) return -1;      /* every byte escaped at worst */
    char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { *o++ = '\\'; *o++ = (char)c; }
        else if (c >= 0x20) *o++ = (char)c;
        else if (c == '\n') { *o++ = '\\'; *o++ = 'n'; }
        else if (c == '\t') { *o++ = '\\'; *o++ = 't'; }
        else if (c == '\r') { *o++ = '\\'; *o++ = 'r'; }
        else if (c == '\b') { *o++ = '\\'; *o++ = 'b'; }
        else if (c == '\f') { *o++ = '\\'; *o++ = 'f'; }
        else { memcpy(o, "\\u00", 4); o += 4; *o++ = hex[c >> 4]; *o++ = hex[c & 15]; }
    }
    *o++ = '"';
    b->len = (size_t)(o - b->p);
    return 0;
}

/* --- interned strings: id -> the str and its JSON form ------------------------------------------- */

static PyObject *string_ids;        /* dict: str -> id */
static PyObject *strings;           /* list: id -> str */
static Buf string_json;             /* every string's JSON form, one after another */
static size_t *json_at;             /* id -> offset in string_json; json_at[n] = its end */
static size_t n_strings, cap_strings;

/* The id of an exact str, interned on first sight; -1 with no error set when it has no UTF-8
   form (a lone surrogate: it goes to the caller's fallback), -2 on an error. */
static int64_t intern(PyObject *s) {
    PyObject *id = PyDict_GetItemWithError(string_ids, s);
    if (id) return PyLong_AsLongLong(id);
    if (PyErr_Occurred()) return -2;
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(s, &n);
    if (!utf8) {
        PyErr_Clear();
        return -1;
    }
    if (n_strings + 1 >= cap_strings) {
        size_t cap = cap_strings ? 2 * cap_strings : 256;
        size_t *p = realloc(json_at, cap * sizeof *p);
        if (!p) { PyErr_NoMemory(); return -2; }
        json_at = p;
        cap_strings = cap;
    }
    if (put_json_string(&string_json, utf8, n) < 0) return -2;
    PyObject *key = PyLong_FromSize_t(n_strings);
    if (!key || PyList_Append(strings, s) < 0) {
        Py_XDECREF(key);
        string_json.len = json_at[n_strings];
        return -2;
    }
    if (PyDict_SetItem(string_ids, s, key) < 0) {
        Py_DECREF(key);
        PyList_SetSlice(strings, (Py_ssize_t)n_strings, (Py_ssize_t)n_strings + 1, NULL);
        string_json.len = json_at[n_strings];
        return -2;
    }
    Py_DECREF(key);
    json_at[++n_strings] = string_json.len;
    return (int64_t)n_strings - 1;
}

/* --- one event's cells ------------------------------------------------------------------------- */

/* v as a 64-bit integer (an int, or an index-like value such as a NumPy integer; not a bool,
   which JSON writes as true/false): 0, or -1 with no error set. */
static int as_int64(PyObject *v, int64_t *out) {
    PyObject *num = NULL;
    if (PyLong_CheckExact(v)) {
        Py_INCREF(v);
        num = v;
    } else if (!PyBool_Check(v) && PyIndex_Check(v)) {
        num = PyNumber_Index(v);
    }
    if (!num) {
        PyErr_Clear();
        return -1;
    }
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(num, &overflow);
    Py_DECREF(num);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = x;
    return 0;
}

static void release_values(const int64_t *values, uint32_t objects) {
    for (int i = 0; objects; i++, objects >>= 1)
        if (objects & 1) Py_DECREF((PyObject *)(intptr_t)values[i]);
}

static void release_objects(const int64_t *cells) { release_values(cells + 1, OBJECTS_OF(cells[0])); }

/* An event of type `kind` with values args[0:nargs] -> cells[0 : n + 1] (a reference taken for
   each value kept as an object). */
static int encode(int kind, PyObject *const *args, Py_ssize_t nargs, int64_t *cells) {
    const Kind *k = &kinds[kind];
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "profiler._lanes.configure() was not called");
        return -1;
    }
    if (nargs != k->n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d values, got %zd", kind_names[kind], k->n, nargs);
        return -1;
    }
    uint32_t objects = 0, nones = 0;
    for (int i = 0; i < k->n; i++) {
        PyObject *v = args[i];
        int64_t x = 0;
        int kept = 0;           /* as an object */
        if (v == Py_None && (k->flags[i] & OPTIONAL)) {
            nones |= 1u << i;
        } else if (k->flags[i] & OBJECT) {
            kept = 1;
        } else if (k->flags[i] & STR) {
            x = PyUnicode_CheckExact(v) ? intern(v) : -1;
            if (x == -2) goto error;
            kept = x < 0;
        } else if (as_int64(v, &x) < 0) {
            if (i < 2) {
                PyErr_Format(PyExc_TypeError, "%s: %s must be integer ns", kind_names[kind], i ? "dur" : "ts");
                goto error;
            }
            kept = 1;
        }
        if (kept) {
            Py_INCREF(v);
            x = (int64_t)(intptr_t)v;
            objects |= 1u << i;
        }
        cells[1 + i] = x;
    }
    cells[0] = HEADER(kind, k->n, objects, nones);
    return 0;
error:
    release_values(cells + 1, objects);
    return -1;
}

/* --- Lane --------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *tid;
    int64_t *cells;
    size_t n_cells, cap, n_events, last_cap;
    int has_objects;
} Lane;

typedef struct {
    PyObject_HEAD
    PyObject *tid;
    int64_t *cells;
    size_t n_cells, n_events;
    int has_objects;
} Batch;

static PyTypeObject LaneType, BatchType;

static void release_all(int64_t *cells, size_t n_cells) {
    for (size_t at = 0; at < n_cells; at += 1 + (size_t)N_OF(cells[at]))
        if (OBJECTS_OF(cells[at])) release_objects(cells + at);
}

static int append(Lane *self, const int64_t *cells, size_t n) {
    if (self->n_cells + n > self->cap) {
        size_t cap = self->cap ? 2 * self->cap : (self->last_cap ? self->last_cap : 1024);
        while (cap < self->n_cells + n) cap *= 2;
        int64_t *p = realloc(self->cells, cap * sizeof *p);
        if (!p) { PyErr_NoMemory(); return -1; }
        self->cells = p;
        self->cap = cap;
    }
    memcpy(self->cells + self->n_cells, cells, n * sizeof *cells);
    self->n_cells += n;
    self->n_events++;
    if (OBJECTS_OF(cells[0])) self->has_objects = 1;
    return 0;
}

static PyObject *record(Lane *self, int kind, PyObject *const *args, Py_ssize_t nargs) {
    int64_t cells[1 + MAX_FIELDS];
    if (encode(kind, args, nargs, cells) < 0) return NULL;
    if (append(self, cells, 1 + (size_t)kinds[kind].n) < 0) {
        release_objects(cells);
        return NULL;
    }
    Py_RETURN_NONE;
}

#define LANE_METHOD(name, kind) \
    static PyObject *lane_##name(Lane *self, PyObject *const *args, Py_ssize_t nargs) { \
        return record(self, kind, args, nargs); \
    }
LANE_METHOD(op, 0)
LANE_METHOD(copy, 1)
LANE_METHOD(split, 2)
LANE_METHOD(wakeup, 3)
LANE_METHOD(sync, 4)
LANE_METHOD(phase, 5)
LANE_METHOD(graph, 6)
LANE_METHOD(test, 7)
LANE_METHOD(route, 8)

static PyObject *lane_take(Lane *self, PyObject *unused) {
    if (!self->n_events) Py_RETURN_NONE;
    Batch *b = PyObject_New(Batch, &BatchType);
    if (!b) return NULL;
    Py_INCREF(self->tid);
    b->tid = self->tid;
    b->cells = self->cells;
    b->n_cells = self->n_cells;
    b->n_events = self->n_events;
    b->has_objects = self->has_objects;
    self->last_cap = self->cap;         /* the next graph's events start in a buffer of this size */
    self->cells = NULL;
    self->n_cells = self->cap = self->n_events = 0;
    self->has_objects = 0;
    return (PyObject *)b;
}

static PyObject *lane_clear(Lane *self, PyObject *unused) {
    if (self->has_objects) release_all(self->cells, self->n_cells);
    self->n_cells = self->n_events = 0;
    self->has_objects = 0;
    Py_RETURN_NONE;
}

static PyObject *lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *tid;
    static char *keywords[] = {"tid", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U:Lane", keywords, &tid)) return NULL;
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    Py_INCREF(tid);
    self->tid = tid;
    return (PyObject *)self;
}

static void lane_dealloc(Lane *self) {
    if (self->has_objects) release_all(self->cells, self->n_cells);
    free(self->cells);
    Py_XDECREF(self->tid);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define FASTCALL(name, doc) {#name, (PyCFunction)(void (*)(void))lane_##name, METH_FASTCALL, doc}
static PyMethodDef lane_methods[] = {
    FASTCALL(op, "op(ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens)"),
    FASTCALL(copy, "copy(ts, dur, graph, split, src, dst, nbytes, name)"),
    FASTCALL(split, "split(ts, dur, graph, split, backend, n_nodes, n_inputs)"),
    FASTCALL(wakeup, "wakeup(ts, dur, graph, split, backend)"),
    FASTCALL(sync, "sync(ts, dur, graph, split, backend)"),
    FASTCALL(phase, "phase(ts, dur, graph, name)"),
    FASTCALL(graph, "graph(ts, dur, graph, test, n_tokens, n_past)"),
    FASTCALL(test, "test(ts, dur, fields)"),
    FASTCALL(route, "route(ts, dur, graph, layer, n_tokens, experts)"),
    {"take", (PyCFunction)lane_take, METH_NOARGS, "take() -> Batch of the events since the last take, or None"},
    {"clear", (PyCFunction)lane_clear, METH_NOARGS, "clear(): forget the events since the last take"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lane_members[] = {
    {"tid", T_OBJECT_EX, offsetof(Lane, tid), READONLY, "the lane's name: main, cpu1, ..., CUDA0"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "profiler._lanes.Lane",
    .tp_doc = "One thread's events since the last take (see profiler/_lanes.c).",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = lane_new,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_methods = lane_methods,
    .tp_members = lane_members,
};

/* --- Batch -------------------------------------------------------------------------------------- */

/* One event's values as a tuple: integers, the interned strings, None, the objects kept. */
static PyObject *values_of(const int64_t *cells) {
    int n = N_OF(cells[0]), kind = KIND_OF(cells[0]);
    uint32_t objects = OBJECTS_OF(cells[0]), nones = NONES_OF(cells[0]);
    PyObject *row = PyTuple_New(n);
    if (!row) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v;
        int64_t x = cells[1 + i];
        if (objects >> i & 1) v = (PyObject *)(intptr_t)x, Py_INCREF(v);
        else if (nones >> i & 1) v = Py_None, Py_INCREF(v);
        else if (kinds[kind].flags[i] & STR) v = PyList_GET_ITEM(strings, x), Py_INCREF(v);
        else if (!(v = PyLong_FromLongLong(x))) { Py_DECREF(row); return NULL; }
        PyTuple_SET_ITEM(row, i, v);
    }
    return row;
}

static PyObject *batch_rows(Batch *self, PyObject *unused) {
    PyObject *rows = PyList_New((Py_ssize_t)self->n_events);
    if (!rows) return NULL;
    size_t at = 0;
    for (size_t e = 0; e < self->n_events; e++, at += 1 + (size_t)N_OF(self->cells[at])) {
        PyObject *values = values_of(self->cells + at);
        PyObject *row = values ? PyTuple_Pack(2, kinds[KIND_OF(self->cells[at])].name, values) : NULL;
        Py_XDECREF(values);
        if (!row) { Py_DECREF(rows); return NULL; }
        PyList_SET_ITEM(rows, (Py_ssize_t)e, row);
    }
    return rows;
}

static Py_ssize_t batch_len(Batch *self) { return (Py_ssize_t)self->n_events; }

static void batch_dealloc(Batch *self) {
    if (self->has_objects) release_all(self->cells, self->n_cells);
    free(self->cells);
    Py_XDECREF(self->tid);
    PyObject_Free(self);
}

static PyMethodDef batch_methods[] = {
    {"rows", (PyCFunction)batch_rows, METH_NOARGS, "rows() -> [(type, values)] in recording order"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef batch_members[] = {
    {"tid", T_OBJECT_EX, offsetof(Batch, tid), READONLY, "the lane the events were recorded on"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods batch_as_sequence = {.sq_length = (lenfunc)batch_len};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "profiler._lanes.Batch",
    .tp_doc = "A lane's events from one take (see profiler/_lanes.c).",
    .tp_basicsize = sizeof(Batch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)batch_dealloc,
    .tp_methods = batch_methods,
    .tp_members = batch_members,
    .tp_as_sequence = &batch_as_sequence,
};

/* --- format_events ------------------------------------------------------------------------------ */

typedef struct { int64_t ts, dur; size_t seq; const int64_t *cells; Py_ssize_t batch; } Line;

static int by_time(const void *pa, const void *pb) {
    const Line *a = pa, *b = pb;
    if (a->ts != b->ts) return a->ts < b->ts ? -1 : 1;
    if (a->dur != b->dur) return a->dur > b->dur ? -1 : 1;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

static int format_line(Buf *text, const int64_t *cells, const Buf *suffix) {
    const Kind *k = &kinds[KIND_OF(cells[0])];
    uint32_t nones = NONES_OF(cells[0]);
    for (int i = 0; i < k->n; i++) {
        if (nones >> i & 1) continue;
        PyObject *prefix = k->prefix[i];
        int64_t x = cells[1 + i];
        if (put(text, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix)) < 0) return -1;
        if (k->flags[i] & STR) {
            if (put(text, string_json.p + json_at[x], json_at[x + 1] - json_at[x]) < 0) return -1;
        } else if (put_int(text, i == 1 && x < 0 ? 0 : x) < 0) return -1;
    }
    return put(text, suffix->p, suffix->len);
}

static int fallback_line(Buf *text, const int64_t *cells, PyObject *tid, PyObject *fallback) {
    PyObject *values = values_of(cells);
    if (!values) return -1;
    PyObject *line = PyObject_CallFunctionObjArgs(fallback, kinds[KIND_OF(cells[0])].name, tid, values, NULL);
    Py_DECREF(values);
    if (!line) return -1;
    int err = PyBytes_Check(line) ? put(text, PyBytes_AS_STRING(line), (size_t)PyBytes_GET_SIZE(line)) : -1;
    if (!PyBytes_Check(line)) PyErr_SetString(PyExc_TypeError, "fallback must return the line as bytes");
    Py_DECREF(line);
    return err;
}

static PyObject *format_events(PyObject *self, PyObject *args) {
    PyObject *list, *fallback;
    if (!PyArg_ParseTuple(args, "O!O:format_events", &PyList_Type, &list, &fallback)) return NULL;
    PyObject *batches = PyList_AsTuple(list);         /* held while `fallback` runs Python */
    if (!batches) return NULL;
    Py_ssize_t n_batches = PyTuple_GET_SIZE(batches);
    size_t n_lines = 0;
    for (Py_ssize_t i = 0; i < n_batches; i++) {
        PyObject *b = PyTuple_GET_ITEM(batches, i);
        if (!PyObject_TypeCheck(b, &BatchType)) {
            PyErr_SetString(PyExc_TypeError, "format_events: batches must be a list of Batch");
            Py_DECREF(batches);
            return NULL;
        }
        n_lines += ((Batch *)b)->n_events;
    }
    Line *lines = malloc(sizeof(Line) * (n_lines ? n_lines : 1));
    Buf *suffixes = calloc((size_t)n_batches + 1, sizeof(Buf));
    Buf text = {0};
    PyObject *out = NULL;
    if (!lines || !suffixes) { PyErr_NoMemory(); goto done; }
    size_t k = 0;
    for (Py_ssize_t i = 0; i < n_batches; i++) {
        Batch *b = (Batch *)PyTuple_GET_ITEM(batches, i);
        Py_ssize_t n;
        const char *tid = PyUnicode_AsUTF8AndSize(b->tid, &n);
        if (!tid || put(&suffixes[i], ",\"tid\":", 7) < 0 || put_json_string(&suffixes[i], tid, n) < 0 ||
            put(&suffixes[i], "}\n", 2) < 0)
            goto done;
        size_t at = 0;
        for (size_t e = 0; e < b->n_events; e++, k++, at += 1 + (size_t)N_OF(b->cells[at]))
            lines[k] = (Line){b->cells[at + 1], b->cells[at + 2] < 0 ? 0 : b->cells[at + 2], k, b->cells + at, i};
    }
    qsort(lines, k, sizeof(Line), by_time);
    for (size_t i = 0; i < k; i++) {
        const int64_t *cells = lines[i].cells;
        Batch *b = (Batch *)PyTuple_GET_ITEM(batches, lines[i].batch);
        if ((OBJECTS_OF(cells[0]) ? fallback_line(&text, cells, b->tid, fallback)
                                  : format_line(&text, cells, &suffixes[lines[i].batch])) < 0)
            goto done;
    }
    out = PyBytes_FromStringAndSize(text.p ? text.p : "", (Py_ssize_t)text.len);
done:
    if (suffixes)
        for (Py_ssize_t i = 0; i < n_batches; i++) free(suffixes[i].p);
    free(suffixes);
    free(lines);
    free(text.p);
    Py_DECREF(batches);
    return out;
}

/* --- pool_op ------------------------------------------------------------------------------------ */

static PyObject *pool_op(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "pool_op takes 13 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *lanes = args[0];
    int64_t t0, ts, nbytes, flops;
    if (!PyTuple_Check(lanes) || as_int64(args[2], &t0) || as_int64(args[3], &ts) || as_int64(args[10], &nbytes) ||
        as_int64(args[11], &flops)) {
        PyErr_SetString(PyExc_TypeError, "pool_op: lanes must be a tuple; t0, ts, bytes and flops integers");
        return NULL;
    }
    Py_buffer times;
    if (PyObject_GetBuffer(args[1], &times, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(lanes);
    PyObject *ret = NULL;
    int64_t cells[1 + MAX_FIELDS] = {0};
    int encoded = 0;
    if (strcmp(times.format, "l") && strcmp(times.format, "q")) goto bad_times;
    if (times.itemsize != 8 || times.len != n * 3 * 8) goto bad_times;
    const int64_t *t = times.buf;
    int64_t n_chunks = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(lanes, i), &LaneType)) {
            PyErr_SetString(PyExc_TypeError, "pool_op: lanes must be Lanes");
            goto done;
        }
        n_chunks += t[3 * i + 2];
    }
    if (n_chunks <= 0) {            /* nothing ran: no events */
        ret = Py_None;
        Py_INCREF(ret);
        goto done;
    }
    /* the event's values; ts, dur, bytes and flops are each lane's own */
    PyObject *values[11] = {args[3], args[3], args[4], args[5], args[6], args[7], args[8], args[9], args[10],
                            args[11], args[12]};
    if (encode(OP, values, 11, cells) < 0) goto done;
    encoded = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t ran = t[3 * i + 2];
        if (ran <= 0) continue;
        int64_t start = i == 0 ? ts : t[3 * i] - t0, end = t[3 * i + 1] - t0;
        int64_t share_bytes = nbytes / n_chunks * ran + nbytes % n_chunks * ran / n_chunks;
        int64_t share_flops = flops / n_chunks * ran + flops % n_chunks * ran / n_chunks;
        Lane *lane = (Lane *)PyTuple_GET_ITEM(lanes, i);
        if (Py_IS_TYPE(lane, &LaneType)) {
            cells[1] = start, cells[2] = end - start, cells[9] = share_bytes, cells[10] = share_flops;
            uint32_t objects = OBJECTS_OF(cells[0]);
            for (int j = 0; objects; j++, objects >>= 1)
                if (objects & 1) Py_INCREF((PyObject *)(intptr_t)cells[1 + j]);
            if (append(lane, cells, 1 + (size_t)kinds[OP].n) < 0) {
                release_objects(cells);
                goto done;
            }
        } else {        /* a subclass (the printing lane): through its method */
            PyObject *r = PyObject_CallMethod((PyObject *)lane, "op", "LLOOOOOOLLO", (long long)start,
                                              (long long)(end - start), args[4], args[5], args[6], args[7],
                                              args[8], args[9], (long long)share_bytes, (long long)share_flops,
                                              args[12]);
            if (!r) goto done;
            Py_DECREF(r);
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
    goto done;
bad_times:
    PyErr_Format(PyExc_ValueError, "pool_op: times must be int64 [%zd, 3], C-contiguous", n);
done:
    if (encoded) release_objects(cells);
    PyBuffer_Release(&times);
    return ret;
}

/* --- configure ---------------------------------------------------------------------------------- */

static PyObject *configure(PyObject *self, PyObject *arg) {
    if (!PyTuple_Check(arg) || PyTuple_GET_SIZE(arg) != N_KINDS) goto bad;
    Kind fresh[N_KINDS];
    for (int kind = 0; kind < N_KINDS; kind++) {
        PyObject *item = PyTuple_GET_ITEM(arg, kind), *name, *fields;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) goto bad;
        name = PyTuple_GET_ITEM(item, 0), fields = PyTuple_GET_ITEM(item, 1);
        if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, kind_names[kind]) || !PyTuple_Check(fields) ||
            PyTuple_GET_SIZE(fields) < 2 || PyTuple_GET_SIZE(fields) > MAX_FIELDS)
            goto bad;
        fresh[kind].name = name;
        fresh[kind].n = (int)PyTuple_GET_SIZE(fields);
        for (int i = 0; i < fresh[kind].n; i++) {
            PyObject *f = PyTuple_GET_ITEM(fields, i);
            if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(f, 0)) ||
                !PyLong_Check(PyTuple_GET_ITEM(f, 1)))
                goto bad;
            fresh[kind].prefix[i] = PyTuple_GET_ITEM(f, 0);
            fresh[kind].flags[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(f, 1));
            if (i < 2 && fresh[kind].flags[i] != INT) goto bad;
        }
    }
    if (configured) {
        PyErr_SetString(PyExc_RuntimeError, "profiler._lanes is configured once");
        return NULL;
    }
    for (int kind = 0; kind < N_KINDS; kind++) {
        Py_INCREF(fresh[kind].name);
        for (int i = 0; i < fresh[kind].n; i++) Py_INCREF(fresh[kind].prefix[i]);
        kinds[kind] = fresh[kind];
    }
    configured = 1;
    Py_RETURN_NONE;
bad:
    PyErr_SetString(PyExc_ValueError, "configure: a tuple of (name, ((prefix bytes, flags), ...)) per event type, "
                                      "in the order op, copy, split, wakeup, sync, phase, graph, test, route; "
                                      "ts and dur first, as integers");
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_O, "configure(kinds): the event types' fields (see the module's source)"},
    {"format_events", format_events, METH_VARARGS, "format_events(batches, fallback) -> the events' lines in time order"},
    {"pool_op", (PyCFunction)(void (*)(void))pool_op, METH_FASTCALL,
     "pool_op(lanes, times, t0, ts, graph, split, backend, op, name, layer, bytes, flops, n_tokens)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lanes", "The recorder's native lanes and line formatter.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__lanes(void) {
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&BatchType) < 0) return NULL;
    string_ids = PyDict_New();
    strings = PyList_New(0);
    json_at = malloc(256 * sizeof *json_at);
    if (!string_ids || !strings || !json_at) return NULL;
    json_at[0] = 0;
    cap_strings = 256;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&LaneType);
    Py_INCREF(&BatchType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0 || PyModule_AddObject(m, "Batch", (PyObject *)&BatchType) < 0 ||
        PyModule_AddIntConstant(m, "STR", STR) < 0 || PyModule_AddIntConstant(m, "OPTIONAL", OPTIONAL) < 0 ||
        PyModule_AddIntConstant(m, "OBJECT", OBJECT) < 0)
        return NULL;
    return m;
}
