"""One token rate (DESIGN.md, "Token rate"): llama-bench's avg_ts ± stdev_ts, the same figure from
`hyprof run`'s table and `hyprof report` on one timings file, and beside llama-bench's own on a log."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fake_engine import make_fake_engine

from analysis.report import build_report
from analysis.timings import load_timings
from profiler.bench import run_bench, plan_tests, sweep
from profiler.rate import token_rate

DATA = Path(__file__).parent / "data"
SAMPLE = Path("/work/shared/samples/ik_print_timing_deepseek2_cpu_t2.txt")


def llama_bench_stdev(values: list[float]) -> float:
    """llama-bench's `stdev` as written in llama-bench.cpp (one pass, Bessel's correction)."""
    n, mean = len(values), sum(values) / len(values)
    return math.sqrt(sum(v * v for v in values) / (n - 1) - mean * mean * n / (n - 1))


def test_rate_is_the_mean_of_repetition_rates_not_total_tokens_over_total_time():
    tps, std = token_rate([10, 10, 10], [1 * 10**9, 2 * 10**9, 4 * 10**9])
    assert tps == pytest.approx((10 + 5 + 2.5) / 3)                 # total/total would be 30 / 7 s
    assert std == pytest.approx(llama_bench_stdev([10, 5, 2.5]))
    assert token_rate([8], [2 * 10**9]) == (4.0, 0.0)                # one repetition: no spread


def test_run_table_and_report_give_the_same_tps_for_one_timings_file(tmp_path):
    """The runner's results (what `hyprof run` prints) and the report of the timings file it wrote."""
    out = tmp_path / "t.jsonl"
    results = run_bench(make_fake_engine, "m.gguf",
                        sweep(threads=[1, 2], n_gpu_layers=[99], override_sets=[], accel="emulated"),
                        plan_tests(n_prompt=[8], n_gen=[3]), 4, timings=str(out), peak_bw=lambda _: {},
                        progress=False)
    report = build_report(load_timings(out))
    assert len(report.tests) == len(results) == 4                    # pp8 and tg3 at -t 1 and -t 2
    for result, test in zip(results, report.tests):
        assert test.name.startswith(result.test.name) and len(set(result.samples_ns)) > 1
        assert (test.tps, test.tps_std) == (result.avg_ts, result.stddev_ts)
        assert test.rep_tps == result.samples_ts


def test_imported_log_that_times_whole_repetitions_gives_llama_bench_figure():
    """tests/data/ik_cuda_pp.log's lines cover its one repetition: llama-bench printed 2962.96 ± 0.00."""
    (test,) = build_report(load_timings(DATA / "ik_cuda_pp.log")).tests
    assert (round(test.tps, 2), test.tps_std) == (test.reported_tps, test.reported_tps_std) == (2962.96, 0.0)


@pytest.mark.skipif(not SAMPLE.exists(), reason="the shared sample is not on this machine")
def test_real_log_rate_is_llama_bench_statistic_on_the_printed_time_only():
    """ik_llama.cpp's llama-bench, -r 2: the log has no timestamps, only the durations its lines print,
    so each repetition's wall misses llama-bench's own loop between decodes. With two repetitions
    llama-bench's per-repetition rates follow from its row (mean ± stdev / sqrt 2): ours are each a
    little faster (0.2-0.8 %), never slower, and the mean and spread agree within 1.2 %. (Total tokens
    over total wall, the report's rate before, said pp32 8,341 t/s against llama-bench's 10,960.94.)"""
    tests = {t.name: t for t in build_report(load_timings(SAMPLE)).tests}
    for name, (printed, printed_std) in {"pp32": (10960.94, 7618.70), "tg8": (3182.32, 2565.21)}.items():
        test = tests[name]
        assert (test.reported_tps, test.reported_tps_std) == (printed, printed_std)
        theirs = sorted((printed - printed_std / math.sqrt(2), printed + printed_std / math.sqrt(2)))
        for ours, their in zip(sorted(test.rep_tps), theirs):
            assert their <= ours <= their * 1.01
        assert test.tps == pytest.approx(printed, rel=0.01) and test.tps >= printed
        assert test.tps_std == pytest.approx(printed_std, rel=0.012)
