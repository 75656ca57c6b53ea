"""Importing ik_llama.cpp `IK_PRINT_TIMING` logs (and llama-bench's table) as timings v1.

ik_llama.cpp, rebuilt with `IK_PRINT_TIMING` set to 1, prints one line to stdout
each time a timed interval ends: `OPNAME(node name): N us` after each op of a CPU
graph (thread 0's view) or of a CUDA graph (each op followed by a stream sync),
`ggml_barrier(...): N us` when a CPU graph ends, `ggml_backend_sched_eval(.1.)`
when a split launches, `ggml_backend_tensor_set/get(name)` after a copy, and the
phases of each decode (`prelude`, `build_graph`, `set_inputs`, `graph_compute`,
...). llama-bench adds its markdown table. This module turns such a log into the
same event stream our own engine writes, so `hyprof report` treats both alike.

Three facts of the format shape the conversion (read in ik_llama.cpp's sources):
- A line is printed when its interval ENDS, and some intervals contain others:
  `graph_compute` contains the splits and ops, `set_inputs` and `get_result` the
  copies they make, `ggml_backend_sched_eval(.1.)` the input copies of its split,
  and a CPU `MUL_MAT` the `quantize(...)` of its activations printed just before
  it. A container claims the lines it contains (`_claims`); whatever of its time
  its children do not cover is its own (the rule table says which category).
- There are no timestamps, only durations. Intervals are laid end to end in log
  order on one host timeline; time nobody printed (llama-bench's own work between
  decodes) is not seen, so our t/s can exceed llama-bench's. Its table's t/s is
  kept on each `test` event as `tps` / `tps_std`.
- Lines of other programs are interleaved; a line either parses whole or is
  skipped and counted, never guessed at.

Reading is two passes over the file: the first finds the llama-bench rows (the
header needs the model; a row is printed after its test) and which decodes belong
to which repetition; the second emits events, one graph at a time.

Public API: `looks_like_ik_log(path)`, `scan(path) -> Scan`,
`convert(path, scan=None, model=None) -> Iterator[str]` (JSONL lines without newline,
header first; `model`: analysis.model_bytes.read_model of the model file, for the
expert ops' bytes), `RULES` and `explain()`.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import orjson

from analysis.model_bytes import ModelWeights, check_log
from profiler.errors import UserError
from profiler.membw import cached_result
from profiler.schema import MAIN_LANE, SCHEMA

FORMAT = "ik_print_timing"
NOTE = ("durations from ik_llama.cpp IK_PRINT_TIMING lines, laid end to end in log order; "
        "per-op stream synchronisation inflates GPU op times; time not printed by any line "
        "(llama-bench between decodes) is not seen")


# ---------------------------------------------------------------- the rule table

@dataclass(frozen=True)
class Rule:
    """How one kind of log line becomes events, and where the analyzer files its time."""
    kind: str       # the parser's name for the line kind
    line: str       # what the line looks like
    event: str      # the contract-v1 event it becomes (phase names in brackets)
    category: str   # the attribution category of its time (DESIGN.md)
    why: str


# Ops that read expert weights by construction, and the node names ik_llama.cpp's
# llm_build_moe_ffn gives only to expert matmul results, with the weight each reads.
# Router, top-k and weighting nodes are also called ffn_moe_* but read no expert
# tensor (ffn_moe_logits reads ffn_gate_inp), and ffn_moe_gate_par is the fused
# MOE_FUSED_UP_GATE only with -fmoe (without, an elementwise FUSED_MUL_UNARY).
EXPERT_OPS = frozenset({"MUL_MAT_ID", "MOE_FUSED_UP_GATE"})
EXPERT_NODES = {"ffn_moe_up": "ffn_up_exps", "ffn_moe_gate": "ffn_gate_exps",
                "ffn_moe_down": "ffn_down_exps", "ffn_moe_up_gate": "ffn_up_gate_exps"}
FUSED_UP_GATE_WEIGHT = "ffn_up_gate_exps"

RULES: tuple[Rule, ...] = (
    Rule("expert_op", "OP(node-L): N us on the CPU, OP in MUL_MAT_ID, MOE_FUSED_UP_GATE, "
         "or node ffn_moe_{up,gate,down,up_gate}-L",
         "op backend=CPU tid=main, name=blk.L.ffn_{up,gate,down,up_gate}_exps (MOE_FUSED_UP_GATE: "
         "ffn_up_gate_exps; other nodes: <node>_exps), node=printed name; with --model, bytes = the "
         "experts' bytes in the model file (bytes_ub=1 for a batch: an upper bound)",
         "cpu_expert_matmul", "thread 0 ran a matmul over expert weights; the weight-style name "
                              "carries the `_exps` mark the analyzer keys on"),
    Rule("op", "OP(node-L): N us on the CPU (any other op: ffn_moe_logits/probs/topk/weights*, "
         "and ffn_moe_gate_par when not MOE_FUSED_UP_GATE, included)", "op backend=CPU tid=main, name=node", "cpu_other",
         "thread 0's time in a CPU op; the other threads are not printed"),
    Rule("quantize", "quantize(node): N us, just before MUL_MAT(node)",
         "op op=quantize, same backend/name as its matmul, cut from the matmul's start",
         "as its matmul", "activation quantisation inside the matmul: printed separately, "
                          "so the matmul event keeps only the rest"),
    Rule("cuda_graph", "======== <fn>: graph with N nodes on device D. time = T",
         "starts a split backend=CUDA<D> n_nodes=N", "-",
         "the ops after it run on CUDA<D>; none after it means a CUDA graph was launched "
         "(counted: its GPU time is only in graph_compute's rest)"),
    Rule("cuda_op", "OP(node): N us after a CUDA graph line",
         "op backend=CUDA<D> tid=CUDA<D>, name=node", "gpu_compute",
         "each CUDA op is followed by a stream sync: launch + kernel, inflated by the sync"),
    Rule("barrier", "ggml_barrier(...): N us", "wakeup backend=CPU tid=main, at the end of its CPU graph",
         "thread_wakeup", "thread 0's time in the graph outside ops: waiting at barriers for the "
                          "other threads"),
    Rule("split_setup", "ggml_backend_sched_eval(.1.): N us (.2.: the first of a split)",
         "split (until its compute ends) + phase [split_setup]", "sched",
         "split start to compute launch: input copies and set-up"),
    Rule("copy", "ggml_backend_tensor_set(name) / ggml_backend_tensor_get(name): N us",
         "copy: set src=CPU dst=<the split's backend, else CPU>; get src=<CUDA if the log has "
         "CUDA, else CPU> dst=CPU", "copy", "a synchronous tensor copy"),
    Rule("prelude", "prelude(...): N us", "phase [graph_build]", "graph_build",
         "batch split and KV-cache slot search before the graph is built"),
    Rule("sched_reset", "sched_reset(...): N us", "phase [split_setup]", "sched",
         "scheduler reset (before a rebuild, and at the end of each decode call)"),
    Rule("build_graph", "build_graph(...), llama_build_graph(...): N us", "phase [graph_build]",
         "graph_build", "graph construction (llama_build_graph is inside build_graph)"),
    Rule("sched_alloc_graph", "sched_alloc_graph(...): N us", "phase [graph_build]", "graph_build",
         "split assignment and buffer allocation for a new graph"),
    Rule("set_inputs", "set_inputs(...), set_inputs(token|embd|pos|scale|outputs|mask1|mask2): N us",
         "phase [set_inputs]", "graph_build", "writing the graph's inputs (copies inside are copies)"),
    Rule("graph_compute", "graph_compute(...): N us",
         "contains the splits; its time outside them extends the last split",
         "thread_wakeup after a CPU split (the analyzer's join), else sched",
         "what no op, barrier or split line printed: CPU graph plan, thread fork/join, dispatch"),
    Rule("get_result", "get_result(...), get_embedding(...): N us", "phase [get_result]", "other",
         "reading logits/embeddings out (the copy inside is a copy)"),
    Rule("decode_marker", "===== llama_decode_internal: T", "starts a graph", "-",
         "printed at decode start when IK_PRINT_TIMING > 2"),
    Rule("graph", "prelude ... get_result (one ubatch); the decode call's final sched_reset "
         "joins its last ubatch", "graph, test/n_tokens/n_past from the llama-bench row", "-",
         "one evaluation of the model"),
    Rule("bench_row", "| model | ... | test | t/s |, rows `| ... | tg8 | 3182.32 ± 2565.21 |`",
         "test per repetition, tps/tps_std from the row; the graphs since the previous row are "
         "1 warm-up per phase then the repetitions", "-",
         "llama-bench prints a row after its test"),
    Rule("skipped", "anything else", "nothing; counted as unrecognised or malformed", "-",
         "output of other programs interleaved in the same stream"),
)

# Phase lines of a decode call (src/llama.cpp) and the contract phase names they become.
PHASE_NAMES = {"prelude": "graph_build", "sched_reset": "split_setup", "build_graph": "graph_build",
               "llama_build_graph": "graph_build", "sched_alloc_graph": "graph_build",
               "set_inputs": "set_inputs", "get_result": "get_result",
               "get_embedding": "get_result"}
TOP_PHASES = frozenset({"prelude", "sched_reset", "build_graph", "sched_alloc_graph",
                        "set_inputs", "graph_compute", "get_result", "get_embedding"})
COMPUTE_KINDS = frozenset({"op", "quantize", "barrier", "copy", "split_setup", "cuda_graph"})


def explain() -> str:
    """The rule table as aligned text, for `hyprof import ik --explain`."""
    out = ["How ik_llama.cpp IK_PRINT_TIMING lines become timings v1 events:", ""]
    for r in RULES:
        out.append(f"{r.kind}")
        out.append(f"    line:     {r.line}")
        out.append(f"    event:    {r.event}")
        out.append(f"    category: {r.category}")
        out.append(f"    why:      {r.why}")
    out += ["", f"Header source note: {NOTE}."]
    return "\n".join(out)


# ---------------------------------------------------------------- lines

TIMING_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\((.*)\): (\d+) us")
CUDA_GRAPH_RE = re.compile(r"=+ (\w+): graph with (\d+) nodes on device (\d+)\. time = (-?\d+)")
DECODE_RE = re.compile(r"=+ (llama_decode_internal): (-?\d+)")
OP_KEY_RE = re.compile(r"[A-Z][A-Z0-9_]*")
STARTS_LIKE_TIMING = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\(")
TABLE_RE = re.compile(r"\|.*\|")
LAYER_RE = re.compile(r"-(\d+)$")
KNOWN_KEYS = {"quantize": "quantize", "ggml_barrier": "barrier",
              "ggml_backend_sched_eval": "split_setup", "ggml_backend_tensor_set": "copy",
              "ggml_backend_tensor_get": "copy", "graph_compute": "graph_compute",
              **{k: "phase" for k in PHASE_NAMES}}


@dataclass(eq=False, slots=True)
class Item:
    """One recognised timing line and the lines it contains (see `_claims`)."""
    kind: str       # op, quantize, barrier, split_setup, copy, phase, graph_compute, cuda_graph, decode_marker
    key: str        # the printed key: MUL_MAT, prelude, ggml_backend_tensor_set, ...
    arg: str        # inside the parentheses (node name, `...`, `.1.`); device for cuda_graph
    us: int
    line_no: int
    n_nodes: int = 0
    children: list = field(default_factory=list)
    total_us: int = -1  # the time it covers: its own, or its children's if they add up to more

    def __post_init__(self):
        self.total_us = self.us


def parse_line(text: str, line_no: int) -> Item | str:
    """An `Item`, or why the line is skipped: 'blank', 'unrecognised', 'malformed', 'table'."""
    s = text.rstrip("\r\n")
    if not s.strip():
        return "blank"
    m = TIMING_RE.fullmatch(s)
    if m:
        key, arg, us = m.group(1), m.group(2), int(m.group(3))
        kind = KNOWN_KEYS.get(key) or ("op" if OP_KEY_RE.fullmatch(key) else None)
        if kind is None:
            return "unrecognised"
        if kind == "split_setup" and arg not in (".1.", ".2."):
            return "malformed"
        return Item(kind, key, arg, us, line_no)
    m = CUDA_GRAPH_RE.fullmatch(s)
    if m:
        return Item("cuda_graph", m.group(1), m.group(3), 0, line_no, n_nodes=int(m.group(2)))
    m = DECODE_RE.fullmatch(s)
    if m:
        return Item("decode_marker", m.group(1), "", 0, line_no)
    if TABLE_RE.fullmatch(s.strip()) or s.startswith("build: "):
        return "table"
    m = STARTS_LIKE_TIMING.match(s)
    if m and (m.group(1) in KNOWN_KEYS or OP_KEY_RE.fullmatch(m.group(1))) and ")" in s:
        return "malformed"  # a timing line cut or glued to other output
    if s.startswith("=====") and ("graph with" in s or "llama_decode_internal" in s):
        return "malformed"
    return "unrecognised"


# ---------------------------------------------------------------- containment

def _claims(container: Item, child: Item) -> bool:
    """Whether `container`, printed after `child`, contains it (ik_llama.cpp's nesting)."""
    k = container.kind
    if k == "op":
        return child.kind == "quantize" and child.arg == container.arg
    if k == "split_setup":
        return child.kind == "copy"
    if k == "graph_compute":
        return child.kind in COMPUTE_KINDS
    if k == "phase":
        if container.key == "set_inputs":
            return child.kind == "copy" or (child.key == "set_inputs" and container.arg == "..."
                                            and child.arg != "...")
        if container.key == "build_graph":
            return child.key == "llama_build_graph"
        if container.key in ("get_result", "get_embedding"):
            return child.kind == "copy"
    return False


def _push(pending: list[Item], item: Item) -> None:
    """Append `item`, moving into it the tail of `pending` that it contains."""
    start = len(pending)
    while start > 0 and _claims(item, pending[start - 1]):
        start -= 1
        if item.kind == "op":
            break
    if start < len(pending):
        item.children = pending[start:]
        del pending[start:]
        item.total_us = max(item.us, sum(c.total_us for c in item.children))
    pending.append(item)


# ---------------------------------------------------------------- segments

@dataclass
class Graph:
    """One ubatch evaluation: its top-level items in log order."""
    items: list
    first_line: int
    complete: bool          # saw graph_compute


@dataclass
class Loose:
    """Timing lines outside any decode (load-time tensor preparation, for example)."""
    items: list


@dataclass(frozen=True)
class BenchRow:
    """One row of llama-bench's markdown table."""
    line_no: int
    columns: dict           # column name -> cell text

    @property
    def test(self) -> str:
        return self.columns.get("test", "")


@dataclass
class Stats:
    """What the conversion read, skipped and had to bend, for the header and the CLI."""
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)   # blank / unrecognised / malformed
    timing_lines: int = 0
    table_lines: int = 0
    graphs: int = 0
    graphs_incomplete: int = 0          # no graph_compute (a truncated log)
    graphs_without_test: int = 0
    loose_items: int = 0                # timing lines outside decodes
    loose_us: int = 0
    stretched: int = 0                  # containers shorter than their children (rounding)
    stretched_us: int = 0
    cumulative_eval2: int = 0           # later sched_eval(.2.) lines of one split (cumulative: skipped)
    cuda_splits_without_ops: int = 0    # a CUDA graph line with no op lines: a CUDA graph was launched
    rows_unmatched: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"lines": self.lines, "timing_lines": self.timing_lines, "table_lines": self.table_lines,
                "skipped": dict(sorted(self.skipped.items())), "graphs": self.graphs,
                "graphs_incomplete": self.graphs_incomplete, "graphs_without_test": self.graphs_without_test,
                "loose_items": self.loose_items, "loose_us": self.loose_us,
                "stretched_containers": self.stretched, "stretched_us": self.stretched_us,
                "cumulative_eval2_skipped": self.cumulative_eval2,
                "cuda_splits_without_ops": self.cuda_splits_without_ops,
                "rows_unmatched": list(self.rows_unmatched)}


def _read_lines(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            yield from f
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def segments(lines: Iterable[str], stats: Stats) -> Iterator[Graph | Loose | BenchRow]:
    """Group the log into graphs, loose timing lines and llama-bench rows, in log order.

    A graph opens at `prelude` (or a decode marker, or any decode phase seen outside
    a graph) and closes at the decode call's final `sched_reset`, at the next
    ubatch's `prelude`, or at anything that cannot be inside it (a table row, EOF).
    """
    header: list[str] | None = None
    pending: list[Item] = []
    in_graph = False
    complete = False
    first_line = 0

    def close():
        nonlocal pending, in_graph
        out = Graph(pending, first_line, complete) if in_graph else (Loose(pending) if pending else None)
        pending, in_graph = [], False
        return out

    def open_graph(line_no):
        nonlocal in_graph, complete, first_line
        in_graph, complete, first_line = True, False, line_no

    for line_no, text in enumerate(lines, 1):
        stats.lines += 1
        parsed = parse_line(text, line_no)
        if parsed == "table":
            cells = [c.strip() for c in text.strip().strip("|").split("|")]
            is_rule = set("".join(cells)) <= set("-: ")
            if "t/s" in cells and "test" in cells:
                header = cells
            elif header and len(cells) == len(header) and not is_rule:
                if (seg := close()) is not None:
                    yield seg
                yield BenchRow(line_no, dict(zip(header, cells)))
            elif not (is_rule or text.startswith("build: ")):
                stats.skipped["unrecognised"] += 1  # some other table, or a row cut short
                continue
            stats.table_lines += 1
            continue
        if isinstance(parsed, str):
            stats.skipped[parsed] += 1
            continue
        item = parsed
        stats.timing_lines += 1
        opens = item.kind == "decode_marker" or item.key == "prelude"
        if opens and in_graph and (complete or item.kind == "decode_marker" or
                                   any(p.key == "prelude" for p in pending)):
            yield close()
        if not in_graph and (opens or item.key in TOP_PHASES):
            if pending:
                yield close()
            open_graph(line_no)
        if item.kind == "decode_marker":
            continue
        ends_call = (item.key == "sched_reset" and in_graph and pending
                     and pending[-1].key != "prelude")
        _push(pending, item)
        if item.kind == "graph_compute":
            complete = True
        if ends_call:
            yield close()
    if (seg := close()) is not None:
        yield seg


# ---------------------------------------------------------------- llama-bench tests

TEST_NAME_RE = (("pp", re.compile(r"pp(\d+)")), ("tg", re.compile(r"tg(\d+)")),
                ("pg", re.compile(r"pp(\d+)\+tg(\d+)")), ("gp", re.compile(r"tg(\d+)@pp(\d+)")))


@dataclass(frozen=True)
class Role:
    """What one graph was in llama-bench's run of a row."""
    test: str | None        # the row's test name, None for warm-up / untimed prompt
    rep: int                # repetition, -1 outside them
    n_tokens: int | None
    n_past: int
    role: str | None        # None (timed), "warmup", "depth" (the untimed prompt of tgN@ppM)


def _int_cell(row: BenchRow, name: str, default: int | None = None) -> int | None:
    m = re.match(r"\s*(\d+)", row.columns.get(name, ""))
    return int(m.group(1)) if m else default


def shape_of_test(name: str) -> tuple[str, int, int] | None:
    """(llama-bench kind pp/tg/pg/gp, n_prompt, n_gen) from a test label."""
    for kind, rx in TEST_NAME_RE:
        m = rx.fullmatch(name.strip())
        if m:
            a = [int(g) for g in m.groups()]
            if kind == "pp":
                return kind, a[0], 0
            if kind == "tg":
                return kind, 0, a[0]
            return (kind, a[0], a[1]) if kind == "pg" else (kind, a[1], a[0])
    return None


def roles_for_row(row: BenchRow, n_graphs: int) -> list[Role] | None:
    """The role of each of the `n_graphs` graphs llama-bench ran for `row`, or None.

    ik_llama.cpp's llama-bench runs one warm-up decode per phase (a short prompt,
    then one generated token) unless `-w 0`, then each repetition: the prompt in
    n_batch chunks cut into n_ubatch graphs, then n_gen one-token graphs. The count
    of repetitions is whatever makes the graph count come out whole.
    """
    shape = shape_of_test(row.test)
    if shape is None:
        return None
    kind, n_prompt, n_gen = shape
    n_batch = _int_cell(row, "n_batch", 2048)
    n_ubatch = min(_int_cell(row, "n_ubatch", 512), n_batch)
    prompt = []
    for start in range(0, n_prompt, n_batch):
        chunk = min(n_batch, n_prompt - start)
        for u in range(0, chunk, n_ubatch):
            prompt.append((min(n_ubatch, chunk - u), start + u))
    per_rep = len(prompt) + n_gen
    warm = [Role(None, -1, None, 0, "warmup")] * (n_prompt > 0) + [Role(None, -1, 1, 0, "warmup")] * (n_gen > 0)
    for warmup in (warm, []):
        reps, left = divmod(n_graphs - len(warmup), per_rep) if per_rep else (0, 1)
        if reps >= 1 and left == 0:
            break
    else:
        return None
    timed_prompt = kind != "gp"
    one_rep = [Role(row.test if timed_prompt else None, 0, n, past, None if timed_prompt else "depth")
               for n, past in prompt]
    one_rep += [Role(row.test, 0, 1, n_prompt + i, None) for i in range(n_gen)]
    roles = list(warmup)
    for r in range(reps):
        roles += [Role(x.test, r if x.test else -1, x.n_tokens, x.n_past, x.role) for x in one_rep]
    return roles


def fields_of_test(row: BenchRow) -> dict:
    """The contract `test` fields of a row, plus llama-bench's t/s."""
    kind, n_prompt, n_gen = shape_of_test(row.test)
    fields = {"name": row.test, "kind": "tg" if kind == "gp" else kind,
              "n_prompt": 0 if kind == "gp" else n_prompt, "n_gen": n_gen,
              "depth": n_prompt if kind == "gp" else 0,
              "n_tokens": n_gen if kind == "gp" else n_prompt + n_gen}
    m = re.fullmatch(r"\s*([0-9.]+)\s*±\s*([0-9.]+)\s*", row.columns.get("t/s", ""))
    if m:
        fields["tps"], fields["tps_std"] = float(m.group(1)), float(m.group(2))
    return fields


# ---------------------------------------------------------------- pass 1

@dataclass
class Scan:
    """What the first pass learnt: llama-bench rows, each graph's role, the CUDA devices, and
    what a model file must have to be the one the log was produced from."""
    path: str
    stats: Stats
    rows: list                  # BenchRow, in order
    roles: list                 # per graph index: (Role, row index) or None
    cuda_devices: list          # device numbers seen in CUDA graph lines, in first-seen order
    expert_weights: dict        # expert weight an op reads -> (line number, line text) of its first op
    top_layer: tuple | None     # (highest layer in a node name, its line number)


def scan(path: str | os.PathLike) -> Scan:
    """First pass: rows, graph roles and devices (the header needs them before any event)."""
    path = os.fspath(path)
    stats = Stats()
    rows: list[BenchRow] = []
    roles: list = []
    devices: list[int] = []
    expert_weights: dict = {}
    top_layer = None
    since_row = 0
    for seg in segments(_read_lines(path), stats):
        if isinstance(seg, (Graph, Loose)):
            for it in _walk(seg.items):
                if it.kind == "cuda_graph" and int(it.arg) not in devices:
                    devices.append(int(it.arg))
                if it.kind == "op":
                    name, node, layer = op_name(it.key, it.arg, "CPU")
                    if node is not None:
                        expert_weights.setdefault(name, (it.line_no, f"{it.key}({it.arg})"))
                    if layer is not None and (top_layer is None or layer > top_layer[0]):
                        top_layer = (layer, it.line_no)
                if it.children and it.total_us > it.us:
                    stats.stretched += 1
                    stats.stretched_us += it.total_us - it.us
                if it.kind == "graph_compute":
                    stats.cumulative_eval2 += len(cumulative_eval2(it.children))
                    stats.cuda_splits_without_ops += cuda_splits_without_ops(it.children)
        if isinstance(seg, Graph):
            stats.graphs += 1
            stats.graphs_incomplete += not seg.complete
            since_row += 1
        elif isinstance(seg, Loose):
            stats.loose_items += sum(1 for _ in _walk(seg.items))
            stats.loose_us += sum(it.total_us for it in seg.items)
        else:
            got = roles_for_row(seg, since_row)
            if got is None:
                stats.rows_unmatched.append(f"line {seg.line_no}: {seg.test} ({since_row} graphs)")
                got = [None] * since_row
            roles += [(r, len(rows)) if r else None for r in got]
            rows.append(seg)
            since_row = 0
    roles += [None] * since_row
    stats.graphs_without_test = sum(1 for r in roles if r is None)
    return Scan(path, stats, rows, roles, devices, expert_weights, top_layer)


def _walk(items: list[Item]) -> Iterator[Item]:
    for it in items:
        yield it
        yield from _walk(it.children)


# ---------------------------------------------------------------- the header

def _size_bytes(text: str) -> int | None:
    m = re.fullmatch(r"([0-9.]+) (KiB|MiB|GiB|TiB)", text.strip())
    return round(float(m.group(1)) * 1024 ** ("KiB MiB GiB TiB".split().index(m.group(2)) + 1)) if m else None


def _count(text: str) -> int | None:
    m = re.fullmatch(r"([0-9.]+) ([KMBT])", text.strip())
    return round(float(m.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]) if m else None


def header(sc: Scan, model_file: ModelWeights | None = None) -> dict:
    """The meta line: the model and config from the first llama-bench row where present, the
    model file's path, size and expert counts where one was given (`source.bytes` says how
    the op bytes were made of it)."""
    row = sc.rows[0].columns if sc.rows else {}
    desc = row.get("model", "")
    model = {"path": None, "desc": desc or None, "arch": desc.split()[0] if desc else None,
             "size_bytes": _size_bytes(row.get("size", "")), "n_params": _count(row.get("params", "")),
             "ftype": desc.split()[-1] if len(desc.split()) > 1 else None}
    if model_file is not None:
        model.update(path=model_file.path, size_bytes=model_file.size_bytes, arch=model_file.arch or model["arch"],
                     n_expert=model_file.n_expert, n_expert_used=model_file.n_expert_used)
    config = {"threads": _int_cell(sc.rows[0], "threads") if sc.rows else None,
              "accel": f"CUDA{sc.cuda_devices[0]}" if sc.cuda_devices else "none"}
    for column, key in (("ngl", "n_gpu_layers"), ("mla", "mla"), ("fa", "fa"), ("fmoe", "fmoe"), ("rtr", "rtr"),
                        ("n_batch", "n_batch"), ("n_ubatch", "n_ubatch")):
        if column in row:
            config[key] = _int_cell(sc.rows[0], column)
    if row.get("ot"):
        config["overrides"] = [row["ot"]]
    config = {k: v for k, v in config.items() if v is not None}
    try:
        from importlib.metadata import version
        importer = f"hyprof {version('hyprof')}"
    except Exception:  # not installed: the tool name is enough
        importer = "hyprof"
    source = {"format": FORMAT, "path": sc.path, "importer": importer, "note": NOTE,
              "backend": row.get("backend"), "bench_rows": [r.columns for r in sc.rows],
              "lines": sc.stats.as_dict(),
              "bytes": model_file.header() if model_file is not None else
              {"from": None, "rule": "none: the log carries no byte counts (give the model file: --model)"}}
    return {"type": "meta", "schema": SCHEMA, "tool": "ik_llama.cpp",
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model": model, "config": config, "machine": {"cpu": None, "gpu": None},
            "peak_bw": _peak_here(config.get("threads")), "placement": {}, "source": source}


def _peak_here(threads: int | None) -> dict:
    """The CPU peak `hyprof membw -t THREADS` measured on this machine, if it has (the log names
    no machine: the peak is right when the log ran here; `report --peak-bw` replaces it)."""
    result = cached_result(threads) if threads else None
    if result is None:
        return {}
    return {"CPU": {"GBps": round(result.triad_GBps, 3),
                    "method": f"`hyprof membw` where the log was imported, {result.cpu} (right if the log ran "
                              f"there): {result.method}"}}


# ---------------------------------------------------------------- pass 2: laying out

US = 1000  # ns per printed microsecond


class _Layout:
    """Lays items end to end from a cursor and turns them into contract-v1 events."""

    def __init__(self, devices: list[int], model: ModelWeights | None):
        self.gpu = f"CUDA{devices[0]}" if devices else None
        self.model = model
        self.out: list[dict] = []
        self.t = 0

    def emit(self, ev: dict) -> None:
        self.out.append({k: v for k, v in ev.items() if v is not None})

    @staticmethod
    def span(item: Item) -> int:
        """Nanoseconds `item` covers: its own time, or its children's if they add up to more."""
        return item.total_us * US

    # --- top level

    def items(self, items: list[Item], graph: int | None, n_tokens: int | None) -> None:
        for it in items:
            if it.kind == "graph_compute":
                self.compute(it, graph, n_tokens)
            else:
                self.item(it, graph, n_tokens, split=None, backend="CPU")

    def item(self, it: Item, graph, n_tokens, split, backend) -> None:
        t0 = self.t
        if it.kind in ("phase", "split_setup"):  # split_setup here: outside graph_compute
            dur = self.span(it)
            name = PHASE_NAMES.get(it.key, "split_setup")
            label = it.key if it.arg == "..." else f"{it.key}({it.arg})"
            self.emit({"type": "phase", "ts": t0, "dur": dur, "graph": graph, "tid": MAIN_LANE,
                       "name": name, "label": label if label != name else None})
            for c in it.children:
                self.item(c, graph, n_tokens, split, backend)
            self.t = t0 + dur
        elif it.kind == "copy":
            self.emit({"type": "copy", "ts": t0, "dur": it.us * US, "graph": graph, "split": split,
                       "tid": MAIN_LANE, "name": it.arg, **self.direction(it, backend)})
            self.t += it.us * US
        elif it.kind in ("op", "quantize"):
            self.op(it, graph, n_tokens, split, backend)
        elif it.kind == "barrier":
            self.emit({"type": "wakeup", "ts": t0, "dur": it.us * US, "graph": graph, "split": split,
                       "tid": MAIN_LANE, "backend": "CPU"})
            self.t += it.us * US
        elif it.kind == "graph_compute":
            self.compute(it, graph, n_tokens)

    def direction(self, it: Item, backend: str) -> dict:
        m = re.match(r"(CUDA\d+)#", it.arg)
        if it.key.endswith("_get"):
            return {"src": m.group(1) if m else (self.gpu or "CPU"), "dst": "CPU"}
        return {"src": "CPU", "dst": m.group(1) if m else backend}

    def op(self, it: Item, graph, n_tokens, split, backend) -> None:
        """An op line; a CPU matmul's `quantize` children come first and are cut from it."""
        t0 = self.t
        lane = MAIN_LANE if backend == "CPU" else backend
        name, node, layer = op_name(it.key, it.arg, backend)
        quantize_us = 0
        for q in it.children:
            self.emit({"type": "op", "ts": self.t, "dur": q.us * US, "graph": graph, "split": split,
                       "backend": backend, "tid": lane, "op": "quantize", "name": name,
                       "node": node, "layer": layer, "n_tokens": n_tokens})
            self.t += q.us * US
            quantize_us += q.us
        dur = self.span(it)
        if it.kind == "op":
            weight = (self.model.expert_bytes(name, n_tokens)
                      if self.model is not None and node is not None and n_tokens else None)
            self.emit({"type": "op", "ts": self.t, "dur": dur - quantize_us * US, "graph": graph,
                       "split": split, "backend": backend, "tid": lane, "op": it.key, "name": name,
                       "node": node, "layer": layer, "n_tokens": n_tokens,
                       "bytes": weight[0] if weight else None, "bytes_ub": 1 if weight and weight[1] else None})
        self.t = t0 + dur

    # --- graph_compute: splits

    def compute(self, gc: Item, graph, n_tokens) -> None:
        """graph_compute's children cut into splits; its unprinted time joins the last split."""
        t0 = self.t
        dur = self.span(gc)
        split = None            # [index, ts, backend, n_nodes, ended]
        n_split = 0
        kids = gc.children
        cumulative = cumulative_eval2(kids)

        def close():
            if split is not None:
                self.emit({"type": "split", "ts": split[1], "dur": self.t - split[1], "graph": graph,
                           "split": split[0], "backend": split[2], "tid": MAIN_LANE,
                           "n_nodes": split[3] or None})

        for i, it in enumerate(kids):
            if i in cumulative:
                continue
            if it.kind == "split_setup":
                close()
                nxt = kids[i + 1] if i + 1 < len(kids) else None
                backend = f"CUDA{nxt.arg}" if nxt is not None and nxt.kind == "cuda_graph" else "CPU"
                split = [n_split, self.t, backend, 0, False]
                n_split += 1
                self.item(it, graph, n_tokens, split[0], backend)
                continue
            if it.kind == "cuda_graph":
                if split is None or split[4] or split[2] != f"CUDA{it.arg}" or split[3]:
                    close()
                    split = [n_split, self.t, f"CUDA{it.arg}", 0, False]
                    n_split += 1
                split[3] = it.n_nodes
                continue
            if split is None or split[4]:  # no sched_eval line before it: a split of its own
                close()
                split = [n_split, self.t, "CPU", 0, False]
                n_split += 1
            self.item(it, graph, n_tokens, split[0], split[2])
            if it.kind == "barrier":
                split[4] = True
        end = t0 + dur
        if split is not None:
            self.t = end  # unprinted compute time: the last split's own (sched)
            close()
        self.t = end


def cumulative_eval2(kids: list[Item]) -> set[int]:
    """Indices of `sched_eval(.2.)` lines after the first of their split: ik_llama.cpp prints
    them with time since the split began (cumulative), so only the first is set-up time."""
    out, prev_eval2 = set(), False
    for i, it in enumerate(kids):
        if it.kind == "split_setup" and it.arg == ".2." and prev_eval2:
            out.add(i)
        elif it.kind not in ("op", "quantize", "cuda_graph", "copy"):
            prev_eval2 = it.kind == "split_setup" and it.arg == ".2."
    return out


def cuda_splits_without_ops(kids: list[Item]) -> int:
    """CUDA graph lines followed by no op line: with CUDA graphs on, ik_llama.cpp launches the
    captured graph and prints no per-op times, so that GPU time is only in graph_compute's rest."""
    count, waiting = 0, False
    for it in kids:
        if it.kind in ("cuda_graph", "split_setup"):
            count += waiting
            waiting = it.kind == "cuda_graph"
        elif it.kind == "op":
            waiting = False
    return count + waiting


def op_name(op: str, node: str, backend: str) -> tuple[str, str | None, int | None]:
    """(contract name, printed node name if different, layer) for an op line (rule `expert_op`)."""
    m = LAYER_RE.search(node)
    layer = int(m.group(1)) if m else None
    stem = node[:m.start()] if m else node
    if backend != "CPU" or not (op in EXPERT_OPS or stem in EXPERT_NODES):
        return node, None, layer
    weight = EXPERT_NODES.get(stem) or (FUSED_UP_GATE_WEIGHT if op == "MOE_FUSED_UP_GATE" else f"{stem}_exps")
    return (f"blk.{layer}.{weight}" if layer is not None else weight), node, layer


# ---------------------------------------------------------------- convert

def convert(path: str | os.PathLike, sc: Scan | None = None, model: ModelWeights | None = None) -> Iterator[str]:
    """Contract-v1 JSONL lines (no newline) for an IK_PRINT_TIMING log: header, then events.
    With the `model` file the log was produced from, expert ops carry the bytes they read
    (analysis/model_bytes.py); a model that does not fit the log is refused before the header."""
    path = os.fspath(path)
    sc = sc if sc is not None else scan(path)
    if model is not None:
        row = sc.rows[0].columns.get("model", "").split() if sc.rows else []
        check_log(model, path, sc.expert_weights, sc.top_layer, sc.stats.cuda_splits_without_ops == 0,
                  row[0] if row else None)
    dumps = orjson.dumps
    yield dumps(header(sc, model)).decode()
    lay = _Layout(sc.cuda_devices, model)
    n_graph = 0
    rep_start: dict = {}
    for seg in segments(_read_lines(path), Stats()):
        if isinstance(seg, BenchRow):
            continue
        if isinstance(seg, Loose):
            lay.items(seg.items, None, None)
        else:
            role_row = sc.roles[n_graph] if n_graph < len(sc.roles) else None
            role = role_row[0] if role_row else None
            t0 = lay.t
            lay.items(seg.items, n_graph, role.n_tokens if role else None)
            lay.emit({"type": "graph", "ts": t0, "dur": lay.t - t0, "graph": n_graph,
                      "tid": MAIN_LANE, "test": role.test if role else None,
                      "n_tokens": role.n_tokens if role else None,
                      "n_past": role.n_past if role else None,
                      "role": role.role if role else None,
                      "incomplete": True if not seg.complete else None})
            if role is not None and role.test is not None:
                key = (role_row[1], role.rep)
                rep_start.setdefault(key, t0)
                nxt = sc.roles[n_graph + 1] if n_graph + 1 < len(sc.roles) else None
                if nxt is None or nxt[0].test is None or (nxt[1], nxt[0].rep) != key:
                    lay.emit({"type": "test", "ts": rep_start[key], "dur": lay.t - rep_start[key],
                              "tid": MAIN_LANE, "rep": role.rep, **fields_of_test(sc.rows[role_row[1]])})
            n_graph += 1
        for ev in lay.out:
            yield dumps(ev).decode()
        lay.out.clear()


# ---------------------------------------------------------------- sniffing

SNIFF_BYTES = 1 << 20
SNIFF_KEYS = ("ggml_barrier(", "graph_compute(", "ggml_backend_sched_eval(", "prelude(",
              "set_inputs(", "ggml_backend_tensor_set(", "graph with ")


def looks_like_ik_log(path: str | os.PathLike) -> bool:
    """Whether the file's first MiB holds IK_PRINT_TIMING lines (a few known keys, parsed whole)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    if head.lstrip()[:1] == b"{":
        return False
    text = head.decode("utf-8", errors="replace")
    hits = 0
    for i, line in enumerate(text.splitlines()):
        if any(k in line for k in SNIFF_KEYS) and isinstance(parse_line(line, i + 1), Item):
            hits += 1
            if hits >= 3:
                return True
    return False
