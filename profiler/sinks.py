"""Where recorded events go: the timings.jsonl writer and the HYPROF_PRINT_TIMING printer.

The writer keeps the file a valid contract-v1 prefix at every flush: the header
line first, then whole graphs only (the runner writes after each graph), each
batch flushed. It writes under a temporary name and renames at the end, so the
final name only ever holds a finished file — or, after Ctrl-C, every graph that
completed. A hard crash leaves the temporary file, a readable prefix.

The printer is ik_llama.cpp's IK_PRINT_TIMING as an environment variable: each
event is one stderr line as it completes, `OP(name) [backend/lane]: N us`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import orjson

from profiler.errors import UserError
from profiler.files import check_output_path, new_file_mode
from profiler.recorder import EventTable, Lane
from profiler.schema import SCHEMA

_json_line = functools.partial(orjson.dumps,
                               option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)


def timings_header(*, model: dict, config: dict, machine: dict, peak_bw: dict,
                   placement: dict, **extra) -> dict:
    """Line 1 of a timings file (DESIGN.md, "The timings file"); `extra` adds keys after."""
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "meta", "schema": SCHEMA, "tool": f"hyprof {version('hyprof')}",
            "created": created, "model": model, "config": config, "machine": machine,
            "peak_bw": peak_bw, "placement": placement, **extra}


def check_timings_path(path: str | os.PathLike, force: bool, flag: str = "-o") -> Path:
    """Refuse a timings path that cannot be written, before any work is done."""
    if Path(path).is_dir():
        raise UserError(f"{flag} {path}: is a directory, not a file")
    return check_output_path(path, force, flag)


class TimingsWriter:
    """A timings.jsonl file being written: after each graph `write_tables(rec.drain_tables())`
    (or `write(rec.drain())`, the same lines made through dicts), then `commit()`.

    As a context manager (or through `finish(exc)`): commits on success and on
    KeyboardInterrupt (the file keeps every batch written before the interrupt),
    removes the temporary file on any other error.
    """

    def __init__(self, path: str | os.PathLike, header: dict, force: bool = False,
                 flag: str = "-o"):
        self.path = check_timings_path(path, force, flag)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                             dir=self.path.parent)
        except OSError as e:
            raise UserError(f"{flag} {self.path}: cannot write there ({e.strerror})") from None
        os.chmod(self._tmp, new_file_mode())
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._good = 0          # file offset after the last complete batch
        self.n_events = 0
        self.write([header])
        self.n_events = 0

    def write(self, events: Sequence[dict]) -> None:
        """Append events, one JSON object per line, and flush them to the OS."""
        self._append(list(map(_json_line, events)))

    def write_tables(self, tables: Sequence[EventTable]) -> None:
        """Append a drain's events (`Recorder.drain_tables()`) in time order, outer
        events first, and flush them: what the runner does after each graph."""
        lines, ts, durs = [], [], []
        for table in tables:
            lines += table_lines(table)
            ts += table.columns[0]
            durs += table.columns[1]
        order = sorted(range(len(lines)), key=durs.__getitem__, reverse=True)
        order.sort(key=ts.__getitem__)
        self._append([lines[i] for i in order])

    def _append(self, lines: list[bytes]) -> None:
        # Line by line into the file's buffer: joining a graph's lines first costs
        # several times more (one large allocation per graph).
        self._file.writelines(lines)
        self._file.flush()
        self._good = self._file.tell()
        self.n_events += len(lines)

    def commit(self) -> Path:
        """Close and move the file to its final name, dropping a batch cut short."""
        self._file.truncate(self._good)
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> "TimingsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exc)

    def finish(self, exc: BaseException | None = None) -> None:
        """Commit after success or Ctrl-C, abort after any other error; once."""
        if self._file.closed:
            return
        if exc is None or isinstance(exc, KeyboardInterrupt):
            self.commit()
        else:
            self.abort()


# Fields written as JSON strings; every other field of a table is an integer.
_STRING_FIELDS = frozenset({"backend", "op", "name", "src", "dst", "test"})


class _JsonStrings(dict):
    """The JSON text of each string met (op and tensor names recur every graph)."""

    def __missing__(self, value) -> bytes:
        text = orjson.dumps(value)
        if type(value) is str:          # not 1 or True: they would answer for each other
            if len(self) > 100_000:
                self.clear()
            self[value] = text
        return text


_json_strings = _JsonStrings()
_templates: dict[tuple, bytes] = {}


def table_lines(table: EventTable) -> list[bytes]:
    """One JSON line per event of the table, as `_json_line` writes its dicts, except
    that every field not in _STRING_FIELDS is written as an integer (they all count
    something: ns, bytes, flops, tokens, ids).

    Formatted from the columns with one `%`-template per kind of table, so that no
    dict is made per event; a table that this cannot write (a test, a field None in
    some rows, a value of an unexpected type) goes through its dicts.
    """
    if table.kind == "test" or table.partly_none:
        return list(map(_json_line, table.to_dicts()))
    key = (table.kind, table.tid, table.names)
    template = _templates.get(key)
    if template is None:
        template = _templates[key] = _template(*key)
    cols = [list(map(_json_strings.__getitem__, col)) if name in _STRING_FIELDS else col
            for name, col in zip(table.names, table.columns)]
    try:
        return [template % row for row in zip(*cols)]
    except (TypeError, ValueError):
        return list(map(_json_line, table.to_dicts()))


def _template(kind: str, tid: str, names: tuple[str, ...]) -> bytes:
    def constant(value) -> bytes:
        return orjson.dumps(value).replace(b"%", b"%%")

    fields = [b'"type":' + constant(kind)]
    fields += [constant(n) + (b":%b" if n in _STRING_FIELDS else b":%d") for n in names]
    fields += [b'"tid":' + constant(tid)]
    return b"{" + b",".join(fields) + b"}\n"


def _us(dur: int) -> int:
    return (dur + 500) // 1000


class PrintingLane(Lane):
    """A lane that also prints each event on stderr as it is recorded
    (`Recorder` uses it when HYPROF_PRINT_TIMING=1)."""

    __slots__ = ()

    @staticmethod
    def _print(line: str) -> None:
        sys.stderr.write(line + "\n")

    def op(self, ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens):
        Lane.op(self, ts, dur, graph, split, backend, op, name, layer, nbytes, flops, n_tokens)
        self._print(f"{op}({name}) [{backend}/{self.tid}]: {_us(dur)} us")

    def copy(self, ts, dur, graph, split, src, dst, nbytes, name):
        Lane.copy(self, ts, dur, graph, split, src, dst, nbytes, name)
        self._print(f"copy({name}) [{src}->{dst}/{self.tid}]: {_us(dur)} us")

    def split(self, ts, dur, graph, split, backend, n_nodes, n_inputs):
        Lane.split(self, ts, dur, graph, split, backend, n_nodes, n_inputs)
        self._print(f"split(.{split}.) [{backend}/{self.tid}]: {_us(dur)} us")

    def wakeup(self, ts, dur, graph, split, backend):
        Lane.wakeup(self, ts, dur, graph, split, backend)
        self._print(f"wakeup(.{split}.) [{backend}/{self.tid}]: {_us(dur)} us")

    def sync(self, ts, dur, graph, split, backend):
        Lane.sync(self, ts, dur, graph, split, backend)
        self._print(f"sync(.{split}.) [{backend}/{self.tid}]: {_us(dur)} us")

    def phase(self, ts, dur, graph, name):
        Lane.phase(self, ts, dur, graph, name)
        self._print(f"{name}(...) [host/{self.tid}]: {_us(dur)} us")

    def graph(self, ts, dur, graph, test, n_tokens, n_past):
        Lane.graph(self, ts, dur, graph, test, n_tokens, n_past)
        self._print(f"graph({test} #{graph}, {n_tokens} tokens @ {n_past}) "
                    f"[host/{self.tid}]: {_us(dur)} us")

    def test(self, ts, dur, fields: dict):
        Lane.test(self, ts, dur, fields)
        self._print(f"test({fields.get('name')} rep {fields.get('rep')}) "
                    f"[host/{self.tid}]: {_us(dur)} us")
