"""`hyprof report` from the command line: tables, --json, --md, flags, and one-line errors."""

from __future__ import annotations

import json

import orjson
import pytest

from hyprof.cli import main

HEADER = {"type": "meta", "schema": "hyprof-timings/1", "peak_bw": {"CPU": {"GBps": 10.0}}}
EVENTS = [
    {"type": "test", "ts": 0, "dur": 2000, "name": "tg2", "kind": "tg", "n_tokens": 2, "rep": 0},
    {"type": "graph", "ts": 0, "dur": 1000, "graph": 0, "n_tokens": 1},
    {"type": "split", "ts": 0, "dur": 900, "graph": 0, "split": 0, "backend": "CPU", "n_nodes": 4, "n_inputs": 1},
    {"type": "op", "ts": 100, "dur": 500, "graph": 0, "split": 0, "backend": "CPU", "tid": "cpu1",
     "op": "MUL_MAT_ID", "name": "blk.0.ffn_up_exps", "layer": 0, "bytes": 2500},
    {"type": "graph", "ts": 1000, "dur": 1000, "graph": 1, "n_tokens": 1},
    {"type": "op", "ts": 1000, "dur": 500, "graph": 1, "split": 0, "backend": "CPU", "tid": "cpu1",
     "op": "MUL_MAT_ID", "name": "blk.0.ffn_up_exps", "layer": 0, "bytes": 2500},
]


@pytest.fixture
def timings_file(tmp_path):
    path = tmp_path / "run1.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in [HEADER, *EVENTS]))
    return path


def test_tables(timings_file, capsys):
    assert main(["report", str(timings_file), "--layers", "--splits", "--graphs"]) == 0
    out = capsys.readouterr().out
    assert "tg2: 1,000,000.00 ± 0.00 t/s — 2 tokens in 0.000 s (1 rep)" in out
    assert "op timing breakdown" in out and "per layer" in out and "per split" in out and "graphs (ms)" in out
    assert "CPU experts: 5.0 GB/s = 50.0 % of the 10.0 GB/s peak" in out


def test_json(timings_file, capsys):
    assert main(["report", str(timings_file), "--json", "--peak-bw", "20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == "hyprof-report/1" and report["source"] == str(timings_file)
    (test,) = report["tests"]
    assert test["categories_s"]["cpu_expert_matmul"] == pytest.approx(1e-6)
    assert test["categories_s"]["sched"] == pytest.approx(0.1e-6)           # split 0..900 before its op
    assert test["categories_s"]["thread_wakeup"] == pytest.approx(0.3e-6)   # join: op end 600 .. split end
    assert test["bandwidth"]["cpu_expert_fraction_of_peak"] == pytest.approx(0.25)


def test_markdown_default_location_and_explicit_file(timings_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(timings_file), "--md"]) == 0
    assert (tmp_path / "reports" / "run1.md").read_text().startswith("# hyprof report")
    assert main(["report", str(timings_file), "--md"]) == 0          # the default file is replaced
    out = tmp_path / "r.md"
    assert main(["report", str(timings_file), "--md", str(out)]) == 0
    assert "## tg2: op timing breakdown" in out.read_text()
    assert main(["report", str(timings_file), "--md", str(out)]) == 2   # exists, no --force
    assert "--md" in capsys.readouterr().err
    assert main(["report", str(timings_file), "--md", str(out), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["--peak-bw", "0"], "--peak-bw 0.0: must be a positive"),
    (["--peak-bw", "-3"], "--peak-bw -3.0: must be a positive"),
])
def test_bad_flags(timings_file, capsys, args, message):
    assert main(["report", str(timings_file), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "meta", "schema": "hyprof-timings/1"}\n{"type": "op", "ts": 1}\n{"type": "op", "ts": 1, "dur": 1}\n')
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"hyprof: error: {bad}:2: event has no 'dur'\n"
    assert main(["report", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_warnings_go_to_stderr_with_json(tmp_path, capsys):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(orjson.dumps(HEADER) + b"\n" + orjson.dumps(EVENTS[1]) + b'\n{"type": "op", "ts"')
    assert main(["report", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warnings"] == [f"{path}:3: truncated last line ignored"]
    assert "truncated last line ignored" in captured.err


def test_imported_log_shows_llama_bench_tps_and_model_and_per_decode_breakdown(tmp_path, capsys):
    log = "tests/data/ik_cuda_pp.log"      # its llama-bench row: pp4, 2962.96 ± 0.00 t/s
    assert main(["report", log, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert captured.err == ""                                   # no warning about the importer's own fields
    assert report["model"] == "deepseek2 16B Q4_0" and report["skipped"] == {"event_types": {}, "fields": {}}
    (test,) = report["tests"]
    assert (test["reported_tps"], test["reported_tps_std"]) == (2962.96, 0.0)
    assert test["tps"] > 0 and test["bandwidth"]["cpu_expert_GBps"] is None      # the log has no bytes
    md = tmp_path / "ik.md"
    assert main(["report", log, "--graphs", "--md", str(md)]) == 0
    out = capsys.readouterr().out
    assert "t/s (reported by llama-bench: 2,962.96 ± 0.00) — 4 tokens" in out and "deepseek2 16B Q4_0" in out
    assert "t/s: llama-bench's statistic" in out and "llama-bench's own used its clock" in out
    assert "graphs (ms)" in out and "(reported by llama-bench: 2,962.96" in md.read_text()
    assert "CPU experts:" not in out                            # no bytes, no bandwidth line


def test_unknown_fields_are_noted_once_not_warned(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in [HEADER, *[{**e, "color": "red"} for e in EVENTS]]))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("color (6)") == 1 and "warning" not in out.lower()
    assert main(["report", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["skipped"]["fields"] == {"color": 6}


def test_sweep_combinations_are_separate_tests(tmp_path, capsys):
    header = {**HEADER, "sweep": [{"threads": 1, "n_gpu_layers": 99}, {"threads": 2, "n_gpu_layers": 99}]}
    second = [{**e, "ts": e["ts"] + 5000, **({"graph": e["graph"] + 2} if "graph" in e else {})} for e in EVENTS]
    events = [{**EVENTS[0], "config": 0}, *EVENTS[1:], {**second[0], "config": 1}, *second[1:]]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in [header, *events]))
    assert main(["report", str(path), "--json"]) == 0
    names = [t["name"] for t in json.loads(capsys.readouterr().out)["tests"]]
    assert names == ["tg2 [t=1]", "tg2 [t=2]"]                  # one test each, not one test of 2 reps
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sweep            t=1, t=2" in out and "tg2 [t=2]: 1,000,000.00 ± 0.00 t/s" in out
