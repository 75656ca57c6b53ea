"""The llama-bench runner: test plans, sweeps, statistics, the timings file, Ctrl-C, the CLI.

The engine here is tests/fake_engine.py (real clock, no model); the same runner
drives hybrid.engine in `hyprof run`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import types

import pytest
from contract import check_timings_file
from fake_engine import FakeEngine, make_fake_engine

from hyprof.cli import main
from profiler.bench import BenchTest, run_bench, sweep, plan_tests
from profiler.bench_output import MD_COLUMNS, render_csv, render_json, render_markdown
from profiler.errors import UserError
from profiler.schema import EVENT_TYPES

PEAK = {"CPU": {"GBps": 30.0, "method": "given: test"}}


def configs(threads=(2,)):
    return sweep(threads=threads, n_gpu_layers=[99], override_sets=[[r"\.ffn_.*_exps\.=CPU"]],
                 accel="emulated")


def bench(tmp_path, tests, reps=2, threads=(2,), make=make_fake_engine, **kwargs):
    out = tmp_path / "t.jsonl"
    results = run_bench(make, "m.gguf", configs(threads), tests, reps, timings=str(out),
                        peak_bw=lambda t: PEAK, progress=False, **kwargs)
    return results, out


def test_plan_names_kinds_and_order_follow_llama_bench():
    tests = plan_tests(n_prompt=[512, 0], n_gen=[128], pg=[(64, 16)], depths=[0, 256])
    assert [(t.name, t.kind, t.n_prompt, t.n_gen, t.depth) for t in tests] == [
        ("pp512", "pp", 512, 0, 0), ("tg128", "tg", 0, 128, 0), ("pp64+tg16", "pg", 64, 16, 0),
        ("pp512@pp256", "pp", 512, 0, 256), ("tg128@pp256", "tg", 0, 128, 256),
        ("pp64+tg16@pp256", "pg", 64, 16, 256)]
    assert tests[2].n_tokens == 80


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_prompt=[0], n_gen=[0]), "-p 0 -n 0"),
    (dict(n_prompt=[-1], n_gen=[1]), "-p"),
    (dict(n_prompt=[0], n_gen=[0], pg=[(8, 0)]), "-pg"),
    (dict(n_prompt=[1], n_gen=[1], depths=[-5]), "-d"),
])
def test_impossible_plans_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        plan_tests(**kwargs)


def test_sweep_is_every_combination_last_flag_fastest():
    got = sweep(threads=[1, 2], n_gpu_layers=[0, 99], override_sets=[["a=CPU"], []],
                accel="none")
    assert [(c.threads, c.n_gpu_layers, c.overrides) for c in got] == [
        (t, n, o) for t in (1, 2) for n in (0, 99) for o in (("a=CPU",), ())]


def test_timings_file_meets_the_contract_and_holds_only_measured_repetitions(tmp_path):
    tests = plan_tests(n_prompt=[8], n_gen=[3], pg=[(4, 2)], depths=[0, 5])
    results, out = bench(tmp_path, tests, reps=3, threads=(1, 2))
    summary = check_timings_file(out, require_types=EVENT_TYPES)
    assert summary.unknown == {}
    assert summary.lanes == {"main", "ACC0", "cpu1", "cpu2"}

    header = summary.header
    assert header["peak_bw"] == PEAK and header["config"]["threads"] == 1
    assert [c["threads"] for c in header["sweep"]] == [1, 2]
    assert header["machine"]["cores"] >= 1 and header["placement"]["CPU"]["tensors"] == 12

    events = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    test_events = [e for e in events if e["type"] == "test"]
    assert len(test_events) == 2 * len(tests) * 3
    assert sorted((e["config"], e["name"], e["rep"]) for e in test_events) == sorted(
        (c, t.name, r) for c in (0, 1) for t in tests for r in range(3))
    # No warm-up or depth-prompt graph is written: only the timed graphs.
    per_rep = {t.name: (t.n_prompt > 0) + t.n_gen for t in tests}
    assert summary.counts["graph"] == 2 * 3 * sum(per_rep.values())

    assert len(results) == 2 * len(tests)
    for r in results:
        assert len(r.samples_ns) == 3 and r.avg_ts > 0 and r.stddev_ts >= 0
        assert r.backend == "ACC0+CPU (emulated)"
        mine = [e for e in test_events if e["config"] == r.config_index
                and e["name"] == r.test.name]
        assert sorted(e["dur"] for e in mine) == sorted(r.samples_ns)


def test_statistics_are_over_repetitions(tmp_path):
    results, _ = bench(tmp_path, [BenchTest("tg4", "tg", 0, 4)], reps=4)
    (r,) = results
    ts = [4e9 / ns for ns in r.samples_ns]
    assert r.samples_ts == pytest.approx(ts)
    assert r.avg_ts == pytest.approx(sum(ts) / 4)
    mean = sum(ts) / 4
    assert r.stddev_ts == pytest.approx((sum((x - mean) ** 2 for x in ts) / 3) ** 0.5)


def test_without_a_timings_file_nothing_is_recorded():
    seen = []

    def make(path, **kw):
        engine = FakeEngine(path, **kw)
        seen.append(engine)
        return engine

    results = run_bench(make, "m.gguf", configs(), [BenchTest("tg2", "tg", 0, 2)], 2,
                        progress=False)
    assert len(results) == 1 and not seen[0].recorder.enabled
    assert seen[0].recorder.drain() == [] and seen[0].closed


def test_ctrl_c_keeps_every_complete_graph_and_a_valid_file(tmp_path):
    engines = []

    def make(path, **kw):
        # Evaluations: warm-up (2), rep 0 (pp + 3 tg), rep 1 interrupted at its 2nd graph.
        engines.append(FakeEngine(path, **kw, interrupt_at_graph=2 + 4 + 1))
        return engines[-1]

    with pytest.raises(KeyboardInterrupt):
        bench(tmp_path, [BenchTest("pp4+tg3", "pg", 4, 3)], reps=3, make=make)
    out = tmp_path / "t.jsonl"
    assert engines[0].closed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    summary = check_timings_file(out, partial_tail=True)
    assert summary.counts["test"] == 1
    assert summary.counts["graph"] == 4 + 1          # rep 0, and rep 1's completed graph
    assert summary.n_graphs_outside_tests == 1
    with pytest.raises(AssertionError, match="test repetitions"):
        check_timings_file(out)                      # strict: the tail graph has no test


def test_renderers_show_every_row_and_field(tmp_path):
    results, _ = bench(tmp_path, plan_tests(n_prompt=[4], n_gen=[2]), reps=2, threads=(1, 2))
    md = render_markdown(results).splitlines()
    assert [c.strip() for c in md[0].strip("|").split("|")] == list(MD_COLUMNS)
    assert len(md) == 2 + 4 and all("±" in row for row in md[2:])
    assert r"\.ffn_.*_exps\.=CPU" in md[2] and "deepseek2 2M Q4_0" in md[2]

    rows = json.loads(render_json(results))
    assert [(r["n_threads"], r["test"]) for r in rows] == [(1, "pp4"), (1, "tg2"), (2, "pp4"),
                                                          (2, "tg2")]
    assert rows[0]["samples_ns"] == list(results[0].samples_ns)
    assert rows[0]["avg_ts"] == results[0].avg_ts and rows[0]["overrides"] == [
        r"\.ffn_.*_exps\.=CPU"]

    table = list(csv.DictReader(io.StringIO(render_csv(results))))
    assert len(table) == 4 and set(table[0]) == set(rows[0])
    assert json.loads(table[3]["samples_ns"]) == list(results[3].samples_ns)


def test_markdown_escapes_regex_alternation(tmp_path):
    results = run_bench(make_fake_engine, "m.gguf",
                        sweep(threads=[1], n_gpu_layers=[99], override_sets=[["(up|down)=CPU"]],
                              accel="none"), [BenchTest("tg1", "tg", 0, 1)], 1, progress=False)
    row = render_markdown(results).splitlines()[2]
    assert r"(up\|down)=CPU" in row and row.count(" | ") == len(MD_COLUMNS) - 1


# ---- the CLI, with the fake engine standing in for hybrid.engine ---------------------------

@pytest.fixture
def fake_hybrid_engine(monkeypatch):
    module = types.ModuleType("hybrid.engine")
    module.make_engine = make_fake_engine
    monkeypatch.setitem(sys.modules, "hybrid.engine", module)
    return module


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


def cli(*argv):
    return main(["run", *argv, "--no-progress", "--peak-bw", "30"])


def test_cli_prints_the_table_and_writes_timings(tmp_path, model, fake_hybrid_engine, capsys):
    out = tmp_path / "t.jsonl"
    rc = cli("-m", model, "-p", "8", "-n", "4", "-r", "2", "-t", "1,2", "--accel", "emulated",
             "-ot", r"\.ffn_.*_exps\.=CPU", "-o", str(out))
    std = capsys.readouterr()
    assert rc == 0, std.err
    table = std.out.splitlines()
    assert table[0].startswith("| model") and len(table) == 2 + 4
    summary = check_timings_file(out, require_types=EVENT_TYPES)
    assert summary.header["peak_bw"]["CPU"] == {"GBps": 30.0, "method": "given: --peak-bw"}
    assert summary.counts["test"] == 2 * 2 * 2


def test_cli_sweeps_override_sets_as_llama_bench(tmp_path, model, fake_hybrid_engine, capsys):
    rc = cli("-m", model, "-p", "0", "-n", "1", "-r", "1", "-ot", "a=CPU;b=ACC0,c=CPU",
             "-ot", "", "--output", "json")
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["overrides"] for r in rows] == [["a=CPU", "b=ACC0"], ["c=CPU"], []]


def test_cli_keeps_a_comma_inside_a_regex_quantifier_in_one_rule(model, fake_hybrid_engine, capsys):
    rc = cli("-m", model, "-p", "0", "-n", "1", "-r", "1", "-ot", r"blk\.\d{1,2}\.=CPU", "--output", "json")
    std = capsys.readouterr()
    assert rc == 0, std.err
    assert [r["overrides"] for r in json.loads(std.out)] == [[r"blk\.\d{1,2}\.=CPU"]]


@pytest.mark.parametrize("argv, message", [
    (["-p", "0", "-n", "0"], "nothing to run"),
    (["-o", "{existing}"], "exists"),
    (["-o", "{file}/t.jsonl"], "not a directory"),
    (["-o", "{dir}", "--force"], "is a directory"),
    (["-m", "/no/such.gguf"], "no such file"),
    (["-ot", "exps"], "-ot 'exps': expected REGEX=BACKEND"),
    (["-ot", "a=CPU;blk.(1=CPU"], "-ot 'blk.(1=CPU': invalid regex"),
    (["-r", "0"], "-r 0"),
    (["-t", "0"], "-t"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, model, fake_hybrid_engine, capsys,
                                              argv, message):
    existing = tmp_path / "existing.jsonl"
    existing.write_text("x")
    argv = [a.format(existing=existing, file=existing, dir=tmp_path) for a in argv]
    defaults = [] if "-p" in argv else ["-p", "1", "-n", "1"]
    defaults += [] if "-m" in argv else ["-m", model]
    assert cli(*defaults, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert existing.read_text() == "x"


def test_cli_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-such-flag"])
    assert e.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["-mla", "-fa", "-fmoe", "-rtr"])
def test_cli_switches_take_only_0_or_1(flag, capsys):
    """llama-bench's 0|1 flags: a 2 is a mistake to name, not a true value to run with."""
    with pytest.raises(SystemExit) as e:
        main(["run", flag, "0,2"])
    assert e.value.code == 2 and f"argument {flag}: '0,2': expected 0 or 1" in capsys.readouterr().err


def test_cli_ctrl_c_exits_130_with_a_valid_file(tmp_path, model, monkeypatch, capsys):
    module = types.ModuleType("hybrid.engine")
    module.make_engine = lambda path, **kw: FakeEngine(path, **kw, interrupt_at_graph=5)
    monkeypatch.setitem(sys.modules, "hybrid.engine", module)
    out = tmp_path / "t.jsonl"
    assert cli("-m", model, "-p", "0", "-n", "3", "-r", "3", "-o", str(out)) == 130
    assert "keeps every graph" in capsys.readouterr().err
    check_timings_file(out, partial_tail=True)


@pytest.mark.slow
def test_done_when_command_on_the_real_engine(tmp_path, tiny_gguf, capsys):
    """The issue's acceptance command, on the tiny model (needs hybrid.engine)."""
    pytest.importorskip("hybrid.engine")
    out = tmp_path / "t.jsonl"
    rc = main(["run", "-m", str(tiny_gguf), "-p", "64", "-n", "16", "-r", "3", "--accel",
               "emulated", "-ot", r"\.ffn_.*_exps\.=CPU", "-o", str(out), "--no-progress",
               "--peak-bw", "30"])
    assert rc == 0, capsys.readouterr().err
    summary = check_timings_file(out, require_types=EVENT_TYPES)
    assert {"main", "ACC0"} <= summary.lanes


@pytest.mark.slow
def test_sigint_on_the_real_engine_keeps_a_valid_file(tmp_path, tiny_gguf):
    """Ctrl-C as a user gives it: SIGINT to a `hyprof run` process in mid-run."""
    pytest.importorskip("hybrid.engine")
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "t.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "hyprof", "run", "-m", str(tiny_gguf), "-p", "0", "-n", "500",
         "-r", "3", "--accel", "emulated", "-ot", r"\.ffn_.*_exps\.=CPU", "-o", str(out),
         "--peak-bw", "30", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def graphs_written() -> int:
        return sum(p.read_bytes().count(b'"type":"graph"') for p in tmp_path.iterdir()
                   if p.name.endswith(".tmp"))

    deadline = time.monotonic() + 300
    while graphs_written() < 3:                      # a few graphs into the first repetition
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)             # faulthandler: every thread's stack
        pytest.fail("no exit 120 s after SIGINT:\n" + proc.communicate()[1].decode()[-8000:])
    assert proc.returncode == 130, err.decode()
    assert "keeps every graph" in err.decode() and "Traceback" not in err.decode()
    summary = check_timings_file(out, partial_tail=True, require_types=("graph", "op"))
    assert summary.counts["graph"] >= 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_measures_peak_bandwidth_once_and_caches_it(tmp_path, model, fake_hybrid_engine,
                                                        monkeypatch, capsys):
    from profiler import membw

    monkeypatch.setenv("HYPROF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(membw, "DEFAULT_ARRAY_BYTES", 4 << 20)
    for out in (tmp_path / "a.jsonl", tmp_path / "b.jsonl"):
        assert main(["run", "-m", model, "-p", "0", "-n", "1", "-r", "1", "-t", "1",
                     "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    a, b = (check_timings_file(tmp_path / f"{x}.jsonl").header["peak_bw"]["CPU"]
            for x in "ab")
    assert a == b and a["GBps"] > 0 and "1 threads" in a["method"]
    assert (tmp_path / "cache" / membw.CACHE_FILE).exists()


def test_cli_print_timing_lines_come_from_the_environment(model, fake_hybrid_engine,
                                                          monkeypatch, capsys):
    monkeypatch.setenv("HYPROF_PRINT_TIMING", "1")
    assert cli("-m", model, "-p", "0", "-n", "2", "-r", "1", "-t", "1") == 0
    err = capsys.readouterr().err.splitlines()
    # Measured repetition only (2 graphs), no warm-up, each event one line.
    assert sum(line.startswith("graph(tg2 ") for line in err) == 2
    assert any(re.fullmatch(r"MUL_MAT_ID\(blk\.0\.ffn_up_exps\) \[CPU/cpu1\]: \d+ us", line)
               for line in err)
    assert any(line.startswith("split(.1.) [CPU/main]: ") for line in err)
