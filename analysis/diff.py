"""Two runs side by side: did the change (a placement, -fmoe, threads) pay off, and where?

Public API (stable):

    diff_reports(a, b, top_ops=10) -> Diff
    diff_tables(diff) -> list[Table]        (analysis.tables.Table, drawn by render_console/markdown)
    Diff (frozen): a, b (the Reports), tests (TestDiff, ...), only_a, only_b (test names in one run only);
        .to_json() -> dict in the `hyprof-diff/1` shape
    TestDiff (frozen): name, a, b (TestReports), tps_change_pct,
        categories (CategoryChange per category, then "wall"), ops (OpChange, largest |change| first),
        experts (ExpertChange, or None unless both runs recorded routes of the same model shape)
    ExpertChange (frozen): layers, moved (per layer: the share of its expert choices that moved,
        the total variation distance of A's and B's distributions; 0 same usage, 1 disjoint), mean_moved
    CategoryChange / OpChange (frozen): a_ms, b_ms (ms per token), change_ms, change_pct (of A; None when A is 0)

Tests are matched by name. Times are compared per token, not in seconds, so
that runs with different repetitions or token counts still compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.report import Report, TestReport
from analysis.run_info import describe_run
from analysis.tables import Table
from profiler.schema import CATEGORIES

DIFF_SCHEMA = "hyprof-diff/1"


@dataclass(frozen=True)
class CategoryChange:
    category: str
    a_ms: float
    b_ms: float
    change_ms: float
    change_pct: float | None


@dataclass(frozen=True)
class OpChange:
    op: str
    backend: str
    a_ms: float
    b_ms: float
    change_ms: float
    change_pct: float | None


@dataclass(frozen=True)
class ExpertChange:
    layers: tuple
    moved: tuple
    mean_moved: float


@dataclass(frozen=True)
class TestDiff:
    name: str
    a: TestReport
    b: TestReport
    tps_change_pct: float | None
    categories: tuple
    ops: tuple
    experts: ExpertChange | None = None


@dataclass(frozen=True)
class Diff:
    a: Report
    b: Report
    tests: tuple
    only_a: tuple
    only_b: tuple

    def to_json(self) -> dict:
        return {"schema": DIFF_SCHEMA, "a": self.a.source, "b": self.b.source,
                "only_a": list(self.only_a), "only_b": list(self.only_b),
                "tests": [{"name": d.name, "a_tps": d.a.tps, "b_tps": d.b.tps, "tps_change_pct": d.tps_change_pct,
                           "ms_per_token": [vars(c) for c in d.categories],
                           "ops": [vars(o) for o in d.ops],
                           "experts": None if d.experts is None else
                           {"mean_moved": d.experts.mean_moved,
                            "moved": dict(zip(map(str, d.experts.layers), d.experts.moved))}}
                          for d in self.tests]}


def _pct(a: float, b: float) -> float | None:
    return 100.0 * (b - a) / a if a else None


def diff_reports(a: Report, b: Report, top_ops: int = 10) -> Diff:
    b_tests = {r.name: r for r in b.tests}
    a_names = [r.name for r in a.tests]
    tests = tuple(_test_diff(r, b_tests[r.name], top_ops) for r in a.tests if r.name in b_tests)
    return Diff(a=a, b=b, tests=tests, only_a=tuple(n for n in a_names if n not in b_tests),
                only_b=tuple(r.name for r in b.tests if r.name not in a_names))


def _test_diff(ra: TestReport, rb: TestReport, top_ops: int) -> TestDiff:
    cats = []
    for c in CATEGORIES + ("wall",):
        a_ns = ra.wall_ns if c == "wall" else ra.categories_ns[c]
        b_ns = rb.wall_ns if c == "wall" else rb.categories_ns[c]
        x, y = ra.ms_per_token(a_ns) or 0.0, rb.ms_per_token(b_ns) or 0.0
        cats.append(CategoryChange(c, x, y, y - x, _pct(x, y)))
    return TestDiff(name=ra.name, a=ra, b=rb, tps_change_pct=_pct(ra.tps, rb.tps), categories=tuple(cats),
                    ops=_op_changes(ra, rb)[:top_ops], experts=_expert_change(ra, rb))


def _expert_change(ra: TestReport, rb: TestReport) -> ExpertChange | None:
    """Per MoE layer, how much of the expert usage moved between the runs (total variation distance
    of the two distributions of choices: half the summed |share A - share B| over the experts)."""
    ua, ub = ra.experts, rb.experts
    if ua is None or ub is None or ua.layers != ub.layers or ua.n_expert != ub.n_expert:
        return None
    pa, pb = (u.counts / np.maximum(u.counts.sum(axis=1, keepdims=True), 1) for u in (ua, ub))
    moved = 0.5 * np.abs(pa - pb).sum(axis=1)
    return ExpertChange(ua.layers, tuple(float(m) for m in moved), float(moved.mean()))


def _op_changes(ra: TestReport, rb: TestReport) -> tuple:
    """Per (op, backend), ms per token in each run; an op that moved backend shows as one gone, one new."""
    times: dict[tuple[str, str], list[float]] = {}
    for side, r in enumerate((ra, rb)):
        for o in r.ops:
            times.setdefault((str(o["op"]), str(o["backend"])), [0.0, 0.0])[side] += r.ms_per_token(o["total_ns"]) or 0.0
    changes = [OpChange(op, backend, x, y, y - x, _pct(x, y)) for (op, backend), (x, y) in times.items()]
    return tuple(sorted(changes, key=lambda c: (-abs(c.change_ms), c.op, c.backend)))


# ---------------------------------------------------------------- tables

def _f(x, digits: int = 3, sign: bool = False) -> str:
    return "-" if x is None else f"{x:+,.{digits}f}" if sign else f"{x:,.{digits}f}"


def diff_tables(d: Diff) -> list[Table]:
    rows = (("A", d.a.source, describe_run(d.a.header, d.a.emulated).replace("\n", " · ")),
            ("B", d.b.source, describe_run(d.b.header, d.b.emulated).replace("\n", " · ")))
    notes = []
    if d.only_a or d.only_b:
        notes.append(f"not compared: only in A {list(d.only_a)}, only in B {list(d.only_b)}")
    if not d.tests:
        notes.append("the runs have no test name in common")
    tables = [Table("hyprof diff", ("run", "timings", "what it was"), rows, tuple(notes))]
    for t in d.tests:
        title = (f"{t.name}: {t.a.tps:,.2f} → {t.b.tps:,.2f} t/s ({_f(t.tps_change_pct, 1, sign=True)} %)")
        tables.append(Table(title, ("category", "A ms/token", "B ms/token", "change ms/token", "change %"),
                            tuple((c.category, _f(c.a_ms), _f(c.b_ms), _f(c.change_ms, sign=True),
                                   _f(c.change_pct, 1, sign=True)) for c in t.categories
                                  if c.a_ms or c.b_ms)))
        tables.append(Table(f"{t.name}: ops whose time changed most",
                            ("op", "backend", "A ms/token", "B ms/token", "change ms/token", "change %"),
                            tuple((o.op, o.backend, _f(o.a_ms), _f(o.b_ms), _f(o.change_ms, sign=True),
                                   _f(o.change_pct, 1, sign=True) if o.a_ms else "new")
                                  for o in t.ops)))
        if t.experts is not None:
            tables.append(_expert_table(t))
    return tables


def _expert_table(t: TestDiff) -> Table:
    ua, ub, change = t.a.experts, t.b.experts, t.experts
    k = ua.ks[len(ua.ks) // 2]

    def hottest(u, i: int) -> str:
        e = int(np.argmax(u.counts[i]))
        return f"#{e} {_f(100 * u.counts[i, e] / max(u.counts[i].sum(), 1), 1)} %"
    rows = tuple((str(layer), _f(100 * moved, 1), hottest(ua, i), hottest(ub, i),
                  f"{_f(100 * ua.coverage[i, k - 1], 1)} → {_f(100 * ub.coverage[i, k - 1], 1)}",
                  f"{_f(100 * ua.lru_hit[i, k - 1], 1)} → {_f(100 * ub.lru_hit[i, k - 1], 1)}")
                 for i, (layer, moved) in enumerate(zip(change.layers, change.moved)))
    return Table(f"{t.name}: expert usage A → B — {_f(100 * change.mean_moved, 1)} % of the choices moved "
                 f"(mean over {len(change.layers)} MoE layers)",
                 ("layer", "% moved", "A hottest", "B hottest", f"top-{k} % of bytes", f"LRU-{k} hit %"), rows,
                 ("% moved: half the summed |A share - B share| over the experts (0: the same usage, "
                  "100: no expert in common)",))
