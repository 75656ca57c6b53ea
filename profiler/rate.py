"""The token rate, one definition for every command (DESIGN.md, "Token rate"): llama-bench's.

llama-bench (tools/llama-bench/llama-bench.cpp, `test::get_ts`, `avg_ts`, `stdev_ts`) turns
each repetition into a rate, `1e9 * n_tokens / samples_ns`, and prints the mean of those
rates ± their sample standard deviation (Bessel's correction; 0 for one repetition). The mean
of the rates is not total tokens over total wall time: a slow repetition weighs as much as a
fast one. `hyprof run` (profiler/bench.py), `hyprof report`, `diff` and the plots (analysis/)
all call these functions, so each figure is llama-bench's statistic on the same walls.

It lives in profiler/ because the runner needs it and may not import analysis/; analysis/
imports profiler/, so it needs no copy.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence


def rep_rates(n_tokens: Iterable[int], wall_ns: Iterable[int]) -> tuple[float, ...]:
    """t/s of each repetition: its tokens over its wall time. A repetition with no measured time
    (an imported log whose lines covered none of it) counts 0 t/s rather than infinity."""
    return tuple(float(n * 1e9 / w) if w > 0 else 0.0 for n, w in zip(n_tokens, wall_ns))


def token_rate(n_tokens: Iterable[int], wall_ns: Iterable[int]) -> tuple[float, float]:
    """(t/s, its standard deviation) of a test from its repetitions: llama-bench's avg_ts, stdev_ts."""
    rates = rep_rates(n_tokens, wall_ns)
    return statistics.fmean(rates), sample_stdev(rates)


def sample_stdev(samples: Sequence[float]) -> float:
    """The sample standard deviation, as llama-bench reports it; 0 for one sample."""
    return statistics.stdev(samples) if len(samples) > 1 else 0.0
