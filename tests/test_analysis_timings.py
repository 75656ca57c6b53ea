"""Loading timings files: columns, symbols, skips, truncation, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

import analysis.timings as timings_module
from analysis.timings import STRING_FIELDS, load_lines, load_timings
from profiler.errors import UserError

HEADER = b'{"type": "meta", "schema": "hyprof-timings/1", "config": {"threads": 2}}'
OP = {"type": "op", "ts": 5, "dur": 7, "tid": "cpu1", "backend": "CPU", "graph": 0, "split": 1,
      "op": "MUL_MAT_ID", "name": "blk.2.ffn_up_exps", "layer": 2, "bytes": 1000, "flops": 9, "n_tokens": 1}


# The vectorised reader has two routes, compiled (analysis._jsonl) and NumPy; tests marked with
# `routes` run on each, the compiled one only where it is built.
try:
    from analysis import _jsonl as compiled_scanner
except ImportError:
    compiled_scanner = None
routes = pytest.mark.parametrize("compiled", [
    pytest.param(True, marks=pytest.mark.skipif(compiled_scanner is None, reason="analysis._jsonl is not built")),
    False], ids=["compiled", "numpy"])


def route(monkeypatch, compiled):
    """Take the given route; on the compiled one, the NumPy route would fail if taken."""
    import analysis.flatjson as flatjson
    if compiled:
        monkeypatch.setattr(flatjson, "_words", None)
    else:
        monkeypatch.setattr(flatjson, "_jsonl", None)


def write(tmp_path, lines, name="t.jsonl", end=b"\n"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else orjson.dumps(x) for x in lines) + end)
    return path


def decoded(t):
    """Events and tests with symbol ids replaced by their strings (ids depend on the reading order)."""
    def rows(table):
        def value(f, v):
            if f in STRING_FIELDS:
                return t.sym(int(v))
            return int(v) if table.dtype[f].kind == "i" else repr(float(v))    # repr: NaN equals NaN
        return [tuple(value(f, v) for f, v in zip(table.dtype.names, row)) for row in table]
    return rows(t.events), rows(t.tests), t.skipped_types, t.skipped_fields


def test_columns_symbols_and_time_order(tmp_path):
    t = load_timings(write(tmp_path, [HEADER, OP, {"type": "copy", "ts": 1, "dur": 2, "src": "CPU", "dst": "CUDA0",
                                                  "bytes": 64, "name": "inp"}]))
    assert t.header["config"] == {"threads": 2}
    ev = t.events
    assert list(ev["ts"]) == [1, 5]                      # sorted by start
    copy, o = ev
    assert t.sym(o["op"]) == "MUL_MAT_ID" and t.sym(o["name"]) == "blk.2.ffn_up_exps"
    assert (o["layer"], o["bytes"], o["flops"], o["graph"], o["split"]) == (2, 1000, 9, 0, 1)
    assert t.sym(copy["src"]) == "CPU" and t.sym(copy["dst"]) == "CUDA0"
    assert (copy["graph"], copy["layer"], copy["flops"]) == (-1, -1, 0)   # absent: -1, absent bytes/flops: 0
    assert t.id("CPU") == o["backend"] == copy["src"] and t.id("nope") == -1
    assert t.warnings == ()


def test_tests_table(tmp_path):
    t = load_timings(write(tmp_path, [HEADER, {"type": "test", "ts": 0, "dur": 9, "name": "tg64@pp512", "kind": "tg",
                                               "n_prompt": 0, "n_gen": 64, "depth": 512, "rep": 3, "n_tokens": 64}]))
    (row,) = t.tests
    assert t.sym(row["name"]) == "tg64@pp512" and t.sym(row["kind"]) == "tg"
    assert (row["n_gen"], row["depth"], row["rep"], row["n_tokens"], row["dur"]) == (64, 512, 3, 64, 9)


def test_unknown_types_and_fields_are_skipped_and_counted(tmp_path):
    t = load_timings(write(tmp_path, [HEADER, {**OP, "color": "red", "extra": [1, {"a": 2}]}, {**OP, "color": "x"},
                                      {"type": "power", "ts": 0, "dur": 1, "watts": 3}, {"type": "power", "ts": 1}]))
    assert len(t.events) == 2
    assert t.skipped_types == {"power": 2}
    assert t.skipped_fields == {"color": 2, "extra": 1}
    assert t.warnings == ()                 # allowed by the contract: counted, and noted once by the report


def test_truncated_last_line_is_ignored_with_a_warning(tmp_path):
    path = write(tmp_path, [HEADER, OP, b'{"type": "op", "ts": 9, "du'], end=b"")
    t = load_timings(path)
    assert len(t.events) == 1
    assert t.warnings == (f"{path}:3: truncated last line ignored",)


@pytest.mark.parametrize("lines, message", [
    ([HEADER, b"{not json", OP], r"t.jsonl:2: not JSON"),
    ([HEADER, b"[1, 2]"], r"t.jsonl:2: not a JSON object"),
    ([HEADER, {"ts": 1, "dur": 1}], r"t.jsonl:2: event has no 'type'"),
    ([HEADER, OP, {"type": "op", "dur": 1}], r"t.jsonl:3: event has no 'ts'"),
    ([HEADER, {**OP, "dur": -1}], r"t.jsonl:2: 'dur' is negative"),
    ([HEADER, OP, {**OP, "ts": "soon"}], r"t.jsonl:3: field 'ts' must be an integer, got 'soon'"),
    ([HEADER, {**OP, "bytes": 1.5}], r"t.jsonl:2: field 'bytes' must be an integer"),
    ([HEADER, {"type": "test", "ts": 0, "dur": 1, "tps": "fast"}], r"t.jsonl:2: field 'tps' must be a number"),
    ([HEADER, {**OP, "backend": 3}], r"t.jsonl:2: field 'backend' must be a string, got 3"),
    ([b'{"type": "meta", "schema": "hyprof-timings/2"}', OP], r"t.jsonl:1: schema 'hyprof-timings/2' is not"),
    ([OP], r"t.jsonl:1: not a hyprof timings file \(line 1 is not the"),
    ([b"model loaded in 3 s", b"bye"], r"t.jsonl: not a hyprof timings file \(line 1 is not a JSON object\)"),
])
def test_bad_input_is_one_clear_error_naming_file_and_line(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        load_timings(write(tmp_path, lines))


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_timings(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match="empty file"):
        load_timings(write(tmp_path, [], end=b"\n\n"))
    with pytest.raises(UserError, match="is a directory"):
        load_timings(tmp_path)


def test_load_lines_matches_load_timings_and_accepts_str_and_blank_lines(tmp_path):
    lines = [HEADER, OP, {**OP, "ts": 2, "tid": "cpu2"}, {"type": "sync", "ts": 3, "dur": 1, "backend": "CUDA0"}]
    from_file = load_timings(write(tmp_path, lines))
    from_lines = load_lines([x.decode() if isinstance(x, bytes) else orjson.dumps(x).decode() + "\n"
                             for x in lines[:2]] + ["", "  "] + [orjson.dumps(x) for x in lines[2:]], "mem")
    assert from_lines.source == "mem"
    assert decoded(from_file) == decoded(from_lines)


def test_many_chunks_keep_line_numbers(tmp_path, monkeypatch):
    import analysis.timings as timings
    monkeypatch.setattr(timings, "LINES_PER_CHUNK", 3)
    monkeypatch.setattr(timings, "BLOCK_BYTES", 50)
    lines = [HEADER] + [{**OP, "ts": i} for i in range(10)] + [b"oops"] + [OP]
    with pytest.raises(UserError, match=r"t.jsonl:12: not JSON"):
        load_timings(write(tmp_path, lines))
    t = load_timings(write(tmp_path, lines[:-2], name="ok.jsonl"))
    assert list(t.events["ts"]) == list(range(10))


def test_analysis_imports_without_torch_or_hybrid():
    code = textwrap.dedent("""
        import sys
        sys.modules['torch'] = None      # importing torch now fails
        sys.modules['hybrid'] = None
        import importlib, pkgutil, analysis
        for info in pkgutil.iter_modules(analysis.__path__):      # every module of analysis/
            importlib.import_module(f"analysis.{info.name}")
        from hyprof.cli import build_parser
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@routes
def test_writer_output_takes_the_vectorised_route(tmp_path, monkeypatch, compiled):
    monkeypatch.setattr(timings_module, "_parse_lines", None)      # the per-line JSON route would fail
    route(monkeypatch, compiled)
    t = load_timings(write(tmp_path, [HEADER] + [{**OP, "ts": i, "zz": 1.5} for i in range(50)]
                           + [{"type": "graph", "ts": 0, "dur": 9, "test": "tg1", "n_past": 3}]))
    assert len(t.events) == 51 and t.skipped_fields == {"zz": 50}
    assert t.sym(t.events["name"][-1]) == "blk.2.ffn_up_exps"


# Both routes must give the same columns: random events, written compact or spaced, with unknown
# types and fields, odd strings (commas, colons, braces, quotes, unicode), nulls and big numbers.
texts = st.sampled_from(["CPU", "cpu1", "blk.0.ffn_up_exps", "a,b", "k:v", "{x}", 'q"q', "é", "", "x" * 70,
                         "MUL_MAT_ID", "CUDA0"])
ints = st.one_of(st.integers(0, 10**12), st.integers(-5, 5))
unknown_values = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                           st.none(), texts)


@st.composite
def event_objects(draw):
    type_ = draw(st.sampled_from(["op", "copy", "graph", "test", "split", "sync", "wakeup", "phase", "gpu_power"]))
    ev = {"type": type_, "ts": draw(st.integers(0, 10**15)), "dur": draw(st.integers(0, 10**9))}
    for f in draw(st.lists(st.sampled_from(["graph", "split", "layer", "bytes", "flops", "n_tokens", "n_past",
                                            "n_nodes", "rep", "depth", "n_gen", "config"]), max_size=5)):
        ev[f] = draw(ints)
    for f in draw(st.lists(st.sampled_from(["tid", "backend", "op", "name", "src", "dst", "kind"]), max_size=4)):
        ev[f] = draw(texts)
    if draw(st.booleans()):
        ev[draw(st.sampled_from(["tps", "tps_std"]))] = draw(st.one_of(
            ints, st.floats(allow_nan=False, allow_infinity=False)))
    if draw(st.booleans()):     # unknown fields, and known ones that are not read (node, role)
        ev[draw(st.sampled_from(["zz", "a_long_field_name", "test", "node", "role"]))] = draw(unknown_values)
    return ev


@routes
@settings(max_examples=200, deadline=None)
@given(st.lists(event_objects(), max_size=12), st.booleans())
def test_vectorised_and_json_routes_agree(compiled, events, spaced):
    import json
    dump = (lambda e: json.dumps(e, ensure_ascii=False)) if spaced else (lambda e: orjson.dumps(e).decode())
    lines = [HEADER.decode()] + [dump(e) for e in events] + ['{"type": "sync", "ts": 0, "dur": 0}']
    with pytest.MonkeyPatch.context() as monkeypatch:
        import analysis.flatjson as flatjson
        if not compiled:
            monkeypatch.setattr(flatjson, "_jsonl", None)
        fast = load_lines(lines, "x")
    slow = load_lines(lines[:1] + [""] + lines[1:], "x")               # a blank line: the JSON route
    assert decoded(fast) == decoded(slow)


@pytest.mark.parametrize("text", [
    b'{"type":"op","ts":1,"dur":2,"name":"a\\"b"}\n',        # an escape
    b'{"type":"op","ts":1,"dur":2,"x":{"a":1}}\n',           # nesting
    b'{"type":"op","ts":1,"dur":2,"x":[1]}\n',               # an array
    b'{"type":"op","ts":1.5,"dur":2}\n',                     # a fraction in a wanted integer
    b'{"type":"op","ts":null,"dur":2}\n',                    # null in a wanted field
    b'{"type":"op","ts":"1","dur":2}\n',                     # a string where an integer belongs
    b'{"type":"op","ts":1234567890123456789,"dur":2}\n',     # more digits than the fast routes read
    b'{"type":"op","ts":true,"dur":2}\n',                    # a boolean in a wanted integer
    b'{"type":5,"ts":1,"dur":2}\n',                          # a number where a string belongs
    b'{"type":"op","ts":1,"dur":2,}\n',                      # a trailing comma
    b'{"type":"op","ts":1 "dur":2}\n',                       # a missing comma
    b'{"type":"op","ts":,"dur":2}\n',                        # a missing value
    b'{"type":"op","ts":1}{"dur":2}\n',                      # two objects on a line
])
@routes
def test_vectorised_reader_declines_what_it_does_not_read(text, compiled, monkeypatch):
    from analysis.flatjson import FlatReader
    from analysis.timings import INT_FIELDS, STR_FIELDS
    reader = FlatReader(INT_FIELDS, STR_FIELDS)
    if not compiled:
        route(monkeypatch, compiled)
    assert (reader._parse_compiled if compiled else reader.parse)(text, text.count(b"\n")) is None


@routes
def test_vectorised_reader_reads_spaced_json_and_negative_numbers(compiled, monkeypatch):
    from analysis.flatjson import FlatReader
    route(monkeypatch, compiled)
    reader = FlatReader(("ts", "dur", "layer"), ("type", "name"))
    text = b'{"type": "op", "ts": 12345678901, "dur": 0, "layer": -1, "name": "blk 3, x"}\r\n{"ts":7,"dur":9,"type":"sync"}\n'
    flat = reader.parse(text, 2)
    assert list(flat.ints["ts"][0]) == [12345678901, 7] and list(flat.ints["layer"][0]) == [-1, 0]
    assert list(flat.ints["layer"][1]) == [True, False]
    assert [reader.strings[i] if i >= 0 else None for i in flat.strs["name"]] == [b"blk 3, x", None]


@pytest.fixture
def parallel(monkeypatch):
    """Every file read on three processes, in blocks of about three lines."""
    monkeypatch.setattr(timings_module, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(timings_module, "BLOCK_BYTES", 400)
    monkeypatch.setattr(timings_module, "_cores", lambda: 3)


def parallel_and_serial(path, monkeypatch):
    fast = load_timings(path)
    monkeypatch.setattr(timings_module, "PARALLEL_MIN_BYTES", 1 << 60)
    return fast, load_timings(path)


@settings(max_examples=25, deadline=None)
@given(st.lists(event_objects(), min_size=1, max_size=40), st.booleans())
def test_parallel_reading_gives_the_same_columns(tmp_path_factory, events, truncated):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(timings_module, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(timings_module, "BLOCK_BYTES", 256)
        monkeypatch.setattr(timings_module, "_cores", lambda: 3)
        lines = [HEADER] + [orjson.dumps(e) for e in events]
        path = write(tmp_path_factory.mktemp("p"), lines + ([b'{"type": "op", "ts'] if truncated else []),
                     end=b"" if truncated else b"\n")
        fast, slow = parallel_and_serial(path, monkeypatch)
    assert decoded(fast) == decoded(slow) and fast.warnings == slow.warnings
    assert [fast.sym(int(i)) for i in fast.tests["name"]] == [slow.sym(int(i)) for i in slow.tests["name"]]


def test_parallel_reading_errors_name_the_right_line(tmp_path, parallel):
    path = write(tmp_path, [HEADER] + [OP] * 30 + [{**OP, "ts": "soon"}] + [OP] * 5)
    with pytest.raises(UserError, match=r"t.jsonl:32: field 'ts' must be an integer, got 'soon'"):
        load_timings(path)
    path = write(tmp_path, [HEADER] + [OP] * 30 + [b'{"type": "op", "ts": 9, "du'], name="cut.jsonl", end=b"")
    t = load_timings(path)
    assert len(t.events) == 30 and t.warnings == (f"{path}:32: truncated last line ignored",)


def test_parallel_reading_joins_ranges_with_fewer_events_than_lines(tmp_path, parallel, monkeypatch):
    """Blank lines and unknown types leave a range fewer events than lines: the next range's rows move down."""
    lines = [HEADER]
    for i in range(60):
        lines.append({**OP, "ts": i, "name": f"blk.{i % 7}.x"} if i % 5 else {"type": "gpu_power", "ts": i, "dur": 1})
        lines += [b""] if i % 9 == 0 else []
    path = write(tmp_path, lines)
    taken = []
    real = timings_module._load_parallel
    monkeypatch.setattr(timings_module, "_load_parallel", lambda *a: taken.append(real(*a)) or taken[-1])
    fast, slow = parallel_and_serial(path, monkeypatch)
    assert taken[0] is not None                    # the ranges were read on three processes and joined
    assert decoded(fast) == decoded(slow) and fast.skipped_types == {"gpu_power": 12}


@pytest.mark.skipif(compiled_scanner is None, reason="analysis._jsonl is not built")
@settings(max_examples=100, deadline=None)
@given(st.lists(event_objects(), min_size=1, max_size=12), st.booleans())
def test_compiled_and_numpy_routes_give_the_same_columns(events, spaced):
    """Where both routes read a block, they read the same values (strings compared as bytes)."""
    import json

    import analysis.flatjson as flatjson
    from analysis.timings import _INT_FILL, FLOAT_FIELDS, INT_FIELDS, STR_FIELDS
    dump = (lambda e: json.dumps(e, ensure_ascii=False)) if spaced else (lambda e: orjson.dumps(e).decode())
    text = "".join(dump(e) + "\n" for e in events).encode()
    compiled = flatjson.FlatReader(INT_FIELDS, STR_FIELDS, FLOAT_FIELDS, _INT_FILL)
    fast = compiled._parse_compiled(text, len(events))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(flatjson, "_jsonl", None)
        numpy_reader = flatjson.FlatReader(INT_FIELDS, STR_FIELDS, FLOAT_FIELDS, _INT_FILL)
        slow = numpy_reader.parse(text, len(events))
    if slow is None:    # the NumPy route declines more (escapes, long strings); the JSON route checks those
        return
    assert fast is not None
    for f in INT_FIELDS:
        assert all((a == b).all() for a, b in zip(fast.ints[f], slow.ints[f])), f
    for f in STR_FIELDS:
        def strings(flat, reader):
            return [reader.strings[i] if i >= 0 else None for i in flat.strs[f]]
        assert strings(fast, compiled) == strings(slow, numpy_reader), f
    for f in FLOAT_FIELDS:
        assert repr(fast.floats[f][0].tolist()) == repr(slow.floats[f][0].tolist()) and \
            (fast.floats[f][1] == slow.floats[f][1]).all(), f
    assert (fast.key_mask == slow.key_mask).all()
    names = [(int(line), fast.other_keys[2][j]) for line, j in zip(*fast.other_keys[:2])]
    assert names == [(int(line), slow.other_keys[2][j]) for line, j in zip(*slow.other_keys[:2])]
