"""hyprof's engine side by side with llama.cpp: pp and tg t/s on one GGUF file, same threads.

Both engines are driven by the same runner (`profiler.bench.run_bench`, the one
behind `hyprof run`): the same llama-bench tests (pp<N>: N random prompt tokens in
one batch; tg<N>: N single-token evaluations from an empty cache), the same
random tokens (same seed), one warm-up run, then -r repetitions each from an
empty KV cache, t/s as mean ± sample standard deviation over the repetitions,
and beside it the fastest repetition (on a loaded machine, the least disturbed).
llama.cpp runs through llama-cpp-python (`Llama.eval`, n_batch = n_ubatch >= the
largest prompt, `Llama.reset()` before each repetition, logging off); each
evaluation of either engine ends with the greedy next token (argmax of the last
logits), so both do the same work per step. Rows:

  llama.cpp                  every tensor on the CPU, read into process memory at load
                             (no mmap: this VM drops page-cache pages under running
                             processes, and hyprof holds its CPU weights, repacked, in
                             process memory too)
  hyprof CPU                 every tensor on the CPU (`--accel none`)
  hyprof ACC0+CPU (emul.)    routed experts on the CPU, the rest on the emulated
                             accelerator (`-ngl 99 -ot "\\.ffn_.*_exps\\.=CPU"`);
                             ACC0 computes on the same cores, so this row shows the
                             hybrid path's cost, not a GPU's speed
  ik_llama.cpp -rtr 1        with --ik-bench PATH: ik_llama.cpp's own llama-bench (built
                             outside the repo, ../shared/tools/build_ik_llama.sh) on the
                             same file, tests, threads and repetitions, -fmoe 1 -rtr 1,
                             once per round after hyprof; its own timing and tokens

The weight bytes per token are computed from the file: every dense weight once per
batch, one token_embd row per token, and of the routed experts n_expert_used of
n_expert per token (exact for tg; for a pp batch the expected share if routing were
uniform, nearly all experts from a few dozen tokens on). GB/s = bytes/token x t/s.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py [--model F.gguf] [--threads 2]
        [-p 64,128] [-n 32] [-r 3] [--json] [--no-emulated] [--ik-bench PATH/llama-bench]

Without --model it uses `hyprof run`'s default model (deepseek-v2-lite-mini at
Q4_0, made once and cached). On a shared machine the figures are noisy: the load
average before and after is printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from profiler.bench import BenchResult, EngineConfig, plan_tests, run_bench
from profiler.errors import UserError
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE

EXPERTS_ON_CPU = r"\.ffn_.*_exps\.=CPU"
IK_LABEL = "ik_llama.cpp -rtr 1"
SCHEMA = "hyprof-bench-vs-llamacpp/1"


# ---------------------------------------------------------------------------
# llama.cpp as a BenchEngine

class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) behind the runner's `BenchEngine` interface.

    Every tensor on the CPU; the batch sizes are fixed at load (`n_batch`), so they
    must cover the largest prompt for a pp test to be one batch as in hyprof. Records
    only `graph` events (llama.cpp's ops are not visible from Python).
    """

    def __init__(self, model_path: str, *, threads: int, n_batch: int, n_ctx: int,
                 recorder: Recorder):
        import llama_cpp

        self.recorder = recorder
        self.lane = recorder.lane(MAIN_LANE)
        self.path = model_path
        self.threads = threads
        with _stderr_to_devnull():      # verbose=False still lets context set-up notes through
            self.llm = llama_cpp.Llama(model_path=model_path, n_gpu_layers=0, n_threads=threads,
                                       n_threads_batch=threads, n_batch=n_batch, n_ubatch=n_batch,
                                       n_ctx=n_ctx, logits_all=False, verbose=False, use_mmap=False)
        self.n_vocab = self.llm.n_vocab()
        self._ctx = self.llm.ctx
        self._logits_ith = llama_cpp.llama_get_logits_ith

    def eval(self, tokens: Sequence[int], test: str) -> int:
        rec = self.recorder
        graph_id = rec.next_graph()
        t0 = rec.now()
        n_past = self.llm.n_tokens
        self.llm.eval(list(tokens))
        logits = np.ctypeslib.as_array(self._logits_ith(self._ctx, -1), shape=(self.n_vocab,))
        token = int(logits.argmax())
        if rec.enabled:
            self.lane.graph(t0, rec.now() - t0, graph_id, test, len(tokens), n_past)
        return token

    def reset(self) -> None:
        """n_tokens = 0: the next `eval` removes every cached position first."""
        self.llm.reset()

    def header(self) -> dict:
        return {"model": {"path": self.path, "size_bytes": os.path.getsize(self.path)},
                "config": {"threads": self.threads, "accel": "none",
                           "engine": f"llama.cpp {llama_cpp_build()['version']}"},
                "machine": {"gpu": None}}

    def close(self) -> None:
        self.llm.close()


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """File descriptor 2 to /dev/null: llama.cpp writes to it from C."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ggml's system-info names of the x86 extensions that a native build picks up, and
# their /proc/cpuinfo flags.
_ISA_CPUINFO = {"AVX2": "avx2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16"}


def llama_cpp_build() -> dict:
    """llama-cpp-python's version and the CPU features compiled into its ggml.

    `llama_print_system_info` reports ggml-cpu's compile-time ISA macros. `native` says
    whether they include every extension of `_ISA_CPUINFO` this CPU has, as a
    GGML_NATIVE build (llama.cpp's default from source, -march=native) does; a portable
    build (GGML_NATIVE=OFF) stops at AVX2.
    """
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    flags = [part.split("=")[0].strip() for part in info.replace("CPU :", "").split("|")
             if part.strip().endswith("= 1")]
    has = _cpuinfo_flags()
    missing = [isa for isa, flag in _ISA_CPUINFO.items() if flag in has and isa not in flags]
    return {"version": llama_cpp.__version__, "system_info": info.strip(), "cpu_flags": flags,
            "native": not missing if has else None, "isa_missing": missing}


def _cpuinfo_flags() -> set[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def make_llama_cpp(n_batch: int, n_ctx: int):
    """A `MakeEngine` for llama.cpp: only `threads` of the sweep flags apply to it."""
    def make(model_path: str, *, threads: int, recorder: Recorder, **_ignored) -> LlamaCppEngine:
        return LlamaCppEngine(model_path, threads=threads, n_batch=n_batch, n_ctx=n_ctx,
                              recorder=recorder)
    return make


# ---------------------------------------------------------------------------
# Bytes per token

def weight_bytes_per_token(model_path: str, n_tokens: int) -> float:
    """Weight bytes one evaluation of `n_tokens` tokens reads, per token (see the module
    docstring: dense weights once per batch, one token_embd row per token, the routed
    experts' expected share under uniform routing, exact for one token)."""
    from hybrid.gguf_model import load_model
    from hybrid.placement import is_expert_tensor

    gguf = load_model(model_path)
    c = gguf.config
    expert_share = 1 - (1 - c.n_expert_used / c.n_expert) ** n_tokens if c.n_expert else 0.0
    total = 0.0
    for name, t in gguf.tensors.items():
        if is_expert_tensor(name):
            total += t.n_bytes * expert_share
        elif name.startswith("token_embd"):
            total += t.n_bytes // c.n_vocab * n_tokens
        else:
            total += t.n_bytes
    return total / n_tokens


# ---------------------------------------------------------------------------
# The side-by-side

@dataclass(frozen=True)
class Row:
    engine: str
    test: str
    kind: str
    tps: float                       # mean over every repetition of every round
    tps_std: float
    samples_tps: tuple[float, ...]
    best_tps: float                  # the fastest repetition: the least disturbed by other load
    round_ratios: tuple[float, ...]  # per round: this row's mean t/s over llama.cpp's, same test
    ratio: float | None              # their median: the figure to read
    ratio_best: float | None         # fastest repetition over llama.cpp's fastest
    bytes_per_token: float
    GBps: float


class Rates(NamedTuple):
    """One test's per-repetition t/s as another engine's llama-bench printed them: what `_row`
    reads of a `BenchResult` (llama-bench's avg_ts is their mean)."""
    samples_ts: tuple[float, ...]

    @property
    def avg_ts(self) -> float:
        return float(np.mean(self.samples_ts))


def ik_llama_bench(binary: str, model: str, tests, threads: int, reps: int) -> list[Rates]:
    """ik_llama.cpp's llama-bench on the same file and tests (-fmoe 1 -rtr 1: its fastest CPU
    path), its per-repetition t/s as `BenchResult`s in `tests`' order (`-o json`)."""
    prompts = sorted({t.n_prompt for t in tests if t.kind == "pp"}) or [0]
    gens = sorted({t.n_gen for t in tests if t.kind == "tg"}) or [0]
    cmd = [binary, "-m", model, "-t", str(threads), "-r", str(reps), "-fmoe", "1", "-rtr", "1", "-o", "json",
           "-p", ",".join(map(str, prompts)), "-n", ",".join(map(str, gens))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
        rows = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        raise UserError(f"--ik-bench {binary}: did not run ({str(e).splitlines()[0]})") from None
    by_test = {(r["n_prompt"], r["n_gen"]): r["samples_ts"] for r in rows}
    results = []
    for t in tests:
        samples = by_test.get((t.n_prompt, 0) if t.kind == "pp" else (0, t.n_gen))
        if not samples:
            raise UserError(f"--ik-bench {binary}: no {t.name} in its output")
        results.append(Rates(tuple(float(v) for v in samples)))
    return results


def hyprof_configs(threads: int, emulated: bool) -> list[tuple[str, EngineConfig]]:
    """hyprof's rows: `hyprof run`'s defaults (-fmoe 1 -rtr 0 --poll 50), all on the
    CPU, and (`emulated`) experts on the CPU with the rest on ACC0."""
    configs = [("hyprof CPU", EngineConfig(threads, 0, (), "none"))]
    if emulated:
        configs.append(("hyprof ACC0+CPU (emul.)",
                        EngineConfig(threads, 99, (EXPERTS_ON_CPU,), "emulated")))
    return configs


def _row(label: str, test, rounds: list[BenchResult], base: list[BenchResult] | None,
         bytes_per_token: float) -> Row:
    """One engine's row for one test from its runs in each round, beside llama.cpp's (`base`)."""
    samples = tuple(s for r in rounds for s in r.samples_ts)
    tps = float(np.mean(samples))
    ratios = () if base is None else tuple(r.avg_ts / b.avg_ts for r, b in zip(rounds, base))
    best_base = None if base is None else max(s for b in base for s in b.samples_ts)
    return Row(label, test.name, test.kind, tps, float(np.std(samples, ddof=1)) if len(samples) > 1 else 0.0,
               samples, max(samples), ratios, float(np.median(ratios)) if ratios else None,
               None if base is None else max(samples) / best_base, bytes_per_token, bytes_per_token * tps / 1e9)


def compare(model: str, *, threads: int = 2, n_prompt: Sequence[int] = (64, 128),
            n_gen: Sequence[int] = (32,), reps: int = 3, rounds: int = 3, emulated: bool = True,
            progress: bool = True, ik_bench: str | None = None) -> dict:
    """Run llama.cpp and hyprof on `model`, in turn, `rounds` times, and return every row,
    the llama.cpp build, the load average before and after, and why hyprof did not run,
    if it did not. Rounds, because this kind of machine's memory bandwidth moves by up
    to 2x from one minute to the next: each round's ratio compares runs a minute apart."""
    if not os.path.isfile(model):
        raise UserError(f"--model {model}: no such file")
    if threads < 1:
        raise UserError(f"--threads {threads}: must be >= 1")
    if rounds < 1:
        raise UserError(f"--rounds {rounds}: must be >= 1")
    tests = plan_tests(n_prompt=n_prompt, n_gen=n_gen)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise UserError(f"llama-cpp-python is not installed ({e}): pip install -e '.[oracle]'")
    bytes_per_token = {t.name: weight_bytes_per_token(model, t.n_prompt or 1) for t in tests}
    longest = max(t.n_tokens for t in tests)
    load_before = os.getloadavg()

    unavailable = None
    try:
        from hybrid.engine import make_engine
    except ImportError as e:
        unavailable, make_engine = f"hybrid.engine does not import: {e}", None
    engines = [("llama.cpp", make_llama_cpp(n_batch=max(max(n_prompt, default=1), 1),
                                             n_ctx=max(256, -(-(longest + 8) // 256) * 256)),
                EngineConfig(threads, 0, (), "none"))]
    if make_engine is not None:
        engines += [(label, make_engine, config) for label, config in hyprof_configs(threads, emulated)]
    t0 = time.monotonic()
    runs: dict[str, list[list[BenchResult]]] = {label: [] for label, _, _ in engines}   # [round][test]
    for _ in range(rounds):
        for label, make, config in engines:
            runs[label].append(run_bench(make, model, [config], tests, reps, progress=progress))
        if ik_bench is not None:
            runs.setdefault(IK_LABEL, []).append(ik_llama_bench(ik_bench, model, tests, threads, reps))
    out = [_row(label, test, [results[i] for results in per_round],
                None if label == "llama.cpp" else [results[i] for results in runs["llama.cpp"]],
                bytes_per_token[test.name])
           for label, per_round in runs.items() for i, test in enumerate(tests)]
    return {"schema": SCHEMA, "model": os.path.abspath(model),
            "model_bytes": os.path.getsize(model), "threads": threads, "reps": reps, "rounds": rounds,
            "cores": os.cpu_count(), "llama_cpp": llama_cpp_build(),
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            "wall_s": time.monotonic() - t0, "hyprof_unavailable": unavailable,
            "rows": [vars(r) | {"samples_tps": list(r.samples_tps), "round_ratios": list(r.round_ratios)}
                     for r in out]}


# ---------------------------------------------------------------------------
# Rendering

def render(result: dict) -> str:
    """The side-by-side as a markdown table, with the facts that qualify it."""
    b = result["llama_cpp"]
    lines = [f"model: {result['model']} ({result['model_bytes'] / 1e9:.2f} GB), "
             f"{result['threads']} threads, {result['rounds']} rounds of llama.cpp then hyprof, "
             f"{result['reps']} reps each",
             f"llama.cpp: llama-cpp-python {b['version']}, built with "
             f"{' '.join(b['cpu_flags'])}" + {True: " (native: every AVX2/AVX-512 extension "
                                                     "of this CPU)",
                                              False: f" (not native: no {b['isa_missing']})",
                                              None: ""}[b["native"]],
             "", "| engine | test | t/s | best t/s | engine/llama.cpp (median of rounds) | per round "
             "| best/best | MB/token | GB/s |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratios = ["" if v is None else f"{v:.2f}" for v in (r["ratio"], r["ratio_best"])]
        lines.append(f"| {r['engine']} | {r['test']} | {r['tps']:.2f} ± {r['tps_std']:.2f} | "
                     f"{r['best_tps']:.2f} | {ratios[0]} | {' '.join(f'{v:.2f}' for v in r['round_ratios'])} | "
                     f"{ratios[1]} | {r['bytes_per_token'] / 1e6:.1f} | {r['GBps']:.2f} |")
    if result["hyprof_unavailable"]:
        lines.append(f"\nhyprof engine not available: {result['hyprof_unavailable']}")
    before, after = (", ".join(f"{v:.2f}" for v in result[k])
                     for k in ("loadavg_before", "loadavg_after"))
    lines.append(f"\nload average before {before}, after {after} on {result['cores']} cores: "
                 "figures on a shared machine are noisy")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", metavar="FILE.gguf",
                   help="GGUF file (default: hyprof run's default model, made once and cached)")
    p.add_argument("-t", "--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("-p", "--n-prompt", type=_ints, default=[64, 128], metavar="N[,N]",
                   help="prompt tokens per pp test (default: 64,128; 0: none)")
    p.add_argument("-n", "--n-gen", type=_ints, default=[32], metavar="N[,N]",
                   help="generated tokens per tg test (default: 32; 0: none)")
    p.add_argument("-r", "--repetitions", type=int, default=3, metavar="N",
                   help="measured repetitions per test (default: 3)")
    p.add_argument("--rounds", type=int, default=3, metavar="K",
                   help="run llama.cpp then hyprof K times in turn; ratios per round (default: 3)")
    p.add_argument("--no-emulated", action="store_true",
                   help="skip the experts-on-CPU, rest-on-ACC0 row")
    p.add_argument("--ik-bench", metavar="PATH",
                   help="ik_llama.cpp's llama-bench: add its -fmoe 1 -rtr 1 row on the same file and tests")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    try:
        model = args.model
        if model is None:
            from hyprof.commands.run import default_model
            model = default_model(progress=not args.no_progress)
        result = compare(model, threads=args.threads, n_prompt=args.n_prompt,
                         n_gen=args.n_gen, reps=args.repetitions, rounds=args.rounds,
                         emulated=not args.no_emulated, progress=not args.no_progress, ik_bench=args.ik_bench)
    except UserError as e:
        print(f"bench_vs_llamacpp: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(result, indent=1) + "\n" if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
