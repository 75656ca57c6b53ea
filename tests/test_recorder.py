"""The recorder keeps every event exactly, in contract-v1 form, from any number of lanes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.recorder import Lane, Recorder, pool_op
from profiler.schema import EVENT_FIELDS
from profiler.sinks import PrintingLane


def record_one_of_each(lane) -> None:
    lane.graph(0, 1000, 7, "tg1", 1, 5)
    lane.phase(10, 20, 7, "graph_build")
    lane.split(40, 500, 7, 0, "ACC0", 12, 2)
    lane.copy(50, 30, 7, 0, "CPU", "ACC0", 4096, "attn_norm-0", None)
    lane.copy(60, 20, 7, 0, "CPU", "ACC0", 8192, "blk.1.ffn_up_exps", "weights")
    lane.op(90, 100, 7, 0, "ACC0", "MUL_MAT", "blk.0.attn_q", 0, 2048, 4096, 1)
    lane.wakeup(100, 15, 7, 0, "CPU")
    lane.sync(200, 300, 7, 0, "ACC0")
    lane.route(600, 0, 7, 1, 2, np.array([3, 5, 0, 5]))
    lane.test(0, 2000, {"name": "tg1", "kind": "tg", "n_prompt": 0, "n_gen": 1, "depth": 0,
                        "rep": 0, "n_tokens": 1})


def test_every_event_type_comes_back_with_its_contract_fields():
    rec = Recorder(enabled=True, print_timing=False)
    record_one_of_each(rec.lane("main"))
    events = rec.drain()
    assert sorted(set(e["type"] for e in events)) == sorted(EVENT_FIELDS)
    for ev in events:
        assert ev["tid"] == "main"
        assert set(EVENT_FIELDS[ev["type"]]) <= set(ev), ev
    op = next(e for e in events if e["type"] == "op")
    assert op == {"type": "op", "ts": 90, "dur": 100, "graph": 7, "split": 0, "backend": "ACC0",
                  "op": "MUL_MAT", "name": "blk.0.attn_q", "layer": 0, "bytes": 2048,
                  "flops": 4096, "n_tokens": 1, "tid": "main"}
    copy, upload = (e for e in events if e["type"] == "copy")
    assert (copy["src"], copy["dst"], copy["bytes"], copy["name"]) == ("CPU", "ACC0", 4096,
                                                                       "attn_norm-0")
    assert "kind" not in copy                   # activations: the default kind, left out
    assert (upload["bytes"], upload["name"], upload["kind"]) == (8192, "blk.1.ffn_up_exps", "weights")
    route = next(e for e in events if e["type"] == "route")
    assert (route["graph"], route["layer"], route["n_tokens"], route["experts"]) == (7, 1, 2, [3, 5, 0, 5])
    assert rec.drain() == []


def test_drain_is_in_time_order_with_outer_events_first():
    rec = Recorder(print_timing=False)
    main, worker = rec.lane("main"), rec.lane("cpu1")
    worker.op(50, 10, 0, 0, "CPU", "ADD", "x", 0, 0, 0, 1)
    main.split(50, 100, 0, 0, "CPU", 1, 0)
    main.graph(0, 200, 0, "pp1", 1, 0)
    events = rec.drain()
    assert [e["type"] for e in events] == ["graph", "split", "op"]
    assert [e["tid"] for e in events] == ["main", "main", "cpu1"]


def test_fields_that_do_not_apply_are_left_out_and_durations_clamped():
    rec = Recorder(print_timing=False)
    lane = rec.lane("main")
    lane.phase(5, -3, None, "sample")                 # outside a graph; clock went backwards
    lane.phase(np.int64(9), np.int64(4), 1, "set_inputs")
    first, second = rec.drain()
    assert "graph" not in first and first["dur"] == 0
    assert second["graph"] == 1 and type(second["ts"]) is int and type(second["dur"]) is int


def test_many_events_keep_their_order_and_the_lane_is_empty_after_a_drain():
    rec = Recorder(print_timing=False)
    lane = rec.lane("cpu1")
    n = 5000
    for i in range(n):
        lane.wakeup(i, 1, i // 100, 0, "CPU")
    events = rec.drain()
    assert [e["ts"] for e in events] == list(range(n))
    lane.wakeup(0, 1, 0, 0, "CPU")
    assert len(rec.drain()) == 1


def test_discard_forgets_and_next_graph_ids_are_unique_across_threads():
    rec = Recorder(print_timing=False)
    record_one_of_each(rec.lane("main"))
    rec.discard()
    assert rec.drain() == []

    ids: list[int] = []

    def take():
        ids.extend(rec.next_graph() for _ in range(1000))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(4000))


def test_lanes_of_concurrent_threads_lose_nothing():
    rec = Recorder(print_timing=False)
    n = 5000

    def work(w: int) -> None:
        lane = rec.lane(f"cpu{w}")
        for i in range(n):
            lane.op(rec.now(), i, 0, 1, "CPU", "MUL_MAT_ID", f"blk.{w}.ffn_up_exps", w, i, 0, 1)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = rec.drain()
    assert len(events) == 3 * n
    for w in range(1, 4):
        mine = [e for e in events if e["tid"] == f"cpu{w}"]
        assert sorted(e["dur"] for e in mine) == list(range(n))
        assert all(e["layer"] == w for e in mine)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


op_rows = st.lists(st.tuples(
    st.integers(0, 2**62), st.integers(0, 2**40), st.integers(0, 10**6), st.integers(0, 64),
    st.sampled_from(["CPU", "ACC0", "CUDA0"]), st.sampled_from(["MUL_MAT", "ADD", "ROPE"]),
    st.text(min_size=1, max_size=20), st.integers(-1, 100), st.integers(0, 2**40),
    st.integers(0, 2**50), st.integers(1, 4096)), max_size=3000)


@settings(max_examples=30, deadline=None)
@given(op_rows)
def test_op_events_round_trip_exactly(rows):
    rec = Recorder(print_timing=False)
    lane = rec.lane("cpu1")
    for row in rows:
        lane.op(*row)
    names = ("ts", "dur", "graph", "split", "backend", "op", "name", "layer", "bytes", "flops",
             "n_tokens")
    got = sorted(tuple(e[n] for n in names) for e in rec.drain())
    assert got == sorted(rows)


def test_print_timing_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("HYPROF_PRINT_TIMING", "1")
    rec = Recorder(enabled=False)
    assert rec.enabled and rec.print_timing
    lane = rec.lane("cpu1")
    assert isinstance(lane, PrintingLane)
    lane.op(0, 812_400, 3, 1, "CPU", "MUL_MAT", "blk.3.ffn_up_exps", 3, 1, 1, 1)
    assert capsys.readouterr().err == "MUL_MAT(blk.3.ffn_up_exps) [CPU/cpu1]: 812 us\n"
    assert len(rec.drain()) == 1

    monkeypatch.setenv("HYPROF_PRINT_TIMING", "0")
    rec = Recorder(enabled=False)
    assert not rec.enabled and type(rec.lane("main")) is Lane


def test_a_pool_op_is_an_event_per_thread_that_ran_chunks_with_its_share(monkeypatch, capsys):
    """The CPU backend's pool ops: each thread's share of bytes and flops is the chunks it
    ran over all chunks, rounded down; the caller's event starts with the op, a worker's at
    its first chunk; a thread that ran nothing has no event. With HYPROF_PRINT_TIMING the
    events are printed as they are made."""
    for printing in (False, True):
        monkeypatch.setenv("HYPROF_PRINT_TIMING", "1" if printing else "0")
        rec = Recorder()
        lanes = tuple(rec.lane(tid) for tid in ("main", "cpu1", "cpu2"))
        t0, flops = rec.t0, 2**61 + 12345      # a share computed without overflowing 64 bits
        times = np.array([[t0 + 100, t0 + 900, 2], [t0 + 150, t0 + 2_000_950, 5], [0, 0, 0]], np.int64)
        pool_op(lanes, times, t0, 90, 7, 1, "CPU", "MUL_MAT", "blk.0.attn_q", 0, 1000, flops, 1)
        common = {"type": "op", "graph": 7, "split": 1, "backend": "CPU", "op": "MUL_MAT",
                  "name": "blk.0.attn_q", "layer": 0, "n_tokens": 1}
        assert rec.drain() == [
            {**common, "ts": 90, "dur": 810, "bytes": 1000 * 2 // 7, "flops": flops * 2 // 7, "tid": "main"},
            {**common, "ts": 150, "dur": 2_000_800, "bytes": 1000 * 5 // 7, "flops": flops * 5 // 7,
             "tid": "cpu1"}]
        printed = capsys.readouterr().err
        assert printed == ("MUL_MAT(blk.0.attn_q) [CPU/main]: 1 us\n"
                           "MUL_MAT(blk.0.attn_q) [CPU/cpu1]: 2001 us\n" if printing else "")
        pool_op(lanes, np.zeros((3, 3), np.int64), t0, 90, 7, 1, "CPU", "ADD", "x", 0, 10, 10, 1)
        assert rec.drain() == []
    with pytest.raises(ValueError, match="times must be int64"):
        pool_op(lanes, np.zeros((2, 3), np.int64), t0, 0, 0, 0, "CPU", "ADD", "x", 0, 0, 0, 1)


def test_values_the_lines_do_not_hold_natively_come_back_as_they_were():
    """A float, a bool, a None where no field allows one, a str subclass: kept as objects,
    given back by drain() as recorded; ts and dur must be integers."""
    class Name(str):
        pass
    rec = Recorder(print_timing=False)
    lane = rec.lane("main")
    lane.op(1, 2, None, None, None, "ADD", Name("x"), None, 2.5, True, 1)
    (ev,) = rec.drain()
    assert ev == {"type": "op", "ts": 1, "dur": 2, "op": "ADD", "name": "x", "layer": None,
                  "bytes": 2.5, "flops": True, "n_tokens": 1, "tid": "main"}
    assert type(ev["name"]) is Name and ev["flops"] is True
    with pytest.raises(TypeError, match="ts must be integer ns"):
        lane.phase(1.5, 2, 0, "x")
    with pytest.raises(TypeError, match="takes 4 values"):
        lane.phase(1, 2, 0)
    assert rec.drain() == []
