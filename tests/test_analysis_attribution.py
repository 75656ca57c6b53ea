"""Attribution on hand-built event streams with known answers, and against a per-nanosecond reference."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.attribution import attribute
from analysis.timings import load_lines
from profiler.errors import UserError
from profiler.schema import CATEGORIES

HEADER = {"type": "meta", "schema": "hyprof-timings/1"}


def timings(events, header=HEADER):
    return load_lines([orjson.dumps(e) for e in [header, *events]], "test.jsonl")


def op(ts, dur, lane, name="blk.0.ffn_up_exps", backend=None, graph=0, split=0, nbytes=0, op_name="MUL_MAT_ID"):
    backend = backend or ("CPU" if lane.startswith("cpu") or lane == "main" else lane)
    return {"type": "op", "ts": ts, "dur": dur, "tid": lane, "backend": backend, "graph": graph, "split": split,
            "op": op_name, "name": name, "layer": 0, "bytes": nbytes}


def ev(type_, ts, dur, **fields):
    return {"type": type_, "ts": ts, "dur": dur, **fields}


def cats(row) -> dict:
    return {c: int(row[f"{c}_ns"]) for c in CATEGORIES if row[f"{c}_ns"]}


def test_overlapping_cpu_and_gpu_work_higher_row_wins_and_overlap_is_reported():
    a = attribute(timings([
        ev("graph", 0, 100, graph=0, n_tokens=1),
        op(10, 40, "CUDA0", name="blk.0.ffn_up_shexp", op_name="MUL_MAT"),   # GPU 10..50
        op(30, 50, "cpu1"),                                                  # CPU experts 30..80
        ev("sync", 50, 40, tid="main", backend="CUDA0", graph=0, split=0),    # 50..90, 80..90 not covered
    ]))
    g = a.graphs[0]
    assert cats(g) == {"cpu_expert_matmul": 50, "gpu_compute": 20, "sync": 10, "other": 20}
    assert g["gpu_compute_busy_ns"] == 40
    cpu, gpu, sync = (CATEGORIES.index(c) for c in ("cpu_expert_matmul", "gpu_compute", "sync"))
    assert a.hidden_ns[0, gpu, cpu] == 20       # the shared expert ran under the CPU experts
    assert a.hidden_ns[0, sync, cpu] == 30
    assert a.hidden_ns[0].sum() == 50


def test_several_cpu_lanes_count_once_and_expert_beats_other_ops():
    a = attribute(timings([
        ev("graph", 0, 100, graph=0),
        op(0, 40, "main", name="blk.0.attn_q", op_name="MUL_MAT"),       # cpu_other 0..40
        op(20, 30, "cpu1"), op(25, 45, "cpu2"), op(60, 5, "cpu3"),         # experts 20..70
        ev("wakeup", 70, 20, tid="cpu1", backend="CPU", graph=0, split=0),
    ]))
    assert cats(a.graphs[0]) == {"cpu_expert_matmul": 50, "cpu_other": 20, "thread_wakeup": 20, "other": 10}
    assert a.graphs[0]["cpu_other_busy_ns"] == 40


def test_nested_splits_sched_fills_the_split_and_join_is_thread_wakeup():
    a = attribute(timings([
        ev("graph", 0, 200, graph=0),
        ev("phase", 0, 10, tid="main", graph=0, name="graph_build"),
        ev("phase", 10, 5, tid="main", graph=0, name="set_inputs"),
        ev("split", 20, 100, tid="main", graph=0, split=0, backend="CPU"),      # CPU split 20..120
        ev("split", 40, 20, tid="main", graph=0, split=1, backend="ACC0"),      # inside it: 40..60
        ev("copy", 40, 5, tid="main", graph=0, split=1, src="CPU", dst="ACC0", bytes=64),
        op(45, 10, "ACC0", name="blk.0.attn_q", op_name="MUL_MAT", split=1),
        ev("wakeup", 60, 10, tid="cpu1", backend="CPU", graph=0, split=0),
        op(70, 30, "cpu1", split=0),                                            # last op ends at 100
        ev("phase", 150, 30, tid="main", graph=0, name="sample"),
    ]))
    assert cats(a.graphs[0]) == {"graph_build": 15, "sched": 20 + 5, "copy": 5, "gpu_compute": 10,
                                 "thread_wakeup": 10 + 20, "cpu_expert_matmul": 30, "other": 85}
    assert int(a.copy_ns["h2d"][0]) == 5


def test_time_between_graphs_of_a_test_is_other_and_reps_sum_to_their_wall():
    a = attribute(timings([
        ev("test", 0, 1000, name="tg2", kind="tg", n_tokens=2, rep=0),
        ev("graph", 100, 200, graph=0, n_tokens=1), op(100, 200, "cpu1"),
        ev("graph", 500, 100, graph=1, n_tokens=1), op(500, 50, "CUDA0", name="x"),
        ev("test", 2000, 500, name="tg2", kind="tg", n_tokens=2, rep=1),
        ev("graph", 2000, 500, graph=2, n_tokens=1), ev("graph", 3000, 9, graph=3),   # graph 3: outside all tests
    ]))
    r0, r1 = a.reps
    assert cats(r0) == {"cpu_expert_matmul": 200, "gpu_compute": 50, "other": 750}
    assert cats(r1) == {"other": 500}
    assert list(a.graphs["rep"]) == [0, 0, 1, -1]
    assert r0["n_graphs"] == 2 and r0["wall_ns"] == 1000


def test_missing_and_unknown_events():
    # no test events: one implicit repetition over the graphs; tokens from the graphs;
    # an unknown event type and fields are skipped; an op outside every graph counts nowhere
    t = timings([
        ev("graph", 0, 50, graph=0, n_tokens=3), ev("gpu_counter", 0, 50, value=1),
        {**op(0, 10, "cpu1"), "new_field": 1},
        ev("graph", 100, 50, graph=1, n_tokens=4),
        op(60, 10, "cpu1"),
    ])
    assert t.skipped_types == {"gpu_counter": 1} and t.skipped_fields == {"new_field": 1}
    a = attribute(t)
    (rep,) = a.reps
    assert (rep["name"], rep["n_tokens"], rep["ts_ns"], rep["wall_ns"]) == ("run", 7, 0, 150)
    assert cats(rep) == {"cpu_expert_matmul": 10, "other": 140}
    assert attribute(timings([])).reps.size == 0


def test_overlapping_graphs_are_an_error():
    with pytest.raises(UserError, match="graph events 0 and 1 overlap"):
        attribute(timings([ev("graph", 0, 50, graph=0), ev("graph", 40, 50, graph=1)]))


# ---------------------------------------------------------------- property: a per-nanosecond reference

def reference(events):
    """Each nanosecond of each graph, the category by DESIGN.md's table, checked event by event."""
    def claim(e):
        if e["type"] == "op":
            cpu = e["backend"] == "CPU"
            return 0 if cpu and "_exps" in e["name"] else 1 if cpu else 2
        return {"wakeup": 3, "copy": 4, "sync": 5, "split": 6}.get(e["type"],
                7 if e["type"] == "phase" and e["name"] in ("graph_build", "set_inputs") else None)

    claims = [(e["ts"], e["ts"] + e["dur"], claim(e)) for e in events if claim(e) is not None]
    for s in (e for e in events if e["type"] == "split" and e["backend"] == "CPU"):
        ends = [o["ts"] + o["dur"] for o in events if o["type"] == "op" and o["backend"] == "CPU"
                and (o["graph"], o["split"]) == (s["graph"], s["split"])]
        if ends:
            claims.append((min(max(max(ends), s["ts"]), s["ts"] + s["dur"]), s["ts"] + s["dur"], 3))
    out = []
    for g in (e for e in events if e["type"] == "graph"):
        totals = [0] * len(CATEGORIES)
        for ns in range(g["ts"], g["ts"] + g["dur"]):
            totals[min([c for a, b, c in claims if a <= ns < b], default=8)] += 1
        out.append(totals)
    return out


lanes = st.sampled_from(["main", "cpu1", "cpu2", "CUDA0"])
names = st.sampled_from(["blk.0.ffn_up_exps", "blk.0.attn_q", "blk.1.ffn_down_exps", "output"])


@st.composite
def streams(draw):
    n_graphs = draw(st.integers(1, 3))
    starts = sorted(draw(st.lists(st.integers(0, 300), min_size=n_graphs, max_size=n_graphs, unique=True)))
    events = []
    for i, s in enumerate(starts):
        limit = (starts[i + 1] if i + 1 < n_graphs else 400) - s
        events.append(ev("graph", s, draw(st.integers(0, limit)), graph=i, n_tokens=1))
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["op", "op", "op", "wakeup", "copy", "sync", "split", "phase"]))
        ts, dur = draw(st.integers(0, 400)), draw(st.integers(0, 80))
        graph, split = draw(st.integers(0, n_graphs - 1)), draw(st.integers(0, 2))
        if kind == "op":
            events.append(op(ts, dur, draw(lanes), name=draw(names), graph=graph, split=split))
        elif kind == "phase":
            events.append(ev("phase", ts, dur, graph=graph, tid="main",
                             name=draw(st.sampled_from(["graph_build", "set_inputs", "sample"]))))
        elif kind == "copy":
            events.append(ev("copy", ts, dur, graph=graph, split=split, src="CPU", dst="CUDA0", tid="main"))
        else:
            events.append(ev(kind, ts, dur, graph=graph, split=split, tid="main",
                             backend=draw(st.sampled_from(["CPU", "CUDA0"]))))
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_categories_sum_to_wall_and_match_a_per_nanosecond_reference(events):
    a = attribute(timings(events))
    want = reference(events)
    for g, totals in zip(a.graphs, want):
        assert [int(g[f"{c}_ns"]) for c in CATEGORIES] == totals
        assert sum(int(g[f"{c}_ns"]) for c in CATEGORIES) == g["wall_ns"]
        for c in CATEGORIES:
            assert g[f"{c}_busy_ns"] >= g[f"{c}_ns"]
    (rep,) = a.reps
    assert sum(int(rep[f"{c}_ns"]) for c in CATEGORIES) == rep["wall_ns"]
    assert (a.hidden_ns >= 0).all()
