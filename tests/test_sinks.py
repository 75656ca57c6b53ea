"""The timings writer leaves only valid files; the printer speaks IK_PRINT_TIMING."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.errors import UserError
from profiler.recorder import Recorder
from profiler.schema import SCHEMA
from profiler.sinks import TimingsWriter, timings_header

HEADER = timings_header(model={"path": "m.gguf"}, config={"threads": 2}, machine={"cpu": "x"},
                        peak_bw={"CPU": {"GBps": 30.0, "method": "given"}}, placement={})


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_header_then_one_event_per_line_under_the_final_name_only_at_the_end(tmp_path):
    out = tmp_path / "t.jsonl"
    with TimingsWriter(out, HEADER) as w:
        w.write([{"type": "graph", "ts": 1, "dur": 2, "graph": 0}])
        w.write([{"type": "op", "ts": 1, "dur": 1, "bytes": np.int64(7), "layer": np.int32(3)}])
        assert not out.exists() and len(leftovers(tmp_path)) == 1
        # Each batch reached the OS: a crash now leaves a readable prefix.
        tmp = tmp_path / leftovers(tmp_path)[0]
        assert [e["type"] for e in lines(tmp)] == ["meta", "graph", "op"]
    got = lines(out)
    assert got[0]["type"] == "meta" and got[0]["schema"] == SCHEMA
    assert got[0]["tool"].startswith("hyprof ") and got[0]["created"].endswith("Z")
    assert got[2] == {"type": "op", "ts": 1, "dur": 1, "bytes": 7, "layer": 3}
    assert w.n_events == 2 and leftovers(tmp_path) == []


def test_an_existing_file_needs_force(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(UserError, match="exists.*--force"):
        TimingsWriter(out, HEADER)
    assert out.read_text() == "keep me\n"
    with TimingsWriter(out, HEADER, force=True):
        pass
    assert lines(out)[0]["type"] == "meta"


@pytest.mark.parametrize("where", ["file/t.jsonl", "/proc/no/such/t.jsonl"])
def test_unwritable_places_are_one_line_errors(tmp_path, where):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="t.jsonl"):
        TimingsWriter(tmp_path / where, HEADER)


def test_ctrl_c_keeps_whole_batches_and_drops_a_batch_cut_short(tmp_path):
    out = tmp_path / "t.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with TimingsWriter(out, HEADER) as w:
            w.write([{"type": "graph", "ts": 0, "dur": 5, "graph": 0}])
            w._file.write(b'{"type":"op","ts":1,')        # interrupted inside a write
            raise KeyboardInterrupt
    assert [e["type"] for e in lines(out)] == ["meta", "graph"]
    assert leftovers(tmp_path) == []


def test_an_error_leaves_nothing(tmp_path):
    out = tmp_path / "t.jsonl"
    with pytest.raises(ZeroDivisionError):
        with TimingsWriter(out, HEADER) as w:
            w.write([{"type": "graph", "ts": 0, "dur": 5, "graph": 0}])
            1 / 0
    assert not out.exists() and leftovers(tmp_path) == []


def test_print_timing_lines(capsys):
    rec = Recorder(print_timing=True)
    main, worker, acc = rec.lane("main"), rec.lane("cpu1"), rec.lane("ACC0")
    main.phase(0, 35_000, 4, "graph_build")
    main.copy(0, 12_000, 4, 0, "CPU", "ACC0", 64, "inp_embd", None)
    main.split(0, 41_000, 4, 1, "CPU", 8, 1)
    worker.wakeup(0, 1_499, 4, 1, "CPU")
    worker.op(0, 812_000, 4, 1, "CPU", "MUL_MAT_ID", "blk.3.ffn_up_exps", 3, 1, 1, 1)
    acc.op(0, 9_000, 4, 0, "ACC0", "ROPE", "q_rope-3", 3, 0, 1, 1)
    main.sync(0, 500, 4, 0, "ACC0")
    main.route(0, 0, 4, 3, 1, np.array([7, 2]))
    main.graph(0, 2_000_000, 4, "tg128", 1, 17)
    assert capsys.readouterr().err.splitlines() == [
        "graph_build(...) [host/main]: 35 us",
        "copy(inp_embd) [CPU->ACC0/main]: 12 us",
        "split(.1.) [CPU/main]: 41 us",
        "wakeup(.1.) [CPU/cpu1]: 1 us",
        "MUL_MAT_ID(blk.3.ffn_up_exps) [CPU/cpu1]: 812 us",
        "ROPE(q_rope-3) [ACC0/ACC0]: 9 us",
        "sync(.0.) [ACC0/main]: 1 us",
        "route(blk.3) [host/main]: 1 tokens, experts [7, 2]",
        "graph(tg128 #4, 1 tokens @ 17) [host/main]: 2000 us",
    ]
    assert len(rec.drain()) == 9


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_umask_decides_the_mode_not_mkstemp(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with TimingsWriter(tmp_path / "t.jsonl", HEADER):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "t.jsonl").stat().st_mode & 0o777 == mode


names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ints = st.integers(-2**40, 2**62)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("op"), ints, ints, st.none() | ints, st.none() | ints,
              st.none() | st.sampled_from(["CPU", "ACC0"]), names, names, ints, ints, ints, ints),
    st.tuples(st.just("copy"), ints, ints, ints, ints, names, names, ints, names, st.none() | st.just("weights")),
    st.tuples(st.just("phase"), ints, ints, st.none() | ints, names),
    st.tuples(st.just("graph"), ints, ints, ints, names, ints, ints),
    st.tuples(st.just("wakeup"), ints, ints, ints, ints, st.just("CPU")),
    st.tuples(st.just("test"), ints, ints, st.fixed_dictionaries({"name": names, "rep": ints})),
    st.tuples(st.just("route"), ints, ints, ints, ints, ints,
              st.lists(st.integers(0, 255), min_size=1, max_size=8).map(np.array)),
), max_size=60), st.sampled_from(["main", "cpu1", 'odd"%lane']), st.booleans())
def test_the_native_lines_are_the_events_drain_gives(tmp_path_factory, events, tid, odd_value):
    """The writer's native formatter writes exactly drain()'s dicts, in drain()'s order;
    an event with values it does not write (a float, a bool, None where a field takes an
    integer) is written through its dict, in its place."""
    rec = Recorder(print_timing=False)
    lane = rec.lane(tid)
    for _ in range(2):
        for kind, *args in events:
            getattr(lane, kind)(*args)
        if odd_value:
            lane.op(5, 1, 0, 0, "CPU", "ADD", "x", None, 2.5, True, 1)
        if _ == 0:
            path = tmp_path_factory.mktemp("w") / "t.jsonl"
            with TimingsWriter(path, HEADER) as w:
                w.write_batches(rec.drain_batches())
    want = rec.drain()
    got = lines(path)[1:]
    assert got == want
    assert all(list(e) == list(w) for e, w in zip(got, want))      # same key order
    assert w.n_events == len(want)


def test_write_batches_is_in_time_order_outer_first(tmp_path):
    rec = Recorder(print_timing=False)
    main, worker = rec.lane("main"), rec.lane("cpu1")
    worker.op(50, 10, 0, 0, "CPU", "ADD", "x", 0, 0, 0, 1)
    main.split(50, 100, 0, 0, "CPU", 1, 0)
    main.graph(0, 200, 0, "tg1", 1, 0)
    main.phase(0, 20, 0, "graph_build")
    with TimingsWriter(tmp_path / "t.jsonl", HEADER) as w:
        w.write_batches(rec.drain_batches())
    assert [e["type"] for e in lines(tmp_path / "t.jsonl")] == ["meta", "graph", "phase",
                                                                "split", "op"]
    assert w.n_events == 4
