"""`hyprof diff` of two placements: the experts moved to the GPU show up where they should."""

from __future__ import annotations

import json

import pytest
from hybrid_stream import hybrid_stream, write_stream

from analysis.diff import diff_reports, diff_tables
from analysis.report import build_report
from analysis.timings import load_timings
from hyprof.cli import main


@pytest.fixture
def runs(tmp_path):
    a = write_stream(tmp_path / "experts-cpu.jsonl", hybrid_stream())
    b = write_stream(tmp_path / "experts-gpu.jsonl", hybrid_stream(experts_on="CUDA0"))
    return a, b


def test_moving_the_experts_to_the_gpu(runs):
    a, b = (build_report(load_timings(p)) for p in runs)
    d = diff_reports(a, b)
    assert [t.name for t in d.tests] == ["pp8", "tg3", "tg3@pp64"] and not d.only_a and not d.only_b
    for t in d.tests:
        change = {c.category: c for c in t.categories}
        assert t.tps_change_pct > 0 and t.b.tps > t.a.tps
        assert change["cpu_expert_matmul"].b_ms == 0 and change["cpu_expert_matmul"].change_pct == -100
        assert change["gpu_compute"].change_ms > 0 and change["thread_wakeup"].change_ms < 0
        assert change["wall"].change_ms == pytest.approx(sum(c.change_ms for c in t.categories[:-1]))
        assert change["wall"].a_ms == pytest.approx(t.a.wall_ns / 1e6 / t.a.n_tokens)
        first, second = t.ops[:2]
        assert (first.op, first.backend, first.b_ms) == ("MUL_MAT_ID", "CPU", 0)        # gone from the CPU
        assert (second.op, second.backend, second.a_ms) == ("MUL_MAT_ID", "CUDA0", 0)   # new on the GPU
        assert abs(first.change_ms) >= abs(second.change_ms) >= max(abs(o.change_ms) for o in t.ops[2:])
    tables = diff_tables(d)
    assert tables[1].title.startswith("pp8: ") and "t/s (+" in tables[1].title


def test_cli_tables_json_and_paired_plot(runs, tmp_path, capsys):
    a, b = runs
    assert main(["diff", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "hyprof-diff/1" and out["tests"][1]["name"] == "tg3"
    assert out["tests"][1]["tps_change_pct"] > 0
    assert main(["diff", str(a), str(b), "--plots", str(tmp_path / "d"), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "tg3: " in text and "ops whose time changed most" in text and "new" in text
    png = (tmp_path / "d" / "breakdown-diff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert main(["diff", str(a), str(b), "--plots", str(tmp_path / "d")]) == 2          # exists, no --force


def test_runs_without_common_tests(tmp_path, capsys):
    a = write_stream(tmp_path / "a.jsonl", hybrid_stream(tests=(("tg2", "tg", 0, 2, 0),)))
    b = write_stream(tmp_path / "b.jsonl", hybrid_stream(tests=(("tg4", "tg", 0, 4, 0),)))
    assert main(["diff", str(a), str(b)]) == 0
    assert "only in A ['tg2'], only in B ['tg4']" in capsys.readouterr().out
    assert main(["diff", str(a), str(b), "--plots", str(tmp_path / "p")]) == 2
    assert "no test name in common" in capsys.readouterr().err
