"""The Chrome trace parsed back: one X event per op on the right lane, nesting, metadata, flows, counters, window."""

from __future__ import annotations

import json
from collections import defaultdict

import orjson
import pytest
from hybrid_stream import engine_run, hybrid_stream, write_stream

from analysis.attribution import attribute
from analysis.timings import load_timings
from analysis.trace import parse_graphs, trace_events
from hyprof.cli import main
from profiler.errors import UserError


def export(tmp_path, events, *flags):
    src = write_stream(tmp_path / "t.jsonl", events)
    out = tmp_path / "trace.json"
    assert main(["trace", str(src), "-o", str(out), *flags]) == 0
    raw = out.read_bytes()
    return raw, json.loads(raw)


def lanes(trace) -> dict:
    """(pid, tid) -> 'process/thread' from the metadata."""
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    return {(e["pid"], e["tid"]): f"{procs[e['pid']]}/{e['args']['name']}"
            for e in trace["traceEvents"] if e["name"] == "thread_name"}


def check_nesting(events):
    by_lane = defaultdict(list)
    for e in events:
        by_lane[e["pid"], e["tid"]].append(e)
    for lane, evs in by_lane.items():
        stack = []
        for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            start, end = round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], f"{e['name']} overlaps its parent on lane {lane}"
            stack.append(end)


def test_every_op_is_one_complete_event_on_its_lane(tmp_path):
    events = hybrid_stream()
    raw, trace = export(tmp_path, events)
    assert raw.index(b'"displayTimeUnit"') < raw.index(b'"traceEvents"')
    names = lanes(trace)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    ops = [e for e in events if e.get("type") == "op"]
    op_x = [e for e in xs if "layer" in e["args"]]
    assert len(op_x) == len(ops) and len(xs) == len(events) - 1        # every event but the header
    where = {"cpu1": "host/cpu1", "cpu2": "host/cpu2", "CUDA0": "CUDA0 (device)/CUDA0 stream"}
    expect = sorted((round(o["ts"] / 1000, 3), o["op"], where[o["tid"]]) for o in ops)
    got = sorted((round(e["ts"], 3), e["name"], names[e["pid"], e["tid"]]) for e in op_x)
    assert got == expect
    cats = {e["cat"] for e in op_x}
    assert cats == {"cpu_expert_matmul", "gpu_compute"}
    assert set(names.values()) == {"host/main", "host/splits", "host/cpu1", "host/cpu2", "host/copies",
                                   "CUDA0 (device)/CUDA0 stream"}
    check_nesting(xs)
    for lane in names:              # written in time order on every lane
        ts = [e["ts"] for e in xs if (e["pid"], e["tid"]) == lane]
        assert ts and ts == sorted(ts), lane


def test_flows_link_each_copy_to_its_split_and_counters_sum_running_ops(tmp_path):
    events = hybrid_stream(tests=(("tg1", "tg", 0, 1, 0),), reps=1)
    _, trace = export(tmp_path, events)
    tev = trace["traceEvents"]
    splits = [e for e in tev if e["ph"] == "X" and e["name"].startswith("split ")]
    copies = [e for e in tev if e["ph"] == "X" and e["name"].startswith("copy ")]
    starts = {e["id"]: e for e in tev if e["ph"] == "s"}
    finishes = {e["id"]: e for e in tev if e["ph"] == "f"}
    assert len(starts) == len(finishes) == len(copies) == 4
    for k, f in finishes.items():
        s = starts[k]
        copy = next(c for c in copies if c["ts"] <= s["ts"] <= c["ts"] + c["dur"] and c["tid"] == s["tid"])
        split = next(x for x in splits if x["ts"] <= f["ts"] < x["ts"] + x["dur"] and x["tid"] == f["tid"])
        assert f["bp"] == "e" and copy["args"]["split"] == split["args"]["split"]
    cpu = [e for e in tev if e["ph"] == "C" and e["name"] == "read GB/s CPU"]
    # two workers each read 150 MB in 5 ms = 30 GB/s; both at once: 60
    assert max(e["args"]["GB/s"] for e in cpu) == pytest.approx(60.0)
    assert cpu[-1]["args"]["GB/s"] == 0


def test_graphs_window(tmp_path):
    events = hybrid_stream()
    _, trace = export(tmp_path, events, "--graphs", "2:4")
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in xs if e["cat"] == "graph") == ["graph 2", "graph 3"]
    assert {e["args"]["graph"] for e in xs if "graph" in e["args"]} == {2, 3}
    assert [e["name"] for e in xs if e["cat"] == "test"] == ["tg3 rep 0"]       # the test around them
    assert parse_graphs("5:") == (5, None) and parse_graphs(":7") == (None, 7)
    for bad in ("3", "4:2", "a:b"):
        with pytest.raises(UserError, match="--graphs"):
            parse_graphs(bad)


def test_bad_window_and_existing_output_are_one_line_errors(tmp_path, capsys):
    src = write_stream(tmp_path / "t.jsonl", hybrid_stream())
    assert main(["trace", str(src), "-o", str(tmp_path / "x.json"), "--graphs", "100:200"]) == 2
    assert "no graph of" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    (tmp_path / "y.json").write_text("keep")
    assert main(["trace", str(src), "-o", str(tmp_path / "y.json")]) == 2
    assert "file exists" in capsys.readouterr().err and (tmp_path / "y.json").read_text() == "keep"


def test_partial_overlap_moves_to_an_overlap_lane(tmp_path):
    head, *_ = hybrid_stream()
    events = [head, {"type": "graph", "ts": 0, "dur": 100, "graph": 0, "n_tokens": 1, "tid": "main"},
              {"type": "op", "ts": 10, "dur": 50, "tid": "CUDA0", "backend": "CUDA0", "graph": 0, "op": "A", "name": "a"},
              {"type": "op", "ts": 40, "dur": 50, "tid": "CUDA0", "backend": "CUDA0", "graph": 0, "op": "B", "name": "b"}]
    t = load_timings(write_stream(tmp_path / "t.jsonl", events))
    stream, summary = trace_events(t, attribute(t))
    tev = list(stream)
    assert summary.n_overlap_moved == 1
    names = lanes({"traceEvents": tev})
    b = next(e for e in tev if e.get("name") == "B")
    assert names[b["pid"], b["tid"]] == "CUDA0 (device)/CUDA0 (overlap)"
    check_nesting([e for e in tev if e["ph"] == "X"])


def test_engine_made_timings(tmp_path, tiny_gguf):
    src = engine_run(tiny_gguf, tmp_path / "engine.jsonl")
    out = tmp_path / "trace.json"
    assert main(["trace", str(src), "-o", str(out)]) == 0
    trace = orjson.loads(out.read_bytes())
    n_ops = sum(1 for line in src.read_bytes().splitlines()[1:] if orjson.loads(line)["type"] == "op")
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sum(1 for e in xs if "layer" in e["args"]) == n_ops
    assert {"host/main", "host/copies", "ACC0 (device)/ACC0 stream"} <= set(lanes(trace).values())
    check_nesting(xs)
