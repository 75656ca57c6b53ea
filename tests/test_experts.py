"""Expert routing: route events recorded by the engine, read back, and the report's `experts`
(counts, top-k coverage, LRU hit rates, what-ifs) against hand-worked and independent figures."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from analysis.attribution import attribute
from analysis.diff import diff_reports, diff_tables
from analysis.experts import distinct_in_order, lru_hit_rates, lru_stack_distances
from analysis.report import build_report
from analysis.tables import report_tables
from analysis.timings import load_timings
from hybrid_stream import EXPERT_BYTES, HEADER, engine_run, hybrid_stream, write_stream
from profiler.errors import UserError


def routed_stream(choose, *, n_expert: int, n_used: int, tests=(("tg300", "tg", 0, 300, 0),), n_layers: int = 2):
    """hybrid_stream's run with a route event per layer in every graph: choose(graph, layer, n_tokens)
    -> the ids [n_tokens, n_used] (graphs numbered in time order)."""
    header = {**HEADER, "model": {**HEADER["model"], "n_expert": n_expert, "n_expert_used": n_used}}
    events = hybrid_stream(tests=tests, reps=1, n_layers=n_layers, header=header)
    out = []
    for ev in events:
        out.append(ev)
        if ev.get("type") == "graph":
            out += [{"type": "route", "ts": ev["ts"] + 1, "dur": 0, "graph": ev["graph"], "layer": layer,
                     "n_tokens": ev["n_tokens"], "tid": "main",
                     "experts": np.asarray(choose(ev["graph"], layer, ev["n_tokens"])).reshape(-1).tolist()}
                    for layer in range(n_layers)]
    return out


def report_of(tmp_path, events, name="t.jsonl"):
    t = load_timings(write_stream(tmp_path / name, events))
    return t, build_report(t)


# ---------------------------------------------------------------- LRU, by hand

def test_lru_replay_equals_a_hand_worked_sequence():
    # experts 1 2 3 1 4 2 1; the LRU stack (most recent first) before each access:
    # [] [1] [2 1] [3 2 1] [1 3 2] [4 1 3 2] [2 4 1 3] -> distances -, -, -, 2, -, 3, 2
    distances = lru_stack_distances([1, 2, 3, 1, 4, 2, 1])
    assert distances.tolist() == [-1, -1, -1, 2, -1, 3, 2]
    # a cache of 2 never hits; of 3 hits the 4th and 7th access; of 4 also the 6th
    assert lru_hit_rates(distances, np.array([1, 2, 3, 4, 5])).tolist() == [0, 0, 2 / 7, 3 / 7, 3 / 7]


def test_a_graph_reads_each_expert_once_in_the_order_its_tokens_first_chose_it():
    assert distinct_in_order(np.array([3, 5, 5, 3, 1, 3])).tolist() == [3, 5, 1]


def test_the_report_replays_the_hand_worked_sequence(tmp_path):
    sequence = [1, 2, 3, 1, 4, 2, 1]          # one expert a token, one token a graph
    _, report = report_of(tmp_path, routed_stream(lambda g, layer, n: [[sequence[g]]], n_expert=8, n_used=1,
                                                  tests=(("tg7", "tg", 0, 7, 0),), n_layers=1))
    u = report.tests[0].experts
    assert u.ks == (1, 2, 4) and u.counts[0].tolist() == [0, 3, 2, 1, 1, 0, 0, 0]
    js = report.to_json()["tests"][0]["experts"]
    assert {k: v["overall"] for k, v in js["lru_hit_rate"].items()} == {"1": 0.0, "2": 0.0, "4": 3 / 7}
    # the hottest expert carries 3 of the 7 reads, the two hottest 5, the four 7
    assert {k: v["layers"]["0"] for k, v in js["top_coverage"].items()} == {"1": 3 / 7, "2": 5 / 7, "4": 1.0}


def test_a_batch_counts_every_choice_but_reads_an_expert_once(tmp_path):
    ids = [[3, 5], [5, 3], [1, 3]]             # three tokens of one prompt graph
    _, report = report_of(tmp_path, routed_stream(lambda g, layer, n: ids, n_expert=8, n_used=2,
                                                  tests=(("pp3", "pp", 3, 0, 0),), n_layers=1))
    u = report.tests[0].experts
    assert u.counts[0].tolist() == [0, 1, 0, 3, 0, 2, 0, 0]
    assert u.reads[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 0]


# ---------------------------------------------------------------- skewed routing, independently

def lru_hit_rate(accesses, size: int) -> float:
    """An LRU cache simulated directly (not by stack distances)."""
    cache, hits = OrderedDict(), 0
    for e in accesses:
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            cache[e] = True
            if len(cache) > size:
                cache.popitem(last=False)
    return hits / len(accesses)


def test_zipf_routing_coverage_hit_rates_and_whatifs_match_independent_figures(tmp_path):
    n_expert, n_used, n_graphs = 32, 4, 300
    rng = np.random.default_rng(7)
    zipf = 1 / np.arange(1, n_expert + 1) ** 1.2
    popularity = [rng.permutation(zipf / zipf.sum()) for _ in range(2)]        # a hot set per layer
    choices = {(g, layer): rng.choice(n_expert, n_used, replace=False, p=popularity[layer])
               for g in range(n_graphs) for layer in range(2)}
    t, report = report_of(tmp_path, routed_stream(lambda g, layer, n: [choices[g, layer]], n_expert=n_expert,
                                                  n_used=n_used))
    r = report.tests[0]
    js = report.to_json()["tests"][0]["experts"]
    assert js["n_graphs"] == n_graphs and js["n_tokens"] == n_graphs
    for layer in (0, 1):
        picks = np.concatenate([choices[g, layer] for g in range(n_graphs)])
        counts = np.bincount(picks, minlength=n_expert)
        assert js["counts"][str(layer)] == counts.tolist()
        assert sum(js["counts"][str(layer)]) == n_graphs * n_used
        ranked = np.sort(counts)[::-1]
        for k in (4, 8, 16):
            assert js["top_coverage"][str(k)]["layers"][str(layer)] == pytest.approx(ranked[:k].sum() / picks.size)
            assert js["lru_hit_rate"][str(k)]["layers"][str(layer)] == pytest.approx(lru_hit_rate(picks.tolist(), k))
    assert js["top_coverage"]["8"]["layers"]["0"] > 2 * 8 / n_expert       # skewed: far above uniform
    # both layers read as many experts at the same CPU cost: overall is their mean
    for key in ("top_coverage", "lru_hit_rate"):
        for k, v in js[key].items():
            assert v["overall"] == pytest.approx(np.mean(list(v["layers"].values())))
    # what-if: each layer's CPU expert bytes (2 workers x EXPERT_BYTES a graph) times the share moved
    per_read = 2 * EXPERT_BYTES / n_used
    for k in (4, 8):
        pin = js["whatif"]["top"][str(k)]
        moved = sum(js["top_coverage"][str(k)]["layers"][str(layer)] for layer in (0, 1)) * 2 * EXPERT_BYTES
        assert pin["cpu_bytes_moved_per_token"] == pytest.approx(moved)
        assert pin["vram_bytes"] == pytest.approx(k * per_read * 2)
        cpu_bw = r.bandwidth["cpu_expert_GBps"]
        gpu_bw = float(r.backends[r.backends["backend"] == "CUDA0"]["GBps"][0])
        assert pin["tps"] == pytest.approx(1e9 / (r.wall_ns / r.n_tokens - moved / cpu_bw + moved / gpu_bw))
        lru = js["whatif"]["lru"][str(k)]
        assert lru["upload_bytes_per_token"] == pytest.approx(2 * 2 * EXPERT_BYTES - lru["cpu_bytes_moved_per_token"])


# ---------------------------------------------------------------- a recorded run

def test_a_recorded_run_counts_tokens_times_experts_used_in_every_moe_layer(tmp_path, tiny_gguf):
    t = load_timings(engine_run(tiny_gguf, tmp_path / "run.jsonl"))
    model = t.header["model"]
    n_used = model["n_expert_used"]
    report = build_report(t)
    assert [r.name for r in report.tests if r.experts is None] == []
    for r in report.tests:
        u = r.experts
        assert u.n_tokens == r.n_tokens
        assert u.counts.sum(axis=1).tolist() == [r.n_tokens * n_used] * len(u.layers)
        assert u.counts.shape == (len(u.layers), model["n_expert"])
    tables = [table.title for table in report_tables(report)]
    assert any("expert routing" in title for title in tables)


def test_experts_that_ran_on_the_gpu_move_nothing(tmp_path):
    events = routed_stream(lambda g, layer, n: [[g % 4, 4 + g % 4]], n_expert=8, n_used=2,
                           tests=(("tg8", "tg", 0, 8, 0),))
    events = [e for e in events if not (e.get("type") == "op" and "_exps" in e["name"])]     # experts elsewhere
    _, report = report_of(tmp_path, events)
    u = report.tests[0].experts
    assert not u.cpu_bytes_per_read.any()
    assert all(w["cpu_bytes_moved_per_token"] == 0 and w["vram_bytes"] == 0 and w["tps"] is None
               for rows in u.whatif.values() for w in rows.values())
    table = next(t for t in report_tables(report) if "expert routing" in t.title)
    assert table.notes[0].startswith("no expert op of this test ran on the CPU")


def test_recording_routes_does_not_change_the_tokens_and_they_are_the_references_choice(make_gguf):
    """The f32 tiny model on the emulated split (experts on the CPU): the same tokens with and without
    recording, and each recorded route the float64 reference's top-k."""
    from hybrid.engine import Engine
    from profiler.recorder import Recorder
    from reference_deepseek2 import Deepseek2Reference

    path = make_gguf("tiny", "f32")
    prompt = [5, 17, 3, 9]

    def generate(rec):
        with Engine(str(path), threads=2, n_gpu_layers=99, overrides=[r"\.ffn_.*_exps\.=CPU"], accel="emulated",
                    recorder=rec) as engine:
            tokens = [engine.eval(prompt, "pp4")]
            for _ in range(3):
                tokens.append(engine.eval([tokens[-1]], "tg"))
            return tokens
    rec = Recorder(enabled=True, print_timing=False)
    tokens = generate(rec)
    assert tokens == generate(Recorder(enabled=False))
    routes = [e for e in rec.drain() if e["type"] == "route"]

    ref = Deepseek2Reference(path)
    chosen = {}
    route = ref.route
    ref.route = lambda x, il: chosen.setdefault((ref.n_past, il), route(x, il))
    ref.forward(prompt)
    for token in tokens[:-1]:
        ref.forward([token])
    graphs = sorted({e["graph"] for e in routes})
    assert len(graphs) == len(tokens) and len(routes) == len(tokens) * (ref.n_layer - ref.n_dense)
    for ev in routes:
        first = 0 if ev["graph"] == graphs[0] else len(prompt) - 1 + graphs.index(ev["graph"])
        ids = np.array(ev["experts"]).reshape(ev["n_tokens"], ref.n_used)
        for i in range(ev["n_tokens"]):
            assert set(ids[i]) == set(chosen[first + i, ev["layer"]][0].tolist()), (first + i, ev["layer"])


@pytest.mark.cuda
@pytest.mark.parametrize("overrides", [(), (r"\.ffn_.*_exps\.=CPU",)], ids=["all-gpu", "experts-cpu"])
def test_cuda_routes_are_read_after_the_graph_and_match_the_cpu_run(tiny_gguf, overrides, monkeypatch):
    """Route ids that live on the GPU are read back once per graph, after its splits, and are the
    CPU run's (both on the exact torch path)."""
    from hybrid import weights
    from hybrid.engine import Engine
    from profiler.recorder import Recorder

    monkeypatch.setattr(weights, "NATIVE", False)

    def routes(accel, overrides):
        rec = Recorder(enabled=True, print_timing=False)
        with Engine(str(tiny_gguf), threads=2, accel=accel, n_gpu_layers=99, overrides=overrides,
                    recorder=rec) as engine:
            token = engine.eval([5, 17, 3, 9], "pp4")
            for _ in range(3):
                token = engine.eval([token], "tg")
        events = rec.drain()
        last_split_end = {}
        for e in events:
            if e["type"] == "split":
                last_split_end[e["graph"]] = max(last_split_end.get(e["graph"], 0), e["ts"] + e["dur"])
        got = [e for e in events if e["type"] == "route"]
        assert all(e["ts"] >= last_split_end[e["graph"]] for e in got)
        return [(e["layer"], [set(ids) for ids in np.reshape(e["experts"], (e["n_tokens"], -1)).tolist()])
                for e in got]
    assert routes("cuda", overrides) == routes("none", ())


def test_qwen3moe_records_a_route_for_every_layer(make_gguf):
    from hybrid.engine import Engine
    from profiler.recorder import Recorder

    rec = Recorder(enabled=True, print_timing=False)
    with Engine(str(make_gguf("qwen3-tiny", "q8_0")), threads=2, accel="none", recorder=rec) as engine:
        engine.eval([3, 1, 4], "pp3")
        c = engine.gguf.config
    routes = [e for e in rec.drain() if e["type"] == "route"]
    assert [e["layer"] for e in routes] == list(range(c.n_layer))
    assert all(len(e["experts"]) == 3 * c.n_expert_used and max(e["experts"]) < c.n_expert for e in routes)
    assert all(len(set(e["experts"][i:i + c.n_expert_used])) == c.n_expert_used
               for e in routes for i in range(0, len(e["experts"]), c.n_expert_used))


# ---------------------------------------------------------------- no routing, bad routing, diff

def test_an_ik_llama_log_says_it_carries_no_routing():
    report = build_report(load_timings(Path(__file__).parent / "data" / "ik_cpu_tg_fmoe.log"))
    assert report.tests and all(r.experts is None for r in report.tests)
    assert all(test["experts"] is None for test in report.to_json()["tests"])
    run = dict(report_tables(report)[0].rows)
    assert "not recorded in this file (ik_llama.cpp logs carry none)" in run["expert routing"]


@pytest.mark.parametrize("experts, message", [
    ([1, "2"], "field 'experts' must be a non-empty list of expert ids"),
    ([], "must be a non-empty list"),
    ([[1], [2]], "must be a non-empty list"),
    ([1, 2, 3], "has 3 ids, not n_expert_used per token of 'n_tokens' 2"),
    ([-1, 2], "holds -1, not an expert id"),
    ([0, 2**64 - 1], "holds 18446744073709551615, not an expert id"),
])
def test_bad_route_events_are_one_line_errors_naming_the_line(tmp_path, experts, message):
    events = routed_stream(lambda g, layer, n: [[0, 1]] * n, n_expert=8, n_used=2,
                           tests=(("pp2", "pp", 2, 0, 0),), n_layers=1)
    i = next(i for i, e in enumerate(events) if e["type"] == "route")
    events[i] = {**events[i], "experts": experts}
    with pytest.raises(UserError, match=f"t.jsonl:{i + 1}: .*{message}"):
        report_of(tmp_path, events)


def test_a_route_without_a_layer_index_is_refused(tmp_path):
    events = routed_stream(lambda g, layer, n: [[0, 1]] * n, n_expert=8, n_used=2,
                           tests=(("pp2", "pp", 2, 0, 0),), n_layers=1)
    i = next(i for i, e in enumerate(events) if e["type"] == "route")
    del events[i]["layer"]
    with pytest.raises(UserError, match=f"t.jsonl:{i + 1}: a route's 'layer' must be a layer index"):
        report_of(tmp_path, events)


@pytest.mark.parametrize("ids, message", [
    ([[9]], "t.jsonl: a route event names expert 9, but the header's model.n_expert is 8"),
    ([[1, 2]], "t.jsonl: a route event of graph 0, layer 0 has 2 ids, not n_tokens 1 x the header's "
               "model.n_expert_used 1"),
    ("n_expert", "t.jsonl: the header's model.n_expert 9007199254740992 and n_expert_used 1 must be whole numbers"),
    ("n_expert_used", r"t.jsonl: the header's model.n_expert 8 and n_expert_used 6.0 must be whole numbers, "
                      r"1 <= n_expert_used <= n_expert <= 65536"),
])
def test_routes_the_header_contradicts_are_refused(tmp_path, ids, message):
    events = routed_stream(lambda g, layer, n: ids if isinstance(ids, list) else [[1]], n_expert=8, n_used=1,
                           tests=(("tg1", "tg", 0, 1, 0),))
    if ids == "n_expert":
        events[0]["model"]["n_expert"] = 2**53
    elif ids == "n_expert_used":
        events[0]["model"]["n_expert_used"] = 6.0
    with pytest.raises(UserError, match=message):
        report_of(tmp_path, events)


def test_route_lines_take_the_same_columns_through_either_reader(tmp_path):
    """A block with route lines: the other lines go through the flat reader, the route lines through
    JSON; the same block with a line the flat reader refuses goes through JSON whole."""
    events = routed_stream(lambda g, layer, n: [[g % 8, (g + layer) % 8 if g % 8 != (g + layer) % 8 else 7]],
                           n_expert=8, n_used=2, tests=(("tg20", "tg", 0, 20, 0),))
    fast = load_timings(write_stream(tmp_path / "a.jsonl", events))
    slow = load_timings(write_stream(tmp_path / "b.jsonl", events[:5] + [{**events[5], "x": 1.5}] + events[6:]))
    assert len(fast.routes) == 40 and np.array_equal(fast.routes, slow.routes)
    assert np.array_equal(fast.route_ids, slow.route_ids)
    for f in fast.events.columns:
        assert np.array_equal(fast.events[f], slow.events[f]), f
    assert fast.of_type("route").sum() == 0                 # routes have their own table


def test_routes_read_on_several_processes_are_the_routes_read_on_one(tmp_path, monkeypatch):
    from analysis import timings

    events = routed_stream(lambda g, layer, n: [[g % 8, 7 - g % 8 if g % 8 != 7 - g % 8 else 0]] * n, n_expert=8,
                           n_used=2, tests=(("pp3", "pp", 3, 0, 0), ("tg9", "tg", 0, 9, 0)))
    path = write_stream(tmp_path / "t.jsonl", events)
    serial = load_timings(path)
    monkeypatch.setattr(timings, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(timings, "BLOCK_BYTES", 2000)
    monkeypatch.setattr(timings, "_cores", lambda: 3)
    parallel = load_timings(path)
    assert len(serial.routes) == 2 * 10
    assert np.array_equal(parallel.routes, serial.routes) and np.array_equal(parallel.route_ids, serial.route_ids)


def test_diff_shows_a_change_in_expert_usage(tmp_path):
    def run(offset):
        return routed_stream(lambda g, layer, n: [[(g + offset) % 4, 4 + (g + offset) % 2]], n_expert=8, n_used=2,
                             tests=(("tg8", "tg", 0, 8, 0),))
    _, a = report_of(tmp_path, run(0), "a.jsonl")
    _, same = report_of(tmp_path, run(0), "b.jsonl")
    assert diff_reports(a, same).tests[0].experts.mean_moved == 0
    # B: expert 7 takes every choice of expert 5's slot (half the second slot's choices)
    b_events = routed_stream(lambda g, layer, n: [[g % 4, 4 + 3 * (g % 2)]], n_expert=8, n_used=2,
                             tests=(("tg8", "tg", 0, 8, 0),))
    _, b = report_of(tmp_path, b_events, "c.jsonl")
    d = diff_reports(a, b)
    change = d.tests[0].experts
    assert change.moved == (0.25, 0.25) and change.mean_moved == 0.25      # 4 of 16 choices moved, per layer
    assert d.to_json()["tests"][0]["experts"] == {"mean_moved": 0.25, "moved": {"0": 0.25, "1": 0.25}}
    titles = [table.title for table in diff_tables(d)]
    assert "tg8: expert usage A → B — 25.0 % of the choices moved (mean over 2 MoE layers)" in titles
