"""The report: everything `hyprof report` shows, as data (the renderers only draw it).

Public API (stable):

    build_report(timings, peak_bw=None, attribution=None) -> Report
        peak_bw: the CPU's peak bandwidth in GB/s, overriding the header's measured one.
    Report (frozen): source, header, emulated, peak_GBps {backend: GB/s}, tests (TestReport, ...),
        graphs, reps (Attribution.graphs, .reps), warnings, skipped {"event_types"|"fields": {name: count}}
        (what contract v1 let the loader pass over), model_name; .to_json() -> dict in the
        `hyprof-report/1` contract.
    TestReport (frozen): one test (pp512, tg128, ...) over its repetitions:
        name, kind, reps, n_tokens, wall_ns (both summed over the repetitions),
        tps, tps_std, rep_tps: llama-bench's avg_ts and stdev_ts, the mean and sample standard
            deviation of each repetition's tokens / wall time (rep_tps), by the one definition of
            profiler/rate.py that `hyprof run` prints too (JSON `tps` meant total tokens / total
            wall before; the two differ when the repetitions do),
        reported_tps, reported_tps_std (the source engine's own figure, e.g. llama-bench's, or None),
        categories_ns {category: ns} (sums to wall_ns), overhead_ns, copy_ns {direction: ns},
        recording_ns (of `other`: the runner handing events to the timings writer, its `record`
        phases; what the profiling itself cost, which a run without -o does not pay),
        hidden [(category, under, ns)], bandwidth {...} (the DESIGN.md keys, GB/s, and
            cpu_expert_upper_bound: true when the expert bytes of an imported batch are an upper
            bound (its log does not say which experts it used): bytes per token, GB/s and the
            fraction of the peak are then at most the figure, and cpu_expert_at_peak (those bytes
            read at the peak) at least its, which whatif_lower_bound names; `bound` adds up only
            the bytes ops carry, which for an imported log are its expert ops'),
        category_bw {category: {"bytes", "busy_ns", "GBps", "upper_bound"}}, whatif_tps {...}
            (analysis/whatif.py: each repetition's wall projected, then the same avg_ts),
        whatif_lower_bound (the whatif_tps keys that are lower bounds, see bandwidth),
        uploads {"bytes", "s", "GBps", "count", "bytes_per_token"} (op-offload weight uploads) and
        offload {...} (analysis/offload.py: at this test's batch, CPU or offload, and the batch where
            they cross),
        ops, copies, layers, backends, splits: structured arrays (bandwidth.py GROUP rows with
        symbol ids replaced by names),
        experts: analysis.experts.ExpertUsage with its what-ifs, or None (no route events: an
            ik_llama.cpp log carries no routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis import bandwidth, experts
from analysis.attribution import COPY_DIRECTIONS, Attribution, attribute
from analysis.offload import offload_rates, offload_whatif, uploads
from analysis.run_info import model_name
from analysis.timings import Timings
from analysis.whatif import whatif_tps
from profiler.rate import rep_rates, token_rate
from profiler.schema import CATEGORIES, OVERHEAD_CATEGORIES, RECORD_PHASE, REPORT_SCHEMA

COMPUTE_CATEGORIES = tuple(c for c in CATEGORIES if c not in OVERHEAD_CATEGORIES)
# hidden overlap worth telling: `sched` and `other` fill whatever is left, they hide under everything
HIDDEN_REPORTED = tuple(c for c in CATEGORIES if c not in ("sched", "other"))
NAMED_COLUMNS = ("op", "backend", "src", "dst")


@dataclass(frozen=True)
class TestReport:
    name: str
    kind: str
    reps: int
    n_tokens: int
    wall_ns: int
    tps: float
    tps_std: float
    rep_tps: tuple
    reported_tps: float | None
    reported_tps_std: float | None
    categories_ns: dict
    overhead_ns: int
    copy_ns: dict
    recording_ns: int
    hidden: tuple
    bandwidth: dict
    category_bw: dict
    whatif_tps: dict
    whatif_lower_bound: tuple
    uploads: dict
    offload: dict
    ops: np.ndarray
    copies: np.ndarray
    layers: np.ndarray
    backends: np.ndarray
    splits: np.ndarray
    experts: experts.ExpertUsage | None = None

    def ms_per_token(self, ns: float) -> float | None:
        """A time of this test (summed over its repetitions) in ms per token; None when it processed
        no token. The breakdown's unit, so that the categories add up to the wall: 1000 / tps, a mean
        of per-repetition rates, is a little less when the repetitions differ."""
        return float(ns) / 1e6 / self.n_tokens if self.n_tokens else None


@dataclass(frozen=True)
class Report:
    source: str
    header: dict
    emulated: bool
    peak_GBps: dict
    tests: tuple
    graphs: np.ndarray
    reps: np.ndarray
    warnings: tuple
    skipped: dict
    model_name: str | None

    def to_json(self) -> dict:
        return {"schema": REPORT_SCHEMA, "source": self.source, "model": self.model_name, "emulated": self.emulated,
                "peak_GBps": self.peak_GBps, "warnings": list(self.warnings), "skipped": self.skipped,
                "tests": [_test_json(r) for r in self.tests]}


def peak_bandwidths(header: dict, cpu_peak: float | None) -> dict:
    """{backend: GB/s} from the header's measured peaks, the CPU's overridden by --peak-bw."""
    peaks = {}
    for backend, entry in (header.get("peak_bw") or {}).items():
        gbps = entry.get("GBps") if isinstance(entry, dict) else entry
        if isinstance(gbps, (int, float)) and gbps > 0:
            peaks[backend] = float(gbps)
    if cpu_peak is not None:
        peaks["CPU"] = float(cpu_peak)
    return peaks


def build_report(t: Timings, peak_bw: float | None = None, attribution: Attribution | None = None) -> Report:
    a = attribution if attribution is not None else attribute(t)
    peaks = peak_bandwidths(t.header, peak_bw)
    test_of_event, names = bandwidth.event_test(t, a)
    tables = {"ops": bandwidth.op_table(t, test_of_event), "copies": bandwidth.copy_table(t, test_of_event),
              "layers": bandwidth.layer_table(t, test_of_event), "backends": bandwidth.backend_table(t, test_of_event),
              "splits": bandwidth.split_table(t, test_of_event)}
    tables = {k: _named(v, t) for k, v in tables.items()}
    rep_of_event = bandwidth.event_rep(t, a)
    category_bytes = _category_sums_per_rep(t, a, rep_of_event, t.events["bytes"])
    category_ub = _category_sums_per_rep(t, a, rep_of_event, t.events["bytes"] * (t.events["bytes_ub"] > 0))
    backend_bytes = _backend_bytes_per_rep(t, rep_of_event, len(a.reps))
    recording = _recording_per_test(t, test_of_event, len(names))
    usage = experts.expert_usage(t, bandwidth.time_test(t.routes["ts"], a)[0], test_of_event, len(names))
    rates = offload_rates(t)
    tests = tuple(_test_report(i, name, a, tables, category_bytes, category_ub, backend_bytes, peaks,
                               _reported_tps(t, a, name), int(recording[i]), uploads(t, test_of_event == i), rates,
                               usage[i])
                  for i, name in enumerate(names))
    accel = str((t.header.get("config") or {}).get("accel", ""))
    emulated = "emulated" in accel or any(b.startswith("ACC") for b in t.symbols)
    return Report(source=t.source, header=t.header, emulated=emulated, peak_GBps=peaks, tests=tests,
                  graphs=a.graphs, reps=a.reps, warnings=t.warnings,
                  skipped={"event_types": dict(t.skipped_types), "fields": dict(t.skipped_fields)},
                  model_name=model_name(t.header))


def _reported_tps(t: Timings, a: Attribution, name: str) -> tuple[float | None, float | None]:
    """The t/s the source engine printed for this test (the same on each repetition's event: one
    llama-bench row covers them all), or (None, None)."""
    mine = t.tests[a.reps["name"] == name] if len(t.tests) == len(a.reps) else t.tests[:0]
    tps, std = mine["tps"][~np.isnan(mine["tps"])], mine["tps_std"][~np.isnan(mine["tps_std"])]
    return (float(tps.mean()) if tps.size else None, float(std.mean()) if std.size else None)


def _named(table: np.ndarray, t: Timings) -> np.ndarray:
    """The table with symbol-id columns turned into strings, and the copy direction named."""
    fields = []
    for name in table.dtype.names:
        if name in NAMED_COLUMNS or name == "direction":
            fields.append((name, "U64"))
        else:
            fields.append((name, table.dtype[name]))
    out = np.zeros(len(table), fields)
    for name in table.dtype.names:
        if name in NAMED_COLUMNS:
            out[name] = [t.sym(int(i)) for i in table[name]]
        elif name == "direction":
            out[name] = [COPY_DIRECTIONS[int(i)] for i in table[name]]
        else:
            out[name] = table[name]
    return out


def _category_sums_per_rep(t: Timings, a: Attribution, rep_of_event: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[repetition, category]: the sum of an event column (bytes) over the events each category claimed
    in each repetition."""
    claimed = (a.event_category >= 0) & (rep_of_event >= 0)
    return np.bincount(rep_of_event[claimed] * len(CATEGORIES) + a.event_category[claimed],
                       weights=values[claimed].astype(np.float64),
                       minlength=len(a.reps) * len(CATEGORIES)).reshape(len(a.reps), len(CATEGORIES))


def _backend_bytes_per_rep(t: Timings, rep_of_event: np.ndarray, n_reps: int) -> dict:
    """{backend: bytes its ops read in each repetition}: the backends table's bytes, per repetition."""
    ops = t.of_type("op") & (rep_of_event >= 0)
    backends, which = np.unique(t.events["backend"][ops], return_inverse=True)
    sums = np.bincount(rep_of_event[ops] * len(backends) + which, weights=t.events["bytes"][ops].astype(np.float64),
                       minlength=n_reps * len(backends)).reshape(n_reps, len(backends))
    return {t.sym(int(b)): sums[:, j] for j, b in enumerate(backends)}


def _recording_per_test(t: Timings, test_of_event: np.ndarray, n_tests: int) -> np.ndarray:
    """Per test, the ns of `record` phases that start inside its repetitions."""
    ev = t.events
    mine = t.of_type("phase") & np.isin(ev["name"], t.ids(lambda s: s == RECORD_PHASE)) & (test_of_event >= 0)
    return np.bincount(test_of_event[mine], weights=ev["dur"][mine].astype(np.float64), minlength=n_tests)


def _test_report(i: int, name: str, a: Attribution, tables: dict, rep_cat_bytes: np.ndarray, rep_cat_ub: np.ndarray,
                 rep_backend_bytes: dict, peaks: dict, reported: tuple, recording_ns: int, test_uploads: dict,
                 rates, usage: experts.ExpertUsage | None) -> TestReport:
    mine = a.reps["name"] == name
    reps = a.reps[mine]
    graphs = a.graphs[np.isin(a.graphs["rep"], np.flatnonzero(mine))]
    batch = int(graphs["n_tokens"].max()) if len(graphs) else 0
    wall_ns = int(reps["wall_ns"].sum())
    n_tokens = int(reps["n_tokens"].sum())
    categories_ns = {c: int(reps[f"{c}_ns"].sum()) for c in CATEGORIES}
    tps, tps_std = token_rate(reps["n_tokens"], reps["wall_ns"])
    cat_bytes = rep_cat_bytes[mine].sum(axis=0)
    cat_ub = rep_cat_ub[mine].sum(axis=0) > 0
    hidden_ns = a.hidden_ns[mine].sum(axis=0)
    hidden = tuple((c, w, int(hidden_ns[ci, wi])) for ci, c in enumerate(CATEGORIES) if c in HIDDEN_REPORTED
                   for wi, w in enumerate(CATEGORIES) if hidden_ns[ci, wi] > 0)
    category_bw = {}
    for c in COMPUTE_CATEGORIES:
        busy, nbytes = int(reps[f"{c}_busy_ns"].sum()), int(round(cat_bytes[CATEGORIES.index(c)]))
        category_bw[c] = {"bytes": nbytes, "busy_ns": busy, "GBps": nbytes / busy if busy and nbytes else None,
                          "upper_bound": bool(cat_ub[CATEGORIES.index(c)])}
    mine_tables = {k: v[v["test"] == i] for k, v in tables.items()}
    expert = category_bw["cpu_expert_matmul"]
    cpu_peak = peaks.get("CPU")
    bw = {"cpu_expert_GBps": expert["GBps"],
          "cpu_expert_bytes_per_token": expert["bytes"] / n_tokens if n_tokens else None,
          "cpu_peak_GBps": cpu_peak,
          "cpu_expert_fraction_of_peak": expert["GBps"] / cpu_peak if cpu_peak and expert["GBps"] else None,
          "cpu_expert_upper_bound": expert["upper_bound"]}
    whatif = whatif_tps(reps["n_tokens"], {c: reps[f"{c}_ns"] for c in CATEGORIES},
                        rep_cat_bytes[mine, CATEGORIES.index("cpu_expert_matmul")], cpu_peak,
                        {b: v[mine] for b, v in rep_backend_bytes.items()}, peaks)
    if usage is not None:
        devices = mine_tables["backends"][~np.char.startswith(np.char.upper(mine_tables["backends"]["backend"]), "CPU")]
        busiest = devices[np.argmax(devices["bytes"])] if len(devices) else None
        usage = experts.with_whatif(usage, experts.Rates(
            ns_per_token=wall_ns / n_tokens if n_tokens else 0.0, cpu_expert_GBps=expert["GBps"],
            gpu_GBps=float(busiest["GBps"]) if busiest is not None and busiest["GBps"] > 0 else None))
    return TestReport(
        name=name, kind=str(reps["kind"][0]), reps=len(reps), n_tokens=n_tokens, wall_ns=wall_ns,
        tps=tps, tps_std=tps_std, rep_tps=rep_rates(reps["n_tokens"], reps["wall_ns"]),
        reported_tps=reported[0], reported_tps_std=reported[1],
        categories_ns=categories_ns, overhead_ns=sum(categories_ns[c] for c in OVERHEAD_CATEGORIES),
        copy_ns={d: int(a.copy_ns[d][mine].sum()) for d in COPY_DIRECTIONS}, recording_ns=recording_ns,
        hidden=hidden,
        bandwidth=bw, category_bw=category_bw,
        whatif_tps=whatif, experts=usage,
        whatif_lower_bound=("cpu_expert_at_peak",) if expert["upper_bound"] and whatif["cpu_expert_at_peak"] else (),
        uploads={**test_uploads, "bytes_per_token": test_uploads["bytes"] / n_tokens if n_tokens else None},
        offload=offload_whatif(rates, batch) if batch else {},
        **mine_tables)


def _rows(table: np.ndarray) -> list[dict]:
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(table.dtype.names, row) if k != "test"}
            for row in table]


def _s(ns: int) -> float:
    return ns / 1e9


def _test_json(r: TestReport) -> dict:
    return {
        "name": r.name, "kind": r.kind, "reps": r.reps, "n_tokens": r.n_tokens,
        "wall_s": _s(r.wall_ns), "tps": r.tps, "tps_std": r.tps_std, "rep_tps": list(r.rep_tps),
        "reported_tps": r.reported_tps, "reported_tps_std": r.reported_tps_std,
        "categories_s": {c: _s(v) for c, v in r.categories_ns.items()},
        "overhead_s": _s(r.overhead_ns),
        "recording_s": _s(r.recording_ns),
        "ms_per_token": {c: r.ms_per_token(v) for c, v in r.categories_ns.items()},
        "copy_s": {d: _s(v) for d, v in r.copy_ns.items()},
        "hidden_s": [{"category": c, "under": w, "s": _s(ns)} for c, w, ns in r.hidden],
        "bandwidth": r.bandwidth,
        "category_bandwidth": {c: {"bytes": v["bytes"], "busy_s": _s(v["busy_ns"]), "GBps": v["GBps"],
                                   "upper_bound": v["upper_bound"]}
                               for c, v in r.category_bw.items()},
        "whatif_tps": r.whatif_tps, "whatif_lower_bound": list(r.whatif_lower_bound),
        "uploads": r.uploads,
        "offload": r.offload,
        "backends": _rows(r.backends), "ops": _rows(r.ops), "copies": _rows(r.copies),
        "layers": _rows(r.layers), "splits": _rows(r.splits),
        "experts": r.experts.to_json() if r.experts is not None else None,
    }
