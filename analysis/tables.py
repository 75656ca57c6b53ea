"""The report laid out as titled tables of display strings, shared by the terminal and markdown renderers.

Public API (stable):

    report_tables(report, layers=False, splits=False, graphs=False) -> list[Table]
    Table (frozen): title, columns, rows (tuples of strings), notes (lines under the table)

Only formatting happens here (units, rounding, order of rows); every figure
comes from the Report. Both renderers draw these tables, so the terminal and
the markdown report always say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.attribution import sweep_labels
from analysis.report import COMPUTE_CATEGORIES, Report, TestReport
from profiler.schema import CATEGORIES, OVERHEAD_CATEGORIES

COPY_LABELS = {"weights": "weight uploads (h2d)"}     # copy directions as the tables name them


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple
    rows: tuple
    notes: tuple = ()


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ms(ns) -> str:
    return _f(ns / 1e6, 2)


def _mb(n) -> str:
    return _f(n / 1e6, 1)


def _size(n) -> str:
    """Bytes in the unit that shows them (a tiny test model's 313 kB per token, a real one's GB)."""
    if not isinstance(n, (int, float)):
        return "-"
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if abs(n) >= s), ("B", 1))
    return f"{n / scale:,.1f} {unit}" if scale > 1 else f"{n:,.0f} B"


def _at_most(upper_bound, text: str) -> str:
    """A figure that may be less than shown (bytes of an imported batch's experts) is marked "≤"."""
    return f"≤ {text}" if upper_bound and text != "-" else text


def _at_least(lower_bound, text: str) -> str:
    return f"≥ {text}" if lower_bound and text != "-" else text


def report_tables(report: Report, layers: bool = False, splits: bool = False, graphs: bool = False) -> list[Table]:
    tables = [_run_table(report)]
    for test in report.tests:
        tables += [_time_table(test, _reporter(report.header)), _backend_table(test, report.peak_GBps), _op_table(test)]
        if len(test.copies):
            tables.append(_copy_table(test))
        if test.experts is not None:
            tables.append(_expert_table(test))
        if layers and len(test.layers):
            tables.append(_layer_table(test))
        if splits and len(test.splits):
            tables.append(_split_table(test))
    if graphs and len(report.graphs):
        tables.append(_graph_table(report))
    return tables


def _reporter(header: dict) -> str:
    """Who printed the t/s an imported log carries (llama-bench, for an ik_llama.cpp log)."""
    return "llama-bench" if (header.get("source") or {}).get("bench_rows") else str(header.get("tool") or "the source")


def _run_table(report: Report) -> Table:
    h = report.header
    model, config, machine = h.get("model") or {}, h.get("config") or {}, h.get("machine") or {}
    rows, notes = [("source", report.source)], []
    if model:
        rows.append(("model", f"{report.model_name or '?'} ({model.get('arch') or '?'}, {model.get('ftype') or '?'})"))
    for label, fields in (("config", config), ("machine", machine)):
        text = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        if text:
            rows.append((label, text))
    labels = sweep_labels(h, range(len(h.get("sweep") or [])))
    if labels:      # the config above is the first combination's
        rows.append(("sweep", ", ".join(label.strip(" []") for label in labels.values())))
    weights = (h.get("source") or {}).get("bytes")
    if isinstance(weights, dict) and weights.get("from") == "model file":   # an imported log's, from its model
        rows.append(("op bytes", f"expert ops, from {weights.get('model')} ({_size(weights.get('size_bytes'))})"))
        notes.append("Imported log: only expert ops carry bytes (its other ops name nodes, not weights), so the "
                     "CPU expert figures are complete and the hardware bound counts the experts alone.")
    elif isinstance(weights, dict):
        rows.append(("op bytes", "none: the log carries no byte counts; --model FILE.gguf (the model it ran) "
                                 "gives its expert ops theirs"))
    methods = h.get("peak_bw") or {}
    peaks = ", ".join(f"{b} {_f(v, 1)} GB/s" + (f" ({methods[b]['method']})" if _method(methods, b, v) else "")
                      for b, v in report.peak_GBps.items()) or "unknown (use --peak-bw)"
    rows.append(("peak bandwidth", peaks))
    skipped = "; ".join(f"{what.replace('_', ' ')} " + ", ".join(f"{k} ({v:,})" for k, v in sorted(counts.items()))
                        for what, counts in report.skipped.items() if counts)
    if skipped:     # allowed by contract v1: said once, in passing
        rows.append(("not read", skipped))
    if report.tests and all(r.experts is None for r in report.tests):
        rows.append(("expert routing", "not recorded in this file (ik_llama.cpp logs carry none); "
                                       "`hyprof run -o` records it"))
    notes.extend(report.warnings)
    if not report.tests:
        notes.append("No graph events in this file: there is no wall time to attribute.")
    if report.emulated:
        notes.insert(0, "The accelerator was EMULATED (ACC0: torch on the CPU); its times are not GPU times.")
    return Table("hyprof report", ("", ""), tuple(rows), tuple(notes))


def _method(methods: dict, backend: str, gbps: float) -> bool:
    """Whether the header says how the peak shown was measured (not when `report --peak-bw` replaced it)."""
    entry = methods.get(backend)
    return (isinstance(entry, dict) and entry.get("GBps") == gbps and isinstance(entry.get("method"), str)
            and bool(entry["method"]))


def _time_table(r: TestReport, source: str) -> Table:
    def row(label, ns):
        pct = 100.0 * ns / r.wall_ns if r.wall_ns else 0.0
        return (label, _f(ns / 1e9, 3), _f(pct, 1), _f(r.ms_per_token(ns), 3))

    rows = [row(c, r.categories_ns[c]) for c in COMPUTE_CATEGORIES]
    rows.append(row("overhead", r.overhead_ns))
    for c in OVERHEAD_CATEGORIES:
        rows.append(row(f"  {c}", r.categories_ns[c]))
        if c == "copy":
            rows += [row(f"    {COPY_LABELS.get(d, d)}", ns) for d, ns in r.copy_ns.items() if ns]
        if c == "other" and r.recording_ns:
            rows.append(row("    recording", r.recording_ns))
    rows.append(row("wall", r.wall_ns))
    reported = ("" if r.reported_tps is None else
                f" (reported by {source}: {_f(r.reported_tps)} ± {_f(r.reported_tps_std)})")
    title = (f"{r.name}: {_f(r.tps)} ± {_f(r.tps_std)} t/s{reported} — {r.n_tokens} tokens in "
             f"{_f(r.wall_ns / 1e9, 3)} s ({r.reps} rep{'s' if r.reps != 1 else ''})")
    rate = () if r.reported_tps is None else (
        f"t/s: llama-bench's statistic (mean ± sd of each repetition's tokens / wall) on this file's walls; "
        f"{source}'s own used its clock, which also saw time no log line prints, so ours can be a little higher",)
    return Table(title, ("category", "s", "%", "ms/token"), tuple(rows), rate + _notes(r))


def _notes(r: TestReport) -> tuple:
    bw, w = r.bandwidth, r.whatif_tps
    notes = []
    if bw["cpu_expert_GBps"] is not None:
        ub = bw["cpu_expert_upper_bound"]
        line = f"CPU experts: {_at_most(ub, _f(bw['cpu_expert_GBps'], 1))} GB/s"
        fraction = bw["cpu_expert_fraction_of_peak"]
        if fraction is not None:
            line += f" = {_at_most(ub, _f(100 * fraction, 1))} % of the {_f(bw['cpu_peak_GBps'], 1)} GB/s peak"
        line += f", {_at_most(ub, _size(bw['cpu_expert_bytes_per_token']))} read per token"
        notes.append(line)
        if ub:
            notes.append("  ≤: an upper bound: the log does not say which experts a batch used, so each batch "
                         "counts min(n_expert, tokens × n_expert_used) of them")
        if fraction is not None and fraction > 1 and not ub:
            notes.append("  above the peak: the peak was measured at another time, when the memory system gave "
                         "less, or given too low (see `peak bandwidth`); `hyprof membw --refresh` measures it again")
    lower = r.whatif_lower_bound
    bound = ("no hardware bound (it needs the peak of the backends that read most bytes)" if w["bound"] is None
             else f"{_at_least('bound' in lower, _f(w['bound'], 1))} t/s hardware bound")
    notes.append(f"what-if: {_f(w['no_overhead'], 1)} t/s with the overhead removed, "
                 f"{_at_least('cpu_expert_at_peak' in lower, _f(w['cpu_expert_at_peak'], 1))} t/s with the CPU "
                 f"experts at peak bandwidth, {bound}")
    notes += _offload_notes(r)
    for c, under, ns in r.hidden:
        notes.append(f"hidden overlap: {c} {_f(ns / 1e9, 3)} s ran under {under}")
    return tuple(notes)


def _offload_notes(r: TestReport) -> list[str]:
    """The weight uploads, and at this test's batch whether offloading the CPU's experts beats
    computing them there (analysis/offload.py), where the file measured what that needs."""
    up, o = r.uploads, r.offload
    notes = []
    if up["count"]:
        notes.append(f"weight uploads (op offload): {up['count']} copies, {_mb(up['bytes'])} MB in "
                     f"{_ms(up['s'] * 1e9)} ms = {_f(up['GBps'], 2)} GB/s, {_mb(up['bytes_per_token'])} MB per token")
    if o.get("faster"):
        crossover = o["crossover_batch"]
        notes.append(f"offload what-if at a batch of {o['batch']}: CPU experts {_ms(o['cpu_s'] * 1e9)} ms, uploaded "
                     f"and computed on the accelerator {_ms(o['offload_s'] * 1e9)} ms a graph -> {o['faster']} is "
                     f"faster; offloading pays from a batch of "
                     f"{crossover if crossover is not None else 'more than 8192'} (GGML_OP_OFFLOAD_MIN_BATCH)")
    return notes


def _backend_table(r: TestReport, peaks: dict) -> Table:
    rows = []
    for b in r.backends:
        peak = peaks.get(str(b["backend"]))
        ub = b["bytes_ub"]
        rows.append((str(b["backend"]) or "?", str(b["count"]), _ms(b["total_ns"]), _ms(b["busy_ns"]),
                     _at_most(ub, _mb(b["bytes"] / r.n_tokens) if r.n_tokens else "-"), _at_most(ub, _f(b["GBps"], 1)),
                     _at_most(ub, _f(100 * b["GBps"] / peak, 1)) if peak else "-"))
    return Table(f"{r.name}: ops by backend", ("backend", "ops", "total ms", "busy ms", "MB/token", "GB/s",
                                               "% of peak"), tuple(rows))


def _op_table(r: TestReport) -> Table:
    rows = tuple((str(o["op"]) or "?", str(o["backend"]) or "?", str(o["count"]), _ms(o["total_ns"]),
                  _f(o["pct"], 1), _f(o["mean_ns"] / 1e3, 1), _at_most(o["bytes_ub"], _f(o["GBps"], 1)) if o["bytes"] else "-")
                 for o in r.ops)
    return Table(f"{r.name}: op timing breakdown", ("op", "backend", "count", "total ms", "%", "mean µs", "GB/s"),
                 rows)


def _copy_table(r: TestReport) -> Table:
    rows = tuple((COPY_LABELS.get(str(c["direction"]), str(c["direction"])), f"{c['src'] or '?'} → {c['dst'] or '?'}", str(c["count"]), _mb(c["bytes"]),
                  _ms(c["total_ns"]), _f(c["GBps"], 2)) for c in r.copies)
    return Table(f"{r.name}: copies", ("direction", "backends", "count", "MB", "total ms", "GB/s"), rows)


HOTTEST_SHOWN = 5     # (layer, expert) pairs named under the expert table


def _expert_table(r: TestReport) -> Table:
    """Per size k: pinning each layer's k hottest experts on the GPU, or an LRU cache of k per layer."""
    u = r.experts
    top, lru = u.overall(u.coverage), u.overall(u.lru_hit)
    rows = []
    for k in u.ks:
        pin, cache = u.whatif["top"][k], u.whatif["lru"][k]
        rows.append((str(k), _f(100 * top[k - 1], 1), _f(100 * lru[k - 1], 1),
                     f"{_mb(pin['cpu_bytes_moved_per_token'])} / {_mb(cache['cpu_bytes_moved_per_token'])}",
                     _mb(cache["upload_bytes_per_token"]), _mb(pin["vram_bytes"]),
                     f"{_f(pin['tps'], 1)} / {_f(cache['tps'], 1)}"))
    share = u.counts / np.maximum(u.counts.sum(axis=1, keepdims=True), 1)         # of each layer's choices
    hottest = np.argsort(-share, axis=None, kind="stable")[:HOTTEST_SHOWN]
    notes = ["hottest (share of its layer's choices; uniform: "
             f"{_f(100 / u.n_expert, 1)} %): " + ", ".join(
                 f"blk.{u.layers[i]} #{e} {_f(100 * share[i, e], 1)} %"
                 for i, e in zip(*np.unravel_index(hottest, share.shape)))]
    notes.append("shares are of the CPU expert bytes (an expert's weights are read once per graph that uses it); "
                 "hottest pinned: chosen from this same run (a ceiling for a static list); LRU: replayed over the "
                 "recorded graphs from a cold cache, misses uploaded (assumed hidden behind compute)")
    notes.append("t/s: the moved bytes' time at the measured CPU expert bandwidth replaced by their time at the "
                 "accelerator's measured bandwidth ('-': no accelerator, or no CPU expert op, in this test)")
    if not u.cpu_bytes_per_read.any():
        notes.insert(0, "no expert op of this test ran on the CPU (its experts on the GPU, or its batch offloaded): "
                        "the shares are of the experts' reads, and nothing would move")
    return Table(f"{r.name}: expert routing — {u.n_tokens} tokens in {u.n_graphs} graphs, {u.n_expert_used} of "
                 f"{u.n_expert} experts per token, {len(u.layers)} MoE layers",
                 ("experts per layer on GPU", "pinned hottest: % of bytes", "LRU cache: hit %",
                  "CPU MB/token moved (pin / LRU)", "LRU upload MB/token", "VRAM MB", "t/s (pin / LRU)"),
                 tuple(rows), tuple(notes))


def _layer_table(r: TestReport) -> Table:
    rows = tuple((str(x["layer"]) if x["layer"] >= 0 else "-", str(x["backend"]) or "?", str(x["count"]),
                  _ms(x["total_ns"]), _ms(x["busy_ns"]), _at_most(x["bytes_ub"], _mb(x["bytes"])),
                  _at_most(x["bytes_ub"], _f(x["GBps"], 1))) for x in r.layers)
    return Table(f"{r.name}: per layer", ("layer", "backend", "ops", "total ms", "busy ms", "MB", "GB/s"), rows)


def _split_table(r: TestReport) -> Table:
    rows = tuple((str(s["split"]), str(s["backend"]) or "?", str(s["count"]), _f(s["mean_ns"] / 1e3, 1),
                  _ms(s["total_ns"]), _f(s["n_nodes_mean"], 1), _f(s["n_inputs_mean"], 1), _ms(s["op_total_ns"]),
                  _mb(s["op_bytes"]), _mb(s["copy_bytes"])) for s in r.splits)
    return Table(f"{r.name}: per split", ("split", "backend", "count", "mean µs", "total ms", "nodes", "inputs",
                                          "op ms", "op MB", "copy MB"), rows)


def _graph_table(report: Report) -> Table:
    names = report.reps["name"]
    rows = tuple((str(g["graph"]), str(names[g["rep"]]) if g["rep"] >= 0 else "-", str(g["n_tokens"]),
                  str(g["n_past"]), _ms(g["wall_ns"])) + tuple(_ms(g[f"{c}_ns"]) for c in CATEGORIES)
                 for g in report.graphs)
    return Table("graphs (ms)", ("graph", "test", "tokens", "n_past", "wall") + CATEGORIES, rows)
