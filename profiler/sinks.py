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

import numpy as np
import orjson

from profiler.errors import UserError
from profiler.files import check_output_path, new_file_mode
from profiler._lanes import format_events
from profiler.recorder import Batch, Lane, event_dict
from profiler.schema import SCHEMA, WEIGHTS_COPY

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
    """A timings.jsonl file being written: after each graph `write_batches(rec.drain_batches())`
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
        lines = list(map(_json_line, events))
        self._append(lines, len(lines))

    def write_batches(self, batches: list[Batch]) -> None:
        """Append a drain's events (`Recorder.drain_batches()`) in time order, outer
        events first, and flush them: what the runner does after each graph.

        The lines are made natively (profiler/_lanes.c) from the cells the lanes
        recorded; an event holding a value they do not write (a test's fields, a
        float) is made as `write` makes it, through its dict."""
        self._append([format_events(batches, _fallback_line)], sum(map(len, batches)))

    def _append(self, lines: list[bytes], n_events: int) -> None:
        # Line by line into the file's buffer: joining a graph's lines first costs
        # several times more (one large allocation per graph).
        self._file.writelines(lines)
        self._file.flush()
        self._good += sum(map(len, lines))      # counted, not asked (tell() is a syscall a graph)
        self.n_events += n_events

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


def _fallback_line(kind: str, tid: str, values: tuple) -> bytes:
    return _json_line(event_dict(kind, tid, values))


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

    def copy(self, ts, dur, graph, split, src, dst, nbytes, name, kind):
        Lane.copy(self, ts, dur, graph, split, src, dst, nbytes, name, kind)
        what = "upload" if kind == WEIGHTS_COPY else "copy"
        self._print(f"{what}({name}) [{src}->{dst}/{self.tid}]: {_us(dur)} us")

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

    def route(self, ts, dur, graph, layer, n_tokens, experts):
        Lane.route(self, ts, dur, graph, layer, n_tokens, experts)
        self._print(f"route(blk.{layer}) [host/{self.tid}]: {n_tokens} tokens, experts "
                    f"{np.asarray(experts).tolist()}")

    def test(self, ts, dur, fields: dict):
        Lane.test(self, ts, dur, fields)
        self._print(f"test({fields.get('name')} rep {fields.get('rep')}) "
                    f"[host/{self.tid}]: {_us(dur)} us")
