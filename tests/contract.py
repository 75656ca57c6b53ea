"""The timings-file contract v1 (DESIGN.md) as one checker that any test can call.

`check_timings_file(path)` raises AssertionError naming the line and the rule
broken, and returns a summary so that a test can demand more (every event
type present, so many graphs). It checks what a reader relies on: the header's
fields, each event's fields, and that ids are consistent in time: every event
of a split inside that split's interval, every event of a graph inside the
graph's, every graph inside a test repetition of the same name whose token
count its graphs add up to; a route's experts are n_tokens x the header's
n_expert_used ids below its n_expert.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from profiler.schema import EVENT_FIELDS, EVENT_TYPES, SCHEMA

HEADER_FIELDS = {
    "model": ("path", "arch", "size_bytes", "n_params", "ftype"),
    "config": ("threads", "n_gpu_layers", "overrides", "accel", "mla", "fmoe", "rtr"),
    "machine": ("cpu", "cores", "mem_bytes", "gpu"),
}
TEST_KINDS = ("pp", "tg", "pg")


@dataclass
class TimingsSummary:
    header: dict
    counts: Counter = field(default_factory=Counter)     # events per type
    unknown: Counter = field(default_factory=Counter)    # events of types not in v1
    lanes: set = field(default_factory=set)
    n_graphs_outside_tests: int = 0


def check_timings_file(path: str | Path, *, tol_ns: int = 0, partial_tail: bool = False,
                       require_types: tuple[str, ...] = ()) -> TimingsSummary:
    """Check a timings file against contract v1 and return what it holds.

    `tol_ns`: how far an event may stick out of its split or graph (device clocks
    mapped to the host). `partial_tail`: allow graphs after the last test event (an
    interrupted run keeps the graphs of its unfinished repetition).
    """
    lines = Path(path).read_bytes().split(b"\n")
    assert lines[-1] == b"", f"{path}: last line is not terminated by a newline"
    records = []
    for i, line in enumerate(lines[:-1], 1):
        try:
            records.append((i, json.loads(line)))
        except ValueError as e:
            raise AssertionError(f"{path}:{i}: not JSON ({e})") from None
    assert records, f"{path}: empty file"
    summary = TimingsSummary(header=check_header(records[0][1], f"{path}:1"))

    by_type: dict[str, list[tuple[int, dict]]] = {t: [] for t in EVENT_TYPES}
    for i, ev in records[1:]:
        where = f"{path}:{i}"
        kind = ev.get("type")
        if kind not in EVENT_TYPES:
            summary.unknown[kind] += 1
            continue
        check_event(ev, where)
        by_type[kind].append((i, ev))
        summary.counts[kind] += 1
        summary.lanes.add(ev["tid"])

    graphs = _index_graphs(by_type["graph"], path)
    splits = _index_splits(by_type["split"], graphs, path, tol_ns)
    for kind in ("op", "copy", "wakeup", "sync", "phase", "route"):
        for i, ev in by_type[kind]:
            _check_inside(ev, graphs, splits, f"{path}:{i}", tol_ns)
    for i, ev in by_type["route"]:
        _check_route(ev, summary.header["model"], f"{path}:{i}")
    summary.n_graphs_outside_tests = _check_tests(by_type["test"], by_type["graph"], path,
                                                  partial_tail)
    missing = [t for t in require_types if not summary.counts[t]]
    assert not missing, f"{path}: no events of type {missing}"
    return summary


def check_header(meta: dict, where: str) -> dict:
    assert meta.get("type") == "meta", f"{where}: line 1 is not the meta header"
    assert meta.get("schema") == SCHEMA, f"{where}: schema {meta.get('schema')!r} != {SCHEMA}"
    for key in ("tool", "created", "peak_bw", "placement"):
        assert key in meta, f"{where}: header lacks {key!r}"
    for part, names in HEADER_FIELDS.items():
        assert isinstance(meta.get(part), dict), f"{where}: header lacks object {part!r}"
        lacking = [n for n in names if n not in meta[part]]
        assert not lacking, f"{where}: header {part} lacks {lacking}"
    for backend, bw in meta["peak_bw"].items():
        assert isinstance(bw.get("GBps"), (int, float)) and bw["GBps"] > 0, \
            f"{where}: peak_bw.{backend}.GBps must be a positive number"
        assert isinstance(bw.get("method"), str), f"{where}: peak_bw.{backend} lacks method"
    for backend, place in meta["placement"].items():
        assert set(place) >= {"bytes", "tensors"}, f"{where}: placement.{backend} lacks bytes/tensors"
    return meta


def check_event(ev: dict, where: str) -> None:
    for key in ("ts", "dur"):
        assert isinstance(ev.get(key), int) and ev[key] >= 0, \
            f"{where}: {ev['type']} {key}={ev.get(key)!r} is not an integer >= 0"
    assert isinstance(ev.get("tid"), str) and ev["tid"], f"{where}: {ev['type']} lacks tid"
    lacking = [f for f in EVENT_FIELDS[ev["type"]] if f not in ev]
    if ev["type"] != "test":
        lacking += [f for f in ("graph",) if f not in ev and ev["type"] != "phase"]
    if ev["type"] in ("op", "copy", "split", "wakeup", "sync"):
        lacking += [f for f in ("split",) if f not in ev]
    if ev["type"] in ("op", "split", "wakeup", "sync"):
        lacking += [f for f in ("backend",) if f not in ev]
    assert not lacking, f"{where}: {ev['type']} event lacks {lacking}"


def _check_route(ev: dict, model: dict, where: str) -> None:
    n_expert, n_used = model.get("n_expert"), model.get("n_expert_used")
    assert n_expert and n_used, f"{where}: route event, but the header's model lacks n_expert / n_expert_used"
    ids = ev["experts"]
    assert isinstance(ids, list) and len(ids) == ev["n_tokens"] * n_used, \
        f"{where}: route experts has {len(ids)} ids, not n_tokens {ev['n_tokens']} x n_expert_used {n_used}"
    assert all(type(e) is int and 0 <= e < n_expert for e in ids), f"{where}: route experts not all in [0, {n_expert})"


def _index_graphs(graph_events, path) -> dict:
    graphs = {}
    for i, ev in graph_events:
        assert ev["graph"] not in graphs, f"{path}:{i}: graph id {ev['graph']} used twice"
        graphs[ev["graph"]] = ev
    return graphs


def _index_splits(split_events, graphs, path, tol_ns) -> dict:
    splits = {}
    for i, ev in split_events:
        key = (ev["graph"], ev["split"])
        assert key not in splits, f"{path}:{i}: split {key} appears twice"
        splits[key] = ev
        _check_inside(ev, graphs, {}, f"{path}:{i}", tol_ns)
    return splits


def _within(inner: dict, outer: dict, tol_ns: int) -> bool:
    return (inner["ts"] >= outer["ts"] - tol_ns
            and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + tol_ns)


def _check_inside(ev, graphs, splits, where, tol_ns) -> None:
    if ev.get("graph") is None:
        return                          # a phase outside any graph
    graph = graphs.get(ev["graph"])
    assert graph is not None, f"{where}: {ev['type']} names graph {ev['graph']}, which has no graph event"
    assert _within(ev, graph, tol_ns), f"{where}: {ev['type']} is outside graph {ev['graph']}'s interval"
    if ev["type"] != "split" and ev.get("split") is not None:
        split = splits.get((ev["graph"], ev["split"]))
        assert split is not None, f"{where}: {ev['type']} names split {ev['split']} of graph {ev['graph']}, which has no split event"
        assert _within(ev, split, tol_ns), f"{where}: {ev['type']} is outside split {ev['split']}'s interval"


def _check_tests(test_events, graph_events, path, partial_tail) -> int:
    """Every graph lies in one test repetition of its name; their tokens add up. Returns
    how many graphs lie after the last test (allowed only with `partial_tail`)."""
    tests = sorted((ev for _, ev in test_events), key=lambda e: e["ts"])
    for i, ev in test_events:
        assert ev["kind"] in TEST_KINDS, f"{path}:{i}: test kind {ev['kind']!r}"
        assert ev["n_tokens"] == ev["n_prompt"] + ev["n_gen"], \
            f"{path}:{i}: test n_tokens != n_prompt + n_gen"
    tokens = Counter()
    end_of_tests = max((t["ts"] + t["dur"] for t in tests), default=-1)
    outside = 0
    for i, g in graph_events:
        holders = [t for t in tests if _within(g, t, 0)]
        if not holders and partial_tail and g["ts"] >= end_of_tests:
            outside += 1
            continue
        assert len(holders) == 1, f"{path}:{i}: graph {g['graph']} lies in {len(holders)} test repetitions, not 1"
        test = holders[0]
        assert g["test"] == test["name"], f"{path}:{i}: graph {g['graph']} says test {g['test']!r} inside {test['name']!r}"
        tokens[id(test)] += g["n_tokens"]
    for t in tests:
        assert tokens[id(t)] == t["n_tokens"], \
            f"{path}: test {t['name']} rep {t.get('rep')} has graphs of {tokens[id(t)]} tokens, not {t['n_tokens']}"
    return outside
