"""The report: ik_llama.cpp's DeepSeek-Lite numbers replayed, bandwidth over unions, what-if, tables."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from rich.console import Console

from analysis import render_console, render_markdown
from analysis.report import build_report
from analysis.tables import report_tables
from analysis.timings import load_lines
from analysis.whatif import whatif_tps
from profiler.rate import token_rate
from profiler.schema import CATEGORIES

MS = 1_000_000


def deepseek_lite_stream():
    """ik_llama.cpp's author, DeepSeek-Lite tg with the experts on the CPU: 640 tokens (5 x tg128) in
    11.53 s, of which CPU experts 8.42 s, GPU 1.23 s, the rest graph build, thread start, split
    scheduling and copies; 730 MB of expert weights per token; 64 GB/s peak. Per token (ns):
    graph_build 187500, GPU split setup 1000000, GPU 1921875 (main thread in sync), CPU split setup
    984375, copy 359375, wakeup 406250, experts 13156250 on two lanes (365 MB each)."""
    yield {"type": "meta", "schema": "hyprof-timings/1", "config": {"accel": "CUDA0"},
           "peak_bw": {"CPU": {"GBps": 64.0, "method": "measured: stream triad"}}}
    ts, g = 0, 0
    for rep in range(5):
        t0, events = ts, []
        for tok in range(128):
            events += [
                {"type": "graph", "ts": ts, "dur": 18015625, "graph": g, "n_tokens": 1, "n_past": tok},
                {"type": "phase", "ts": ts, "dur": 187500, "graph": g, "name": "graph_build", "tid": "main"}]
            s0 = ts + 187500
            events += [
                {"type": "split", "ts": s0, "dur": 2921875, "graph": g, "split": 0, "backend": "CUDA0", "tid": "main"},
                {"type": "op", "ts": s0 + MS, "dur": 1921875, "graph": g, "split": 0, "backend": "CUDA0",
                 "tid": "CUDA0", "op": "MUL_MAT", "name": "blk.1.attn_q", "layer": 1, "bytes": 50_000_000},
                {"type": "sync", "ts": s0 + MS, "dur": 1921875, "graph": g, "split": 0, "backend": "CUDA0"}]
            s1 = s0 + 2921875
            copy, dispatch = s1 + 984375, s1 + 984375 + 359375
            events += [
                {"type": "split", "ts": s1, "dur": 14906250, "graph": g, "split": 1, "backend": "CPU", "tid": "main"},
                {"type": "copy", "ts": copy, "dur": 359375, "graph": g, "split": 1, "src": "CUDA0", "dst": "CPU",
                 "bytes": 8192, "name": "ffn_inp", "tid": "main"},
                {"type": "wakeup", "ts": dispatch, "dur": 406250, "graph": g, "split": 1, "tid": "cpu1"},
                {"type": "wakeup", "ts": dispatch, "dur": 200000, "graph": g, "split": 1, "tid": "cpu2"}]
            events += [{"type": "op", "ts": dispatch + 406250, "dur": 13156250, "graph": g, "split": 1,
                        "backend": "CPU", "tid": lane, "op": "MUL_MAT_ID", "name": "blk.1.ffn_up_exps", "layer": 1,
                        "bytes": 365_000_000} for lane in ("cpu1", "cpu2")]
            ts, g = ts + 18015625, g + 1
        yield {"type": "test", "ts": t0, "dur": ts - t0, "name": "tg128", "kind": "tg", "n_prompt": 0,
               "n_gen": 128, "depth": 0, "rep": rep, "n_tokens": 128}
        yield from events
        ts += 7 * MS        # between repetitions: in no test


def report_of(events, peak_bw=None):
    return build_report(load_lines((orjson.dumps(e) for e in events), "t.jsonl"), peak_bw=peak_bw)


@pytest.fixture(scope="module")
def deepseek():
    return report_of(deepseek_lite_stream())


def test_deepseek_lite_replay_json(deepseek):
    (test,) = deepseek.to_json()["tests"]
    assert (test["name"], test["kind"], test["reps"], test["n_tokens"]) == ("tg128", "tg", 5, 640)
    assert test["wall_s"] == pytest.approx(11.53)
    assert round(test["tps"], 1) == 55.5 and test["tps_std"] == pytest.approx(0, abs=1e-9)
    assert test["categories_s"] == pytest.approx({
        "cpu_expert_matmul": 8.42, "cpu_other": 0.0, "gpu_compute": 1.23, "thread_wakeup": 0.26, "copy": 0.23,
        "sync": 0.0, "sched": 1.27, "graph_build": 0.12, "other": 0.0})
    assert sum(test["categories_s"].values()) == pytest.approx(test["wall_s"])
    bw = test["bandwidth"]
    assert round(bw["cpu_expert_GBps"], 1) == 55.5
    assert bw["cpu_expert_bytes_per_token"] == 730_000_000 and bw["cpu_peak_GBps"] == 64.0
    assert round(bw["cpu_expert_fraction_of_peak"], 3) == 0.867
    assert round(test["whatif_tps"]["no_overhead"]) == 66
    assert test["whatif_tps"]["cpu_expert_at_peak"] == pytest.approx(640 / (11.53 - 8.42 + 730e6 * 640 / 64e9))
    assert test["whatif_tps"]["bound"] == pytest.approx(64e9 / 730e6)       # only the CPU's peak is known
    assert test["copy_s"] == pytest.approx({"h2d": 0.0, "d2h": 0.23, "other": 0.0, "weights": 0.0})
    assert test["uploads"] == {"bytes": 0, "s": 0.0, "GBps": None, "count": 0, "bytes_per_token": 0.0}
    assert test["hidden_s"] == [{"category": "sync", "under": "gpu_compute", "s": pytest.approx(1.23)}]
    assert orjson.loads(orjson.dumps(deepseek.to_json()))["schema"] == "hyprof-report/1"


def test_deepseek_lite_replay_terminal_shows_the_figures(deepseek):
    console = Console(record=True, width=160)
    render_console.render(report_tables(deepseek), console)
    text = console.export_text()
    assert "tg128: 55.51 ± 0.00 t/s — 640 tokens in 11.530 s (5 reps)" in text
    for line in ("cpu_expert_matmul    8.420    73.0     13.156", "gpu_compute          1.230    10.7      1.922",
                 "overhead             1.880    16.3      2.938"):
        assert line in text
    assert "CPU experts: 55.5 GB/s = 86.7 % of the 64.0 GB/s peak, 730.0 MB read per token" in text
    assert "what-if: 66.3 t/s with the overhead removed" in text
    assert "MUL_MAT_ID" in text and "CUDA0 → CPU" in text


def test_markdown_has_the_same_tables(deepseek):
    md = render_markdown.render(report_tables(deepseek, layers=True, splits=True, graphs=True))
    assert md.startswith("# hyprof report\n")
    assert "## tg128: 55.51 ± 0.00 t/s" in md
    assert "| cpu_expert_matmul | 8.420 | 73.0 | 13.156 |" in md
    assert "## tg128: per split" in md and "## graphs (ms)" in md
    assert "- CPU experts: 55.5 GB/s = 86.7 %" in md


def test_peak_bw_flag_overrides_the_header(deepseek):
    r = report_of(deepseek_lite_stream(), peak_bw=100.0)
    assert r.tests[0].bandwidth["cpu_expert_fraction_of_peak"] == pytest.approx(0.5549, abs=1e-4)


def test_a_fraction_above_the_peak_says_why_and_what_to_do():
    """The peak comes with how and when it was measured; a fraction above 100 % (a cached
    peak from a slower minute of a shared machine) is explained, not left to puzzle over."""
    def text_of(report):
        console = Console(record=True, width=200)
        render_console.render(report_tables(report), console)
        return console.export_text()
    below = text_of(report_of(deepseek_lite_stream()))
    assert "CPU 64.0 GB/s (measured: stream triad)" in below and "above the peak" not in below
    above = text_of(report_of(deepseek_lite_stream(), peak_bw=50.0))
    assert "111.0 % of the 50.0 GB/s peak" in above and "(measured: stream triad)" not in above  # --peak-bw's
    assert "above the peak: the peak was measured at another time" in above and "or given too low" in above
    assert "hyprof membw --refresh" in above


def test_bandwidth_is_bytes_over_the_union_of_busy_time_and_op_table():
    ev = [{"type": "graph", "ts": 0, "dur": 1000, "graph": 0, "n_tokens": 2}]
    for lane, start in (("cpu1", 0), ("cpu2", 100), ("cpu3", 600)):   # union 0..500 and 600..800 = 700 ns
        ev.append({"type": "op", "ts": start, "dur": 400 if lane != "cpu3" else 200, "tid": lane, "backend": "CPU",
                   "op": "MUL_MAT_ID", "name": "blk.0.ffn_down_exps", "layer": 0, "bytes": 700})
    ev.append({"type": "op", "ts": 900, "dur": 100, "tid": "CUDA0", "backend": "CUDA0", "op": "ADD", "name": "x",
               "layer": 0, "bytes": 50})
    ev.append({"type": "copy", "ts": 850, "dur": 20, "src": "CPU", "dst": "CUDA0", "bytes": 40})
    (t,) = report_of([{"type": "meta", "schema": "hyprof-timings/1"}] + ev).tests
    assert t.bandwidth["cpu_expert_GBps"] == pytest.approx(2100 / 700)
    assert t.bandwidth["cpu_expert_bytes_per_token"] == 1050 and t.bandwidth["cpu_peak_GBps"] is None
    assert t.whatif_tps["cpu_expert_at_peak"] is None and t.whatif_tps["bound"] is None
    ops = {(str(o["op"]), str(o["backend"])): o for o in t.ops}
    mm = ops["MUL_MAT_ID", "CPU"]
    assert (mm["count"], mm["total_ns"], mm["busy_ns"], mm["bytes"]) == (3, 1000, 700, 2100)
    assert mm["mean_ns"] == pytest.approx(1000 / 3) and mm["pct"] == pytest.approx(100 * 1000 / 1100)
    (copy,) = t.copies
    assert (str(copy["direction"]), copy["bytes"], copy["GBps"]) == ("h2d", 40, 2.0)


def test_whatif_formulas():
    cats = {c: np.array([0]) for c in CATEGORIES} | {"cpu_expert_matmul": np.array([6_000_000_000]),
                                                     "gpu_compute": np.array([2_000_000_000]),
                                                     "sched": np.array([2_000_000_000])}
    w = whatif_tps(np.array([100]), cats, cpu_expert_bytes=np.array([100 * 10**9]), cpu_peak_GBps=50.0,
                   backend_bytes={"CPU": np.array([100 * 10**9]), "CUDA0": np.array([10**11])},
                   backend_peak_GBps={"CPU": 50.0, "CUDA0": 1000.0})
    assert w["no_overhead"] == pytest.approx(100 / 8)
    assert w["cpu_expert_at_peak"] == pytest.approx(100 / (10 - 6 + 2))
    assert w["bound"] == pytest.approx(100 / (2 + 0.1))
    offloaded = whatif_tps(np.array([100]), cats, cpu_expert_bytes=np.array([0]), cpu_peak_GBps=50.0,
                           backend_bytes={"CPU": np.array([10**3]), "ACC0": np.array([10**11])},
                           backend_peak_GBps={"CPU": 50.0})
    assert offloaded["bound"] is None, "a bound on the CPU's 1 kB of 100 GB"


def test_whatif_projects_each_repetition_then_takes_the_mean_rate():
    """Two repetitions of 100 tokens: 2 s and 4 s of compute, 0 s and 4 s of overhead. Without the
    overhead they take 2 s and 4 s: mean(50, 25) = 37.5 t/s, not 200 tokens / 6 s; measured, the
    rate is mean(50, 12.5) = 31.25 t/s, not 200 / 10 s."""
    cats = {c: np.array([0, 0]) for c in CATEGORIES} | {"cpu_other": np.array([2, 4]) * 10**9,
                                                        "sched": np.array([0, 4]) * 10**9}
    w = whatif_tps(np.array([100, 100]), cats, np.array([0, 0]), None, {}, {})
    assert w["no_overhead"] == pytest.approx(37.5)
    nothing_removed = whatif_tps(np.array([100, 100]), cats | {"sched": np.array([0, 0])}, np.array([0, 0]),
                                 None, {}, {})
    assert nothing_removed["no_overhead"] == token_rate([100, 100], [2 * 10**9, 4 * 10**9])[0]
    (test,) = report_of(two_repetitions(walls_ms=(2, 8), overhead_ms=(0, 4))).tests
    assert test.tps == pytest.approx(0.5 * (100 / 0.002 + 100 / 0.008))
    assert test.whatif_tps["no_overhead"] == pytest.approx(0.5 * (100 / 0.002 + 100 / 0.004))


def two_repetitions(walls_ms, overhead_ms):
    """tg100 twice: each repetition one graph of one CPU op, `overhead_ms` of it split setup."""
    events = [{"type": "meta", "schema": "hyprof-timings/1"}]
    ts = 0
    for rep, (wall, overhead) in enumerate(zip(walls_ms, overhead_ms)):
        events += [{"type": "test", "ts": ts, "dur": wall * MS, "name": "tg100", "kind": "tg", "n_prompt": 0,
                    "n_gen": 100, "depth": 0, "rep": rep, "n_tokens": 100},
                   {"type": "graph", "ts": ts, "dur": wall * MS, "graph": rep, "n_tokens": 100, "n_past": 0},
                   {"type": "phase", "ts": ts, "dur": overhead * MS, "graph": rep, "name": "split_setup",
                    "tid": "main"},
                   {"type": "op", "ts": ts + overhead * MS, "dur": (wall - overhead) * MS, "graph": rep, "split": 0,
                    "backend": "CPU", "tid": "main", "op": "ADD", "name": "x", "layer": 0}]
        ts += wall * MS
    return events


def test_the_runners_record_phases_are_the_recording_part_of_other():
    """`record` phases (the runner handing events to the writer) between graphs stay in `other`, and
    the report says how much of it they were, in the JSON and in the time table; one outside every
    repetition counts for none."""
    events = [{"type": "meta", "schema": "hyprof-timings/1"},
              {"type": "test", "ts": 0, "dur": 10 * MS, "name": "tg2", "kind": "tg", "n_prompt": 0, "n_gen": 2,
               "depth": 0, "rep": 0, "n_tokens": 2}]
    for g, ts in enumerate((0, 5 * MS)):
        events += [{"type": "graph", "ts": ts, "dur": 4 * MS, "graph": g, "n_tokens": 1, "n_past": g},
                   {"type": "op", "ts": ts, "dur": 4 * MS, "graph": g, "split": 0, "backend": "CPU", "tid": "main",
                    "op": "ADD", "name": "x", "layer": 0}]
    events += [{"type": "phase", "ts": 4 * MS, "dur": MS // 2, "name": "record", "tid": "main"},
               {"type": "phase", "ts": 9 * MS, "dur": MS // 4, "name": "record", "tid": "main"},
               {"type": "phase", "ts": 20 * MS, "dur": MS, "name": "record", "tid": "main"}]
    report = report_of(events)
    (test,) = report.to_json()["tests"]
    assert test["categories_s"]["other"] == pytest.approx(0.002)
    assert test["recording_s"] == pytest.approx(0.00075)
    console = Console(record=True, width=160)
    render_console.render(report_tables(report), console)
    assert "recording       0.001     7.5      0.375" in console.export_text()
