"""Two runs side by side: did the change (a placement, -fmoe, threads) pay off, and where?

Public API (stable):

    diff_reports(a, b, top_ops=10) -> Diff
    diff_tables(diff) -> list[Table]        (analysis.tables.Table, drawn by render_console/markdown)
    Diff (frozen): a, b (the Reports), tests (TestDiff, ...), only_a, only_b (test names in one run only);
        .to_json() -> dict in the `hyprof-diff/1` shape
    TestDiff (frozen): name, a, b (TestReports), tps_change_pct,
        categories (CategoryChange per category, then "wall"), ops (OpChange, largest |change| first)
    CategoryChange / OpChange (frozen): a_ms, b_ms (ms per token), change_ms, change_pct (of A; None when A is 0)

Tests are matched by name. Times are compared per token, not in seconds, so
that runs with different repetitions or token counts still compare.
"""

from __future__ import annotations

from dataclasses import dataclass

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
class TestDiff:
    name: str
    a: TestReport
    b: TestReport
    tps_change_pct: float | None
    categories: tuple
    ops: tuple


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
                           "ops": [vars(o) for o in d.ops]} for d in self.tests]}


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
                    ops=_op_changes(ra, rb)[:top_ops])


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
    return tables
