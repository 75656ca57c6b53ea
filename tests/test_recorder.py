"""The recorder keeps every event exactly, in contract-v1 form, from any number of lanes."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.recorder import Lane, Recorder
from profiler.schema import EVENT_FIELDS
from profiler.sinks import PrintingLane


def record_one_of_each(lane) -> None:
    lane.graph(0, 1000, 7, "tg1", 1, 5)
    lane.phase(10, 20, 7, "graph_build")
    lane.split(40, 500, 7, 0, "ACC0", 12, 2)
    lane.copy(50, 30, 7, 0, "CPU", "ACC0", 4096, "attn_norm-0")
    lane.op(90, 100, 7, 0, "ACC0", "MUL_MAT", "blk.0.attn_q", 0, 2048, 4096, 1)
    lane.wakeup(100, 15, 7, 0, "CPU")
    lane.sync(200, 300, 7, 0, "ACC0")
    lane.test(0, 2000, {"name": "tg1", "kind": "tg", "n_prompt": 0, "n_gen": 1, "depth": 0,
                        "rep": 0, "n_tokens": 1})


def test_every_event_type_comes_back_with_its_contract_fields():
    rec = Recorder(enabled=True, print_timing=False)
    record_one_of_each(rec.lane("main"))
    events = rec.drain()
    assert sorted(e["type"] for e in events) == sorted(EVENT_FIELDS)
    for ev in events:
        assert ev["tid"] == "main"
        assert set(EVENT_FIELDS[ev["type"]]) <= set(ev), ev
    op = next(e for e in events if e["type"] == "op")
    assert op == {"type": "op", "ts": 90, "dur": 100, "graph": 7, "split": 0, "backend": "ACC0",
                  "op": "MUL_MAT", "name": "blk.0.attn_q", "layer": 0, "bytes": 2048,
                  "flops": 4096, "n_tokens": 1, "tid": "main"}
    copy = next(e for e in events if e["type"] == "copy")
    assert (copy["src"], copy["dst"], copy["bytes"], copy["name"]) == ("CPU", "ACC0", 4096,
                                                                       "attn_norm-0")
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


def test_drain_hooks_record_before_each_drain_and_discard_until_removed():
    """A producer's buffered measurements become events at the drain (the CPU backend's
    per-op thread shares); a removed hook is not called again."""
    rec = Recorder(print_timing=False)
    lane = rec.lane("main")
    buffered = []

    def hook():
        for ts in buffered:
            lane.phase(ts, 1, 0, "late")
        buffered.clear()

    rec.on_drain(hook)
    buffered += [3, 1]
    assert [e["ts"] for e in rec.drain()] == [1, 3]
    buffered.append(5)
    rec.discard()
    assert rec.drain() == [] and buffered == []
    rec.on_drain(hook, remove=True)
    buffered.append(7)
    assert rec.drain() == [] and buffered == [7]
