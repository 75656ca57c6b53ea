"""How fast `hyprof report` is: events per second, end to end (load + attribute + report + render).

    .venv/bin/python benchmarks/bench_report.py [--events 3000000] [--file /tmp/hyprof-bench.jsonl]

Writes a synthetic timings file shaped like a hybrid DeepSeek run (per token and
layer: a GPU split with attention ops and a sync, copies both ways, a CPU split
with wakeups and expert matmuls on several lanes, and each layer's route: 6 of 64
experts, skewed), once, then times each stage
and prints the figures and the peak memory next to the size of the columns.
The target (issue 6) is 1 M events/s end to end on the 2-core development machine;
wall time there depends on what else runs, so the CPU seconds are printed too.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import time

from rich.console import Console

from analysis import flatjson, render_console, render_markdown
from analysis.attribution import attribute
from analysis.heap import keep_freed_memory
from analysis.report import build_report
from analysis.tables import report_tables
from analysis.timings import load_timings

LAYERS = 27
LANES = ("main", "cpu1", "cpu2", "cpu3")
N_EXPERT, N_EXPERT_USED = 64, 6
GPU_OPS = ("RMS_NORM", "MUL_MAT", "MUL_MAT", "ROPE", "SOFT_MAX", "MUL_MAT", "ADD", "MUL_MAT")


def _graph_lines(graph: int, ts: int, n_past: int) -> tuple[list[str], int]:
    """One token's events as JSON lines (written by hand: generating must not dominate the benchmark)."""
    lines, t0 = [], ts
    lines.append(f'{{"type":"phase","ts":{ts},"dur":40000,"graph":{graph},"tid":"main","name":"graph_build"}}')
    ts += 40000
    split = 0
    for layer in range(LAYERS):
        lines.append(f'{{"type":"split","ts":{ts},"dur":{len(GPU_OPS) * 6000 + 3000},"graph":{graph},"split":{split},'
                     f'"backend":"CUDA0","tid":"main","n_nodes":{len(GPU_OPS)},"n_inputs":1}}')
        for i, op in enumerate(GPU_OPS):
            lines.append(f'{{"type":"op","ts":{ts + 2000 + 6000 * i},"dur":5000,"tid":"CUDA0","graph":{graph},'
                         f'"split":{split},"backend":"CUDA0","op":"{op}","name":"blk.{layer}.attn_{i}","layer":{layer},'
                         f'"bytes":2000000,"flops":4000000,"n_tokens":1}}')
        lines.append(f'{{"type":"sync","ts":{ts + 2000},"dur":{len(GPU_OPS) * 6000},"graph":{graph},"split":{split},'
                     f'"backend":"CUDA0","tid":"main"}}')
        ts += len(GPU_OPS) * 6000 + 3000
        split += 1
        lines.append(f'{{"type":"split","ts":{ts},"dur":330000,"graph":{graph},"split":{split},"backend":"CPU",'
                     f'"tid":"main","n_nodes":4,"n_inputs":2}}')
        lines.append(f'{{"type":"copy","ts":{ts + 1000},"dur":9000,"graph":{graph},"split":{split},"src":"CUDA0",'
                     f'"dst":"CPU","bytes":8192,"name":"blk.{layer}.ffn_inp","tid":"main"}}')
        for k, lane in enumerate(LANES[1:]):
            lines.append(f'{{"type":"wakeup","ts":{ts + 10000},"dur":{5000 + 1000 * k},"graph":{graph},'
                         f'"split":{split},"backend":"CPU","tid":"{lane}"}}')
        for j, name in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            for k, lane in enumerate(LANES):
                lines.append(f'{{"type":"op","ts":{ts + 20000 + 100000 * j + 500 * k},"dur":95000,"tid":"{lane}",'
                             f'"graph":{graph},"split":{split},"backend":"CPU","op":"MUL_MAT_ID",'
                             f'"name":"blk.{layer}.{name}","layer":{layer},"bytes":6000000,"flops":12000000,'
                             f'"n_tokens":1}}')
        lines.append(f'{{"type":"copy","ts":{ts + 320000},"dur":8000,"graph":{graph},"split":{split},"src":"CPU",'
                     f'"dst":"CUDA0","bytes":8192,"name":"blk.{layer}.ffn_out","tid":"main"}}')
        ts += 330000
        split += 1
    for layer in range(LAYERS):
        experts = ",".join(str((graph * layer + k * k) % N_EXPERT) for k in range(N_EXPERT_USED))
        lines.append(f'{{"type":"route","ts":{ts},"dur":0,"graph":{graph},"layer":{layer},"n_tokens":1,'
                     f'"experts":[{experts}],"tid":"main"}}')
    lines.append(f'{{"type":"phase","ts":{ts},"dur":20000,"graph":{graph},"tid":"main","name":"sample"}}')
    ts += 20000
    lines.append(f'{{"type":"graph","ts":{t0},"dur":{ts - t0},"graph":{graph},"test":"tg","n_tokens":1,'
                 f'"n_past":{n_past}}}')
    # in time order, longest first at equal starts, as the recorder writes them
    key = [(int(x[x.index('"ts":') + 5:x.index(',', x.index('"ts":'))]),
            -int(x[x.index('"dur":') + 6:x.index(',', x.index('"dur":'))])) for x in lines]
    return [x for _, x in sorted(zip(key, lines))], ts


def write_synthetic(path: str, n_events: int, tokens_per_rep: int = 128) -> int:
    header = ('{"type":"meta","schema":"hyprof-timings/1","tool":"bench_report",'
              f'"model":{{"n_expert":{N_EXPERT},"n_expert_used":{N_EXPERT_USED}}},"config":{{"threads":4,'
              '"accel":"CUDA0"},"peak_bw":{"CPU":{"GBps":64.0,"method":"synthetic"}}}')
    written, graph, ts = 0, 0, 0
    with open(path, "w") as f:
        f.write(header + "\n")
        while written < n_events:
            rep_start, body = ts, []
            for tok in range(tokens_per_rep):
                lines, ts = _graph_lines(graph, ts, tok)
                body += lines
                graph += 1
            f.write(f'{{"type":"test","ts":{rep_start},"dur":{ts - rep_start},"name":"tg{tokens_per_rep}",'
                    f'"kind":"tg","n_prompt":0,"n_gen":{tokens_per_rep},"depth":0,"rep":{graph // tokens_per_rep - 1},'
                    f'"n_tokens":{tokens_per_rep}}}\n')
            f.write("\n".join(body) + "\n")
            written += len(body) + 1
            ts += 1_000_000
    return written


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the loader reads large files on several)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))


def _timed(stages: list, name: str, fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), _cpu_s()
    result = fn(*args, **kwargs)
    stages.append((name, time.perf_counter() - wall, _cpu_s() - cpu))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3_000_000, help="events in the synthetic file (at least)")
    parser.add_argument("--file", default="/tmp/hyprof-bench-timings.jsonl", help="where the synthetic file goes")
    parser.add_argument("--regenerate", action="store_true", help="write the file even if it exists")
    args = parser.parse_args()

    if args.regenerate or not os.path.exists(args.file):
        t = time.perf_counter()
        n = write_synthetic(args.file, args.events)
        print(f"wrote {n:,} events to {args.file} in {time.perf_counter() - t:.1f} s")
    size = os.path.getsize(args.file)

    def render(report):
        tables = report_tables(report, layers=True, splits=True)
        render_console.render(tables, Console(file=io.StringIO(), width=160))
        return render_markdown.render(tables)

    keep_freed_memory()      # as `hyprof report` does
    stages, wall0, cpu0 = [], time.perf_counter(), _cpu_s()
    timings = _timed(stages, "load", load_timings, args.file)
    attribution = _timed(stages, "attribute", attribute, timings)
    report = _timed(stages, "report (bandwidth, tables)", build_report, timings, attribution=attribution)
    _timed(stages, "render (terminal + markdown)", render, report)
    stages.append(("end to end", time.perf_counter() - wall0, _cpu_s() - cpu0))

    n = len(timings.events)
    print(f"{n:,} events, {size / 1e6:,.0f} MB of JSONL, {len(report.graphs):,} graphs; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine inflates wall time, not CPU time; "
          f"CPU time counts the loader's child processes)")
    print("line scanner: " + ("compiled (analysis._jsonl)" if flatjson._jsonl is not None else
                              "NumPy only (analysis._jsonl is not built: setup.py build_ext --inplace)"))
    print(f"  {'stage':<30} {'wall s':>7} {'M ev/s':>7}   {'CPU s':>7} {'M ev/CPU s':>10}")
    for stage, wall, cpu in stages:
        print(f"  {stage:<30} {wall:7.2f} {n / wall / 1e6:7.2f}   {cpu:7.2f} {n / max(cpu, 1e-9) / 1e6:10.2f}")
    columns = timings.events.nbytes + attribution.event_category.nbytes
    peak, child = (resource.getrusage(who).ru_maxrss * 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"memory: columns {columns / 1e6:,.0f} MB, peak RSS {peak / 1e6:,.0f} MB"
          + (f" (a loader child: {child / 1e6:,.0f} MB, in part the same shared pages)" if child else ""))


if __name__ == "__main__":
    main()
