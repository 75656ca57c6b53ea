"""`hyprof advise`: the placement that maximises t/s within a VRAM budget, predicted from measured rates and verified."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

from profiler.errors import UserError

EPILOG = """\
how it decides:
  1. candidates: -ngl 99 with the routed experts of the first N MoE layers on the
     CPU (-ncmoe N) for every N, the boundary layer's down or gate+up experts on
     either side, and the shared experts, dense FFNs and output head on either
     side; and -ngl K for every K with the experts on the CPU. Rules only ever send
     tensors to the CPU, so they paste into llama.cpp / ik_llama.cpp as printed.
  2. each must fit --vram: the weights it puts on the accelerator (as stored),
     the KV cache of its accelerator layers for -c positions (float32, as this
     engine allocates it) and a compute buffer estimate (two activations of the
     widest row for a 512-token batch, plus one row of logits).
  3. rates: two short calibration runs of this engine on this machine (experts of
     all MoE layers but the last on the CPU; then everything on the CPU), or
     --profile's timings: per backend and op class (routed experts, other
     matmuls, glue ops) a time per op plus a time per byte (tg) or per flop (pp),
     and the overhead of each split and of each evaluation. The emulated ACC0 is
     measured like a GPU, never declared.
  4. prediction: per evaluation, the ops' times on their backends plus the
     overheads of its splits (the engine's own split rule on its own graph); see
     analysis/advise.py for the cost model. Ranked by predicted tg t/s.
  5. --verify N runs the top N with `hyprof run`'s engine (tg and pp, -r reps),
     then calibrates again and predicts from both calibrations, so that the
     predictions bracket the verification in time (a shared machine's load
     drifts), and prints measured beside predicted. The final ranking may
     then move a verified candidate down, or an unverified one up.

pp: predicted, calibrated and verified with op offload off (-nopo 1): the
prompt's op-offload uploads are not modelled yet; tg (one token a batch) never
offloads.

-ot: the table joins a candidate's rules with ',' (llama-cli, llama-server,
ik_llama.cpp); for llama-bench or `hyprof run` join them with ';' (a ',' there
starts another set to sweep). --json lists them one by one.

examples:
  hyprof advise --vram 700MiB --accel emulated -t 2 --verify 2
  hyprof advise -m model.gguf --vram 24GiB -c 8192 --json > advice.json
  hyprof advise --vram 8GiB --profile timings.jsonl --gpu-bw 900 --plot advice.png
"""

def parse_size(text: str) -> int:
    """A memory size: 700MiB, 8GiB, 1.5G (binary: K, M, G, T with or without `iB`), 24GB
    (decimal, as GPU vendors print it), or plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if not m or (m.group(3).lower() == "i"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 700MiB, 8GiB or 24GB")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024
    return int(number * base ** power)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return value
    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "advise", help="rank placements (-ot, -ngl) by predicted t/s within a VRAM budget, and verify",
        description="Predict the generation and prompt rate of every placement of a MoE model "
        "that fits the accelerator's memory, from rates measured on this machine, rank them, "
        "print the best ones ready to paste into llama.cpp, and (--verify) run them to check.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", metavar="FILE.gguf",
                   help="model file (default: `hyprof run`'s default model, made once and cached)")
    p.add_argument("--vram", type=parse_size, required=True, metavar="SIZE",
                   help="accelerator memory the placement may use (700MiB, 8GiB, 24GB)")
    p.add_argument("--gpu-bw", type=_positive(float), metavar="GBPS",
                   help="GPU memory bandwidth, for tg rates no profile measured")
    p.add_argument("--gpu-tflops", type=_positive(float), metavar="T",
                   help="GPU matmul rate, for pp rates no profile measured")
    p.add_argument("--pcie-bw", type=_positive(float), metavar="GBPS",
                   help="host-to-GPU bandwidth, for prompt op-offload uploads (this engine does not "
                   "offload yet: the term is 0 until it does)")
    p.add_argument("-t", "--threads", type=_positive(int), default=os.cpu_count() or 1,
                   help=f"CPU threads (default: {os.cpu_count()})")
    p.add_argument("-c", "--ctx-size", type=_positive(int), default=4096, metavar="CTX",
                   help="context the KV cache holds (default: 4096)")
    p.add_argument("-p", "--n-prompt", type=_positive(int), default=64, metavar="N",
                   help="prompt tokens of the pp test calibrated, predicted and verified (default: 64)")
    p.add_argument("-n", "--n-gen", type=_positive(int), default=32, metavar="N",
                   help="generated tokens of the tg test (default: 32)")
    p.add_argument("-r", "--repetitions", type=_positive(int), default=3, metavar="N",
                   help="repetitions of each verified test (default: 3; calibration runs 2)")
    p.add_argument("--peak-bw", type=_positive(float), metavar="GBPS",
                   help="the CPU's peak memory bandwidth the rates are set against, instead of "
                   "`hyprof membw`'s (measured once per thread count, cached)")
    p.add_argument("--profile", metavar="TIMINGS.jsonl",
                   help="take the rates from this run of `hyprof run -o` instead of calibrating")
    p.add_argument("--top", type=_positive(int), default=10, metavar="N", help="candidates shown (default: 10)")
    p.add_argument("--verify", type=int, default=0, metavar="N", help="run the top N and show measured t/s")
    p.add_argument("--accel", choices=("auto", "cuda", "emulated"), default="auto",
                   help="the accelerator: a CUDA GPU, or the emulated ACC0 (default: auto, CUDA if present)")
    p.add_argument("--json", action="store_true", help="print the `hyprof-advice/1` JSON instead of tables")
    p.add_argument("--plot", metavar="FILE", help="write predicted tg t/s against VRAM (png, svg or pdf)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from analysis import advise
    from analysis.timings import load_timings
    from hybrid.gguf_model import load_model
    from hybrid.placement import available_backends
    from hybrid.plans import Planner
    from hyprof.commands.run import default_model
    from profiler.files import check_output_path

    if args.verify < 0:
        raise UserError(f"--verify {args.verify}: must be >= 0")
    if args.plot:
        _plot_format(args.plot)
        check_output_path(args.plot, args.force, "--plot")
    if args.profile and not os.path.isfile(args.profile):
        raise UserError(f"--profile {args.profile}: no such file")
    model_path = args.model or default_model(progress=not args.no_progress)
    if not os.path.isfile(model_path):
        raise UserError(f"-m {model_path}: no such file")
    backends, accel = available_backends(args.accel)
    if accel is None:
        raise UserError("--accel auto: torch sees no CUDA GPU; --accel emulated advises for the emulated ACC0")
    gguf = load_model(model_path)
    profiles = [load_timings(args.profile)] if args.profile else []
    n_prompt = advise.samples(profiles[0]).n_prompt if profiles else args.n_prompt
    planner = Planner(gguf, backends=backends, accel=accel, n_ctx=args.ctx_size, n_prompt=n_prompt or args.n_prompt,
                      n_kv=args.n_gen // 2)
    plans = _plans(planner, advise.candidates(gguf.tensors, gguf.config.n_layer, accel))
    _check_budget(args.vram, plans[0][1], args.ctx_size)
    fitting = [(c, p, n) for c, p, n in plans if p.vram_bytes <= args.vram]

    if not profiles:
        profiles.append(_calibrate(args, model_path, accel, gguf))
    rates = advise.declare_rates(advise.measure_rates(*profiles), accel, args.gpu_bw, args.gpu_tflops)
    ranked = advise.rank(_advice(c, p, n, rates, args.pcie_bw) for c, p, n in fitting)
    if args.verify:
        measured = _verify(ranked[:args.verify], args, model_path, accel, rates.n_prompt)
        if not args.profile:        # bracket the verification: calibrate again after it, predict from both
            profiles.append(_calibrate(args, model_path, accel, gguf))
            rates = advise.declare_rates(advise.measure_rates(*profiles), accel, args.gpu_bw, args.gpu_tflops)
        ranked = advise.rank(_advice(c, p, n, rates, args.pcie_bw, measured.get(c)) for c, p, n in fitting)
    result = advise.advice_json(ranked, rates, model=model_path, accel=accel, emulated=accel.startswith("ACC"),
                                vram_budget=args.vram, n_ctx=args.ctx_size, threads=args.threads,
                                n_placements=len(plans))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _render(result, args.top)
    if args.plot:
        _write_plot(ranked, args, accel)
    return 0


def _plans(planner, candidates) -> list:
    """(candidate, plan, n_cpu_moe or None) of each distinct placement, in the candidates' order:
    a candidate that places exactly as an earlier one is left out."""
    seen, out = set(), []
    for c in candidates:
        plan = planner.plan(c.ngl, list(c.ot))
        key = tuple(plan.placement.backend.values())
        if key not in seen:
            seen.add(key)
            out.append((c, plan, _n_cpu_moe(planner, c, plan.placement)))
    return out


def _n_cpu_moe(planner, c, placement) -> int | None:
    """The N for which `-ngl c.ngl -ncmoe N` with the candidate's other rules places the same, if any:
    when its routed experts on the CPU are those of the layers below some N, the one N to check."""
    from analysis.advise import n_cpu_moe_rules

    experts = {n: int(n.split(".")[1]) for n in placement.backend if "_exps." in n}
    on_cpu = [il for n, il in experts.items() if placement.backend[n] == "CPU"]
    n = max(on_cpu) + 1 if on_cpu else 0
    same = planner.placement(c.ngl, n_cpu_moe_rules(n, sorted(set(experts.values()))) + list(c.sides))
    return n if same.backend == placement.backend else None


def _check_budget(vram: int, classic, n_ctx: int) -> None:
    """Refuse a budget below the classic placement's (every routed expert on the CPU, the rest on
    the accelerator): what every advice starts from."""
    if vram >= classic.vram_bytes:
        return
    parts = classic.vram_parts
    raise UserError(f"--vram {_mib(vram)} is too small: the non-expert weights alone need {_mib(parts['weights'])} "
                    f"on the accelerator, plus {_mib(parts['kv_cache'])} of KV cache at -c {n_ctx} and "
                    f"{_mib(parts['compute'])} of compute buffer: at least {_mib(classic.vram_bytes)}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _calibrate(args, model_path: str, accel: str, gguf):
    """Two short runs of this engine (see the epilog), their timings loaded."""
    from analysis.advise import n_cpu_moe_rules
    from analysis.timings import load_timings

    moe_layers = sorted({int(n.split(".")[1]) for n in gguf.tensors if "_exps." in n})
    last = moe_layers[-1] if moe_layers else 0
    placements = [(99, tuple(n_cpu_moe_rules(last, moe_layers))), (0, ())]
    with tempfile.TemporaryDirectory(prefix="hyprof-advise-") as tmp:
        path = os.path.join(tmp, "calibration.jsonl")
        if not args.no_progress:
            print("hyprof: calibrating: 2 short runs of this engine measure its rates on this machine",
                  file=sys.stderr)
        _bench(args, model_path, accel, placements, reps=2, timings=path)
        return load_timings(path)


def _bench(args, model_path: str, accel: str, placements, reps: int, timings: str | None = None,
           n_prompt: int | None = None):
    """`hyprof run`'s engine on each (ngl, rules): a pp and a tg test, `reps` repetitions, op offload
    off (-nopo 1): the cost model does not model the prompt's uploads yet (`prompt_upload_ns`)."""
    from hybrid.engine import make_engine
    from hyprof.commands.run import _peak_bw
    from profiler.bench import EngineConfig, plan_tests, run_bench

    configs = [EngineConfig(args.threads, ngl, tuple(rules), "emulated" if accel.startswith("ACC") else "cuda",
                            no_op_offload=1) for ngl, rules in placements]
    tests = plan_tests(n_prompt=[n_prompt or args.n_prompt], n_gen=[args.n_gen], pg=[], depths=[0])
    return run_bench(make_engine, model_path, configs, tests, reps, timings=timings, force=True,
                     peak_bw=_peak_bw(args.peak_bw, not args.no_progress), progress=not args.no_progress)


def _advice(candidate, plan, n_cpu_moe, rates, pcie_GBps, measured: dict | None = None):
    from analysis.advise import Advice, Work, predict

    measured = measured or {}
    return Advice(candidate, n_cpu_moe, plan.vram_bytes, plan.vram_parts,
                  tg=predict(Work(**plan.work["tg"]), rates, "tg"),
                  pp=predict(Work(**plan.work["pp"]), rates, "pp", pcie_GBps=pcie_GBps) if "pp" in rates.graph_ns else None,
                  measured_tg_tps=measured.get("tg"), measured_pp_tps=measured.get("pp"))


def _verify(top, args, model_path: str, accel: str, n_prompt: int) -> dict:
    """{candidate: {"tg": t/s, "pp": t/s}}: the candidates run with `hyprof run`'s engine."""
    results = _bench(args, model_path, accel, [(a.candidate.ngl, a.candidate.ot) for a in top],
                     reps=args.repetitions, n_prompt=n_prompt)
    measured: dict = {}
    for r in results:
        measured.setdefault(top[r.config_index].candidate, {})[r.test.kind] = r.avg_ts
    return measured


def _render(result: dict, top: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    accel = result["accel"] + (" (emulated)" if result["emulated"] else "")
    console.print(f"placements of {result['model']} within {_mib(result['vram_budget_bytes'])} of {accel}, "
                  f"-c {result['n_ctx']}, -t {result['threads']}", style="bold", highlight=False, markup=False)
    rates = Table(box=box.SIMPLE_HEAD, title="measured rates", title_justify="left")
    for col in ("kind", "backend", "class", "us/op", "rate", "ops", "source"):
        rates.add_column(col, justify="left" if col in ("kind", "backend", "class", "source") else "right")
    for r in result["rates"]:
        unit = "GB/s" if r["kind"] == "tg" else "GFLOP/s"
        value = r.get("GBps", r.get("GFLOPps"))
        source = r["source"]
        if "fraction_of_peak" in r:
            source += f", {100 * r['fraction_of_peak']:.0f}% of the {result['cpu_peak_GBps']:.1f} GB/s peak"
        rates.add_row(r["kind"], r["backend"], r["class"], f"{r['us_per_op']:.1f}",
                      f"{value:,.2f} {unit}" if value else "-", str(r["ops"]), source)
    console.print(rates)
    over = result["overhead_us"]
    console.print("overhead: " + ", ".join(f"{k} evaluation {v:,.0f} us" for k, v in over["graph"].items()) + "; "
                  + ", ".join(f"{s['kind']} {s['backend']} split {s['us']:,.0f} us + {s['us_per_op']:,.1f} us an op"
                            for s in over["split"]),
                  highlight=False, markup=False)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)
    shown = result["candidates"][:top]
    t = Table(box=box.SIMPLE_HEAD, title=f"best {len(shown)} of the {len(result['candidates'])} placements that fit "
              f"(of {result['n_placements']}), by predicted tg t/s (pp: {result['n_prompt']} tokens, -nopo 1)",
              title_justify="left")
    for col in ("#", "placement", "VRAM MiB", "tg t/s", "pp t/s", "bottleneck"):
        t.add_column(col, justify="left" if col in ("placement", "bottleneck") else "right")
    for c in shown:
        t.add_row(str(c["rank"]), c["placement"], f"{c['vram_bytes'] / (1 << 20):,.0f}", f"{c['tg_tps']:,.2f}",
                  _tps(c["pp_tps"]), c["bottleneck"])
    console.print(t)
    verified = [c for c in result["candidates"] if "measured_tg_tps" in c]
    if verified:
        v = Table(box=box.SIMPLE_HEAD, title="verified: predicted against measured (error: predicted / measured - 1)",
                  title_justify="left")
        for col in ("#", "tg predicted", "tg measured", "error", "pp predicted", "pp measured", "error"):
            v.add_column(col, justify="right")
        for c in verified:
            v.add_row(str(c["rank"]), f"{c['tg_tps']:,.2f}", *_measured(c, "tg"), _tps(c["pp_tps"]),
                      *_measured(c, "pp"))
        console.print(v)
    console.print("to paste (llama-cli, llama-server, ik_llama.cpp):", style="bold", highlight=False, markup=False)
    for c in shown:
        ot = f' -ot "{",".join(c["ot"])}"' if c["ot"] else ""
        sides = f' -ot "{",".join(c["ot_with_n_cpu_moe"])}"' if c["ot_with_n_cpu_moe"] else ""
        # the -ncmoe form where there is one (-ncmoe 0 would only repeat the line)
        same = "" if not c["n_cpu_moe"] else f"   = -ngl {c['ngl']} -ncmoe {c['n_cpu_moe']}{sides}"
        console.print(f"  {c['rank']:>2}  -ngl {c['ngl']}{ot}{same}", highlight=False, markup=False, soft_wrap=True)


def _tps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _measured(c: dict, kind: str) -> list[str]:
    got, error = c.get(f"measured_{kind}_tps"), c.get(f"{kind}_error")
    return [_tps(got), "-" if error is None else f"{100 * error:+.1f}%"]


def _plot_format(path: str) -> str:
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise UserError(f"--plot {path}: the file name must end in .png, .svg or .pdf")
    return fmt


def _write_plot(ranked, args, accel: str) -> None:
    from pathlib import Path

    from analysis.plots import plot_advice, save

    subtitle = (f"{os.path.basename(args.model or 'default model')}, -t {args.threads}, -c {args.ctx_size}, "
                f"accelerator {accel}{' (emulated)' if accel.startswith('ACC') else ''}")
    save(plot_advice(ranked, 0, args.vram, subtitle), Path(args.plot), _plot_format(args.plot), args.force)
    print(f"plot: {args.plot}", file=sys.stderr)
