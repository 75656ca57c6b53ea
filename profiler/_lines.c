/* The timings writer's line formatter: a drain's recorded rows to JSON lines in time order.

   format_events(tables) -> bytes

   `tables` is a list of (rows, fields, suffix), one per lane and event type:
     rows    a list of tuples, one per event, its values in field order (ts, dur, ...);
     fields  a tuple of (prefix: bytes, kind: int) per value: the prefix is written before
             the value (`{"type":"op","ts":` for the first, `,"name":` after), kind is
             INT or STR, plus OPTIONAL where a None value leaves the field out;
     suffix  bytes written after the last value (`,"tid":"main"}\n`).
   A table with fields None holds rows already formatted: (ts, dur, line bytes).

   The lines come back as one bytes object sorted by ts, then the longest dur first (an
   outer event before the events it contains), then in the order given. A dur below zero
   is written as 0. Integers are written in decimal (a bool as 1 or 0, an index-like
   object such as a NumPy integer through __index__), strings as JSON strings; a value
   of any other kind, or an integer beyond 64 bits, raises TypeError, and the caller
   writes that drain through its slower, general route (orjson over dicts).

   Why native: the runner writes the timings after every graph (the contract flushes
   at least once per graph), between graphs, where its time is the report's `other`.
   Formatting a generated token's ~160 events in Python cost ~0.4 ms of a 14 ms token
   on the all-CPU mini model, most of it interpreter code and objects that the token's
   weight streaming had pushed out of the caches. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { INT = 0, STR = 1, OPTIONAL = 2 };

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

static int put_int(Buf *b, long long v) {
    char tmp[24], *end = tmp + sizeof tmp, *s = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { *--s = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) *--s = '-';
    return put(b, s, (size_t)(end - s));
}

/* An integer value as a long long; -1 with TypeError set when it is not one, or too big. */
static int as_int(PyObject *v, long long *out) {
    PyObject *num = PyLong_Check(v) ? (Py_INCREF(v), v) : PyNumber_Index(v);
    if (!num) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "a value that is not an integer");
        return -1;
    }
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(num, &overflow);
    Py_DECREF(num);
    if (overflow || (*out == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "an integer beyond 64 bits");
        return -1;
    }
    return 0;
}

static int put_str(Buf *b, PyObject *v) {
    static const char hex[] = "0123456789abcdef";
    Py_ssize_t n;
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8AndSize(v, &n) : NULL;
    if (!s) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "a value that is not text");
        return -1;
    }
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

typedef struct { long long ts, dur; size_t start, len, seq; } Line;

static int by_time(const void *pa, const void *pb) {
    const Line *a = pa, *b = pb;
    if (a->ts != b->ts) return a->ts < b->ts ? -1 : 1;
    if (a->dur != b->dur) return a->dur > b->dur ? -1 : 1;
    return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/* Appends one row's line to `text`; its ts and dur to `line`. */
static int format_row(Buf *text, Line *line, PyObject *row, PyObject *fields, PyObject *suffix) {
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != n || n < 2) {
        PyErr_SetString(PyExc_TypeError, "a row that does not match its fields");
        return -1;
    }
    line->start = text->len;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i), *v = PyTuple_GET_ITEM(row, i);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(field, 1));
        if (v == Py_None && (kind & OPTIONAL)) continue;
        PyObject *prefix = PyTuple_GET_ITEM(field, 0);
        if (put(text, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix)) < 0) return -1;
        if (kind & STR) {
            if (put_str(text, v) < 0) return -1;
            continue;
        }
        long long x;
        if (as_int(v, &x) < 0) return -1;
        if (i == 1 && x < 0) x = 0;
        if (i == 0) line->ts = x;
        if (i == 1) line->dur = x;
        if (put_int(text, x) < 0) return -1;
    }
    if (put(text, PyBytes_AS_STRING(suffix), (size_t)PyBytes_GET_SIZE(suffix)) < 0) return -1;
    line->len = text->len - line->start;
    return 0;
}

/* A row already formatted: (ts, dur, line bytes). */
static int copy_row(Buf *text, Line *line, PyObject *row) {
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(row, 2))) {
        PyErr_SetString(PyExc_TypeError, "a formatted row that is not (ts, dur, bytes)");
        return -1;
    }
    if (as_int(PyTuple_GET_ITEM(row, 0), &line->ts) < 0 || as_int(PyTuple_GET_ITEM(row, 1), &line->dur) < 0)
        return -1;
    if (line->dur < 0) line->dur = 0;
    PyObject *s = PyTuple_GET_ITEM(row, 2);
    line->start = text->len;
    line->len = (size_t)PyBytes_GET_SIZE(s);
    return put(text, PyBytes_AS_STRING(s), line->len);
}

static int check_fields(PyObject *fields, PyObject *suffix) {
    if (fields == Py_None) return 0;
    if (!PyTuple_Check(fields) || !PyBytes_Check(suffix)) goto bad;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(fields); i++) {
        PyObject *f = PyTuple_GET_ITEM(fields, i);
        if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(f, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(f, 1)))
            goto bad;
    }
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "fields must be a tuple of (bytes, int) and suffix bytes");
    return -1;
}

static PyObject *format_events(PyObject *self, PyObject *tables) {
    if (!PyList_Check(tables)) {
        PyErr_SetString(PyExc_ValueError, "tables must be a list");
        return NULL;
    }
    Py_ssize_t n_tables = PyList_GET_SIZE(tables), n_lines = 0;
    for (Py_ssize_t t = 0; t < n_tables; t++) {
        PyObject *table = PyList_GET_ITEM(tables, t);
        if (!PyTuple_Check(table) || PyTuple_GET_SIZE(table) != 3 || !PyList_Check(PyTuple_GET_ITEM(table, 0))) {
            PyErr_SetString(PyExc_ValueError, "each table must be (rows: list, fields, suffix)");
            return NULL;
        }
        if (check_fields(PyTuple_GET_ITEM(table, 1), PyTuple_GET_ITEM(table, 2)) < 0) return NULL;
        n_lines += PyList_GET_SIZE(PyTuple_GET_ITEM(table, 0));
    }
    Buf text = {0};
    Line *lines = malloc(sizeof(Line) * (size_t)(n_lines ? n_lines : 1));
    PyObject *out = NULL;
    if (!lines) return PyErr_NoMemory();
    size_t k = 0;
    for (Py_ssize_t t = 0; t < n_tables; t++) {
        PyObject *table = PyList_GET_ITEM(tables, t);
        PyObject *rows = PyTuple_GET_ITEM(table, 0), *fields = PyTuple_GET_ITEM(table, 1);
        PyObject *suffix = PyTuple_GET_ITEM(table, 2);
        for (Py_ssize_t r = 0; r < PyList_GET_SIZE(rows); r++, k++) {
            PyObject *row = PyList_GET_ITEM(rows, r);
            lines[k].seq = k;
            if ((fields == Py_None ? copy_row(&text, &lines[k], row)
                                   : format_row(&text, &lines[k], row, fields, suffix)) < 0)
                goto done;
        }
    }
    qsort(lines, k, sizeof(Line), by_time);
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)text.len);
    if (!out) goto done;
    char *o = PyBytes_AS_STRING(out);
    for (size_t i = 0; i < k; i++) {
        memcpy(o, text.p + lines[i].start, lines[i].len);
        o += lines[i].len;
    }
done:
    free(lines);
    free(text.p);
    return out;
}

static PyMethodDef methods[] = {
    {"format_events", format_events, METH_O, "A drain's rows as JSON lines in time order (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lines", "The timings writer's line formatter.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__lines(void) { return PyModule_Create(&module); }
