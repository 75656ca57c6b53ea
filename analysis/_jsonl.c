/* A compiled scanner for JSON lines that are flat objects: the fast route of analysis.flatjson.

   count_lines(buf) -> the number of "\n" in buf
   scan(buf, n_lines, fields, n_int, n_str, ints, int_keyed, strs, floats, float_keyed, key_mask)
       -> (strings, other_lines, other_names) | None

   `buf` holds n_lines lines, each ending in "\n", each one JSON object whose values are strings,
   numbers or literals. `fields` are the wanted keys (bytes): the first n_int integers, the next
   n_str strings, the rest floats. Their values are written into the given writable arrays, one
   row of n_lines per field (ints int64, strs int64 ids, floats float64, the *_keyed uint8: the
   line has the key); key_mask, uint64 per line, gets bit i set where the line has fields[i]. Values
   of absent fields are left as they are. String ids index `strings`, the distinct wanted string values of this call
   (bytes, in order of first appearance); other keys are listed by line and name.

   Anything this does not read exactly as a JSON parser would returns None, and the caller takes
   its slower route, which also words the errors: escapes, nesting, blank lines, a wanted integer
   that is not a plain integer of at most 18 digits, a wanted string that is not a string.
   The scan itself runs without the GIL, so threads can scan separate buffers at once. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FIELDS 64
#define MAX_KEY 32
#define SLOTS 256
#define PER_SLOT 4

typedef struct {
    int n;
    const char *name[MAX_FIELDS];
    Py_ssize_t len[MAX_FIELDS];
    uint64_t word[MAX_FIELDS];           /* names of up to 8 bytes as one little-endian word, zero-padded */
    signed char slot[SLOTS][PER_SLOT];   /* field indices by (length, first, last byte); -1 empty */
} Keys;

typedef struct { Py_ssize_t start, len; } Span;
typedef struct { Py_ssize_t line; Span name; } Other;

typedef struct {
    /* the distinct strings: open addressing on a hash of their bytes */
    Span *strings; Py_ssize_t n_strings, cap_strings;
    int64_t *table; uint64_t *hashes; Py_ssize_t table_mask;
    Other *others; Py_ssize_t n_others, cap_others;
} Found;

static inline uint64_t load8(const char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* memcmp for the short runs compared here, without a call: a word at a time, then bytes. */
static inline int same_bytes(const char *a, const char *b, Py_ssize_t n) {
    for (; n >= 8; a += 8, b += 8, n -= 8)
        if (load8(a) != load8(b)) return 0;
    while (n--)
        if (*a++ != *b++) return 0;
    return 1;
}

static unsigned key_slot(const char *k, Py_ssize_t len) {
    return (unsigned)(len * 31 + (unsigned char)k[0] * 7 + (unsigned char)k[len - 1]) & (SLOTS - 1);
}

/* The field named by the key k (len bytes), or -1; `end`: where the buffer ends. */
static int find_key(const Keys *keys, const char *k, Py_ssize_t len, const char *end) {
    if (len == 0 || len > MAX_KEY) return -1;
    const signed char *c = keys->slot[key_slot(k, len)];
    if (len <= 8 && end - k >= 8) {
        uint64_t w = load8(k) & (~0ULL >> (64 - 8 * len));
        for (int i = 0; i < PER_SLOT && c[i] >= 0; i++)
            if (keys->word[c[i]] == w && keys->len[c[i]] == len) return c[i];
        return -1;
    }
    for (int i = 0; i < PER_SLOT && c[i] >= 0; i++)
        if (keys->len[c[i]] == len && same_bytes(keys->name[c[i]], k, len)) return c[i];
    return -1;
}

static inline const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\r') p++;
    return p;
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* The bytes of w that are a quote, a backslash or a control byte, as their high bits (SWAR). */
static inline uint64_t special_bytes(uint64_t w) {
    uint64_t quote = w ^ (ONES * '"'), slash = w ^ (ONES * '\\');
    return (((quote - ONES) & ~quote) | ((slash - ONES) & ~slash) | ((w - ONES * 0x20) & ~w)) & HIGHS;
}

/* The end of a string whose opening quote is at p, or NULL (an escape, a control byte).
   Eight bytes at a time while eight remain before `end`. */
static inline const char *string_end(const char *p, const char *end) {
    p++;
    for (; end - p >= 8; p += 8) {
        uint64_t hit = special_bytes(load8(p));
        if (hit) {
            p += __builtin_ctzll(hit) >> 3;
            return *p == '"' ? p : NULL;
        }
    }
    while (p < end && *p != '"') {
        if (*p == '\\' || (unsigned char)*p < 0x20) return NULL;
        p++;
    }
    return p < end ? p : NULL;
}

/* The end of a JSON number at p, or NULL; *integer: it has no fraction or exponent. */
static const char *number_end(const char *p, int *integer) {
    if (*p == '-') p++;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (*p >= '0' && *p <= '9') p++;
    else return NULL;
    *integer = 1;
    if (*p == '.') {
        *integer = 0;
        p++;
        if (!(*p >= '0' && *p <= '9')) return NULL;
        while (*p >= '0' && *p <= '9') p++;
    }
    if (*p == 'e' || *p == 'E') {
        *integer = 0;
        p++;
        if (*p == '+' || *p == '-') p++;
        if (!(*p >= '0' && *p <= '9')) return NULL;
        while (*p >= '0' && *p <= '9') p++;
    }
    return p;
}

/* A hash of the n bytes at s; `end`: where the buffer ends (the last word is read whole before it). */
static inline uint64_t hash_bytes(const char *s, Py_ssize_t n, const char *end) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n, w = 0;
    for (; n >= 8; s += 8, n -= 8) {
        h = (h ^ load8(s)) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 32;
    }
    if (end - s >= 8)
        w = n ? load8(s) & (~0ULL >> (64 - 8 * n)) : 0;
    else
        for (Py_ssize_t i = n - 1; i >= 0; i--) w = (w << 8) | (unsigned char)s[i];
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL;
    return h ^ (h >> 29);
}

static int grow(void **items, Py_ssize_t *cap, Py_ssize_t size) {
    Py_ssize_t n = *cap ? 2 * *cap : 64;
    void *p = realloc(*items, n * size);
    if (!p) return -1;
    *items = p;
    *cap = n;
    return 0;
}

/* Twice the slots, kept at least half empty. */
static int grow_table(Found *f) {
    Py_ssize_t cap = 2 * (f->table_mask + 1);
    int64_t *table = malloc(cap * sizeof(int64_t));
    uint64_t *hashes = malloc(cap * sizeof(uint64_t));
    if (!table || !hashes) {
        free(table);
        free(hashes);
        return -1;
    }
    memset(table, -1, cap * sizeof(int64_t));
    for (Py_ssize_t i = 0; i <= f->table_mask; i++) {
        if (f->table[i] < 0) continue;
        Py_ssize_t j = (Py_ssize_t)f->hashes[i] & (cap - 1);
        while (table[j] >= 0) j = (j + 1) & (cap - 1);
        table[j] = f->table[i];
        hashes[j] = f->hashes[i];
    }
    free(f->table);
    free(f->hashes);
    f->table_mask = cap - 1;
    f->table = table;
    f->hashes = hashes;
    return 0;
}

/* The id of the string buf[start, start+len), added if new; -1 when out of memory. */
static int64_t intern(Found *f, const char *buf, const char *end, Py_ssize_t start, Py_ssize_t len) {
    if (2 * (f->n_strings + 1) > f->table_mask + 1 && grow_table(f)) return -1;
    uint64_t h = hash_bytes(buf + start, len, end);
    Py_ssize_t i = (Py_ssize_t)h & f->table_mask;
    for (;; i = (i + 1) & f->table_mask) {
        int64_t id = f->table[i];
        if (id < 0) break;
        if (f->hashes[i] == h && f->strings[id].len == len && same_bytes(buf + f->strings[id].start, buf + start, len))
            return id;
    }
    if (f->n_strings == f->cap_strings && grow((void **)&f->strings, &f->cap_strings, sizeof(Span))) return -1;
    f->strings[f->n_strings] = (Span){start, len};
    f->table[i] = f->n_strings;
    f->hashes[i] = h;
    return f->n_strings++;
}

/* 1: every line read; 0: a line this does not read (the caller's slower route); -1: out of memory. */
static int scan_lines(const char *buf, Py_ssize_t size, Py_ssize_t n_lines, const Keys *keys, int n_int, int n_str,
                      int64_t *ints, uint8_t *int_keyed, int64_t *strs, double *floats, uint8_t *float_keyed,
                      uint64_t *key_mask, Found *found) {
    const char *p = buf, *end = buf + size;
    char number[64];
    for (Py_ssize_t line = 0; line < n_lines; line++) {
        p = skip_ws(p);
        if (*p != '{') return 0;
        p = skip_ws(p + 1);
        if (*p != '}') {
            for (;;) {
                if (*p != '"') return 0;
                const char *key = p + 1, *key_end = string_end(p, end);
                if (!key_end) return 0;
                p = skip_ws(key_end + 1);
                if (*p != ':') return 0;
                p = skip_ws(p + 1);
                int f = find_key(keys, key, key_end - key, end);
                if (*p == '"') {
                    const char *s_end = string_end(p, end);
                    if (!s_end || (f >= 0 && (f < n_int || f >= n_int + n_str))) return 0;
                    if (f >= 0) {
                        int64_t id = intern(found, buf, end, p + 1 - buf, s_end - p - 1);
                        if (id < 0) return -1;
                        strs[(Py_ssize_t)(f - n_int) * n_lines + line] = id;
                    }
                    p = s_end + 1;
                } else {
                    int integer = 0;
                    const char *v_end;
                    if (*p == '-' || (*p >= '0' && *p <= '9')) v_end = number_end(p, &integer);
                    else if (f < 0 && !strncmp(p, "true", 4)) v_end = p + 4;
                    else if (f < 0 && !strncmp(p, "false", 5)) v_end = p + 5;
                    else if (f < 0 && !strncmp(p, "null", 4)) v_end = p + 4;
                    else return 0;
                    if (!v_end) return 0;
                    if (f >= 0 && f < n_int) {
                        const char *d = p + (*p == '-');
                        if (!integer || v_end - d > 18) return 0;
                        int64_t v = 0;
                        for (; d < v_end; d++) v = v * 10 + (*d - '0');
                        ints[(Py_ssize_t)f * n_lines + line] = *p == '-' ? -v : v;
                        int_keyed[(Py_ssize_t)f * n_lines + line] = 1;
                    } else if (f >= n_int + n_str) {
                        if (v_end - p >= (Py_ssize_t)sizeof number) return 0;
                        memcpy(number, p, v_end - p);
                        number[v_end - p] = 0;
                        Py_ssize_t at = (Py_ssize_t)(f - n_int - n_str) * n_lines + line;
                        floats[at] = strtod(number, NULL);
                        float_keyed[at] = 1;
                    } else if (f >= 0) {
                        return 0;       /* a wanted string field holding a number */
                    }
                    p = v_end;
                }
                if (f >= 0) key_mask[line] |= 1ULL << f;
                else {
                    if (found->n_others == found->cap_others
                        && grow((void **)&found->others, &found->cap_others, sizeof(Other))) return -1;
                    found->others[found->n_others++] = (Other){line, {key - buf, key_end - key}};
                }
                p = skip_ws(p);
                if (*p == '}') break;
                if (*p != ',') return 0;
                p = skip_ws(p + 1);
            }
        }
        p = skip_ws(p + 1);
        if (*p != '\n') return 0;
        p++;
    }
    return p == end;
}

static int writable(PyObject *obj, Py_buffer *view, Py_ssize_t bytes, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len < bytes) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "scan: '%s' holds %zd bytes, needs %zd", what, view->len, bytes);
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *data;     /* bytes: they end in a NUL byte, which stops every scan of a line */
    Py_ssize_t n_lines;
    PyObject *fields, *out[6];
    int n_int, n_str;
    if (!PyArg_ParseTuple(args, "SnO!iiOOOOOO", &data, &n_lines, &PyTuple_Type, &fields, &n_int, &n_str,
                          &out[0], &out[1], &out[2], &out[3], &out[4], &out[5]))
        return NULL;
    const char *buf = PyBytes_AS_STRING(data);
    PyObject *result = NULL;
    Py_buffer views[6];
    int n_views = 0;
    Keys keys;
    Found found = {0};
    keys.n = (int)PyTuple_GET_SIZE(fields);
    int n_float = keys.n - n_int - n_str;
    if (keys.n > MAX_FIELDS || n_int < 0 || n_str < 0 || n_float < 0 || n_lines < 0) {
        PyErr_SetString(PyExc_ValueError, "scan: bad field counts");
        goto done;
    }
    memset(keys.slot, -1, sizeof keys.slot);
    for (int i = 0; i < keys.n; i++) {
        PyObject *name = PyTuple_GET_ITEM(fields, i);
        if (!PyBytes_Check(name) || PyBytes_GET_SIZE(name) == 0 || PyBytes_GET_SIZE(name) > MAX_KEY) {
            PyErr_SetString(PyExc_ValueError, "scan: field names must be bytes of 1 to 32");
            goto done;
        }
        keys.name[i] = PyBytes_AS_STRING(name);
        keys.len[i] = PyBytes_GET_SIZE(name);
        keys.word[i] = 0;
        if (keys.len[i] <= 8) memcpy(&keys.word[i], keys.name[i], keys.len[i]);
        signed char *c = keys.slot[key_slot(keys.name[i], keys.len[i])];
        int j = 0;
        while (j < PER_SLOT && c[j] >= 0) j++;
        if (j == PER_SLOT) {
            PyErr_SetString(PyExc_ValueError, "scan: too many field names share a slot");
            goto done;
        }
        c[j] = (signed char)i;
    }
    const Py_ssize_t sizes[6] = {8 * n_int * n_lines, n_int * n_lines, 8 * n_str * n_lines,
                                 8 * n_float * n_lines, n_float * n_lines, 8 * n_lines};
    const char *names[6] = {"ints", "int_keyed", "strs", "floats", "float_keyed", "key_mask"};
    for (; n_views < 6; n_views++)
        if (writable(out[n_views], &views[n_views], sizes[n_views], names[n_views]) < 0) goto done;

    Py_ssize_t cap = 64;
    while (cap < 2 * (n_str * n_lines + 1)) cap *= 2;
    cap = cap < (1 << 16) ? cap : (1 << 16);    /* distinct strings are few; the table grows if not */
    found.table_mask = cap - 1;
    found.table = malloc(cap * sizeof(int64_t));
    found.hashes = malloc(cap * sizeof(uint64_t));
    if (!found.table || !found.hashes) {
        PyErr_NoMemory();
        goto done;
    }
    memset(found.table, -1, cap * sizeof(int64_t));

    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = scan_lines(buf, PyBytes_GET_SIZE(data), n_lines, &keys, n_int, n_str, views[0].buf, views[1].buf, views[2].buf,
                    views[3].buf, views[4].buf, views[5].buf, &found);
    Py_END_ALLOW_THREADS
    if (ok < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (ok == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *strings = PyList_New(found.n_strings), *lines = PyList_New(found.n_others),
             *others = PyList_New(found.n_others);
    if (strings && lines && others) {
        for (Py_ssize_t i = 0; i < found.n_strings; i++) {
            PyObject *s = PyBytes_FromStringAndSize(buf + found.strings[i].start, found.strings[i].len);
            if (!s) goto fail;
            PyList_SET_ITEM(strings, i, s);
        }
        for (Py_ssize_t i = 0; i < found.n_others; i++) {
            PyObject *line = PyLong_FromSsize_t(found.others[i].line);
            PyObject *name = PyBytes_FromStringAndSize(buf + found.others[i].name.start,
                                                       found.others[i].name.len);
            if (line) PyList_SET_ITEM(lines, i, line);
            if (name) PyList_SET_ITEM(others, i, name);
            if (!line || !name) goto fail;
        }
        result = PyTuple_Pack(3, strings, lines, others);
    }
fail:
    Py_XDECREF(strings);
    Py_XDECREF(lines);
    Py_XDECREF(others);
done:
    while (n_views > 0) PyBuffer_Release(&views[--n_views]);
    free(found.strings);
    free(found.table);
    free(found.hashes);
    free(found.others);
    return result;
}

/* count_lines(buf) -> the number of "\n" in buf: memchr is several times faster than bytes.count. */
static PyObject *count_lines(PyObject *self, PyObject *arg) {
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n = 0;
    const char *p = in.buf, *end = p + in.len;
    Py_BEGIN_ALLOW_THREADS
    while ((p = memchr(p, '\n', end - p))) {
        n++;
        p++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Read flat JSON lines into columns (see the module's source)."},
    {"count_lines", count_lines, METH_O, "The number of line breaks in a bytes-like object."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonl", "The compiled route of analysis.flatjson.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__jsonl(void) { return PyModule_Create(&module); }
