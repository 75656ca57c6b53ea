"""Bottleneck plots: where a token's time goes, at a glance (matplotlib, no pyplot state).

Public API (stable):

    write_plots(timings, report, attribution, out_dir, fmt="png", force=True) -> list[Path]
        breakdown, timeline, timeline_offload (when the run uploaded weights), ops, bandwidth,
        (when the run has depth tests) depth and (when it recorded routes) experts,
        each written atomically as out_dir/<name>.<fmt>.
    write_diff_plot(diff, out_dir, fmt="png", force=True) -> Path
        out_dir/breakdown-diff.<fmt>: per test, run A's bar over run B's, in ms/token.
    plot_breakdown(groups, subtitle, per_token=False, title=...) -> Figure
        groups: [(title, [(bar label, TestReport), ...]), ...], one panel per group;
        bar lengths in % of wall time, or in ms/token with per_token (for comparing runs).
    plot_timeline(token_timeline, subtitle) -> Figure
    plot_ops(tests, subtitle, top=10) -> Figure
    plot_bandwidth(tests, peak_GBps, subtitle) -> Figure
    plot_depth(series, subtitle) -> Figure
    plot_experts(tests, subtitle) -> Figure     (tests with expert usage: TestReport.experts)
    plot_advice(advice, chosen, vram_budget, subtitle) -> Figure
        `hyprof advise`: predicted tg t/s against accelerator memory for every candidate.
    CATEGORY_COLOURS {category: colour}

Each plot function takes results (TestReport, TokenTimeline, DepthSeries) and
only lays them out. Every drawn bar or line carries a gid (`category:<name>`,
`backend:<name>`, `peak:<backend>`, `series:<test>`, `usage:<test>`, `coverage:<test>`,
`lru:<test>`), so that tests can ask a
figure what it shows; figures are plain `Figure`s (no pyplot), saved with Agg.

Colours are the Okabe-Ito palette (safe for the common colour-vision
deficiencies), fixed per category so that every plot and every run reads alike:
the CPU experts are always vermillion, the GPU always green.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.attribution import Attribution
from analysis.depth import DepthSeries, depth_series
from analysis.diff import Diff
from analysis.report import COMPUTE_CATEGORIES, Report, TestReport
from analysis.run_info import describe_run
from analysis.timeline import TokenTimeline, token_timeline
from analysis.timings import Timings
from profiler.errors import UserError
from profiler.files import atomic_output, check_output_path
from profiler.schema import CATEGORIES

# timeline_offload: the timeline of a graph that uploaded weights (op offload), its uploads on the
# copies lane; drawn only for a run that has some (the `timeline` is a generated token's)
PLOT_NAMES = ("breakdown", "timeline", "timeline_offload", "ops", "bandwidth", "depth", "experts")
CATEGORY_COLOURS = {
    "cpu_expert_matmul": "#D55E00",  # vermillion
    "cpu_other": "#E69F00",          # orange
    "gpu_compute": "#009E73",        # bluish green
    "thread_wakeup": "#CC79A7",      # reddish purple
    "copy": "#56B4E9",               # sky blue
    "sync": "#0072B2",               # blue
    "sched": "#F0E442",              # yellow
    "graph_build": "#666666",        # dark grey
    "other": "#C8C8C8",              # light grey
}
HOST_COLOUR, DEVICE_COLOUR = CATEGORY_COLOURS["cpu_other"], CATEGORY_COLOURS["gpu_compute"]
LABEL_MIN_FRACTION = 0.09   # a segment narrower than this share of the axis gets its label outside
SMALL_TEXT_WIDTH = 170      # characters per line of the list of segments too small to label
LOG_BELOW = 0.05            # a bandwidth axis turns logarithmic when a bar is below this share of it
SLIVER_FRACTION = 0.0015    # the narrowest a timeline bar is drawn, so that short ops stay visible
SUBTITLE_CHARS_PER_INCH = 14
DPI = 150


# ---------------------------------------------------------------- shared layout helpers

def _text_colour(colour: str) -> str:
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _ms(x: float) -> str:
    """Milliseconds with about three significant digits."""
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if abs(x) >= limit:
            return f"{x:.{digits}f}"
    return f"{x:.4f}" if x else "0"


def _mb(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.3g} {unit}"
    return f"{n:.3g} B"


def _new_figure(width: float, height: float, title: str, sub: str) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=13, fontweight="bold")
    sub = "\n".join(textwrap.fill(line, width=int(width * SUBTITLE_CHARS_PER_INCH)) for line in sub.split("\n"))
    fig.supxlabel(sub, fontsize=8, color="#444444").set_gid("subtitle")   # at the bottom, clear of the legend
    return fig


def _legend(fig: Figure, categories: Sequence[str]) -> None:
    """The categories shown, in the fixed order, to the right (the title and subtitle hold top and bottom)."""
    handles = [Patch(facecolor=CATEGORY_COLOURS[c], label=c) for c in CATEGORIES if c in categories]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)


def save(fig: Figure, path: Path, fmt: str, force: bool) -> Path:
    with atomic_output(path, "wb", force=force, flag="--plots") as f:
        fig.savefig(f, format=fmt, dpi=DPI)
    return path


# ---------------------------------------------------------------- breakdown

def plot_breakdown(groups: Sequence[tuple[str, Sequence[tuple[str, TestReport]]]], subtitle: str,
                   per_token: bool = False, title: str = "Where a token's time goes") -> Figure:
    n_bars = sum(len(bars) for _, bars in groups)
    single = len(groups) == 1
    if single and len(groups[0][1]) <= 4:
        title += ": " + " · ".join(f"{label} {r.tps:,.1f} t/s" for label, r in groups[0][1])
    fig = _new_figure(12, 1.6 + 0.95 * n_bars + 0.5 * len(groups), title, subtitle)
    axes = fig.subplots(len(groups), 1, squeeze=False,
                        height_ratios=[max(len(bars), 1) for _, bars in groups])[:, 0]
    shown = set()
    for ax, (group_title, bars) in zip(axes, groups):
        shown |= _breakdown_panel(ax, bars, per_token)
        if group_title:
            ax.set_title(group_title, fontsize=10, loc="left")
    _legend(fig, shown)
    return fig


def _breakdown_panel(ax, bars: Sequence[tuple[str, TestReport]], per_token: bool) -> set:
    shown = set()
    span = max((r.ms_per_token(r.wall_ns) or 0.0 for _, r in bars), default=1.0) if per_token else 100.0
    for y, (label, r) in enumerate(bars):
        left, small = 0.0, []
        for c in CATEGORIES:
            ns = r.categories_ns[c]
            if ns <= 0:
                continue
            pct = 100.0 * ns / r.wall_ns
            per_tok = r.ms_per_token(ns) or 0.0
            width = per_tok if per_token else pct
            colour = CATEGORY_COLOURS[c]
            ax.barh(y, width, left=left, height=0.55, color=colour, edgecolor="white", linewidth=0.5,
                    gid=f"category:{c}")
            shown.add(c)
            text = f"{pct:.1f}%\n{_ms(per_tok)} ms/tok"
            if width >= LABEL_MIN_FRACTION * span:
                ax.text(left + width / 2, y, text, ha="center", va="center", fontsize=7.5,
                        color=_text_colour(colour))
            else:
                small.append(f"{c} {pct:.1f}% ({_ms(per_tok)} ms/tok)")
            left += width
        if small:
            lines = textwrap.wrap("smaller: " + " · ".join(small), width=SMALL_TEXT_WIDTH)
            ax.text(0, y + 0.31, "\n".join(lines), ha="left", va="top", fontsize=7, color="#333333")
    ax.set_yticks(range(len(bars)),
                  [f"{label}\n{r.tps:,.1f} t/s\n{r.ms_per_token(r.wall_ns) or 0.0:.3g} ms/token"
                   + (f"\nreported {r.reported_tps:,.1f} t/s" if r.reported_tps is not None else "")
                   for label, r in bars], fontsize=8.5)
    ax.set_ylim(len(bars) - 0.35, -0.45)
    ax.set_xlim(0, span * 1.01)
    ax.set_xlabel("ms per token" if per_token else "share of wall time (%)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return shown


# ---------------------------------------------------------------- timeline

def plot_timeline(tl: TokenTimeline, subtitle: str) -> Figure:
    unit = "token" if tl.n_tokens == 1 else f"batch of {tl.n_tokens} tokens"
    title = (f"One {unit} of {tl.test}: graph {tl.graph}, {tl.wall_ns / 1e6:.3g} ms "
             f"(median wall of {tl.n_candidates} graph{'s' if tl.n_candidates != 1 else ''}), KV depth {tl.n_past}")
    n_lanes = len(tl.lanes) + 1                # + the splits band on top
    fig = _new_figure(13, 2.0 + 0.42 * n_lanes, title, subtitle)
    ax = fig.subplots()
    wall_ms = tl.wall_ns / 1e6
    sliver = SLIVER_FRACTION * wall_ms
    shown = set()
    for lane in range(len(tl.lanes)):
        y = lane + 1
        mine = tl.bars[tl.bars["lane"] == lane]
        for c, name in enumerate(CATEGORIES):
            sel = mine[mine["category"] == c]
            if not len(sel):
                continue
            spans = [(s / 1e6, max(d / 1e6, sliver)) for s, d in zip(sel["start_ns"], sel["dur_ns"])]
            ax.broken_barh(spans, (y - 0.36, 0.72), facecolors=CATEGORY_COLOURS[name], edgecolor="white",
                           linewidth=0.3, gid=f"category:{name}")
            shown.add(name)
            for s, d, label in zip(sel["start_ns"], sel["dur_ns"], sel["label"]):
                if d / 1e6 >= 0.06 * wall_ms and label:
                    ax.text((s + d / 2) / 1e6, y, label, ha="center", va="center", fontsize=6.5,
                            color=_text_colour(CATEGORY_COLOURS[name]), clip_on=True)
    for s, d, split, backend in tl.splits:
        on_device = bool(backend) and not backend.upper().startswith("CPU")
        colour = DEVICE_COLOUR if on_device else HOST_COLOUR
        ax.broken_barh([(s / 1e6, d / 1e6)], (-0.3, 0.6), facecolors=colour, alpha=0.35, edgecolor=colour,
                       linewidth=0.8, gid=f"backend:{backend}")
        # the full label where it fits, the split index where only that fits (the colour tells the backend)
        label = f"split {split}: {backend}" if d / 1e6 >= 0.09 * wall_ms else str(split) if d / 1e6 >= 0.012 * wall_ms \
            else ""
        if label:
            ax.text((s + d / 2) / 1e6, 0, label, ha="center", va="center", fontsize=7)
        ax.axvline(s / 1e6, color="#555555", linestyle=":", linewidth=0.7, zorder=0)
    if len(tl.splits):
        ax.axvline((tl.splits["start_ns"] + tl.splits["dur_ns"]).max() / 1e6, color="#555555", linestyle=":",
                   linewidth=0.7, zorder=0)
    labels = ["splits"] + [f"{lane}\n(device)" if dev else lane for lane, dev in zip(tl.lanes, tl.is_device)]
    ax.set_yticks(range(n_lanes), labels, fontsize=8.5)
    ax.set_ylim(n_lanes - 0.5, -0.5)
    ax.set_xlim(0, wall_ms)
    ax.set_xlabel("ms from the start of the graph (dotted: split boundaries)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    _legend(fig, shown)
    return fig


# ---------------------------------------------------------------- ops

def _backends(tests: Sequence[TestReport]) -> list[str]:
    names = {str(b) for r in tests for b in r.ops["backend"]}
    return sorted(names, key=lambda b: (not b.upper().startswith("CPU"), b))


def plot_ops(tests: Sequence[TestReport], subtitle: str, top: int = 10) -> Figure:
    backends = _backends(tests) or ["-"]
    rows = max(len(tests), 1)
    # bar slots per panel: the most any panel shows, so that bars are equally thick everywhere
    counts = [int((r.ops["backend"] == b).sum()) for r in tests for b in backends]
    slots = max([min(n, top) + (n > top) for n in counts] + [1])
    fig = _new_figure(6.5 * len(backends), 1.4 + rows * (0.9 + 0.3 * slots), "Top ops by time, per backend",
                      subtitle)
    axes = fig.subplots(rows, len(backends), squeeze=False)
    for row, r in enumerate(tests):
        for col, backend in enumerate(backends):
            _ops_panel(axes[row, col], r, backend, top, slots)
    return fig


def _ops_panel(ax, r: TestReport, backend: str, top: int, slots: int) -> None:
    ops = r.ops[r.ops["backend"] == backend]          # sorted by total time, longest first
    per_token = ops["total_ns"] / 1e6 / max(r.n_tokens, 1)
    backend_total = per_token.sum()
    ax.set_title(f"{r.name} · {backend}: {_ms(backend_total)} ms/token in ops", fontsize=9.5, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    if not len(ops):
        ax.text(0.5, 0.5, "no ops on this backend", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_yticks([])
        return
    shown, rest = ops[:top], per_token[top:]
    values = list(per_token[:top]) + ([rest.sum()] if rest.size else [])
    labels = [f"{o['op']} ×{o['count']:,}" for o in shown]
    labels += [f"{rest.size} more op type{'s' if rest.size > 1 else ''}"] if rest.size else []
    colour = HOST_COLOUR if backend.upper().startswith("CPU") else DEVICE_COLOUR
    ax.barh(range(len(values)), values, color=[colour] * len(shown) + ["#C8C8C8"] * bool(rest.size),
            height=0.7, gid=f"backend:{backend}")
    cumulative = np.cumsum(values) / backend_total * 100 if backend_total else np.zeros(len(values))
    for y, (v, cum) in enumerate(zip(values, cumulative)):
        share = 100 * v / backend_total if backend_total else 0
        ax.text(v, y, f" {_ms(v)} ms  {share:.1f}%  (Σ {cum:.0f}%)", va="center", fontsize=7.5)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.set_ylim(slots - 0.5, -0.6)
    ax.set_xlim(0, max(values) * 1.55 if max(values) > 0 else 1)
    ax.set_xlabel("ms per token (summed over lanes; ×: calls); %: share of this backend's op time", fontsize=8)


# ---------------------------------------------------------------- bandwidth

def plot_bandwidth(tests: Sequence[TestReport], peak_GBps: dict, subtitle: str) -> Figure:
    items = [_bandwidth_items(r) for r in tests]
    heights = [max(len(i), 1) + 0.8 for i in items] or [1]
    fig = _new_figure(11, 1.6 + 0.42 * sum(heights), "Achieved read bandwidth against the measured peak", subtitle)
    axes = fig.subplots(max(len(tests), 1), 1, squeeze=False, sharex=True, height_ratios=heights)[:, 0]
    values = [v for it in items for _, v, _, _ in it if v > 0] + list(peak_GBps.values())
    x_max = max(values + [1e-9]) * 1.3
    # bars far below the peak (a tiny model, a test bound elsewhere) vanish on a linear axis
    log = bool(values) and min(values) < LOG_BELOW * x_max
    for ax, r, it in zip(axes, tests, items):
        if log:
            ax.set_xscale("log")
        ax.set_xlim(*((min(values) / 3, x_max * 2) if log else (0, x_max)))
        _bandwidth_panel(ax, r, it, peak_GBps)
    axes[-1].set_xlabel("GB/s: bytes read over the union of busy time (dashed: the backend's measured peak)",
                        fontsize=8.5)
    return fig


def _bandwidth_items(r: TestReport) -> list[tuple[str, float, float, str]]:
    """(label, GB/s, bytes per token, gid) for each backend and compute category that read bytes,
    each backend followed by its categories (so that its peak line spans them); a label ends in
    "(≤)" where the bytes are an upper bound (an imported batch's experts)."""
    per = max(r.n_tokens, 1)
    items = []
    for b in r.backends:
        if b["bytes"] <= 0 or b["busy_ns"] <= 0:
            continue
        backend = str(b["backend"])
        at_most = {True: " (≤)", False: ""}
        items.append((f"all ops on {backend}{at_most[bool(b['bytes_ub'])]}", float(b["GBps"]), b["bytes"] / per,
                      f"backend:{backend}"))
        on_cpu = backend.upper().startswith("CPU")
        items += [(c + at_most[r.category_bw[c]["upper_bound"]], float(r.category_bw[c]["GBps"]),
                   r.category_bw[c]["bytes"] / per, f"category:{c}")
                  for c in COMPUTE_CATEGORIES if c.startswith("cpu") == on_cpu
                  and r.category_bw[c]["bytes"] > 0 and r.category_bw[c]["GBps"]]
    return items


def _bandwidth_panel(ax, r: TestReport, items, peak_GBps: dict) -> None:
    ax.set_title(r.name, fontsize=10, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    if not items:
        ax.text(0.5, 0.5, "no op of this test reports the bytes it read", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set_yticks([])
        return
    ax.set_ylim(len(items) - 0.4, -0.6)
    to_axes = ax.transData + ax.transAxes.inverted()
    group_start, backend = 0, None
    for y, (label, gbps, per_token, gid) in enumerate(items):
        kind, name = gid.split(":", 1)
        colour = CATEGORY_COLOURS[name] if kind == "category" else "#8C8C8C"
        ax.barh(y, gbps, height=0.6, color=colour, hatch="//" if kind == "backend" else None,
                edgecolor="white", gid=gid)
        if kind == "backend":
            backend, group_start = name, y
        peak = peak_GBps.get(backend)
        text = f"{gbps:,.3g} GB/s" + (f" ({100 * gbps / peak:.0f}% of peak)" if peak else "")
        text += f" · {_mb(per_token)}/token"
        inside = to_axes.transform((gbps, y))[0] > 0.45   # long bars carry their label, clear of the peak line
        ax.text(gbps, y, f"{text} " if inside else f" {text}", va="center", ha="right" if inside else "left",
                fontsize=7.5, color=_text_colour(colour) if inside else "black",
                bbox=None if inside else {"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        last_of_group = y + 1 == len(items) or items[y + 1][3].startswith("backend:")
        if last_of_group and backend in peak_GBps:
            peak = peak_GBps[backend]
            ax.vlines(peak, group_start - 0.45, y + 0.45, color="black", linestyle="--", linewidth=1,
                      gid=f"peak:{backend}")
            ax.text(peak, group_start - 0.45, f" {backend} peak {peak:,.1f} GB/s", fontsize=7.5, va="bottom",
                    ha="left")
    ax.set_yticks(range(len(items)), [label for label, *_ in items], fontsize=8.5)


# ---------------------------------------------------------------- depth

def plot_depth(series: Sequence[DepthSeries], subtitle: str) -> Figure:
    fig = _new_figure(6 * len(series) + 1, 7, "Token rate and time shares against context depth", subtitle)
    axes = fig.subplots(2, len(series), squeeze=False, sharex="col", height_ratios=[1, 1.4])
    shown = set()
    for col, s in enumerate(series):
        top, bottom = axes[0, col], axes[1, col]
        x = np.arange(len(s.depths))
        tps = [r.tps for r in s.tests]
        top.errorbar(x, tps, yerr=[r.tps_std for r in s.tests], marker="o", color="#0072B2", capsize=3,
                     gid=f"series:{s.base}")
        for xi, v in zip(x, tps):
            top.annotate(f"{v:,.1f}", (xi, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        top.set_ylim(0, max(tps) * 1.25 if max(tps) > 0 else 1)
        top.set_ylabel("t/s", fontsize=9)
        top.set_title(f"{s.base} at depth (KV cache tokens)", fontsize=10, loc="left")
        bottom_edge = np.zeros(len(s.tests))
        for c in CATEGORIES:
            share = np.array([100.0 * r.categories_ns[c] / r.wall_ns if r.wall_ns else 0.0 for r in s.tests])
            if not share.any():
                continue
            bottom.bar(x, share, bottom=bottom_edge, color=CATEGORY_COLOURS[c], width=0.6, edgecolor="white",
                       linewidth=0.5, gid=f"category:{c}")
            for xi, b, v in zip(x, bottom_edge, share):
                if v >= 6:
                    bottom.text(xi, b + v / 2, f"{v:.0f}%", ha="center", va="center", fontsize=7.5,
                                color=_text_colour(CATEGORY_COLOURS[c]))
            bottom_edge += share
            shown.add(c)
        bottom.set_ylim(0, 100)
        bottom.set_ylabel("share of wall time (%)", fontsize=9)
        bottom.set_xticks(x, [str(d) for d in s.depths], fontsize=8.5)
        bottom.set_xlabel("context depth (tokens already in the KV cache)", fontsize=9)
        for ax in (top, bottom):
            ax.spines[["top", "right"]].set_visible(False)
    _legend(fig, shown)
    return fig


# ---------------------------------------------------------------- experts

def plot_experts(tests: Sequence[TestReport], subtitle: str) -> Figure:
    """Per test: a layer x expert heatmap of each layer's share of tokens, and the coverage curves:
    the share of CPU expert bytes that pinning each layer's k hottest experts, or an LRU cache of
    k per layer, would take off the CPU."""
    fig = _new_figure(14, 1.4 + 3.2 * len(tests), "Which experts the tokens used, and what caching them would move",
                      subtitle)
    axes = fig.subplots(len(tests), 2, squeeze=False, width_ratios=[2.2, 1])
    for (heat, curves), r in zip(axes, tests):
        u = r.experts
        share = 100 * u.counts / np.maximum(u.counts.sum(axis=1, keepdims=True), 1)
        image = heat.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
        image.set_gid(f"usage:{r.name}")
        heat.set_yticks(range(len(u.layers)), [str(layer) for layer in u.layers], fontsize=7)
        heat.set_ylabel("layer", fontsize=9)
        heat.set_xlabel("expert", fontsize=9)
        heat.set_title(f"{r.name}: share of the layer's {u.n_tokens} tokens that chose each expert "
                       f"({u.n_expert_used} of {u.n_expert} each)", fontsize=10, loc="left")
        fig.colorbar(image, ax=heat, label="% of the layer's choices", pad=0.01)
        k = np.arange(1, u.n_expert + 1)
        for shares, gid, label, colour in ((u.coverage, "coverage", "pin the k hottest", "#D55E00"),
                                           (u.lru_hit, "lru", "LRU cache of k", "#0072B2")):
            overall = 100 * u.overall(shares)
            curves.plot(k, overall, color=colour, label=label, gid=f"{gid}:{r.name}")
            curves.plot(list(u.ks), overall[np.asarray(u.ks) - 1], "o", color=colour, markersize=4)
        curves.plot(k, 100 * k / u.n_expert, ":", color="#8C8C8C", label="uniform routing")
        curves.set_xlim(0, u.n_expert)
        curves.set_ylim(0, 100)
        curves.set_xlabel("experts per layer on the GPU (k)", fontsize=9)
        curves.set_ylabel("% of CPU expert bytes moved", fontsize=9)
        curves.legend(fontsize=8, frameon=False, loc="lower right")
        curves.spines[["top", "right"]].set_visible(False)
    return fig


# ---------------------------------------------------------------- all plots of a report

def plot_paths(out_dir: str | os.PathLike, fmt: str) -> dict[str, Path]:
    return {name: Path(out_dir) / f"{name}.{fmt}" for name in PLOT_NAMES}


def write_plots(t: Timings, report: Report, a: Attribution, out_dir: str | os.PathLike, fmt: str = "png",
                force: bool = True) -> list[Path]:
    """Render every plot that the run has data for; check all outputs before drawing any."""
    paths = plot_paths(out_dir, fmt)
    for path in paths.values():
        check_output_path(path, force=force, flag="--plots")
    sub = describe_run(report.header, report.emulated)
    figures = {"breakdown": plot_breakdown([("", [(r.name, r) for r in report.tests])], sub),
               "ops": plot_ops(report.tests, sub),
               "bandwidth": plot_bandwidth(report.tests, report.peak_GBps, sub)}
    tl = token_timeline(t, a)
    if tl is not None:
        figures["timeline"] = plot_timeline(tl, sub)
    offloaded = next((r.name for r in report.tests if r.uploads["count"]), None)
    if offloaded is not None:
        figures["timeline_offload"] = plot_timeline(token_timeline(t, a, offloaded), sub)
    series = depth_series(report, t)
    if series:
        figures["depth"] = plot_depth(series, sub)
    routed = [r for r in report.tests if r.experts is not None]
    if routed:
        figures["experts"] = plot_experts(routed, sub)
    return [save(figures[name], paths[name], fmt, force) for name in PLOT_NAMES if name in figures]


def write_diff_plot(diff: Diff, out_dir: str | os.PathLike, fmt: str = "png", force: bool = True) -> Path:
    path = Path(out_dir) / f"breakdown-diff.{fmt}"
    check_output_path(path, force=force, flag="--plots")
    if not diff.tests:
        raise UserError(f"--plots: {diff.a.source} and {diff.b.source} have no test name in common; nothing to draw")
    a_label, b_label = f"A: {Path(diff.a.source).stem}", f"B: {Path(diff.b.source).stem}"
    groups = [(f"{t.name}: {t.a.tps:,.1f} → {t.b.tps:,.1f} t/s"
               + (f" ({t.tps_change_pct:+.1f} %)" if t.tps_change_pct is not None else ""),
               [(a_label, t.a), (b_label, t.b)]) for t in diff.tests]
    sub = "\n".join(f"{side}: " + describe_run(r.header, r.emulated).replace("\n", " · ")
                    for side, r in (("A", diff.a), ("B", diff.b)))
    fig = plot_breakdown(groups, sub, per_token=True, title="Where a token's time goes: A against B")
    return save(fig, path, fmt, force)


# ---------------------------------------------------------------- advice

def plot_advice(advice: Sequence, chosen: int, vram_budget: int, subtitle: str) -> Figure:
    """Predicted tg t/s against the accelerator memory of every candidate that fits (analysis.advise.Advice,
    ranked), the chosen one starred, measured rates (after --verify) as hollow circles above or below."""
    fig = _new_figure(10, 6, "Predicted generation rate of each placement", subtitle)
    ax = fig.subplots()
    mib = np.array([a.vram_bytes for a in advice], dtype=np.float64) / (1 << 20)
    tps = np.array([a.tg.tps for a in advice])
    ax.scatter(mib, tps, s=18, color=DEVICE_COLOUR, alpha=0.7, label="candidate (predicted)", gid="candidates")
    measured = [(m, a.measured_tg_tps, a.tg.tps) for m, a in zip(mib, advice) if a.measured_tg_tps]
    for i, (m, got, predicted) in enumerate(measured):
        ax.plot([m, m], [predicted, got], color="#444444", linewidth=0.8)
        ax.scatter([m], [got], s=60, facecolors="none", edgecolors="black", gid=f"measured:{i}", zorder=4,
                   label="measured (--verify)" if i == 0 else None)
    best = advice[chosen]
    ax.scatter([mib[chosen]], [tps[chosen]], s=220, marker="*", color=CATEGORY_COLOURS["cpu_expert_matmul"],
               zorder=3, gid="chosen", label=f"chosen: {textwrap.shorten(best.candidate.words, 60)}")
    ax.axvline(vram_budget / (1 << 20), color="#444444", linestyle="--", linewidth=1, gid="budget",
               label=f"--vram {vram_budget / (1 << 20):,.0f} MiB")
    ax.set_xlabel("accelerator memory: weights + KV cache + compute buffer (MiB)", fontsize=9)
    ax.set_ylabel("tg t/s", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
