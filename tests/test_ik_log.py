"""The ik_llama.cpp IK_PRINT_TIMING importer (analysis/ik_log.py, `hyprof import ik`).

The logs in tests/data are written by hand in exactly the format ik_llama.cpp prints
(see the printf calls quoted in analysis/ik_log.py); the expected figures below are
worked out by hand from those lines, in microseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from analysis import ik_log
from analysis.attribution import attribute
from analysis.timings import load_lines, load_timings
from hyprof.cli import main as hyprof

DATA = Path(__file__).parent / "data"
CPU_TG = DATA / "ik_cpu_tg_fmoe.log"
CUDA_PP = DATA / "ik_cuda_pp.log"
CPU_PP = DATA / "ik_cpu_pp_ubatch.log"
DAMAGED = DATA / "ik_damaged.log"
SAMPLE = Path("/work/shared/samples/ik_print_timing_deepseek2_cpu_t2.txt")
US = 1000


def events(path) -> tuple[dict, list[dict]]:
    lines = list(ik_log.convert(path))
    return orjson.loads(lines[0]), [orjson.loads(x) for x in lines[1:]]


def of(evs, type_, **match) -> list[dict]:
    return [e for e in evs if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]


def rep_categories_us(path) -> list[dict]:
    t = load_lines(ik_log.convert(path), str(path))
    a = attribute(t)
    out = []
    for r in a.reps:
        cats = {c: int(r[f"{c}_ns"]) // US for c in a.categories if r[f"{c}_ns"]}
        assert sum(cats.values()) * US == r["wall_ns"]
        out.append({"name": str(r["name"]), "rep": int(r["rep"]), "wall": int(r["wall_ns"]) // US, **cats})
    return out


# ---------------------------------------------------------------- CPU only, tg, -fmoe 1

def test_cpu_tg_graphs_tests_and_layout():
    meta, evs = events(CPU_TG)
    assert meta["schema"] == "hyprof-timings/1" and meta["source"]["format"] == "ik_print_timing"
    assert "inflates GPU op times" in meta["source"]["note"]
    assert meta["model"]["arch"] == "deepseek2" and meta["model"]["ftype"] == "Q4_0"
    assert meta["model"]["size_bytes"] == 8 * 1024 ** 3 and meta["model"]["n_params"] == 15_710_000_000
    assert meta["config"]["threads"] == 2 and meta["config"]["accel"] == "none"
    graphs = of(evs, "graph")
    # warm-up 5+10+20+30+4+200+3+1; then 2+3+150+2+0; then graph_compute 145 < its children 146
    assert [(g["ts"] // US, g["dur"] // US) for g in graphs] == [(0, 273), (273, 157), (430, 153)]
    assert graphs[0]["role"] == "warmup" and "test" not in graphs[0]
    assert [g.get("test") for g in graphs[1:]] == ["tg2", "tg2"]
    assert [g["n_past"] for g in graphs[1:]] == [0, 1] and graphs[1]["n_tokens"] == 1
    [test] = of(evs, "test")
    assert (test["ts"] // US, test["dur"] // US) == (273, 310)
    assert (test["name"], test["kind"], test["rep"], test["n_tokens"]) == ("tg2", "tg", 0, 2)
    assert (test["tps"], test["tps_std"]) == (6400.0, 0.0)


def test_cpu_tg_ops_quantize_and_expert_names():
    _, evs = events(CPU_TG)
    g1 = [e for e in evs if e.get("graph") == 1]
    ops = [(e["op"], e["name"], e["ts"] // US, e["dur"] // US) for e in of(g1, "op")]
    # graph 1 starts at 273: prelude 2, set_inputs 3, sched_eval 1, then the ops end to end
    assert ops == [("GET_ROWS", "inp_embd", 279, 2), ("RMS_NORM", "attn_norm-0", 281, 1),
                   ("quantize", "q-0", 282, 2), ("MUL_MAT", "q-0", 284, 6),
                   ("MUL_MAT", "ffn_moe_logits-0", 290, 4),
                   ("MOE_FUSED_UP_GATE", "blk.0.ffn_up_gate_exps", 294, 80),
                   ("MUL_MAT_ID", "blk.0.ffn_down_exps", 374, 40)]
    down = of(g1, "op", op="MUL_MAT_ID")[0]
    assert (down["node"], down["layer"], down["backend"], down["tid"]) == ("ffn_moe_down-0", 0, "CPU", "main")
    [wakeup] = of(g1, "wakeup")
    assert (wakeup["ts"] // US, wakeup["dur"] // US) == (414, 10)
    [split] = of(g1, "split")   # from sched_eval to the end of graph_compute (278 + 150)
    assert (split["ts"] // US, split["dur"] // US, split["backend"]) == (278, 150, "CPU")
    assert [(p["name"], p.get("label")) for p in of(g1, "phase")] == [
        ("graph_build", "prelude"), ("set_inputs", None),
        ("split_setup", "ggml_backend_sched_eval(.1.)"), ("get_result", None),
        ("split_setup", "sched_reset")]


def test_cpu_tg_attribution_by_hand():
    # per token graph: prelude 2 + set_inputs 2 (graph_build), copies 1+1, sched_eval 1,
    # cpu_other 2+1+2+6+4, experts 80+40, barrier 10 + unprinted graph_compute rest
    # (4 in graph 1, none in graph 2) as the CPU split's join, get_result's own 1
    assert rep_categories_us(CPU_TG) == [{
        "name": "tg2", "rep": 0, "wall": 310, "cpu_expert_matmul": 240, "cpu_other": 30,
        "thread_wakeup": 24, "copy": 4, "sched": 2, "graph_build": 8, "other": 2}]


# ---------------------------------------------------------------- CPU only, pp in two ubatches, -fmoe 0

def test_cpu_pp_ubatches_are_graphs_of_one_repetition():
    meta, evs = events(CPU_PP)
    assert meta["config"] == {"threads": 4, "accel": "none", "n_ubatch": 4}
    graphs = of(evs, "graph")
    # warm-up 4+6+10+20+2+100+1+2; ubatch 1 (no logits: no get_result) 3+5+10+20+2+190;
    # ubatch 2 reuses the graph: 2+2+185+2, then the call's final sched_reset 3
    assert [(g["ts"] // US, g["dur"] // US) for g in graphs] == [(0, 145), (145, 230), (375, 194)]
    assert [(g.get("test"), g.get("n_tokens"), g["n_past"]) for g in graphs] == [
        (None, None, 0), ("pp8", 4, 0), ("pp8", 4, 4)]
    [test] = of(evs, "test")
    assert (test["ts"] // US, test["dur"] // US, test["n_tokens"], test["tps"]) == (145, 424, 8, 18000.0)
    names = [o["name"] for o in of(evs, "op", graph=1)]
    assert names == ["blk.1.ffn_up_exps", "blk.1.ffn_gate_exps", "ffn_moe_gate_par-1", "blk.1.ffn_down_exps"]
    # experts 60+60+50 twice; FUSED_MUL_UNARY 4 twice; barriers 10+10 and graph 1's unprinted 5;
    # sched_reset 5 and 3, sched_eval 1 and 1; prelude 3+2, build 10, alloc 20, set_inputs' own 1+1
    assert rep_categories_us(CPU_PP) == [{
        "name": "pp8", "rep": 0, "wall": 424, "cpu_expert_matmul": 340, "cpu_other": 8,
        "thread_wakeup": 25, "copy": 3, "sched": 10, "graph_build": 37, "other": 1}]


# ---------------------------------------------------------------- CUDA + CPU experts, pp, -fmoe 0

def test_cuda_pp_splits_backends_and_copies():
    meta, evs = events(CUDA_PP)
    assert meta["config"]["accel"] == "CUDA0" and meta["config"]["n_gpu_layers"] == 99
    assert meta["config"]["fmoe"] == 0 and meta["source"]["backend"] == "CUDA"
    g1 = [e for e in evs if e.get("graph") == 1]
    splits = [(s["split"], s["backend"], s.get("n_nodes"), s["ts"] // US, s["dur"] // US)
              for s in of(g1, "split")]
    # graph 1 starts at 1350; graph_compute starts at 1350 + 10+20+100+200+5 = 1685, children
    # 103 + 805 + 40 = 948 of its 1000 us: the unprinted 52 extend the last split
    assert splits == [(0, "CUDA0", 12, 1685, 103), (1, "CPU", None, 1788, 805), (2, "CUDA0", 5, 2593, 92)]
    cuda_ops = of(g1, "op", backend="CUDA0")
    assert [o["op"] for o in cuda_ops] == ["GET_ROWS", "RMS_NORM", "MUL_MAT", "FLASH_ATTN_EXT", "MUL_MAT",
                                           "ADD", "RMS_NORM", "MUL_MAT"]
    assert {o["tid"] for o in cuda_ops} == {"CUDA0"} and cuda_ops[4]["name"] == "ffn_moe_logits-0"
    cpu_ops = [(o["op"], o["name"]) for o in of(g1, "op", backend="CPU")]
    assert cpu_ops == [("MUL_MAT_ID", "blk.0.ffn_up_exps"), ("MUL_MAT_ID", "blk.0.ffn_gate_exps"),
                       ("FUSED_MUL_UNARY", "ffn_moe_gate_par-0"), ("MUL_MAT_ID", "blk.0.ffn_down_exps")]
    copies = [(c["name"], c["src"], c["dst"], c.get("split")) for c in of(g1, "copy")]
    assert copies == [("inp_tokens", "CPU", "CPU", None), ("inp_pos", "CPU", "CPU", None),
                      ("ffn_norm-0", "CUDA0", "CPU", 1), ("ffn_moe_topk-0", "CUDA0", "CPU", 1),
                      ("CUDA0#ffn_moe_down-0#0", "CPU", "CUDA0", 2), ("result_output", "CUDA0", "CPU", None)]


def test_cuda_pp_attribution_by_hand():
    # graph_build: prelude 10 + build 100 + alloc 200 + set_inputs' own 3; sched: sched_reset
    # 20 + 3, split set-up 3 + 5 + 2, unprinted compute 52 (last split is CUDA); copies
    # 2 + 10 + 8 + 10; GPU ops 100 + 30; CPU experts 300 + 290 + 150; FUSED_MUL_UNARY 20;
    # barrier 30; get_result's own 2
    [rep] = rep_categories_us(CUDA_PP)
    assert rep == {"name": "pp4", "rep": 0, "wall": 1350, "cpu_expert_matmul": 740, "cpu_other": 20,
                   "gpu_compute": 130, "thread_wakeup": 30, "copy": 30, "sched": 85,
                   "graph_build": 313, "other": 2}
    a = attribute(load_lines(ik_log.convert(CUDA_PP), "cuda"))
    assert {d: int(v[0]) // US for d, v in a.copy_ns.items()} == {"h2d": 8, "d2h": 20, "other": 2, "weights": 0}


# ---------------------------------------------------------------- damaged logs

def test_damaged_log_is_counted_not_guessed():
    sc = ik_log.scan(DAMAGED)
    s = sc.stats
    assert s.skipped == {"unrecognised": 2, "malformed": 3}
    assert (s.graphs, s.graphs_incomplete, s.graphs_without_test) == (4, 1, 1)
    assert s.lines == len(DAMAGED.read_text().splitlines())
    meta, evs = events(DAMAGED)
    assert meta["source"]["lines"]["skipped"] == {"malformed": 3, "unrecognised": 2}
    last = of(evs, "graph")[-1]
    assert last["incomplete"] is True and "test" not in last
    assert (last["dur"] // US) == 3 + 2 + 1 + 2   # prelude, set_inputs, sched_eval, GET_ROWS; the cut line lost
    # the foreign line between quantize(q-0) and MUL_MAT(q-0) does not separate them
    g1 = [e for e in evs if e.get("graph") == 1]
    assert [o["op"] for o in of(g1, "op")][:4] == ["GET_ROWS", "RMS_NORM", "quantize", "MUL_MAT"]
    # the lost lines' time stays inside graph_compute: ffn_moe_logits' 4 us join the split's end
    assert rep_categories_us(DAMAGED) == [{
        "name": "tg2", "rep": 0, "wall": 309, "cpu_expert_matmul": 240, "cpu_other": 25,
        "thread_wakeup": 28, "copy": 4, "sched": 2, "graph_build": 8, "other": 2}]


def test_cuda_graph_launch_without_op_lines_is_counted(tmp_path):
    log = tmp_path / "graphs.log"
    log.write_text("prelude(...): 1 us\nggml_backend_sched_eval(.1.): 1 us\n"
                   "======== evaluate_and_capture_cuda_graph: graph with 90 nodes on device 0. time = 5\n"
                   "graph_compute(...): 400 us\nsched_reset(...): 1 us\n")
    sc = ik_log.scan(log)
    assert sc.stats.cuda_splits_without_ops == 1 and sc.cuda_devices == [0]
    assert ik_log.scan(CUDA_PP).stats.cuda_splits_without_ops == 0


def test_stretched_container_is_counted():
    s = ik_log.scan(CPU_TG).stats
    assert (s.stretched, s.stretched_us) == (1, 1)   # graph_compute 145 us around 146 us of lines


@pytest.mark.parametrize("text, expect", [
    ("MUL_MAT(ffn_moe_up-3): 812 us", ("op", "MUL_MAT", "ffn_moe_up-3", 812)),
    ("CPY(blk.0.attn_kv_b.weight (view) (copy) (transposed) (cont) (copy)): 9 us",
     ("op", "CPY", "blk.0.attn_kv_b.weight (view) (copy) (transposed) (cont) (copy)", 9)),
    ("ggml_backend_sched_eval(.2.): 3 us\r\n", ("split_setup", "ggml_backend_sched_eval", ".2.", 3)),
    ("set_inputs(mask1): 4 us", ("phase", "set_inputs", "mask1", 4)),
    ("======================== evaluate_and_capture_cuda_graph: graph with 731 nodes on device 1. "
     "time = 1731946123456", ("cuda_graph", "evaluate_and_capture_cuda_graph", "1", 0)),
    ("MUL_MAT(ffn_moe_up-3): 812 u", "malformed"),
    ("ggml_barrier(...): 12 usllama_perf_context_print: load time", "malformed"),
    ("ggml_backend_sched_eval(.3.): 1 us", "malformed"),
    ("llama_model_loader: - kv   0: general.architecture str = deepseek2", "unrecognised"),
    ("load_tensors: offloaded 28/28 layers to GPU", "unrecognised"),
    ("my_function(x): 3 us", "unrecognised"),
    ("", "blank"),
    ("| deepseek2 ?B Q8_0 | 2.21 MiB | 2.15 M | CPU | 2 | pp32 | 1.00 ± 0.00 |", "table"),
])
def test_parse_line(text, expect):
    got = ik_log.parse_line(text, 1)
    assert (got if isinstance(got, str) else (got.kind, got.key, got.arg, got.us)) == expect


# ---------------------------------------------------------------- llama-bench rows

def row(test, **cols):
    return ik_log.BenchRow(1, {"test": test, **{k: str(v) for k, v in cols.items()}})


def roles(test, n, **cols):
    got = ik_log.roles_for_row(row(test, **cols), n)
    return None if got is None else [(r.test, r.rep, r.n_tokens, r.n_past, r.role) for r in got]


def test_rows_split_into_warmup_and_repetitions():
    w = (None, -1, None, 0, "warmup")
    # pp1024 in n_ubatch 256: 4 graphs per repetition, after one warm-up
    assert roles("pp1024", 9, n_ubatch=256) == [w] + [("pp1024", r, 256, 256 * i, None)
                                                      for r in range(2) for i in range(4)]
    # pp+tg: warm-up prompt and token, then the prompt and the tokens, all timed
    assert roles("pp4+tg2", 5) == [w, (None, -1, 1, 0, "warmup"), ("pp4+tg2", 0, 4, 0, None),
                                   ("pp4+tg2", 0, 1, 4, None), ("pp4+tg2", 0, 1, 5, None)]
    # tg@pp: the prompt is untimed depth
    assert roles("tg1@pp8", 4) == [w, (None, -1, 1, 0, "warmup"), (None, -1, 8, 0, "depth"),
                                   ("tg1@pp8", 0, 1, 8, None)]
    assert roles("tg2", 4) == [("tg2", r, 1, i, None) for r in range(2) for i in range(2)]  # -w 0
    assert roles("tg3", 5) is None and roles("embd", 3) is None


def test_fields_of_test():
    assert ik_log.fields_of_test(row("tg64@pp512", **{"t/s": "55.50 ± 0.05"})) == {
        "name": "tg64@pp512", "kind": "tg", "n_prompt": 0, "n_gen": 64, "depth": 512, "n_tokens": 64,
        "tps": 55.5, "tps_std": 0.05}


# ---------------------------------------------------------------- every nanosecond inside its graph

@pytest.mark.parametrize("path", [CPU_TG, CPU_PP, CUDA_PP, DAMAGED, SAMPLE], ids=lambda p: p.name)
def test_graphs_contain_their_events(path):
    if not path.exists():
        pytest.skip(f"{path} not on this machine")
    _, evs = events(path)
    graphs = {g["graph"]: (g["ts"], g["ts"] + g["dur"]) for g in of(evs, "graph")}
    spans = sorted(graphs.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    splits = {(s["graph"], s["split"]): (s["ts"], s["ts"] + s["dur"]) for s in of(evs, "split")}
    for e in evs:
        assert e["dur"] >= 0
        if e["type"] not in ("graph", "test") and "graph" in e:
            lo, hi = graphs[e["graph"]]
            assert lo <= e["ts"] and e["ts"] + e["dur"] <= hi, e
        if e["type"] in ("op", "copy", "wakeup") and "split" in e:
            lo, hi = splits[(e["graph"], e["split"])]
            assert lo <= e["ts"] and e["ts"] + e["dur"] <= hi, e
    for t in of(evs, "test"):
        inside = [g for g in of(evs, "graph") if t["ts"] <= g["ts"] < t["ts"] + t["dur"]]
        assert all(g["ts"] + g["dur"] <= t["ts"] + t["dur"] and g.get("test") == t["name"] for g in inside)


# ---------------------------------------------------------------- the real sample

@pytest.mark.skipif(not SAMPLE.exists(), reason="the shared sample is not on this machine")
def test_real_sample_converts_and_matches_llama_bench():
    sc = ik_log.scan(SAMPLE)
    assert sc.stats.skipped == {"blank": 1} and sc.stats.rows_unmatched == []
    assert (sc.stats.graphs, sc.stats.loose_items) == (20, 40)   # 3 pp32 decodes, 17 tg8 decodes
    t = load_timings(SAMPLE)   # the analyzer's loader detects the format itself
    assert t.header["source"]["format"] == "ik_print_timing"
    a = attribute(t)
    for name in ("pp32", "tg8"):      # their t/s beside llama-bench's: tests/test_rate.py
        reps = a.reps[a.reps["name"] == name]
        assert len(reps) == 2 and (reps["n_graphs"] == (1 if name == "pp32" else 8)).all()
    _, evs = events(SAMPLE)
    experts = [o for o in of(evs, "op", graph=5) if "_exps" in o["name"]]
    # 3 MoE layers (2 of 5 dense) x (MOE_FUSED_UP_GATE + MUL_MAT_ID down)
    assert sorted(o["name"] for o in experts) == sorted(
        f"blk.{layer}.{w}" for layer in (2, 3, 4) for w in ("ffn_up_gate_exps", "ffn_down_exps"))


# ---------------------------------------------------------------- sniffing and the CLI

def test_looks_like_ik_log(tmp_path):
    assert all(ik_log.looks_like_ik_log(p) for p in (CPU_TG, CPU_PP, CUDA_PP, DAMAGED))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"type": "meta", "schema": "hyprof-timings/1"}\n')
    text = tmp_path / "notes.txt"
    text.write_text("MUL_MAT is the op\nprelude: none\n")
    assert not ik_log.looks_like_ik_log(jsonl) and not ik_log.looks_like_ik_log(text)
    assert not ik_log.looks_like_ik_log(tmp_path / "missing.log")


def test_cli_import_writes_a_timings_file(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert hyprof(["import", "ik", str(CUDA_PP), "-o", str(out)]) == 0
    assert "graphs" in capsys.readouterr().err
    written = out.read_text().splitlines()
    assert written[1:] == list(ik_log.convert(CUDA_PP))[1:]
    assert orjson.loads(written[0])["type"] == "meta"
    assert len(load_timings(out).events) == len(written) - 1
    assert hyprof(["import", "ik", str(CUDA_PP), "-o", str(out)]) == 2
    assert "file exists" in capsys.readouterr().err
    assert hyprof(["import", "ik", str(CUDA_PP), "-o", str(out), "--force"]) == 0


def test_cli_errors_and_explain(tmp_path, capsys):
    assert hyprof(["import", "ik", "--explain"]) == 0
    text = capsys.readouterr().out
    assert all(r.kind in text and r.category in text for r in ik_log.RULES)
    other = tmp_path / "other.txt"
    other.write_text("hello\n")
    assert hyprof(["import", "ik", str(other), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "no IK_PRINT_TIMING lines" in capsys.readouterr().err
    assert hyprof(["import", "ik", str(tmp_path / "nope.log"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert hyprof(["import", "ik", str(CPU_TG)]) == 2
    assert "-o TIMINGS is required" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")
