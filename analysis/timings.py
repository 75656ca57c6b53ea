"""Loading a timings file (contract v1, DESIGN.md) into NumPy columns.

Public API (stable; everything else in the analyzer builds on it):

    load_timings(path, progress=None, model=None) -> Timings
        Read a `timings.jsonl` (`progress(bytes_read)` is called after each block,
        for a progress bar); files of PARALLEL_MIN_BYTES or more are read on every
        core, in forked processes (Linux). A file that does not start with a JSON object is
        handed to `analysis.ik_log` (the ik_llama.cpp log importer) when that module
        exists and recognises it, with `model` (analysis.model_bytes.read_model of the
        model file the log ran) for its ops' bytes; a timings file refuses `model`.
    load_lines(lines, source) -> Timings
        The same from an iterable of lines (bytes or str, one JSON object each);
        `source` names the input in messages. Importers of other engines' logs
        convert to v1 lines and call this.

    Timings (frozen):
        source          the file name, for messages and reports
        header          the meta line (line 1) as a dict
        events          EventColumns: one array per EVENT_DTYPE field, one row per event (but routes),
                        sorted by ts; read like a structured array (events["ts"], events[mask] -> rows)
        tests           NumPy structured array, TEST_DTYPE, one row per `test` event
        routes          NumPy structured array, ROUTE_DTYPE, one row per `route` event, sorted by ts (kept
                        out of `events`: they hold no time, and their ids no column):
                        its experts are route_ids[first:first + n_ids] (token-major)
        route_ids       int32, every route event's expert ids, one after another
        symbols         tuple of strings; every string field is an integer id into it (-1: absent)
        skipped_types   {unknown event type: count}
        skipped_fields  {unknown field: count}  (contract v1 allows both: the report notes them once)
        warnings        tuple of one-line messages for the user (a truncated last line)
        .sym(i) -> str, .id(s) -> int, .ids(pred) -> array of ids whose string satisfies pred,
        .type_code(name) -> int (index in EVENT_TYPES, the value of events["type"])
        .of_type(name) -> bool mask over the events of that type

Why columns: a run has millions of events; per-event Python objects would make
the report slower than the run. Strings are stored once, HTA style, as ids.
Absent integer fields are -1, absent `bytes`/`bytes_ub`/`flops` are 0, absent `tps`/`tps_std`
NaN. Known optional fields that only echo a source's own names (`role`, `label`,
`node`, `incomplete`: profiler.schema.OPTIONAL_FIELDS) are accepted and not read.

Readers must accept unknown fields and event types (skip and count), and a
truncated last line (a crashed run leaves a readable prefix); anything else
that is not contract v1 is a `UserError` naming the file and line.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
from collections import Counter
from itertools import chain
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable, Iterable, Iterator

import numpy as np
import orjson

from analysis.flatjson import FlatColumns, FlatReader, count_lines
from profiler.errors import UserError
from profiler.schema import COMMON_FIELDS, EVENT_FIELDS, EVENT_TYPES, OPTIONAL_FIELDS, SCHEMA

# Event columns. String fields hold symbol ids.
EVENT_DTYPE = np.dtype([
    ("type", np.int8), ("ts", np.int64), ("dur", np.int64),
    ("tid", np.int32), ("backend", np.int32), ("graph", np.int32), ("split", np.int32),
    ("op", np.int32), ("name", np.int32), ("layer", np.int32),
    ("bytes", np.int64), ("bytes_ub", np.int8), ("flops", np.int64), ("n_tokens", np.int32),
    ("src", np.int32), ("dst", np.int32),
    ("n_past", np.int32), ("n_nodes", np.int32), ("n_inputs", np.int32),
    ("kind", np.int32),     # a copy's kind ("weights": an op-offload upload), a test's (pp, tg)
])
# One row per test repetition (the few fields only `test` events carry); `tps`/`tps_std` are
# the source engine's own figures (NaN: none), `config` the sweep index (-1: none).
TEST_DTYPE = np.dtype([
    ("ts", np.int64), ("dur", np.int64), ("name", np.int32), ("kind", np.int32),
    ("n_prompt", np.int32), ("n_gen", np.int32), ("depth", np.int32), ("rep", np.int32),
    ("n_tokens", np.int32), ("config", np.int32), ("tps", np.float64), ("tps_std", np.float64),
])
STRING_FIELDS = frozenset({"tid", "backend", "op", "name", "src", "dst", "kind"})
ZERO_WHEN_ABSENT = frozenset({"bytes", "bytes_ub", "flops"})
REQUIRED_FIELDS = ("ts", "dur")
TYPE_CODES = {t: i for i, t in enumerate(EVENT_TYPES)}
# Fields each type may carry (beyond `type`); a field outside its type's list is unknown.
TYPE_FIELDS = {t: tuple(f for f in COMMON_FIELDS if f != "type") + EVENT_FIELDS[t] + OPTIONAL_FIELDS.get(t, ())
               for t in EVENT_TYPES}
FLOAT_FIELDS = ("tps", "tps_std")
# Known fields not read: the graph's test (found by time instead) and the source's own names.
UNREAD_FIELDS = frozenset({"test", "role", "incomplete", "label", "node"})
# Integers beyond this are refused: the largest a double holds exactly (JSON readers such as the
# trace viewers keep numbers as doubles), and far from int64's end, so ts + dur cannot wrap.
MAX_INT = 2**53

# One row per `route` event (the experts a MoE layer chose in one graph); its ids live in one
# array for all of them (`Timings.route_ids`), from `first` on.
ROUTE_DTYPE = np.dtype([
    ("ts", np.int64), ("graph", np.int32), ("layer", np.int32), ("n_tokens", np.int32),
    ("first", np.int64), ("n_ids", np.int32),
])
# Fields whose value is a list (of integers): read by their event type's own code, never by the
# flat reader (analysis.flatjson), which takes flat objects only.
LIST_FIELDS = frozenset({"experts"})
MAX_EXPERT_ID = 2**31 - 1

# The header's sections (objects) and the numbers in them that the analyses compute with.
HEADER_OBJECTS = ("model", "config", "machine", "peak_bw", "placement", "source")
HEADER_NUMBERS = {"model": ("size_bytes", "n_params", "n_expert", "n_expert_used"),
                  "machine": ("cores", "mem_bytes")}

# The fields read into columns, for the vectorised reader (analysis.flatjson).
STR_FIELDS = ("type",) + tuple(sorted(STRING_FIELDS))
INT_FIELDS = tuple(f for f in dict.fromkeys(COMMON_FIELDS + sum(EVENT_FIELDS.values(), ()) + ("config", "bytes_ub"))
                   if f not in STR_FIELDS and f not in UNREAD_FIELDS and f not in LIST_FIELDS)
READ_FIELDS = INT_FIELDS + STR_FIELDS + FLOAT_FIELDS
_INT_FILL = np.array([0 if f in ZERO_WHEN_ABSENT else -1 for f in INT_FIELDS])
# NOT_CARRIED[type code]: bit i set when an event of that type may not carry field READ_FIELDS[i]
NOT_CARRIED = np.array([sum(1 << i for i, f in enumerate(READ_FIELDS) if f not in TYPE_FIELDS[t] and f != "type")
                        for t in EVENT_TYPES], dtype=np.uint64)

LINES_PER_CHUNK = 1 << 15
BLOCK_BYTES = 1 << 21


class EventColumns:
    """The events, one contiguous array per field of EVENT_DTYPE, read like a structured array:
    `ev["ts"]` is a column, `ev[mask]` (or an index, a slice) the selected rows as an EVENT_DTYPE
    array, built when asked. Analyses pass over whole fields; in a table of rows each such pass
    would drag every row's other fields through the cache too."""

    dtype = EVENT_DTYPE

    def __init__(self, columns: dict):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["ts"])

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        if np.ndim(key) == 0 and not isinstance(key, slice):
            return self[np.array([key])][0]
        rows = self.columns["ts"][key]
        out = np.empty(len(rows), EVENT_DTYPE)
        for f, col in self.columns.items():
            out[f] = col[key]
        return out

    def __iter__(self):
        return iter(self[:])

    @property
    def nbytes(self) -> int:
        return sum(col.nbytes for col in self.columns.values())


@dataclass(frozen=True)
class Timings:
    source: str
    header: dict
    events: EventColumns
    tests: np.ndarray
    symbols: tuple[str, ...]
    routes: np.ndarray = field(default_factory=lambda: np.empty(0, ROUTE_DTYPE))
    route_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    skipped_types: dict = field(default_factory=dict)
    skipped_fields: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def sym(self, i: int) -> str:
        return self.symbols[i] if i >= 0 else ""

    def id(self, s: str) -> int:
        try:
            return self.symbols.index(s)
        except ValueError:
            return -1

    def ids(self, pred: Callable[[str], bool]) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.symbols) if pred(s)], dtype=np.int32)

    @staticmethod
    def type_code(name: str) -> int:
        return TYPE_CODES[name]

    def of_type(self, name: str) -> np.ndarray:
        """The mask of events of one type (op, copy, split, ...)."""
        return self.events["type"] == TYPE_CODES[name]


def load_timings(path: str | os.PathLike, progress: Callable[[int], None] | None = None, model=None) -> Timings:
    source = os.fspath(path)
    if not os.path.exists(source):
        raise UserError(f"{source}: no such file")
    if os.path.isdir(source):
        raise UserError(f"{source}: is a directory, not a timings file")
    with open(source, "rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        raise UserError(f"{source}: empty file, not a hyprof timings file")
    if not head.startswith(b"{"):
        ik_log = _ik_log_importer()
        if ik_log is not None and ik_log.looks_like_ik_log(source):
            return load_lines(ik_log.convert(source, model=model), source)
        raise UserError(f"{source}: not a hyprof timings file (line 1 is not a JSON object)")
    if model is not None:
        raise UserError(f"--model {model.path}: only for another engine's log; {source} is a timings file, "
                        "whose ops carry their bytes")
    size = os.path.getsize(source)
    cores = _cores()
    if size >= PARALLEL_MIN_BYTES and cores > 1:
        timings = _load_parallel(source, progress, min(cores, MAX_PROCESSES))
        if timings is not None:
            return timings
    return _load(_file_blocks(source, progress), source, capacity=size // 64)


def load_lines(lines: Iterable[bytes | str], source: str) -> Timings:
    return _load(_line_blocks(lines), source)


def _ik_log_importer():
    """The ik_llama.cpp log importer, if this checkout has it (written separately)."""
    if importlib.util.find_spec("analysis.ik_log") is None:
        return None
    from analysis import ik_log
    return ik_log


# ---------------------------------------------------------------- reading blocks of lines
# A block is (bytes of whole lines each ending in b"\n", False) or, last, (the final line, True).
# The final line is kept apart: it alone may be cut short by a crash.

def _file_blocks(path: str, progress: Callable[[int], None] | None, start: int = 0,
                 end: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """Blocks of the bytes [start, end) of the file (to its end by default); progress(bytes read).
    Cut from a map of the file: each byte is copied once, into its block."""
    first = start
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = len(data) if end is None else end
            while start < end:
                stop = min(start + BLOCK_BYTES, end)
                cut = data.rfind(b"\n", start, stop) + 1 or data.find(b"\n", stop, end) + 1
                if not cut:         # no line break to the end: the last line, perhaps cut short
                    yield data[start:end], True
                    return
                yield data[start:cut], False
                if progress is not None:
                    progress(cut - first)
                start = cut


def _line_blocks(lines: Iterable[bytes | str]) -> Iterator[tuple[bytes, bool]]:
    chunk: list[bytes] = []
    prev = None
    for line in lines:
        if prev is not None:
            chunk.append(prev)
            if len(chunk) == LINES_PER_CHUNK:
                yield b"\n".join(chunk) + b"\n", False
                chunk = []
        prev = (line.encode() if isinstance(line, str) else line).rstrip(b"\r\n")
    if chunk:
        yield b"\n".join(chunk) + b"\n", False
    if prev is not None:
        yield prev, True


# ---------------------------------------------------------------- parsing

class _Symbols:
    """String -> id, growing as chunks arrive; absent (None) is -1."""

    def __init__(self):
        self.ids: dict = {None: -1}
        self.names: list[str] = []

    def intern(self, values: list, field_name: str, where: Callable[[int], str]) -> np.ndarray:
        i = next((i for i, v in enumerate(values) if v is not None and type(v) is not str), None)
        if i is not None:
            raise UserError(f"{where(i)}: field '{field_name}' must be a string, got {_shown(values[i])}")
        new = set(values) - self.ids.keys()
        for v in sorted(new):
            self.ids[v] = len(self.names)
            self.names.append(v)
        return np.fromiter(map(self.ids.__getitem__, values), dtype=np.int32, count=len(values))


class _NoRoom(Exception):
    """A fixed (shared) table is full: the lines are shorter than its room assumed; read in one pass."""


class _Rows:
    """A growing event table, one array per field: rows are written in place, so the columns are
    never copied to be joined.

    Room is reserved generously (for a file, a row per 64 bytes; event lines are longer):
    pages never written are never backed by memory.
    """

    def __init__(self, capacity: int, data: dict | None = None):
        self.data = data or _shared_rows(max(capacity, 1024))
        self.fixed = data is not None     # given arrays (shared with a parent process): never replaced
        self.n = 0

    def take(self, n: int) -> dict:
        if self.n + n > len(self.data["ts"]):
            if self.fixed:
                raise _NoRoom("more events than a shared table's room for them")
            size = max(2 * len(self.data["ts"]), self.n + n)
            for f, col in self.data.items():
                self.data[f] = np.empty(size, col.dtype)
                self.data[f][:self.n] = col[:self.n]
        self.n += n
        return {f: col[self.n - n:self.n] for f, col in self.data.items()}


@dataclass
class _Accumulator:
    source: str
    events: _Rows
    symbols: _Symbols = field(default_factory=_Symbols)
    tests: list = field(default_factory=list)
    routes: list = field(default_factory=list)      # (ROUTE_DTYPE rows, their ids one after another)
    skipped_types: Counter = field(default_factory=Counter)
    skipped_fields: Counter = field(default_factory=Counter)
    warnings: list = field(default_factory=list)
    reader: FlatReader = field(default_factory=lambda: FlatReader(INT_FIELDS, STR_FIELDS, FLOAT_FIELDS, _INT_FILL))
    reader_symbols: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    reader_types: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def _load(blocks: Iterator[tuple[bytes, bool]], source: str, capacity: int = 1 << 16) -> Timings:
    acc = _Accumulator(source, _Rows(capacity))
    header, _ = _read(blocks, acc, None, 1)
    return _finish(acc, header)


def _read(blocks: Iterator[tuple[bytes, bool]], acc: _Accumulator, header: dict | None, line_no: int):
    """Add the events of the blocks to `acc`, reading the header first unless given: (header, next line)."""
    source = acc.source
    for data, final in blocks:
        while header is None and data:
            cut = data.find(b"\n") + 1 if not final else len(data)
            first, data = data[:cut or len(data)], data[cut or len(data):]
            if first.strip():
                header = _check_header(_header_object(first, line_no, source), line_no, source)
            line_no += 1
        if not data:
            continue
        n_lines = 1 if final else count_lines(data)
        flat, listed = None, []
        if not final:
            flat_lines, listed = _cut_listed(data)
            flat = acc.reader.parse(flat_lines, n_lines - len(listed))
        if flat is None or not _add_flat(flat, acc):
            lines = [data] if final else data.split(b"\n")[:-1]
            objs, numbers = _parse_lines(lines, line_no, final, acc)
            if objs:
                _add_objects(objs, numbers, acc)
        elif listed:
            _add_objects(*_parse_listed(listed, line_no, acc), acc)
        line_no += n_lines
    return header, line_no


def _cut_listed(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The block's lines without a `[` (for the flat reader), and the others (a route's experts) as
    (index in the block, line): few, a MoE layer's per graph, so the rest keeps the fast reader."""
    at = data.find(b"[")
    if at < 0:
        return data, []
    view = memoryview(data)             # (slices of a view are not copies: the join copies once)
    kept, listed, start, i = [], [], 0, 0
    while at >= 0:
        begin = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at) + 1
        i += data.count(b"\n", start, begin)
        kept.append(view[start:begin])
        listed.append((i, data[begin:end - 1]))
        i += 1
        start = end
        at = data.find(b"[", start)
    kept.append(view[start:])
    return b"".join(kept), listed


def _parse_listed(listed: list[tuple[int, bytes]], line_no: int, acc: _Accumulator) -> tuple[list, list]:
    """The listed lines' objects and line numbers: parsed as one JSON array, or where that fails
    (a line that is not JSON) line by line, for the message."""
    try:
        objs = orjson.loads(b"[" + b",".join(line for _, line in listed) + b"]")
    except orjson.JSONDecodeError:
        objs = None
    if objs is None or not all(type(o) is dict for o in objs):
        objs = []
        for i, line in listed:
            objs += _parse_lines([line], line_no + i, False, acc)[0]
    return objs, [line_no + i for i, _ in listed]


def _finish(acc: _Accumulator, header: dict | None) -> Timings:
    source = acc.source
    if header is None:
        raise UserError(f"{source}: empty file, not a hyprof timings file")
    columns = {f: col[:acc.events.n] for f, col in acc.events.data.items()}
    ts = columns["ts"]
    if (ts[1:] < ts[:-1]).any():    # writers write in time order; others get sorted
        order = np.argsort(ts, kind="stable")
        columns = {f: col[order] for f, col in columns.items()}
    events = EventColumns(columns)
    tests = np.concatenate(acc.tests) if acc.tests else np.empty(0, TEST_DTYPE)
    tests = tests[np.argsort(tests["ts"], kind="stable")]
    routes, route_ids = _route_table(acc.routes)
    return Timings(source=source, header=header, events=events, tests=tests,
                   symbols=tuple(acc.symbols.names), routes=routes, route_ids=route_ids,
                   skipped_types=dict(acc.skipped_types),
                   skipped_fields=dict(acc.skipped_fields), warnings=tuple(acc.warnings))


def _header_object(line: bytes, line_no: int, source: str):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        raise UserError(f"{source}:{line_no}: not a hyprof timings file (line {line_no} is not JSON)") from None


def _check_header(obj, line_no: int, source: str) -> dict:
    """The meta line, with the sections and numbers the analyses read of the JSON types they read."""
    if not isinstance(obj, dict) or obj.get("type") != "meta":
        raise UserError(f"{source}:{line_no}: not a hyprof timings file (line 1 is not the "
                        f'{{"type": "meta", "schema": "{SCHEMA}"}} header)')
    if obj.get("schema") != SCHEMA:
        raise UserError(f"{source}:{line_no}: schema {_shown(obj.get('schema'))} is not {SCHEMA!r}")
    for section in HEADER_OBJECTS:
        if obj.get(section) is not None and not isinstance(obj[section], dict):
            raise UserError(f"{source}:{line_no}: header field '{section}' must be an object, "
                            f"got {_shown(obj[section])}")
    sweep = obj.get("sweep")
    if sweep is not None and not (isinstance(sweep, list) and all(isinstance(c, dict) for c in sweep)):
        raise UserError(f"{source}:{line_no}: header field 'sweep' must be a list of objects, got {_shown(sweep)}")
    for section, names in HEADER_NUMBERS.items():
        for name in names:
            v = (obj.get(section) or {}).get(name)
            if v is not None and not (type(v) in (int, float) and 0 <= v <= MAX_INT):
                raise UserError(f"{source}:{line_no}: header field '{section}.{name}' must be a number "
                                f"from 0 to 2**53, got {_shown(v)}")
    return obj


def _parse_lines(lines: list[bytes], first_line: int, final: bool, acc: _Accumulator):
    """JSON objects and their line numbers; blank lines skipped, a broken last line dropped."""
    objs, numbers = [], []
    loads = orjson.loads
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except orjson.JSONDecodeError as e:
            if final and i == len(lines) - 1:
                acc.warnings.append(f"{acc.source}:{first_line + i}: truncated last line ignored")
                continue
            raise UserError(f"{acc.source}:{first_line + i}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{acc.source}:{first_line + i}: not a JSON object")
        objs.append(obj)
        numbers.append(first_line + i)
    return objs, numbers


def _add_objects(objs: list[dict], numbers: list[int], acc: _Accumulator) -> None:
    """Columns for one chunk of event objects, extracted one field at a time per event type."""
    try:
        types = list(map(itemgetter("type"), objs))
    except KeyError:
        i = next(i for i, o in enumerate(objs) if "type" not in o)
        raise UserError(f"{acc.source}:{numbers[i]}: event has no 'type'") from None
    i = next((i for i, t in enumerate(types) if type(t) is not str), None)
    if i is not None:
        raise UserError(f"{acc.source}:{numbers[i]}: field 'type' must be a string, got {_shown(types[i])}")
    codes = np.fromiter(map(TYPE_CODES.get, types, [-1] * len(types)), dtype=np.int8, count=len(types))
    unknown = np.flatnonzero(codes < 0)
    if unknown.size:
        acc.skipped_types.update(str(types[i]) for i in unknown)
    out = np.empty(len(objs), EVENT_DTYPE)
    for name in EVENT_DTYPE.names:
        out[name] = 0 if name in ZERO_WHEN_ABSENT else -1
    out["type"] = codes
    for code in np.unique(codes[codes >= 0]):
        rows = np.flatnonzero(codes == code)
        sub = [objs[i] for i in rows]
        type_name = EVENT_TYPES[code]

        def where(j, rows=rows):
            return f"{acc.source}:{numbers[rows[j]]}"

        known = 1  # `type`
        values = {}
        for f in TYPE_FIELDS[type_name]:
            col, present = _field(sub, f, where)
            known += present
            values[f] = col
        unknown_fields = sum(map(len, sub)) - known
        if unknown_fields:
            allowed = set(TYPE_FIELDS[type_name]) | {"type"}
            acc.skipped_fields.update(k for o in sub for k in o if k not in allowed)
        for f, col in values.items():
            if f in EVENT_DTYPE.names and col is not None:
                out[f][rows] = col if f not in STRING_FIELDS else acc.symbols.intern(col, f, where)
        if type_name == "test":
            acc.tests.append(_test_rows(values, out[rows], acc, where))
        if type_name == "route":
            acc.routes.append(_route_rows(values["experts"], out[rows], where))
        if (out["dur"][rows] < 0).any():
            j = int(np.flatnonzero(out["dur"][rows] < 0)[0])
            raise UserError(f"{where(j)}: 'dur' is negative")
    kept = out[(codes >= 0) & (codes != TYPE_CODES["route"])]        # routes: their own table
    for name, column in acc.events.take(len(kept)).items():
        column[:] = kept[name]


def _field(sub: list[dict], f: str, where) -> tuple:
    """(values, how many events carry the field): ints as an array, strings as a list."""
    vals = [o.get(f) for o in sub]
    present = len(vals) - vals.count(None)
    if present == 0:
        if f in REQUIRED_FIELDS:
            raise UserError(f"{where(0)}: event has no '{f}'")
        return None, sum(1 for o in sub if f in o)
    if present < len(vals):
        if f in REQUIRED_FIELDS:
            j = vals.index(None)
            raise UserError(f"{where(j)}: event has no '{f}'")
        keyed = sum(1 for o in sub if f in o)
        if f not in STRING_FIELDS:
            fill = 0 if f in ZERO_WHEN_ABSENT else -1
            vals = [fill if v is None else v for v in vals]
        present = keyed
    if f in STRING_FIELDS:
        return vals, present
    if f in UNREAD_FIELDS or f in LIST_FIELDS:
        return (vals if f in LIST_FIELDS else None), present
    types = (int, bool, float) if f in FLOAT_FIELDS else (int, bool)
    j = next((j for j, v in enumerate(vals) if type(v) not in types), None)
    if j is not None:
        raise UserError(f"{where(j)}: field '{f}' must be {'a number' if f in FLOAT_FIELDS else 'an integer'}, "
                        f"got {_shown(vals[j])}")
    j = next((j for j, v in enumerate(vals) if type(v) is int and not -MAX_INT <= v <= MAX_INT), None)
    if j is not None:
        raise UserError(f"{where(j)}: field '{f}' is {_shown(vals[j])}, beyond ±2**53")
    if f in FLOAT_FIELDS:
        vals = [np.nan if v == -1 and f not in o else v for v, o in zip(vals, sub)]
    arr = np.array(vals)
    return arr.astype(np.float64 if f in FLOAT_FIELDS else np.int64), present


def _shown(value) -> str:
    """A value for a one-line message: a long one cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _test_rows(values: dict, rows: np.ndarray, acc: _Accumulator, where) -> np.ndarray:
    out = np.empty(len(rows), TEST_DTYPE)
    for name in TEST_DTYPE.names:
        col = values.get(name)
        if name in ("ts", "dur", "name", "n_tokens"):
            out[name] = rows[name]
        elif col is None:
            out[name] = np.nan if name in FLOAT_FIELDS else -1
        else:
            out[name] = acc.symbols.intern(col, name, where) if name in STRING_FIELDS else col
    return out


def _route_rows(experts: list | None, rows: np.ndarray, where) -> tuple[np.ndarray, np.ndarray]:
    """Route rows of these events and all their expert ids in one array: each event's a non-empty
    list of n_tokens * n_expert_used integer ids (checked for the whole chunk at once)."""
    experts = experts or [None] * len(rows)
    j = next((j for j, v in enumerate(experts) if type(v) is not list or not v), None)
    flat = list(chain.from_iterable(experts)) if j is None else []
    if j is None and not all(type(v) is int for v in flat):
        j = next(j for j, v in enumerate(experts) if not all(type(e) is int for e in v))
    if j is not None:
        raise UserError(f"{where(j)}: field 'experts' must be a non-empty list of expert ids, "
                        f"got {_shown(experts[j])}")
    n_ids = np.fromiter(map(len, experts), dtype=np.int64, count=len(experts))
    at = next((i for i, v in enumerate(flat) if not 0 <= v <= MAX_EXPERT_ID), None)
    if at is not None:
        j = int(np.searchsorted(np.cumsum(n_ids), at, side="right"))
        raise UserError(f"{where(j)}: field 'experts' holds {_shown(flat[at])}, not an expert id (0 to 2**31 - 1)")
    if (rows["layer"] < 0).any():
        j = int(np.argmax(rows["layer"] < 0))
        raise UserError(f"{where(j)}: a route's 'layer' must be a layer index (>= 0), got {rows['layer'][j]}")
    ids = np.array(flat, dtype=np.int64)
    n_tokens = rows["n_tokens"].astype(np.int64)
    bad = (n_tokens <= 0) | (n_ids % np.maximum(n_tokens, 1) != 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise UserError(f"{where(j)}: field 'experts' has {n_ids[j]} ids, not n_expert_used per token of "
                        f"'n_tokens' {n_tokens[j]}")
    out = np.zeros(len(rows), ROUTE_DTYPE)
    for name in ("ts", "graph", "layer", "n_tokens"):
        out[name] = rows[name]
    out["n_ids"] = n_ids
    return out, ids.astype(np.int32)


def _route_table(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """The routes of every chunk, sorted by ts, and their ids in one array (`first` into it)."""
    if not parts:
        return np.empty(0, ROUTE_DTYPE), np.empty(0, np.int32)
    routes = np.concatenate([rows for rows, _ in parts])
    routes["first"] = np.concatenate([[0], np.cumsum(routes["n_ids"][:-1], dtype=np.int64)])
    return routes[np.argsort(routes["ts"], kind="stable")], np.concatenate([ids for _, ids in parts])


def _add_flat(flat: FlatColumns, acc: _Accumulator) -> bool:
    """Columns from the vectorised reader; False (add nothing) where the JSON parser must word an error."""
    new = acc.reader.strings[len(acc.reader_symbols):]
    if new:
        decoded = [b.decode() for b in new]     # (the reader takes ASCII lines only)
        acc.reader_symbols = np.append(acc.reader_symbols, acc.symbols.intern(decoded, "", str))
        acc.reader_types = np.append(acc.reader_types, [TYPE_CODES.get(s, -1) for s in decoded])
    type_id = flat.strs["type"]
    codes = np.append(acc.reader_types, -2)[type_id]          # -1 unknown type, -2 no type
    kept = codes >= 0
    (ts, has_ts), (dur, has_dur) = flat.ints["ts"], flat.ints["dur"]
    if (codes == -2).any() or not (has_ts | ~kept).all() or not (has_dur | ~kept).all() or (dur[kept] < 0).any() \
            or (codes == TYPE_CODES["route"]).any():        # a route without its list of experts
        return False
    floats = np.array([flat.floats[f][0] for f in FLOAT_FIELDS])
    if (np.abs(flat.int_table[0]) > MAX_INT).any() or np.isinf(floats).any():
        return False
    symbol_of = np.append(acc.reader_symbols, -1)

    unknown = np.flatnonzero(codes == -1)
    for i, n in zip(*np.unique(type_id[unknown], return_counts=True)):
        acc.skipped_types[acc.symbols.names[acc.reader_symbols[i]]] += int(n)
    # all the fields of a kind at once, as [field, line] tables (absent fields already hold their fill)
    tables = (flat.int_table[0], _INT_FILL), (symbol_of[flat.str_table], -1), \
        (floats, np.nan)
    # a field the line's type does not carry is skipped, counted, and read as absent
    stray = np.where(kept, flat.key_mask & NOT_CARRIED[np.maximum(codes, 0)], 0)
    if stray.any():
        row = 0
        for table, fill in tables:
            for j in range(len(table)):
                lines = np.flatnonzero(stray & np.uint64(1 << (row + j)))
                if lines.size:
                    acc.skipped_fields[READ_FIELDS[row + j]] += lines.size
                    table[j, lines] = fill if np.ndim(fill) == 0 else fill[j]
            row += len(table)
    columns = dict(zip(READ_FIELDS, (column for table, _ in tables for column in table)))
    line, name_id, names = flat.other_keys
    for j in np.unique(name_id):
        rows = line[name_id == j]
        known = np.isin(codes[rows], [TYPE_CODES[t] for t in EVENT_TYPES if names[j].decode() in TYPE_FIELDS[t]])
        stray = int((kept[rows] & ~known).sum())
        if stray:
            acc.skipped_fields[names[j].decode(errors="replace")] += stray

    out = acc.events.take(int(kept.sum()))
    everything = kept.all()
    for name in EVENT_DTYPE.names:
        column = codes if name == "type" else columns[name]
        out[name][:] = column if everything else column[kept]
    is_test = codes == TYPE_CODES["test"]
    if is_test.any():
        tests = np.empty(int(is_test.sum()), TEST_DTYPE)
        for name in TEST_DTYPE.names:
            tests[name] = columns[name][is_test]
        acc.tests.append(tests)
    return True


# ---------------------------------------------------------------- several cores
# A large file is cut at line breaks into ranges read at once: one by this process, the others
# by forked children. All write into one table in shared memory, each range from the row of its
# first line (a child counts the lines before its range), so the columns are not copied to be
# joined: a range with fewer events than lines (blank lines, unknown types) is moved down.
# Strings are numbered per process and renumbered in place. Anything unusual (no header on line 1,
# an error, which must name its line) falls back to the one-pass reader.

PARALLEL_MIN_BYTES = 64 << 20   # below this, starting a process costs more than it saves
MAX_PROCESSES = 4
ROOM_BYTES = 48                 # the table has room for a row per this many bytes (a child whose lines
                                # do not fit hands over to the one-pass reader; our writer's lines are longer)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


def _shared_rows(n_rows: int) -> dict:
    """Empty event columns in memory that forked children share (pages are backed when written)."""
    n_rows = max(n_rows, 1)
    buf = mmap.mmap(-1, sum(EVENT_DTYPE[f].itemsize for f in EVENT_DTYPE.names) * n_rows)
    columns, offset = {}, 0
    for f in EVENT_DTYPE.names:
        columns[f] = np.frombuffer(buf, EVENT_DTYPE[f], n_rows, offset)
        offset += EVENT_DTYPE[f].itemsize * n_rows
    return columns


def _count_lines(source: str, start: int, end: int) -> int:
    """The line breaks in bytes [start, end) of the file."""
    if end <= start:
        return 0
    with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            return count_lines(view[start:end])
        finally:
            view.release()


def _line_cuts(source: str, n: int) -> tuple[bytes, list[int], int] | None:
    """(the header line, the bounds of n ranges of whole lines, the file size), or None when line 1 is
    not a header line. Bytes after the last bound are a last line without its newline."""
    size = os.path.getsize(source)
    with open(source, "rb") as f:
        first = f.readline()
        if not first.endswith(b"\n") or not first.strip():
            return None
        f.seek(max(size - BLOCK_BYTES, len(first)))
        tail = f.read()
        body_end = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else len(first)
        cuts = [len(first)]
        for k in range(1, n):
            f.seek(max(cuts[-1], len(first) + (body_end - len(first)) * k // n))
            f.readline()
            cuts.append(min(f.tell(), body_end))
    return first, cuts + [body_end], size


def _read_range(acc: _Accumulator, header: dict, start: int, end: int, line_no: int, progress) -> int:
    _, next_line = _read(_file_blocks(acc.source, progress, start, end), acc, header, line_no)
    return next_line - line_no


def _load_parallel(source: str, progress: Callable[[int], None] | None, n: int) -> Timings | None:
    import multiprocessing

    cut = _line_cuts(source, n) if "fork" in multiprocessing.get_all_start_methods() else None
    if cut is None:
        return None
    first, bounds, size = cut
    header = _check_header(_header_object(first, 1, source), 1, source)
    ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    done = np.frombuffer(mmap.mmap(-1, 8 * len(ranges)), np.int64)   # bytes read per range
    room = size // ROOM_BYTES + 2
    try:
        table = _shared_rows(room)
    except (OSError, ValueError):       # no memory to map: read it in one pass
        return None
    own = _Accumulator(source, _Rows(0, table))     # its rows are at most its lines: they end before the next range
    children = []
    context = multiprocessing.get_context("fork")
    for k, (start, end) in zip(range(1, len(ranges)), ranges[1:]):
        receive, send = context.Pipe(duplex=False)

        def child(k=k, start=start, end=end, send=send):
            try:
                first_row, n_lines = (_count_lines(source, a, b) for a, b in ((ranges[0][0], start), (start, end)))
                if first_row + n_lines + 1 > room:      # (+1: the last line, read by the parent)
                    raise _NoRoom("more lines than the table has room for")
                rows = {f: col[first_row:first_row + n_lines] for f, col in table.items()}
                acc = _Accumulator(source, _Rows(0, rows))
                lines = _read_range(acc, header, start, end, 1, lambda b: done.__setitem__(k, b))
                tests = np.concatenate(acc.tests) if acc.tests else np.empty(0, TEST_DTYPE)
                send.send((first_row, acc.events.n, lines, acc.symbols.names, tests, acc.routes,
                           acc.skipped_types, acc.skipped_fields))
            except BaseException:       # the one-pass reader will say what and where
                send.send(None)

        process = context.Process(target=child, daemon=True)
        process.start()
        children.append((process, receive))
    try:
        def advance(b):
            done[0] = b
            if progress is not None:
                progress(int(done.sum()))
        try:
            lines = _read_range(own, header, *ranges[0], 2, advance)
        except _NoRoom:         # lines shorter than ROOM_BYTES: read it in one pass
            return None
        results = []
        for process, receive in children:
            while not receive.poll(0.2):
                advance(int(done[0]))
                if not process.is_alive() and not receive.poll(0):
                    return None
            results.append(receive.recv())
            process.join()
    finally:
        for process, _ in children:
            if process.is_alive():
                process.kill()
    if any(r is None for r in results):
        return None
    line_no = 2 + lines
    for first_row, n_rows, n_lines, names, tests, routes, skipped_types, skipped_fields in results:
        renumber = np.append(own.symbols.intern(names, "", str), -1)     # index -1: absent stays -1
        at = own.events.n
        for f, column in own.events.take(n_rows).items():
            rows = table[f][first_row:first_row + n_rows]
            if f in STRING_FIELDS:
                column[:] = renumber[rows]
            elif first_row != at:
                column[:] = rows
        for f in ("name", "kind"):
            tests[f] = renumber[tests[f]]
        own.tests.append(tests)
        own.routes += routes
        own.skipped_types.update(skipped_types)
        own.skipped_fields.update(skipped_fields)
        line_no += n_lines
    if bounds[-1] < size:       # the last line has no newline: perhaps cut short by a crash
        try:
            _read(_file_blocks(source, None, bounds[-1]), own, header, line_no)
        except _NoRoom:
            return None
    return _finish(own, header)
