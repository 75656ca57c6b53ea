"""Plots from hand-built and engine-made timings: the files, and what each figure shows (its artists)."""

from __future__ import annotations

import pytest
from hybrid_stream import engine_run, hybrid_stream, write_stream

from analysis.attribution import attribute
from analysis.depth import depth_series
from analysis.plots import (CATEGORY_COLOURS, plot_bandwidth, plot_breakdown, plot_depth, plot_experts, plot_ops,
                            plot_timeline, write_plots)
from analysis.report import build_report
from analysis.run_info import describe_run
from analysis.timeline import token_timeline
from analysis.timings import load_timings
from hyprof.cli import main

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml", "pdf": b"%PDF"}


def analysed(path):
    t = load_timings(path)
    a = attribute(t)
    return t, a, build_report(t, attribution=a)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return analysed(write_stream(tmp_path_factory.mktemp("hand") / "hand.jsonl", hybrid_stream()))


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_gguf):
    return analysed(engine_run(tiny_gguf, tmp_path_factory.mktemp("engine") / "engine.jsonl"))


def gids(fig) -> set[str]:
    return {a.get_gid() for ax in fig.axes for a in ax.get_children() if a.get_gid()}


def texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_breakdown_has_every_category_of_each_test_and_the_rates(hand):
    t, a, report = hand
    fig = plot_breakdown([("", [(r.name, r) for r in report.tests])], "sub")
    present = {c for r in report.tests for c, ns in r.categories_ns.items() if ns}
    assert {g for g in gids(fig) if g.startswith("category:")} == {f"category:{c}" for c in present}
    bars = [p for p in fig.axes[0].patches if p.get_gid() == "category:cpu_expert_matmul"]
    tg = next(r for r in report.tests if r.name == "tg3")
    widths = sorted(round(p.get_width(), 6) for p in bars)
    assert round(100 * tg.categories_ns["cpu_expert_matmul"] / tg.wall_ns, 6) in widths
    for p in bars:    # the fixed, colour-blind-safe colour
        assert p.get_facecolor()[:3] == pytest.approx(tuple(int(CATEGORY_COLOURS["cpu_expert_matmul"][i:i + 2], 16)
                                                            / 255 for i in (1, 3, 5)))
    words = texts(fig)
    assert f"tg3 {tg.tps:,.1f} t/s" in words and "ms/tok" in words and "%" in words
    assert "smaller: " in words                     # tiny segments are named under the bar, not lost


def test_timeline_has_a_lane_per_host_thread_device_and_copies(hand):
    t, a, report = hand
    tl = token_timeline(t, a)
    assert tl.test == "tg3" and tl.n_tokens == 1 and tl.n_candidates == 6
    walls = sorted(int(g["wall_ns"]) for g in a.graphs if a.reps["name"][g["rep"]] == "tg3")
    assert tl.wall_ns == walls[(len(walls) - 1) // 2]              # the median-wall graph
    fig = plot_timeline(tl, "sub")
    lanes = [label.get_text() for label in fig.axes[0].get_yticklabels()]
    assert lanes == ["splits", "main", "cpu1", "cpu2", "CUDA0\n(device)", "copies"]
    assert {"category:cpu_expert_matmul", "category:gpu_compute", "category:thread_wakeup", "category:copy",
            "category:sync", "category:sched", "category:graph_build", "category:other",
            "backend:CPU", "backend:CUDA0"} <= gids(fig)
    assert "split 1: CPU" in texts(fig)


def test_ops_bandwidth_and_depth(hand):
    t, a, report = hand
    fig = plot_ops(report.tests, "sub")
    assert {"backend:CPU", "backend:CUDA0"} <= gids(fig)
    assert "MUL_MAT_ID ×" in texts(fig)
    fig = plot_bandwidth(report.tests, report.peak_GBps, "sub")
    assert {"peak:CPU", "peak:CUDA0", "category:cpu_expert_matmul", "category:gpu_compute", "backend:CPU"} <= gids(fig)
    bar = next(p for p in fig.axes[1].patches if p.get_gid() == "category:cpu_expert_matmul")
    assert bar.get_width() == pytest.approx(report.tests[1].bandwidth["cpu_expert_GBps"])
    (series,) = depth_series(report, t)
    assert (series.base, series.depths) == ("tg3", (0, 64))
    assert series.tests[1].tps < series.tests[0].tps           # attention grows with the KV cache
    fig = plot_depth([series], "sub")
    assert "series:tg3" in gids(fig) and "category:gpu_compute" in gids(fig)


def test_subtitle_names_model_placement_threads_and_machine(hand):
    sub = describe_run(hand[2].header, emulated=False)
    for part in ("DeepSeek-Lite-Q4_0.gguf", "-ngl 99", "-ot \\.ffn_.*_exps\\.=CPU", "2 threads", "Test CPU 16-core"):
        assert part in sub


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_write_plots_files(hand, tmp_path, fmt):
    t, a, report = hand
    paths = write_plots(t, report, a, tmp_path, fmt)
    assert [p.name for p in paths] == [f"{n}.{fmt}" for n in ("breakdown", "timeline", "ops", "bandwidth", "depth")]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(MAGIC[fmt]), p
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporary files left


def test_no_depth_plot_without_depth_tests(tmp_path):
    t, a, report = analysed(write_stream(tmp_path / "t.jsonl", hybrid_stream(tests=(("tg2", "tg", 0, 2, 0),))))
    names = [p.name for p in write_plots(t, report, a, tmp_path / "plots")]
    assert names == ["breakdown.png", "timeline.png", "ops.png", "bandwidth.png"]


def test_engine_made_timings(engine, tmp_path):
    t, a, report = engine
    tl = token_timeline(t, a)
    assert tl.test == "tg3" and {"main", "copies", "ACC0"} <= set(tl.lanes)
    fig = plot_timeline(tl, describe_run(report.header, report.emulated))
    assert {"category:gpu_compute", "category:cpu_expert_matmul", "backend:ACC0", "backend:CPU"} <= gids(fig)
    assert "EMULATED" in texts(fig) or "emulated" in texts(fig)
    names = [p.name for p in write_plots(t, report, a, tmp_path)]
    assert names == ["breakdown.png", "timeline.png", "ops.png", "bandwidth.png", "depth.png", "experts.png"]
    routed = [r for r in report.tests if r.experts is not None]
    assert [r.name for r in routed] == [r.name for r in report.tests]      # every test recorded its routes
    assert {f"{kind}:tg3" for kind in ("usage", "coverage", "lru")} <= gids(plot_experts(routed, ""))


def test_cli_plots_default_dir_and_refuses_existing_explicit_dir(hand, tmp_path, monkeypatch, capsys):
    src = write_stream(tmp_path / "run7.jsonl", hybrid_stream(tests=(("tg2", "tg", 0, 2, 0),)))
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(src), "--plots", "--plot-format", "svg"]) == 0
    assert sorted(p.name for p in (tmp_path / "reports" / "run7").iterdir()) == \
        ["bandwidth.svg", "breakdown.svg", "ops.svg", "timeline.svg"]
    assert main(["report", str(src), "--plots"]) == 0                  # the default dir is overwritten
    assert main(["report", str(src), "--plots", "reports/run7", "--plot-format", "svg"]) == 2
    assert "--plots reports/run7/breakdown.svg: file exists (use --force to overwrite)" in capsys.readouterr().err
    assert main(["report", str(src), "--plots", "reports/run7", "--plot-format", "svg", "--force"]) == 0
