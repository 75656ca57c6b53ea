"""The same test at growing context depth (llama-bench `-d`: tg64, tg64@pp512, tg64@pp4096, ...).

Public API (stable):

    depth_series(report, timings) -> list[DepthSeries]
        One series per test that was run at two or more depths, in the report's order.
    DepthSeries (frozen): base (the test name without its depth, "tg64"), kind, depths, tests
        (TestReport per depth, ascending)

Why a series: attention reads a KV cache that grows with depth while the
expert weights read per token stay fixed, so the curve of t/s against depth
shows where the GPU side stops being hidden behind the CPU experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from analysis.report import Report, TestReport
from analysis.timings import Timings

_AT_DEPTH = re.compile(r"@pp(\d+)$")


@dataclass(frozen=True)
class DepthSeries:
    base: str
    kind: str
    depths: tuple[int, ...]
    tests: tuple[TestReport, ...]


def depth_of_tests(t: Timings) -> dict[str, int]:
    """Depth of each test name: its `depth` field, else the llama-bench `@ppN` suffix, else 0."""
    depths = {}
    for row in t.tests:
        name = t.sym(int(row["name"]))
        if name not in depths:
            depths[name] = int(row["depth"]) if row["depth"] >= 0 else _depth_from_name(name)
    return depths


def _depth_from_name(name: str) -> int:
    m = _AT_DEPTH.search(name)
    return int(m.group(1)) if m else 0


def depth_series(report: Report, t: Timings) -> list[DepthSeries]:
    depths = depth_of_tests(t)
    groups: dict[str, list[tuple[int, TestReport]]] = {}
    for r in report.tests:
        base = _AT_DEPTH.sub("", r.name)
        groups.setdefault(base, []).append((depths.get(r.name, _depth_from_name(r.name)), r))
    series = []
    for base, members in groups.items():
        members.sort(key=lambda m: m[0])
        if len({d for d, _ in members}) >= 2:
            series.append(DepthSeries(base=base, kind=members[0][1].kind, depths=tuple(d for d, _ in members),
                                      tests=tuple(r for _, r in members)))
    return series
