"""Where op offload starts to pay: pp t/s per offload minimum, and the report's crossover beside it.

Runs `hyprof run`'s benchmark in one sweep on a model (default: deepseek-v2-lite-mini Q4_0,
made and cached by `hyprof run`), experts on the CPU and the rest on the emulated ACC0
(`-ngl 99 -ot "\\.ffn_.*_exps\\.=CPU"`): prompts of 8, 16, 32, 64 and 128 tokens (and a few
generated tokens, for the CPU's one-token expert bandwidth) under `--op-offload-min-batch`
8, 16, 32, 64, 128 and under `-nopo 1`. A prompt of B tokens is offloaded when the minimum is
<= B, so the table's diagonal is where each minimum switches. It prints pp t/s per minimum
and prompt; the measured crossover (the smallest prompt whose runs offloaded were faster, on
average, than its runs that were not: the best minimum among those tried) and the crossover
`hyprof report` predicts from the same run's measured rates (analysis/offload.py: upload GB/s,
CPU expert GB/s and GFLOP/s, ACC0's expert GFLOP/s).

    .venv/bin/python benchmarks/bench_offload.py [-m MODEL.gguf] [-t 2] [-r 2]

ACC0 computes on the same CPU cores as the workers, and its "upload" is a host memory copy:
its figures are not GPU or PCIe figures, and on a machine with few cores the CPU's idle
workers and ACC0 compete for them (--poll 0 here, so that idle workers sleep).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from analysis.offload import crossover_batch, offload_rates
from analysis.timings import load_timings
from hybrid import cpu_kernels
from hybrid.engine import make_engine
from hyprof.commands.run import default_model
from profiler.bench import plan_tests, run_bench, sweep
from profiler.machine import cpu_model
from profiler.membw import given_peak_bw

EXPERTS_ON_CPU = r"\.ffn_.*_exps\.=CPU"
BATCHES = (8, 16, 32, 64, 128)
NO_OFFLOAD = "nopo 1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: the cached deepseek-v2-lite-mini Q4_0)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-r", "--reps", type=int, default=2)
    args = ap.parse_args()
    model = args.model or default_model(progress=True)

    configs = (sweep(threads=[args.threads], n_gpu_layers=[99], override_sets=[[EXPERTS_ON_CPU]], accel="emulated",
                     poll=[0], op_offload_min_batch=list(BATCHES))
               + sweep(threads=[args.threads], n_gpu_layers=[99], override_sets=[[EXPERTS_ON_CPU]], accel="emulated",
                       poll=[0], no_op_offload=[1]))
    tests = plan_tests(n_prompt=list(BATCHES), n_gen=[4])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "offload.jsonl"
        results = run_bench(make_engine, model, configs, tests, args.reps, timings=str(path),
                            peak_bw=lambda threads: given_peak_bw(1.0), progress=True)
        rates = offload_rates(load_timings(path))

    tps = {(NO_OFFLOAD if r.config.no_op_offload else r.config.op_offload_min_batch, r.test.n_prompt): r.avg_ts
           for r in results if r.test.kind == "pp"}
    print(f"\nmodel {Path(model).name}, {args.threads} threads, CPU {cpu_model()}, "
          f"SIMD path {cpu_kernels.available()}, load average {os.getloadavg()[0]:.1f} at the end "
          f"(ACC0 emulated: not GPU/PCIe figures)")
    minimums = (*BATCHES, NO_OFFLOAD)
    print("pp t/s per offload minimum (rows) and prompt (columns); * = that prompt was offloaded")
    print(f"{'minimum':>10} " + " ".join(f"{f'pp{b}':>9}" for b in BATCHES))
    for m in minimums:
        cells = [f"{tps[m, b]:8.1f}{'*' if m != NO_OFFLOAD and m <= b else ' '}" for b in BATCHES]
        print(f"{m!s:>10} " + " ".join(cells))

    def mean_tps(b: int, offloaded: bool) -> float:
        return statistics.fmean(tps[m, b] for m in minimums if (m != NO_OFFLOAD and m <= b) == offloaded)
    measured = next((b for b in BATCHES if mean_tps(b, True) > mean_tps(b, False)), None)
    predicted = crossover_batch(rates)
    print(f"crossover: measured {measured if measured is not None else f'> {BATCHES[-1]}'} "
          f"(smallest prompt of {BATCHES} whose offloaded runs beat, on average, its others), "
          f"predicted {predicted if predicted is not None else '> 8192 or unknown'} "
          f"(hyprof report's model on this run's rates)")
    print(f"rates: upload {rates.upload_GBps or 0:.2f} GB/s, CPU experts {rates.cpu_expert_GBps or 0:.2f} GB/s at "
          f"1 token and {rates.cpu_expert_GFLOPs or 0:.1f} GFLOP/s batched, ACC0 experts "
          f"{rates.acc_expert_GFLOPs or 0:.1f} GFLOP/s batched")


if __name__ == "__main__":
    main()
