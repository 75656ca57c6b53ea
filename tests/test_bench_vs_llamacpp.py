"""benchmarks/bench_vs_llamacpp.py: its bytes-per-token model, and (oracle) a run end to end.

The end-to-end run uses the tiny preset and a few tokens: it checks the shape of
the result (one row per engine and test, ratios against llama.cpp's row), not speed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_llamacpp.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_one_token_reads_what_the_placement_says(bench, tiny_gguf):
    from hybrid.gguf_model import load_model
    from hybrid.placement import backend_loads, place

    gguf = load_model(tiny_gguf)
    placement = place(gguf.tensors, [], 0, gguf.config.n_layer, ("CPU",), None)
    loads = backend_loads({n: t.n_bytes for n, t in gguf.tensors.items()}, gguf.config, placement)
    assert bench.weight_bytes_per_token(str(tiny_gguf), 1) == pytest.approx(
        sum(load.bytes_per_token for load in loads), rel=1e-6)


def test_a_large_batch_reads_every_weight_once(bench, tiny_gguf):
    from hybrid.gguf_model import load_model

    gguf = load_model(tiny_gguf)
    embd = gguf.tensors["token_embd.weight"].n_bytes
    rest = sum(t.n_bytes for t in gguf.tensors.values()) - embd
    n = 4096
    per_token = bench.weight_bytes_per_token(str(tiny_gguf), n)
    assert per_token == pytest.approx(rest / n + embd // gguf.config.n_vocab, rel=1e-6)
    ladder = [bench.weight_bytes_per_token(str(tiny_gguf), k) for k in (1, 2, 8, 64)]
    assert all(a > b for a, b in zip(ladder, ladder[1:]))


def test_a_missing_model_is_one_line_and_exit_2(bench, capsys, tmp_path):
    missing = tmp_path / "none.gguf"
    assert bench.main(["--model", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err


def test_ik_llama_bench_rows_follow_the_tests(bench, tmp_path):
    """ik_llama.cpp's llama-bench is run with the tests' prompts and generations, -fmoe 1 -rtr 1,
    and its per-repetition t/s land in the tests' order; a binary that fails, or prints no
    row for a test, is one UserError naming --ik-bench."""
    from profiler.bench import plan_tests
    from profiler.errors import UserError

    args_file = tmp_path / "args"
    fake = tmp_path / "llama-bench"
    rows = [{"n_prompt": 64, "n_gen": 0, "samples_ts": [300.0, 310.0]},
            {"n_prompt": 0, "n_gen": 32, "samples_ts": [60.0, 62.0]}]
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {args_file}\necho '{json.dumps(rows)}'\n")
    fake.chmod(0o755)
    tests = plan_tests(n_prompt=[64], n_gen=[32])
    got = bench.ik_llama_bench(str(fake), "m.gguf", tests, threads=2, reps=2)
    assert [r.samples_ts for r in got] == [(300.0, 310.0), (60.0, 62.0)] and got[1].avg_ts == 61.0
    assert args_file.read_text().split() == ["-m", "m.gguf", "-t", "2", "-r", "2", "-fmoe", "1", "-rtr", "1",
                                             "-o", "json", "-p", "64", "-n", "32"]
    with pytest.raises(UserError, match="--ik-bench .*no tg64"):
        bench.ik_llama_bench(str(fake), "m.gguf", plan_tests(n_prompt=[64], n_gen=[64]), 2, 2)
    with pytest.raises(UserError, match="--ik-bench .*did not run"):
        bench.ik_llama_bench(str(tmp_path / "missing"), "m.gguf", tests, 2, 2)


@pytest.mark.oracle
def test_llama_cpp_engine_returns_the_greedy_token(bench, tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from profiler.recorder import Recorder

    tokens = [5, 17, 3, 99, 42]
    engine = bench.LlamaCppEngine(str(tiny_gguf), threads=1, n_batch=8, n_ctx=64,
                                  recorder=Recorder(enabled=False))
    try:
        first = engine.eval(tokens, "pp5")
        second = engine.eval([first], "tg1")
        engine.reset()
        assert engine.eval(tokens, "pp5") == first          # reset empties the cache
    finally:
        engine.close()
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)
    llm.eval(tokens + [first])
    scores = np.asarray(llm.scores[: len(tokens) + 1])
    assert first == int(scores[len(tokens) - 1].argmax())
    assert second == int(scores[len(tokens)].argmax())


@pytest.mark.oracle
def test_compare_gives_one_row_per_engine_and_test(bench, tiny_gguf):
    pytest.importorskip("llama_cpp")
    result = bench.compare(str(tiny_gguf), threads=1, n_prompt=[4], n_gen=[2], reps=2, rounds=2,
                           emulated=True, progress=False)
    assert result["hyprof_unavailable"] is None
    rows = result["rows"]
    engines = ["llama.cpp", "hyprof CPU", "hyprof ACC0+CPU (emul.)"]
    assert [(r["engine"], r["test"]) for r in rows] == [(e, t) for e in engines
                                                        for t in ("pp4", "tg2")]
    base = {r["test"]: r for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        assert len(r["samples_tps"]) == 4 and all(s > 0 for s in r["samples_tps"])   # 2 rounds of 2
        assert r["tps"] == pytest.approx(np.mean(r["samples_tps"]))
        assert r["best_tps"] == max(r["samples_tps"])
        assert r["GBps"] == pytest.approx(r["bytes_per_token"] * r["tps"] / 1e9)
        if r["engine"] == "llama.cpp":
            assert r["ratio"] is None and r["ratio_best"] is None
        else:
            mine, theirs = (np.reshape(x["samples_tps"], (2, 2)).mean(1) for x in (r, base[r["test"]]))
            assert r["round_ratios"] == pytest.approx(list(mine / theirs))      # rounds in order
            assert r["ratio"] == pytest.approx(np.median(r["round_ratios"]))
            assert r["ratio_best"] == pytest.approx(r["best_tps"] / base[r["test"]]["best_tps"])
    assert len(result["loadavg_before"]) == 3 and result["llama_cpp"]["version"]
    json.dumps(result)
    table = bench.render(result)
    assert sum(line.startswith("| hyprof") for line in table.splitlines()) == 4
    assert "load average" in table


@pytest.mark.oracle
def test_without_the_engine_llama_cpp_runs_alone_and_says_why(bench, tiny_gguf, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setitem(sys.modules, "hybrid.engine", None)      # import fails
    result = bench.compare(str(tiny_gguf), threads=1, n_prompt=[4], n_gen=[0], reps=1,
                           progress=False)
    assert [r["engine"] for r in result["rows"]] == ["llama.cpp"]
    assert "hybrid.engine" in result["hyprof_unavailable"]
    assert "hyprof engine not available: " in bench.render(result)
