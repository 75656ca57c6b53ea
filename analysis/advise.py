"""Placement advice: which `-ot` / `-ngl` gives the most tokens per second, predicted from measured rates.

Public API (stable):

    candidates(tensor_names, n_layer, accel) -> [Candidate]
        every placement worth asking about (see "Candidates" below), each as `-ngl` plus `-ot`
        rules that send tensors to the CPU only, so that they paste into llama.cpp as they are.
    n_cpu_moe_rules(n, moe_layers) -> [rule]   llama.cpp's --n-cpu-moe N as -ot rules
    measure_rates(*timings) -> Rates   the rates of profiles (calibration runs), their samples pooled
    samples(timings) -> Samples         what one profile measured: per op, split and evaluation
    declare_rates(rates, accel, gpu_GBps=None, gpu_tflops=None) -> Rates
    predict(work, rates, kind) -> Prediction   one evaluation's time, term by term
    prompt_upload_ns(upload_bytes, pcie_GBps) -> ns   the op-offload upload term of a prompt
    rank(advice rows) -> the rows by predicted tg t/s, best first
    advice_json(...) -> dict in the `hyprof-advice/1` contract

The cost model
--------------
An evaluation (one generated token for tg, one prompt batch for pp) runs a list of ops cut
into backend splits (hybrid/sched.py). Its predicted time is

    T = graph_ns[kind]                                   per evaluation: graph build, inputs,
                                                          sampling, the host between graphs
      + sum over its splits   split_ns[kind, backend]    per split: setup, input copies, thread
                              + n_ops x gap_ns[kind, backend]   wakeup and join (CPU), queue and
                                                          sync (devices), and per op of the split
                                                          the gap before it (the run loop, a CPU
                                                          op's dispatch to the workers): all a
                                                          split costs beyond its ops' own time
      + sum over its ops      ns_per_op[kind, backend, class]
                              + units x ns_per_unit[kind, backend, class]

where an op's class is `expert` (it reads routed experts, `_exps`), `matmul` (any other
MUL_MAT / MUL_MAT_ID) or `glue` (norms, rope, attention, adds, routing: a fixed time each),
and its units are the weight bytes it reads for tg (exact, from the tensor table: a token
reads n_expert_used of the n_expert experts of each MoE layer) and its flops for pp. So for
tg, `1 / ns_per_unit` is the bandwidth that backend reaches on that class of op: the CPU's
on experts is the machine's STREAM triad times this engine's expert-path efficiency, an
accelerator's is what its matmuls reach (ACC0, the emulated one, is measured like any other;
a CUDA GPU's too, else `--gpu-bw` stands in). For pp, `1 / ns_per_unit` is the flop rate
(`--gpu-tflops` stands in for an unmeasured GPU), and a prompt adds the op-offload uploads
over `--pcie-bw` (`prompt_upload_ns`). t/s is n_tokens / T.

Every rate comes from a profile (`measure_rates`): each op's time is the span of its events
(a CPU op runs on several worker lanes at once), `ns_per_op` and `ns_per_unit` are the least-
squares line through (units, time) of that class's ops on that backend (neither negative;
through the origin where the sizes do not vary), a split's overhead is its span less
its ops' (a line through (ops in the split, that overhead) gives `split_ns` and `gap_ns`: the
two calibration runs' splits hold 1 to 2 and about a hundred ops), and an evaluation's is its share of the repetition's wall less its splits' spans and
less the profiler's own `record` phases (a run without -o does not pay those). A class a
profile never ran on a backend borrows the nearest measured rate (`expert` <-> `matmul` on
the same backend, glue from the other backend) and says so in `Rates.notes`.

`hyprof advise` calibrates with two short runs of this engine, so every rate above is
measured on this machine: the experts of all MoE layers but the last on the CPU and the rest
on the accelerator (CPU experts, accelerator experts, matmuls and glue, both kinds of split),
and everything on the CPU (`-ngl 0`: the CPU's matmuls and glue).

Candidates
----------
At `-ngl 99` (everything the rules do not send to the CPU on the accelerator): the routed
experts of the first N MoE layers on the CPU (llama.cpp's `-ncmoe N`) for every N, and
between two such N the boundary layer half-placed (its down experts, or its gate and up
experts, on the accelerator); each of those with the shared experts, the dense FFNs and the
output head on either side. And the partial offloads: `-ngl K` for every K with the routed
experts on the CPU. Rules only ever name the CPU, so they paste into llama.cpp or
ik_llama.cpp as they are, whatever the accelerator is called there.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from analysis.attribution import Attribution, attribute
from analysis.bandwidth import event_rep
from analysis.timings import Timings
from profiler.schema import ADVICE_SCHEMA, EXPERT_TENSOR_MARK, RECORD_PHASE

KINDS = ("tg", "pp")
CLASSES = ("expert", "matmul", "glue")
MATMUL_OPS = ("MUL_MAT", "MUL_MAT_ID", "MOE_FUSED_UP_GATE")
CLASSIC_RULE = r"\.ffn_.*_exps\.=CPU"
# an op's units for the rates of each kind (see the module docstring)
UNITS = {"tg": "bytes", "pp": "flops"}


def op_class(op: str, name: str) -> str:
    """`expert`, `matmul` or `glue` (see the module docstring)."""
    if EXPERT_TENSOR_MARK in name:
        return "expert"
    return "matmul" if op in MATMUL_OPS else "glue"


# ---- candidates -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    ngl: int                        # -ngl (99: every layer)
    ot: tuple[str, ...]             # -ot rules, first match wins; each sends tensors to the CPU
    words: str                      # the placement in words
    sides: tuple[str, ...] = ()     # of `ot`, the rules for other tensors than the routed experts


def n_cpu_moe_rules(n: int, moe_layers: Sequence[int]) -> list[str]:
    """llama.cpp's `--n-cpu-moe N` (common/arg.cpp): the routed experts of layers 0..N-1 on the
    CPU, one rule per layer; layers without experts get none (theirs would match nothing)."""
    return [rf"blk\.{il}\.ffn_(up|down|gate)_exps=CPU" for il in moe_layers if il < n]


def _layer_range(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def _expert_choices(moe_layers: Sequence[int], accel: str) -> list[tuple[list[str], str]]:
    """(rules, words) for each split of the routed experts: the first layers' on the CPU, the
    boundary layer's down or gate+up experts on the accelerator, the rest's there too."""
    out = [([CLASSIC_RULE], "experts on CPU")]
    for k in range(len(moe_layers)):            # k: layers whose experts all stay on the CPU
        cpu, boundary = list(moe_layers[:k]), moe_layers[k]
        on_accel = f"{_layer_range(moe_layers[k:])} on {accel}"
        full = n_cpu_moe_rules(boundary, moe_layers)
        out.append((full, f"experts of {_layer_range(cpu)} on CPU, {on_accel}" if cpu else
                    f"experts on {accel}"))
        for part, keep_cpu in (("down", "(up|gate)"), ("gate+up", "down")):
            rules = full + [rf"blk\.{boundary}\.ffn_{keep_cpu}_exps=CPU"]
            accel_part = f"layer {boundary}'s {part}" + (f" and {_layer_range(moe_layers[k + 1:])}"
                                                         if k + 1 < len(moe_layers) else "")
            out.append((rules, f"experts on CPU but {accel_part} on {accel}"))
    return out


def candidates(tensor_names: Iterable[str], n_layer: int, accel: str) -> list[Candidate]:
    """Every placement `hyprof advise` predicts (the module docstring's "Candidates")."""
    names = list(tensor_names)
    moe_layers = sorted({int(n.split(".")[1]) for n in names if EXPERT_TENSOR_MARK in n})
    sides = []      # (rule, words) of the parts that may go to the CPU, where the model has them
    if any("_shexp." in n for n in names):
        sides.append((r"\.ffn_(up|down|gate)_shexp\.=CPU", "shared experts on CPU"))
    if any(n.startswith("blk.") and n.split(".")[2] in ("ffn_up", "ffn_gate", "ffn_down") for n in names):
        sides.append((r"\.ffn_(up|down|gate)\.=CPU", "dense FFNs on CPU"))
    if "output.weight" in names:
        sides.append((r"^output\.=CPU", "output head on CPU"))
    out = []
    for rules, words in _expert_choices(moe_layers, accel):
        for chosen in itertools.product((False, True), repeat=len(sides)):
            extra = [s for s, c in zip(sides, chosen) if c]
            side_rules = tuple(r for r, _ in extra)
            out.append(Candidate(99, tuple(rules) + side_rules, "; ".join([words] + [w for _, w in extra]),
                                 side_rules))
    for k in range(n_layer + 1):
        where = ("nothing" if k == 0 else "the output layer" if k == 1 else
                 f"{_layer_range(range(n_layer + 1 - k, n_layer))} and the output")
        out.append(Candidate(k, (CLASSIC_RULE,), f"-ngl {k}: {where} on {accel}, experts on CPU"))
    return out


# ---- rates ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    ns_per_op: float
    ns_per_unit: float              # per byte read (tg) or per flop (pp)
    n_ops: int = 0                  # ops of the profile it was fitted to (0: not measured)
    source: str = "measured"


@dataclass(frozen=True)
class SplitRate:
    ns: float                       # per split
    gap_ns: float = 0.0             # per op of the split


@dataclass(frozen=True)
class Rates:
    op: dict                        # (kind, backend, class) -> Rate
    split_ns: dict                  # (kind, backend) -> SplitRate
    graph_ns: dict                  # kind -> ns per evaluation
    n_prompt: int                   # the prompt batch the pp figures were measured at
    notes: tuple[str, ...] = ()
    cpu_peak_GBps: float | None = None

    def rate(self, kind: str, backend: str, cls: str) -> Rate:
        """The rate of a class on a backend; one never measured borrows the nearest measured
        (the same backend's other weight class, else the class on another backend)."""
        if (kind, backend, cls) in self.op:
            return self.op[kind, backend, cls]
        order = [(backend, "matmul" if cls == "expert" else "expert")] if cls != "glue" else []
        order += [(b, cls) for (k, b, c) in self.op if k == kind and c == cls and b != backend]
        for b, c in order:
            if (kind, b, c) in self.op:
                r = self.op[kind, b, c]
                return Rate(r.ns_per_op, r.ns_per_unit, 0, f"borrowed from {b} {c}")
        return Rate(0.0, 0.0, 0, "unmeasured: counted as free")

    def split(self, kind: str, backend: str) -> SplitRate:
        """A backend's split overhead; one never measured: the costliest measured split of the kind."""
        if (kind, backend) in self.split_ns:
            return self.split_ns[kind, backend]
        others = [v for (k, _), v in self.split_ns.items() if k == kind]
        return max(others, key=lambda r: r.ns, default=SplitRate(0.0))


def _line(x: np.ndarray, y: np.ndarray, constant_x: str) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points with neither negative: the
    free line if it is so, else the better of the line through the origin and the flat line.
    Where x hardly varies no line is determined: `constant_x` says which the points measure, the
    slope (the bytes an op reads: its time per byte) or the intercept (a split's fixed overhead)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if x.max() < 1.5 * max(x.min(), 1):
        return (0.0, float(y.sum() / max(x.sum(), 1))) if constant_x == "slope" else (max(float(y.mean()), 0.0), 0.0)
    slope, intercept = np.polyfit(x, y, 1)
    if intercept >= 0 and slope >= 0:
        return float(intercept), float(slope)
    through_origin = (0.0, max(float((x * y).sum() / (x * x).sum()), 0.0))
    flat = (max(float(y.mean()), 0.0), 0.0)
    return min(through_origin, flat, key=lambda line: float(((line[0] + line[1] * x - y) ** 2).sum()))


def _graph_kinds(t: Timings, a: Attribution) -> tuple[np.ndarray, np.ndarray]:
    """Per event: its graph's kind code (index in KINDS; -1 outside the pp/tg repetitions) and
    its repetition."""
    rep = event_rep(t, a)
    rep_kind = np.array([KINDS.index(k) if k in KINDS else -1 for k in a.reps["kind"]], dtype=np.int64)
    kind = np.where(rep >= 0, rep_kind[np.maximum(rep, 0)] if len(rep_kind) else -1, -1)
    return kind, rep


@dataclass(frozen=True)
class Samples:
    """What one profile measured, by name (so that profiles pool): per op its kind, backend, class,
    bytes, flops and span; per split its kind, backend and overhead; per repetition its kind and
    overhead per evaluation."""
    ops: np.ndarray
    splits: np.ndarray
    reps: np.ndarray
    n_prompt: int
    cpu_peak_GBps: float | None


OP_SAMPLE = np.dtype([("kind", "U2"), ("backend", "U16"), ("class", "U8"), ("bytes", np.float64),
                      ("flops", np.float64), ("ns", np.float64)])
OVERHEAD_SAMPLE = np.dtype([("kind", "U2"), ("backend", "U16"), ("n_ops", np.int64), ("ns", np.float64)])


def samples(t: Timings, attribution: Attribution | None = None) -> Samples:
    """The ops, splits and evaluations of a profile's pp and tg repetitions (see the module docstring)."""
    a = attribution if attribution is not None else attribute(t)
    ev = t.events
    kind, rep = _graph_kinds(t, a)
    ops = np.flatnonzero(t.of_type("op") & (kind >= 0))
    # one op = its events with the same (graph, split, name): a CPU op has one per worker lane
    key = np.stack([ev["graph"][ops], ev["split"][ops], ev["name"][ops]], axis=1)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(uniq)
    start = np.full(n, np.iinfo(np.int64).max)
    end = np.zeros(n, np.int64)
    np.minimum.at(start, inverse, ev["ts"][ops])
    np.maximum.at(end, inverse, ev["ts"][ops] + ev["dur"][ops])
    first = np.zeros(n, np.int64)
    first[inverse[::-1]] = ops[::-1]                 # an event of each op, for its op, backend, kind
    pairs, pair_of_op = np.unique(np.stack([ev["op"][first], ev["name"][first]], axis=1), axis=0, return_inverse=True)
    op_rows = np.zeros(n, OP_SAMPLE)
    op_rows["kind"] = np.array(KINDS)[kind[first]] if n else []
    op_rows["backend"] = [t.sym(int(b)) for b in ev["backend"][first]]
    op_rows["class"] = np.array([op_class(t.sym(int(o)), t.sym(int(m))) for o, m in pairs] or [""])[pair_of_op.reshape(-1)]
    for u in ("bytes", "flops"):
        op_rows[u] = np.bincount(inverse, weights=ev[u][ops].astype(np.float64), minlength=n)
    op_rows["ns"] = end - start

    # a split's overhead: its span less its ops' spans
    op_ns_in: dict = {}
    for (g, s, _), ns in zip(uniq, op_rows["ns"]):
        n_ops, total = op_ns_in.get((g, s), (0, 0.0))
        op_ns_in[g, s] = n_ops + 1, total + ns
    splits = np.flatnonzero(t.of_type("split") & (kind >= 0))
    split_rows = np.zeros(len(splits), OVERHEAD_SAMPLE)
    for j, i in enumerate(splits):
        n_ops, total = op_ns_in.get((ev["graph"][i], ev["split"][i]), (0, 0.0))
        split_rows[j] = (KINDS[kind[i]], t.sym(int(ev["backend"][i])), n_ops, ev["dur"][i] - total)

    # an evaluation's overhead: its repetition's wall less the splits and record phases, per graph
    record = t.of_type("phase") & np.isin(ev["name"], t.ids(lambda s: s == RECORD_PHASE))
    inside = t.of_type("split") | record
    rep_rows = np.zeros(len(a.reps), OVERHEAD_SAMPLE)
    for r, row in enumerate(a.reps):
        inside_ns = ev["dur"][(rep == r) & inside].sum()
        rep_rows[r] = (row["kind"] if row["kind"] in KINDS else "", "", 0,
                       (row["wall_ns"] - inside_ns) / max(row["n_graphs"], 1))
    pp = a.reps["n_tokens"][a.reps["kind"] == "pp"]
    peak = (t.header.get("peak_bw") or {}).get("CPU") or {}
    return Samples(op_rows, split_rows, rep_rows[rep_rows["kind"] != ""], int(pp[0]) if len(pp) else 0,
                   peak.get("GBps") if isinstance(peak, dict) else None)


def measure_rates(*profiles: Timings) -> Rates:
    """The rates of the module docstring, from the pooled pp and tg repetitions of the profiles."""
    taken = [samples(t) for t in profiles]
    ops = np.concatenate([s.ops for s in taken])
    splits = np.concatenate([s.splits for s in taken])
    reps = np.concatenate([s.reps for s in taken])
    rates = {}
    for kname, backend, cname in sorted(set(zip(ops["kind"], ops["backend"], ops["class"]))):
        sel = (ops["kind"] == kname) & (ops["backend"] == backend) & (ops["class"] == cname)
        if cname == "glue":
            per_op, per_unit = float(ops["ns"][sel].mean()), 0.0
        else:
            per_op, per_unit = _line(ops[UNITS[kname]][sel], ops["ns"][sel], "slope")
        rates[kname, backend, cname] = Rate(per_op, per_unit, int(sel.sum()))
    split_ns = {}
    for k, b in sorted(set(zip(splits["kind"], splits["backend"]))):
        sel = (splits["kind"] == k) & (splits["backend"] == b)
        split_ns[k, b] = SplitRate(*_line(splits["n_ops"][sel], splits["ns"][sel], "intercept"))
    graph_ns = {k: max(float(reps["ns"][reps["kind"] == k].mean()), 0.0) for k in sorted(set(reps["kind"]))}
    return Rates(rates, split_ns, graph_ns, max(s.n_prompt for s in taken),
                 cpu_peak_GBps=next((s.cpu_peak_GBps for s in taken if s.cpu_peak_GBps), None))


def declare_rates(rates: Rates, accel: str, gpu_GBps: float | None = None, gpu_tflops: float | None = None) -> Rates:
    """`--gpu-bw` / `--gpu-tflops`: the accelerator's matmul and expert rates where the profile
    did not measure them (a measured rate wins: it is this engine on this machine)."""
    op, notes = dict(rates.op), list(rates.notes)
    for value, kind, per_unit, flag in ((gpu_GBps, "tg", lambda v: 1.0 / v, "--gpu-bw"),
                                        (gpu_tflops, "pp", lambda v: 1.0 / (v * 1e3), "--gpu-tflops")):
        if value is None:
            continue
        for cls in ("expert", "matmul"):
            if (kind, accel, cls) not in op:
                op[kind, accel, cls] = Rate(0.0, per_unit(value), 0, f"declared {flag} {value:g}")
                notes.append(f"{accel} {cls} {kind}: {flag} {value:g} (not measured)")
    return Rates(op, rates.split_ns, rates.graph_ns, rates.n_prompt, tuple(notes), rates.cpu_peak_GBps)


# ---- prediction -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """What one evaluation of a placement runs (hybrid/plans.py works it out from the graph)."""
    ops: tuple                      # (backend, op, name, bytes, flops) per op
    splits: tuple                   # the backend of each split
    n_tokens: int                   # tokens the evaluation computes

    def totals(self, kind: str) -> dict:
        """{(backend, class): [ops, units]}: the sums the cost model needs."""
        out: dict = {}
        u = 3 if UNITS[kind] == "bytes" else 4
        for row in self.ops:
            acc = out.setdefault((row[0], op_class(row[1], row[2])), [0, 0])
            acc[0] += 1
            acc[1] += row[u]
        return out


@dataclass(frozen=True)
class Prediction:
    ns: float                       # one evaluation
    tps: float
    terms_ns: dict                  # "CPU expert", "ACC0 matmul", ..., "overhead": their ns
    no_overhead_tps: float
    notes: tuple = field(default=())


def prompt_upload_ns(upload_bytes: int, pcie_GBps: float | None) -> float:
    """The op-offload upload term of a prompt: the host experts' bytes that a split uploads to
    the accelerator (DESIGN.md, "Op offload") over the PCIe bandwidth. This engine's `hyprof
    run` offloads now (issue 21), but `hyprof advise` plans, calibrates and verifies prompts
    with op offload off (-nopo 1), so the planner passes 0 bytes and the term is 0; to model
    it, plan the pp graph with the engine's `OpOffload` (hybrid/sched.py) and pass the used
    experts' bytes of the offloaded ops, with analysis/offload.py's measured upload GB/s."""
    return upload_bytes / pcie_GBps if pcie_GBps and upload_bytes else 0.0


def predict(work: Work, rates: Rates, kind: str, upload_bytes: int = 0, pcie_GBps: float | None = None) -> Prediction:
    """The cost model of the module docstring, one evaluation of `work`."""
    terms: dict = {}
    notes = []
    for (backend, cls), (n_ops, units) in sorted(work.totals(kind).items()):
        r = rates.rate(kind, backend, cls)
        if r.source != "measured":
            notes.append(f"{backend} {cls} {kind}: {r.source}")
        terms[f"{backend} {cls}"] = n_ops * r.ns_per_op + units * r.ns_per_unit
    upload = prompt_upload_ns(upload_bytes, pcie_GBps) if kind == "pp" else 0.0
    if upload:
        terms["uploads"] = upload
    n_ops = Counter(row[0] for row in work.ops)
    overhead = rates.graph_ns.get(kind, 0.0) + sum(rates.split(kind, b).ns for b in work.splits) \
        + sum(n * rates.split(kind, b).gap_ns for b, n in n_ops.items())
    compute = sum(terms.values())
    terms["overhead"] = overhead
    total = compute + overhead
    return Prediction(total, work.n_tokens * 1e9 / total if total > 0 else 0.0, terms,
                      work.n_tokens * 1e9 / compute if compute > 0 else 0.0, tuple(notes))


def bottleneck(p: Prediction) -> str:
    """The largest term, in words with its share: `CPU expert 62%`."""
    name, ns = max(p.terms_ns.items(), key=lambda kv: kv[1])
    return f"{name} {100 * ns / p.ns:.0f}%"


# ---- the advice -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Advice:
    """One candidate that fits, with its predictions (and measurements, once verified)."""
    candidate: Candidate
    n_cpu_moe: int | None           # -ncmoe N that, with the candidate's `sides` rules, places the same
    vram_bytes: int
    vram_parts: dict                # weights, kv_cache, compute: bytes
    tg: Prediction
    pp: Prediction | None           # None: the rates came from a profile without a pp test
    measured_tg_tps: float | None = None
    measured_pp_tps: float | None = None

    @property
    def bottleneck(self) -> str:
        return bottleneck(self.tg)


def rank(advice: Iterable[Advice]) -> list[Advice]:
    """Best predicted tg first; among equals, the less VRAM."""
    return sorted(advice, key=lambda a: (-a.tg.tps, a.vram_bytes))


def rate_table(rates: Rates) -> list[dict]:
    """The rates as rows for people: per kind, backend and class, GB/s (tg) or GFLOP/s (pp)."""
    rows = []
    for (kind, backend, cls), r in sorted(rates.op.items()):
        per_s = 1.0 / r.ns_per_unit if r.ns_per_unit else None    # units per ns = G units per s
        row = {"kind": kind, "backend": backend, "class": cls, "us_per_op": r.ns_per_op / 1e3,
               "GBps" if kind == "tg" else "GFLOPps": per_s, "ops": r.n_ops, "source": r.source}
        if kind == "tg" and backend == "CPU" and per_s and rates.cpu_peak_GBps:
            row["fraction_of_peak"] = per_s / rates.cpu_peak_GBps      # the expert-path efficiency
        rows.append(row)
    return rows


def advice_json(ranked: Sequence[Advice], rates: Rates, *, model: str, accel: str, emulated: bool,
                vram_budget: int, n_ctx: int, threads: int, n_placements: int, chosen: int = 0) -> dict:
    """The `hyprof-advice/1` contract (`n_placements`: the distinct placements considered, of which
    `candidates` lists those that fit)."""
    def one(rank_: int, a: Advice) -> dict:
        out = {"rank": rank_, "placement": a.candidate.words, "ot": list(a.candidate.ot), "ngl": a.candidate.ngl,
               "n_cpu_moe": a.n_cpu_moe, "ot_with_n_cpu_moe": list(a.candidate.sides) if a.n_cpu_moe is not None else None,
               "vram_bytes": a.vram_bytes, "vram_parts": a.vram_parts,
               "tg_tps": a.tg.tps, "pp_tps": a.pp.tps if a.pp else None, "tg_no_overhead_tps": a.tg.no_overhead_tps,
               "bottleneck": a.bottleneck, "tg_terms_ms": {k: v / 1e6 for k, v in a.tg.terms_ns.items()}}
        if a.measured_tg_tps is not None or a.measured_pp_tps is not None:
            out["measured_tg_tps"] = a.measured_tg_tps
            out["measured_pp_tps"] = a.measured_pp_tps
            out["tg_error"] = a.tg.tps / a.measured_tg_tps - 1 if a.measured_tg_tps else None
            out["pp_error"] = a.pp.tps / a.measured_pp_tps - 1 if a.measured_pp_tps and a.pp else None
        return out
    return {"schema": ADVICE_SCHEMA, "model": model, "accel": accel, "emulated": emulated,
            "vram_budget_bytes": vram_budget, "n_ctx": n_ctx, "threads": threads, "n_prompt": rates.n_prompt,
            "chosen": chosen, "n_placements": n_placements, "cpu_peak_GBps": rates.cpu_peak_GBps,
            "rates": rate_table(rates),
            "overhead_us": {"graph": {k: v / 1e3 for k, v in rates.graph_ns.items()},
                            "split": [{"kind": k, "backend": b, "us": v.ns / 1e3, "us_per_op": v.gap_ns / 1e3}
                                      for (k, b), v in rates.split_ns.items()]},
            "notes": list(rates.notes),
            "candidates": [one(i + 1, a) for i, a in enumerate(ranked)]}
