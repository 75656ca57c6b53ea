"""`hyprof advise`: the cost model's arithmetic, rates measured from profiles, candidates, plans and the CLI."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from analysis.advise import (CLASSIC_RULE, Rate, Rates, SplitRate, Work, _line, candidates, measure_rates,
                             n_cpu_moe_rules, predict, prompt_upload_ns, rate_table)
from analysis.timings import load_lines
from analysis.whatif import whatif_tps
from hyprof.cli import main
from profiler.schema import CATEGORIES
from test_analysis_report import deepseek_lite_stream

MS = 1_000_000


def timings_of(events):
    return load_lines((orjson.dumps(e) for e in events), "t.jsonl")


# ---- the seed case: ik_llama.cpp's DeepSeek-Lite figures ---------------------------------------

def test_seed_deepseek_lite_reproduced_from_its_profile():
    """The seed's figures (DESIGN.md's report example): 640 tokens in 11.53 s, 730 MB of experts per
    token at 55.5 GB/s on the CPU, 1.23 s of GPU, 1.88 s of overhead. The rates measured from that
    profile, applied to the same placement's work, give back its 55.5 t/s; the no-overhead
    projection is the report's what-if (analysis/whatif.py, computed from the categories) within 2 %."""
    rates = measure_rates(timings_of(deepseek_lite_stream()))
    cpu = rates.rate("tg", "CPU", "expert")
    assert 1 / cpu.ns_per_unit == pytest.approx(730e6 / (8.42e9 / 640)) == pytest.approx(55.49, abs=0.01)
    gpu = rates.rate("tg", "CUDA0", "matmul")
    assert 50e6 * gpu.ns_per_unit == pytest.approx(1.23e9 / 640)
    work = Work(ops=(("CUDA0", "MUL_MAT", "blk.1.attn_q", 50_000_000, 0),
                     ("CPU", "MUL_MAT_ID", "blk.1.ffn_up_exps", 730_000_000, 0)),
                splits=("CUDA0", "CPU"), n_tokens=1)
    p = predict(work, rates, "tg")
    assert p.tps == pytest.approx(640 / 11.53, rel=1e-6)
    assert round(p.tps, 1) == 55.5
    assert p.terms_ns["overhead"] == pytest.approx(1.88e9 / 640)
    seed = {"cpu_expert_matmul": 8.42, "cpu_other": 0.0, "gpu_compute": 1.23, "thread_wakeup": 0.26, "copy": 0.23,
            "sync": 0.0, "sched": 1.27, "graph_build": 0.12, "other": 0.0}
    reference = whatif_tps(np.array([640]), {c: np.array([seed[c] * 1e9]) for c in CATEGORIES}, np.array([0.0]),
                           None, {}, {})["no_overhead"]
    assert p.no_overhead_tps == pytest.approx(reference, rel=0.02)
    assert round(p.no_overhead_tps, 1) == 66.3
    (cpu_row,) = [r for r in rate_table(rates) if r["backend"] == "CPU"]
    assert round(cpu_row["fraction_of_peak"], 3) == 0.867        # the report's, of the header's 64 GB/s


def test_seed_projected_to_another_placement():
    """Half the experts' bytes moved to the GPU at its measured rate: the hand-worked time per token."""
    rates = measure_rates(timings_of(deepseek_lite_stream()))
    work = Work(ops=(("CUDA0", "MUL_MAT", "blk.1.attn_q", 50_000_000, 0),
                     ("CUDA0", "MUL_MAT_ID", "blk.2.ffn_up_exps", 365_000_000, 0),
                     ("CPU", "MUL_MAT_ID", "blk.1.ffn_up_exps", 365_000_000, 0)),
                splits=("CUDA0", "CPU"), n_tokens=1)
    gpu_ns_per_byte = (1.23e9 / 640) / 50e6
    expected_ns = 415e6 * gpu_ns_per_byte + 365e6 / (730e6 / (8.42e9 / 640)) + 1.88e9 / 640
    p = predict(work, rates, "tg")
    assert p.ns == pytest.approx(expected_ns, rel=1e-9)
    assert p.terms_ns["CUDA0 expert"] == pytest.approx(365e6 * gpu_ns_per_byte)    # borrowed from its matmuls
    assert any("borrowed from CUDA0 matmul" in n for n in p.notes)


# ---- rates from a profile ----------------------------------------------------------------------

def _profile():
    """Two tg repetitions of 2 tokens; per token: an ACC0 split (3 matmuls of 1, 2 and 4 MB taking
    20 us + 0.5 ns a byte each, and 2 glue ops of 7 us) then a CPU split (an expert op on two lanes, 5 MB
    each), a record phase of 50 us after each graph (left out of the overhead)."""
    yield {"type": "meta", "schema": "hyprof-timings/1", "config": {"accel": "ACC0 (emulated)"}}
    ts, g = 0, 0
    for rep in range(2):
        t0, events = ts, []
        for tok in range(2):
            start = ts
            events.append({"type": "phase", "ts": ts, "dur": 100_000, "graph": g, "name": "graph_build", "tid": "main"})
            ts += 100_000
            s0, t = ts, ts + 30_000                                    # split setup 30 us
            for i, mb in enumerate((1, 2, 4)):
                dur = 20_000 + mb * 500_000                            # 20 us + 2 GB/s
                events.append({"type": "op", "ts": t, "dur": dur, "graph": g, "split": 0, "backend": "ACC0",
                               "tid": "ACC0", "op": "MUL_MAT", "name": f"blk.{i}.attn_q", "bytes": mb * 1_000_000})
                t += dur
            for i in range(2):
                events.append({"type": "op", "ts": t, "dur": 7_000, "graph": g, "split": 0, "backend": "ACC0",
                               "tid": "ACC0", "op": "ADD", "name": f"ffn_out-{i}", "bytes": 0})
                t += 7_000
            t += 40_000                                                # sync after the last op
            events.append({"type": "split", "ts": s0, "dur": t - s0, "graph": g, "split": 0, "backend": "ACC0",
                           "tid": "main"})
            s1 = t
            t += 60_000                                                # copy + wakeup
            for lane, late in (("main", 0), ("cpu1", 5_000)):          # two lanes: the op spans both
                events.append({"type": "op", "ts": t + late, "dur": 1_000_000 - late, "graph": g, "split": 1,
                               "backend": "CPU", "tid": lane, "op": "MUL_MAT_ID", "name": "blk.1.ffn_up_exps",
                               "bytes": 5_000_000})
            t += 1_000_000 + 10_000                                    # join
            events.append({"type": "split", "ts": s1, "dur": t - s1, "graph": g, "split": 1, "backend": "CPU",
                           "tid": "main"})
            events.append({"type": "graph", "ts": start, "dur": t - start, "graph": g, "n_tokens": 1, "n_past": tok})
            events.append({"type": "phase", "ts": t, "dur": 50_000, "graph": g, "name": "record", "tid": "main"})
            ts, g = t + 50_000, g + 1
        yield {"type": "test", "ts": t0, "dur": ts - t0, "name": "tg2", "kind": "tg", "n_prompt": 0, "n_gen": 2,
               "depth": 0, "rep": rep, "n_tokens": 2}
        yield from events


def test_rates_of_a_profile_hand_worked():
    r = measure_rates(timings_of(_profile()))
    mm = r.op["tg", "ACC0", "matmul"]
    assert (mm.ns_per_op, mm.ns_per_unit, mm.n_ops) == (pytest.approx(20_000), pytest.approx(0.5), 12)
    assert r.op["tg", "ACC0", "glue"].ns_per_op == pytest.approx(7_000)
    ex = r.op["tg", "CPU", "expert"]     # one size: through the origin, 1 ms per 2 lanes x 5 MB
    assert (ex.ns_per_op, ex.ns_per_unit, ex.n_ops) == (0.0, pytest.approx(1_000_000 / 10e6), 4)
    assert r.split_ns["tg", "ACC0"].ns == pytest.approx(30_000 + 40_000)      # 5 ops in every split: a mean
    assert r.split_ns["tg", "CPU"].ns == pytest.approx(60_000 + 10_000)
    assert r.split_ns["tg", "CPU"].gap_ns == 0.0
    assert r.graph_ns["tg"] == pytest.approx(100_000)     # the record phases are not the engine's
    assert r.rate("tg", "CPU", "glue").source == "borrowed from ACC0 glue"
    assert r.rate("tg", "CPU", "matmul").source == "borrowed from CPU expert"


def test_prediction_of_the_profiled_placement_is_its_measured_rate():
    t = timings_of(_profile())
    r = measure_rates(t)
    work = Work(ops=tuple(("ACC0", "MUL_MAT", f"blk.{i}.attn_q", mb * 1_000_000, 0) for i, mb in enumerate((1, 2, 4)))
                + (("ACC0", "ADD", "ffn_out-0", 0, 0), ("ACC0", "ADD", "ffn_out-1", 0, 0),
                   ("CPU", "MUL_MAT_ID", "blk.1.ffn_up_exps", 10_000_000, 0)),
                splits=("ACC0", "CPU"), n_tokens=1)
    token_ns = 100_000 + 30_000 + 3 * 20_000 + 7 * 500_000 + 2 * 7_000 + 40_000 + 60_000 + 1_000_000 + 10_000
    assert predict(work, r, "tg").tps == pytest.approx(1e9 / token_ns)


def test_unmeasured_rates_are_declared_or_free():
    from analysis.advise import declare_rates

    r = Rates({("tg", "CPU", "expert"): Rate(0.0, 0.1, 5)}, {}, {"tg": 0.0}, 0)
    d = declare_rates(r, "CUDA0", gpu_GBps=1000.0, gpu_tflops=100.0)
    assert d.rate("tg", "CUDA0", "matmul").ns_per_unit == pytest.approx(1e-3)
    assert d.rate("pp", "CUDA0", "expert").ns_per_unit == pytest.approx(1e-5)
    assert d.rate("tg", "CPU", "expert") == r.op["tg", "CPU", "expert"]        # measured wins
    assert Rates({}, {}, {}, 0).rate("tg", "CPU", "glue").source.startswith("unmeasured")
    assert prompt_upload_ns(0, 25.0) == 0.0 and prompt_upload_ns(25_000, 25.0) == pytest.approx(1000.0)


# ---- candidates --------------------------------------------------------------------------------

TINY_NAMES = (["token_embd.weight", "output_norm.weight", "output.weight"]
              + [f"blk.{il}.{t}.weight" for il in range(3) for t in ("attn_norm", "attn_q", "ffn_norm")]
              + [f"blk.0.ffn_{p}.weight" for p in ("gate", "up", "down")]
              + [f"blk.{il}.ffn_{p}_{k}.weight" for il in (1, 2) for p in ("gate", "up", "down")
                 for k in ("exps", "shexp")])


def test_n_cpu_moe_rules_are_llama_cpp_s():
    """common/arg.cpp: --n-cpu-moe N adds `blk\\.%d\\.ffn_(up|down|gate)_exps=CPU` for i < N."""
    assert n_cpu_moe_rules(3, [1, 2, 3]) == [r"blk\.1\.ffn_(up|down|gate)_exps=CPU",
                                             r"blk\.2\.ffn_(up|down|gate)_exps=CPU"]
    assert n_cpu_moe_rules(0, [1, 2]) == []


def test_candidates_cover_the_placements_and_name_only_the_cpu():
    cs = candidates(TINY_NAMES, 3, "ACC0")
    assert cs[0].ngl == 99 and cs[0].ot == (CLASSIC_RULE,)
    # expert splits: classic + 2 MoE layers x (whole, down, gate+up); x 2^3 sides; + -ngl 0..3
    assert len(cs) == (1 + 2 * 3) * 8 + 4
    assert all(rule.endswith("=CPU") for c in cs for rule in c.ot)
    assert len({(c.ngl, c.ot) for c in cs}) == len(cs)
    words = {c.words for c in cs}
    assert "experts on ACC0" in words and "-ngl 0: nothing on ACC0, experts on CPU" in words
    assert "experts of layer 1 on CPU, layer 2 on ACC0; output head on CPU" in words
    assert "experts on CPU but layer 1's down and layer 2 on ACC0" in words


# ---- plans (the engine's own graph and split rule) ----------------------------------------------

@pytest.fixture(scope="module")
def planner(tiny_gguf):
    from hybrid.gguf_model import load_model
    from hybrid.plans import Planner

    return Planner(load_model(tiny_gguf), backends=("CPU", "ACC0"), accel="ACC0", n_ctx=64, n_prompt=8, n_kv=4)


def test_plan_counts_what_the_engine_runs(planner, tiny_gguf):
    """The plan's splits are the engine's, and its VRAM the tensor table's bytes plus the KV cache."""
    from hybrid.engine import Engine
    from hybrid.model import kv_cache_bytes

    plan = planner.plan(99, [CLASSIC_RULE])
    tensors = planner.gguf.tensors
    assert plan.vram_parts["weights"] == sum(t.n_bytes for n, t in tensors.items()
                                             if "_exps." not in n and not n.startswith("token_embd"))
    assert plan.vram_parts["kv_cache"] == kv_cache_bytes(planner.config, 64, False)
    with Engine(str(tiny_gguf), threads=1, n_gpu_layers=99, overrides=[CLASSIC_RULE], accel="emulated",
                fmoe=1, fa=1, n_ctx=64) as engine:
        engine.eval([1], "tg1")
        assert plan.work["tg"]["splits"] == tuple(s.backend for s in engine.last_plan.splits)
    expert_bytes = [row[3] for row in plan.work["tg"]["ops"] if "_exps" in row[2]]
    c = planner.config
    per_expert = sum(tensors[f"blk.1.ffn_{p}_exps.weight"].n_bytes for p in ("gate", "up", "down")) // c.n_expert
    assert sum(expert_bytes) == 2 * c.n_expert_used * per_expert        # 2 MoE layers, n_expert_used each
    none = planner.plan(0, [])
    assert none.vram_bytes == 0 and set(none.work["tg"]["splits"]) == {"CPU"}


# ---- the command ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("700MiB", 700 << 20), ("8GiB", 8 << 30), ("1.5G", 3 << 29),
                                            ("24GB", 24_000_000_000), ("4096", 4096), ("64k", 64 << 10)])
def test_parse_size(text, expected):
    from hyprof.commands.advise import parse_size

    assert parse_size(text) == expected


def test_budget_below_the_non_expert_weights_is_one_line(tiny_gguf, capsys):
    assert main(["advise", "-m", str(tiny_gguf), "--vram", "1KiB", "--accel", "emulated", "-c", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("hyprof: error: --vram 0.0 MiB is too small: the non-expert weights alone need")
    assert "at least" in err


@pytest.mark.parametrize("argv, message", [
    (["--vram", "lots"], "expected a size such as 700MiB"),
    (["--vram", "1GiB", "--verify", "-1"], "--verify -1: must be >= 0"),
    (["--vram", "1GiB", "--profile", "/nonexistent.jsonl"], "--profile /nonexistent.jsonl: no such file"),
    (["--vram", "1GiB", "--plot", "x.gif"], "must end in .png, .svg or .pdf"),
    (["--vram", "1GiB", "-t", "0"], "must be > 0"),
])
def test_bad_arguments(tiny_gguf, capsys, argv, message):
    try:
        code = main(["advise", "-m", str(tiny_gguf), "--accel", "emulated", *argv])
    except SystemExit as e:         # argparse's own refusals
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_advise_calibrates_ranks_and_verifies(tiny_gguf, tmp_path, capsys):
    plot = tmp_path / "advice.svg"
    argv = ["advise", "-m", str(tiny_gguf), "--vram", "1.6MiB", "--accel", "emulated", "-t", "1", "-c", "64",
            "-p", "8", "-n", "4", "-r", "1", "--verify", "2", "--json", "--no-progress", "--plot", str(plot),
            "--peak-bw", "25"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "hyprof-advice/1" and out["emulated"] and out["n_prompt"] == 8
    cands = out["candidates"]
    assert cands and all(c["vram_bytes"] <= 1.6 * (1 << 20) for c in cands)
    assert len(cands) < out["n_placements"]                 # the budget left some out
    assert [c["tg_tps"] for c in cands] == sorted((c["tg_tps"] for c in cands), reverse=True)
    verified = [c for c in cands if "measured_tg_tps" in c]         # the top 2, then ranked again from both
    assert len(verified) == 2                                        # calibrations: anywhere in the list
    for c in verified:
        assert c["measured_tg_tps"] > 0 and c["measured_pp_tps"] > 0
        assert c["tg_error"] == pytest.approx(c["tg_tps"] / c["measured_tg_tps"] - 1)
    assert {r["backend"] for r in out["rates"]} == {"CPU", "ACC0"}            # both measured by calibration
    assert all(r["source"] == "measured" for r in out["rates"])
    assert out["cpu_peak_GBps"] == 25.0
    svg = plot.read_text()
    assert 'id="chosen"' in svg and 'id="budget"' in svg and 'id="measured:1"' in svg


def test_auto_without_a_gpu_says_how_to_use_the_emulated_one(tiny_gguf, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --accel auto takes it")
    assert main(["advise", "-m", str(tiny_gguf), "--vram", "1GiB"]) == 2
    assert "--accel emulated" in capsys.readouterr().err


def test_advise_reads_rates_from_a_profile(tiny_gguf, tmp_path, capsys):
    """--profile: no calibration; the pp test of the profile sets the prompt the pp rates are for."""
    timings = tmp_path / "t.jsonl"
    assert main(["run", "-m", str(tiny_gguf), "--accel", "emulated", "-t", "1", "-p", "6", "-n", "3", "-r", "1",
                 "-ot", CLASSIC_RULE, "-o", str(timings), "--no-progress", "--peak-bw", "20"]) == 0
    capsys.readouterr()
    assert main(["advise", "-m", str(tiny_gguf), "--vram", "1GiB", "--accel", "emulated", "-c", "64",
                 "--profile", str(timings), "--json", "--no-progress", "--gpu-bw", "500"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_prompt"] == 6 and out["cpu_peak_GBps"] == 20.0
    sources = {(r["kind"], r["backend"], r["class"]): r["source"] for r in out["rates"]}
    assert sources["tg", "CPU", "expert"] == "measured"
    assert sources["tg", "ACC0", "expert"] == "declared --gpu-bw 500"       # the profile ran none there
    assert ("tg", "CPU", "matmul") not in sources                           # borrowed when predicting, not shown
    assert len(out["candidates"]) == out["n_placements"]                    # 1 GiB: everything fits


def test_a_profile_without_a_prompt_test_predicts_no_pp(tiny_gguf, tmp_path, capsys):
    timings = tmp_path / "t.jsonl"
    assert main(["run", "-m", str(tiny_gguf), "--accel", "emulated", "-t", "1", "-p", "0", "-n", "3", "-r", "1",
                 "-o", str(timings), "--no-progress", "--peak-bw", "20"]) == 0
    capsys.readouterr()
    assert main(["advise", "-m", str(tiny_gguf), "--vram", "1GiB", "--accel", "emulated", "-c", "64",
                 "--profile", str(timings), "--no-progress", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "by predicted tg t/s" in out and "to paste" in out


def test_split_overhead_is_a_line_through_the_ops_it_holds():
    """Splits of 2 and of 100 ops (the two calibration runs): 50 us a split plus 3 us before each op."""
    n_ops = np.array([2, 2, 100, 100])
    assert _line(n_ops, 50_000 + 3_000.0 * n_ops, "intercept") == (pytest.approx(50_000), pytest.approx(3_000))
    assert _line(np.array([5, 5]), np.array([10.0, 30.0]), "intercept") == (20.0, 0.0)
    assert _line(np.array([5, 5]), np.array([10.0, 30.0]), "slope") == (0.0, 4.0)
    # a line that would cross below zero: the better of through-the-origin and flat
    assert _line(np.array([1, 2, 3]), np.array([0.0, 1.0, 5.0]), "intercept") == (0.0, pytest.approx(17 / 14))
    assert _line(np.array([1, 2, 3]), np.array([5.0, 4.0, 4.0]), "intercept") == (pytest.approx(13 / 3), 0.0)
    work = Work(ops=(("CPU", "ADD", "a", 0, 0),) * 4, splits=("CPU", "CPU"), n_tokens=1)
    rates = Rates({("tg", "CPU", "glue"): Rate(1_000.0, 0.0, 1)}, {("tg", "CPU"): SplitRate(50_000.0, 3_000.0)},
                  {"tg": 7_000.0}, 0)
    assert predict(work, rates, "tg").ns == pytest.approx(7_000 + 2 * 50_000 + 4 * 3_000 + 4 * 1_000)
