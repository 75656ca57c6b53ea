"""The split rule and the scheduler, on a synthetic MoE graph and on the tiny model.

The synthetic graph has the shape of a DeepSeek2 MoE layer (norm, attention,
router, top-k, routed experts, shared expert, adds), each node a small torch op,
so the expected splits can be written down by hand and the results checked
against the plain sequential `compute`.
"""

from __future__ import annotations

import re

import pytest
import torch

from hybrid.backends.acc import AccBackend
from hybrid.backends.cpu import CpuBackend
from hybrid.cpu_kernels import n_tasks, run_tasks
from hybrid.builder import forms
from hybrid.graph import Graph, Node
from hybrid.program import compute
from hybrid.sched import Scheduler, describe, split_graph
from profiler.recorder import Recorder

D, N_EXPERT, N_USED = 8, 4, 2


def node(op, name, srcs, fn, parallel=None, **kw) -> Node:
    """A graph node from fn(buf, *src_values) (and parallel(buf, *src_values, pool, times));
    fn None: a graph input."""
    return Node(op, name, srcs, None if fn is None else forms(fn, parallel), **kw)


def _parallel_matmul(w, x, pool, times):
    """Rows of `w @ x` shared out as tasks, as a CPU op's `parallel` form does."""
    dst = torch.empty(x.shape[0], w.shape[0])
    bounds = torch.linspace(0, w.shape[0], n_tasks(pool) + 1).long().tolist()

    def task(r0, r1):
        return lambda: dst[:, r0:r1].copy_(x @ w[r0:r1].T)
    run_tasks([task(a, b) for a, b in zip(bounds, bounds[1:]) if b > a], pool, times)
    return dst


def _parallel_experts(w, x, topk, pool, times):
    weights, ids = topk
    dst = torch.zeros(N_USED, *x.shape)

    def task(k):
        def run():
            for t in range(x.shape[0]):
                dst[k, t] = weights[t, k] * (w[ids[t, k]] @ x[t])
        return run
    # per-expert partials: the weightless SUM_ROWS after it adds them up
    run_tasks([task(k) for k in range(N_USED)], pool, times)
    return dst


def synthetic_moe_graph(n_layer: int = 2, n_tokens: int = 3) -> Graph:
    inp = node("INPUT", "inp_embd", (), None, n_tokens=n_tokens)
    nodes = [inp]

    def add(node):
        nodes.append(node)
        return node

    cur = inp
    for il in range(n_layer):
        norm = add(node("RMS_NORM", f"blk.{il}.attn_norm", (cur,),
                        lambda w, x: torch.nn.functional.rms_norm(x, (D,)) * w,
                        buffer=f"blk.{il}.attn_norm.weight", layer=il))
        attn = add(node("MUL_MAT", f"blk.{il}.attn_q", (norm,), lambda w, x: x @ w.T,
                        buffer=f"blk.{il}.attn_q.weight", layer=il,
                        parallel=_parallel_matmul))
        res = add(node("ADD", f"ffn_inp-{il}", (attn, cur), lambda _, a, b: a + b, layer=il))
        fnorm = add(node("RMS_NORM", f"blk.{il}.ffn_norm", (res,),
                         lambda w, x: torch.nn.functional.rms_norm(x, (D,)) * w,
                         buffer=f"blk.{il}.ffn_norm.weight", layer=il))
        logits = add(node("MUL_MAT", f"blk.{il}.ffn_gate_inp", (fnorm,), lambda w, x: x @ w.T,
                          buffer=f"blk.{il}.ffn_gate_inp.weight", layer=il))
        topk = add(node("TOP_K", f"ffn_moe_topk-{il}", (logits,),
                        lambda _, l: torch.topk(torch.softmax(l, -1), N_USED), layer=il))
        exps = add(node("MUL_MAT_ID", f"blk.{il}.ffn_up_exps", (fnorm, topk),
                        lambda w, x, tk: torch.stack([
                            tk[0][:, k:k + 1] * torch.einsum("td,tod->to", x, w[tk[1][:, k]])
                            for k in range(N_USED)]),
                        buffer=f"blk.{il}.ffn_up_exps.weight", layer=il,
                        parallel=_parallel_experts))
        moe = add(node("SUM_ROWS", f"ffn_moe_out-{il}", (exps,), lambda _, e: e.sum(0), layer=il))
        shexp = add(node("MUL_MAT", f"blk.{il}.ffn_up_shexp", (fnorm,), lambda w, x: x @ w.T,
                         buffer=f"blk.{il}.ffn_up_shexp.weight", layer=il))
        both = add(node("ADD", f"ffn_out-{il}", (moe, shexp), lambda _, a, b: a + b, layer=il))
        cur = add(node("ADD", f"l_out-{il}", (both, res), lambda _, a, b: a + b, layer=il))
    out_norm = add(node("RMS_NORM", "output_norm", (cur,),
                        lambda w, x: torch.nn.functional.rms_norm(x, (D,)) * w,
                        buffer="output_norm.weight"))
    out = add(node("MUL_MAT", "output", (out_norm,), lambda w, x: x @ w.T, buffer="output.weight",
                   parallel=_parallel_matmul))
    return Graph(nodes, {"inp_embd": inp}, out, n_tokens=n_tokens)


def synthetic_weights(n_layer: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for il in range(n_layer):
        w[f"blk.{il}.attn_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        w[f"blk.{il}.attn_q.weight"] = torch.randn(D, D, generator=g) / D ** 0.5
        w[f"blk.{il}.ffn_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        w[f"blk.{il}.ffn_gate_inp.weight"] = torch.randn(N_EXPERT, D, generator=g)
        w[f"blk.{il}.ffn_up_exps.weight"] = torch.randn(N_EXPERT, D, D, generator=g) / D ** 0.5
        w[f"blk.{il}.ffn_up_shexp.weight"] = torch.randn(D, D, generator=g) / D ** 0.5
    w["output_norm.weight"] = torch.ones(D)
    w["output.weight"] = torch.randn(16, D, generator=g)
    return w


def experts_on_cpu(buffer: str) -> str:
    return "CPU" if re.search(r"\.ffn_.*_exps\.", buffer) else "ACC0"


def test_split_rule_moe_gives_two_splits_per_layer():
    graph = synthetic_moe_graph(n_layer=2)
    plan = split_graph(graph, experts_on_cpu)
    rows = [(r["backend"], r["nodes"], r["inputs"]) for r in describe(plan)]
    # As in ggml, weightless ops between the experts and the next device op are
    # pulled up onto the device ("2.dev_up"): the CPU split holds the experts only.
    assert rows == [
        ("ACC0", ["blk.0.attn_norm", "blk.0.attn_q", "ffn_inp-0", "blk.0.ffn_norm",
                  "blk.0.ffn_gate_inp", "ffn_moe_topk-0"], ["inp_embd"]),
        ("CPU", ["blk.0.ffn_up_exps"], ["blk.0.ffn_norm", "ffn_moe_topk-0"]),
        ("ACC0", ["ffn_moe_out-0", "blk.0.ffn_up_shexp", "ffn_out-0", "l_out-0",
                  "blk.1.attn_norm", "blk.1.attn_q", "ffn_inp-1", "blk.1.ffn_norm",
                  "blk.1.ffn_gate_inp", "ffn_moe_topk-1"], ["blk.0.ffn_up_exps"]),
        ("CPU", ["blk.1.ffn_up_exps"], ["blk.1.ffn_norm", "ffn_moe_topk-1"]),
        ("ACC0", ["ffn_moe_out-1", "blk.1.ffn_up_shexp", "ffn_out-1", "l_out-1",
                  "output_norm", "output"], ["blk.1.ffn_up_exps"]),
    ]
    causes = dict(zip((n.name for n in graph.nodes), plan.causes))
    assert causes["inp_embd"] == "1.inp"
    assert causes["blk.0.ffn_up_exps"] == "1.buf"
    assert causes["ffn_moe_topk-0"] == "2.dev_down"
    assert causes["ffn_moe_out-0"] == "2.dev_up"
    assert plan.n_copies == 7


def test_split_rule_single_backend_is_one_split():
    graph = synthetic_moe_graph(n_layer=2)
    plan = split_graph(graph, lambda _: "CPU")
    assert [(s.backend, len(s.nodes), len(s.inputs)) for s in plan.splits] == \
        [("CPU", len(graph.nodes) - 1, 0)]
    assert set(plan.causes) == {"1.inp", "1.buf", "2.rest_down"}


def test_split_rule_weightless_graph_follows_sources():
    a = node("INPUT", "a", (), None)
    b = node("ADD", "b", (a, a), lambda _, x, y: x + y)
    plan = split_graph(Graph([a, b], {"a": a}, b), lambda _: "ACC0")
    assert plan.causes == ("1.inp", "3.src") and [plan.backend_of[n] for n in (a, b)] == ["CPU", "CPU"]


def _run(graph, weights, placement, n_threads, poll, rec):
    cpu = CpuBackend(weights, n_threads, poll, rec)
    acc = AccBackend({k: v.clone() for k, v in weights.items()}, rec)
    try:
        sched = Scheduler({"CPU": cpu, "ACC0": acc}, rec)
        x = torch.randn(graph.n_tokens, D, generator=torch.Generator().manual_seed(1))
        t0 = rec.now()
        out = sched.compute(graph, split_graph(graph, placement), {"inp_embd": x}, graph_id=7)
        rec.lane("main").graph(t0, rec.now() - t0, 7, "t", graph.n_tokens, 0)
        return x, out
    finally:
        cpu.close()
        acc.close()


@pytest.mark.parametrize("n_threads,poll", [(1, 0), (2, 0), (2, 50), (3, 50)])
def test_scheduler_matches_sequential_compute(n_threads, poll):
    graph = synthetic_moe_graph(n_layer=2)
    weights = synthetic_weights()
    rec = Recorder(enabled=True)
    x, out = _run(graph, weights, experts_on_cpu, n_threads, poll, rec)
    expected = compute(graph, {"inp_embd": x}, weights.__getitem__)
    torch.testing.assert_close(out, expected)
    events = rec.drain()
    kinds = {e["type"] for e in events}
    assert {"op", "split", "copy", "sync", "graph", "phase"} <= kinds
    assert ("wakeup" in kinds) == (n_threads > 1)
    _assert_nesting(events)
    ops = [e for e in events if e["type"] == "op"]
    lanes = {"main", "ACC0"} | {f"cpu{i}" for i in range(1, n_threads)}
    # the CPU ops' tasks go to whichever threads claim them first: some CPU lane, not a fixed one
    tids = {e["tid"] for e in ops}
    assert "ACC0" in tids and tids - {"ACC0"} and tids <= lanes
    assert {e["tid"] for e in events if e["type"] == "wakeup"} == lanes - {"main", "ACC0"}
    assert all(e["graph"] == 7 for e in ops)


@pytest.mark.parametrize("n_threads,poll", [(2, 0), (3, 50)])
def test_every_worker_runs_a_share_at_the_same_time(n_threads, poll):
    """Tasks that wait for each other can only finish if all workers run them at once."""
    import threading
    barrier = threading.Barrier(n_threads, timeout=10)
    a = node("INPUT", "a", (), None)
    b = node("MUL_MAT", "blk.0.ffn_up_exps", (a,), lambda w, x: x, buffer="w",
             parallel=lambda w, x, pool, times: run_tasks([barrier.wait] * pool.n_threads, pool, times) or x)
    graph = Graph([a, b], {"a": a}, b)
    rec = Recorder(enabled=True)
    cpu = CpuBackend({"w": None}, n_threads, poll, rec)
    try:
        Scheduler({"CPU": cpu}, rec).compute(graph, split_graph(graph, lambda _: "CPU"),
                                            {"a": torch.ones(1)}, 0)
    finally:
        cpu.close()
    ops = [e for e in rec.drain() if e["type"] == "op"]
    workers = ["main"] + [f"cpu{i}" for i in range(1, n_threads)]
    assert sorted(e["tid"] for e in ops) == sorted(workers)


def _assert_nesting(events):
    """Every event lies inside its graph, and inside its split when it names one
    (device ops included: a device split ends when the host has waited for it)."""
    graphs = {e["graph"]: e for e in events if e["type"] == "graph"}
    splits = {(e["graph"], e["split"]): e for e in events if e["type"] == "split"}
    for e in events:
        if e["type"] == "graph":
            continue
        g = graphs[e["graph"]]
        assert g["ts"] <= e["ts"] and e["ts"] + e["dur"] <= g["ts"] + g["dur"], e
        if e["type"] in ("op", "copy", "sync", "wakeup") and e.get("split") is not None:
            s = splits[(e["graph"], e["split"])]
            assert s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"], (e, s)


def test_worker_error_reaches_the_main_thread():
    def bad_parallel(w, x, pool, times):
        def boom():
            raise ValueError("task failed")
        run_tasks([boom] * 4, pool, times)
        return x
    a = node("INPUT", "a", (), None)
    b = node("MUL_MAT", "b", (a,), lambda w, x: x, buffer="w", parallel=bad_parallel)
    graph = Graph([a, b], {"a": a}, b)
    rec = Recorder(enabled=False)
    cpu = CpuBackend({"w": None}, 2, 0, rec)
    try:
        sched = Scheduler({"CPU": cpu}, rec)
        with pytest.raises(ValueError, match="task failed"):
            sched.compute(graph, split_graph(graph, lambda _: "CPU"), {"a": torch.ones(1)}, 0)
        # the pool still works afterwards
        good = node("MUL_MAT", "c", (a,), lambda w, x: x, buffer="w",
                    parallel=lambda w, x, pool, times: run_tasks([lambda: None] * 2, pool, times) or x)
        g2 = Graph([a, good], {"a": a}, good)
        assert sched.compute(g2, split_graph(g2, lambda _: "CPU"), {"a": torch.ones(1)}, 1) == 1
    finally:
        cpu.close()


def test_device_error_is_raised_at_sync():
    a = node("INPUT", "a", (), None)
    b = node("MUL_MAT", "b", (a,), lambda w, x: 1 / 0, buffer="w")
    graph = Graph([a, b], {"a": a}, b)
    rec = Recorder(enabled=False)
    acc = AccBackend({"w": None}, rec)
    try:
        sched = Scheduler({"CPU": CpuBackend({}, 1, 0, rec), "ACC0": acc}, rec)
        with pytest.raises(ZeroDivisionError):
            sched.compute(graph, split_graph(graph, lambda _: "ACC0"), {"a": torch.ones(1)}, 0)
    finally:
        acc.close()


def test_split_rule_on_the_tiny_model(tiny_gguf):
    """DeepSeek2 (1 dense + 2 MoE layers), -ngl 99 -ot exps=CPU: the embedding lookup
    on the CPU, then per MoE layer one device split and one CPU split holding just
    the routed experts, with what each split copies in written out by hand."""
    from hybrid.engine import Engine

    with Engine(str(tiny_gguf), accel="emulated", n_gpu_layers=99,
                overrides=[r"\.ffn_.*_exps\.=CPU"]) as engine:
        engine.forward([1, 2])
        plan = engine.last_plan
    rows = describe(plan)
    assert [r["backend"] for r in rows] == ["CPU", "ACC0", "CPU", "ACC0", "CPU", "ACC0"]
    assert rows[0]["nodes"] == ["token_embd"] and rows[0]["inputs"] == []
    # the dense layer 0 and layer 1's attention and router all run on the device
    assert rows[1]["nodes"][:2] == ["attn_norm-0", "blk.0.attn_q_a"]
    assert "blk.0.ffn_down" in rows[1]["nodes"] and "cache_k_l0" in rows[1]["nodes"]
    assert rows[1]["nodes"][-3:] == ["ffn_moe_probs-1", "ffn_moe_topk-1", "ffn_moe_weights-1"]
    assert rows[1]["inputs"] == ["token_embd", "inp_pos"]
    for il, cpu, acc in ((1, rows[2], rows[3]), (2, rows[4], rows[5])):
        assert cpu["nodes"] == [f"blk.{il}.ffn_gate_exps", f"blk.{il}.ffn_up_exps",
                                f"ffn_moe_swiglu-{il}", f"blk.{il}.ffn_down_exps"]
        assert cpu["inputs"] == [f"ffn_norm-{il}", f"ffn_moe_topk-{il}"]
        # weighting and summing the experts' outputs is pulled up onto the device
        assert acc["nodes"][:3] == [f"ffn_moe_weighted-{il}", f"ffn_moe_out-{il}",
                                    f"blk.{il}.ffn_gate_shexp"]
        assert acc["inputs"] == [f"blk.{il}.ffn_down_exps"]
    assert "inp_pos" not in rows[3]["inputs"]          # copied once per graph and backend
    assert rows[5]["nodes"][-3:] == ["inp_out_ids", "result_norm", "output"]
    assert set(plan.causes) == {"1.inp", "1.buf", "2.dev_down", "2.dev_up", "2.rest_down"}


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_program_is_captured_at_its_first_run(monkeypatch, native):
    """After its first run a CPU program's native ops are their noted calls over its own memory:
    later runs run none of their Python, yet read their inputs' new contents (copied into that
    memory) and give the values a live run gives; an op that ran in torch stays live, and so
    does an op that reads its value. With the torch small ops (HYPROF_OPS=torch) all stays live."""
    from types import SimpleNamespace

    from hybrid import ops
    from hybrid.builder import Builder

    monkeypatch.setattr(ops, "NATIVE", native)
    runs = []

    def add(_, x, y, out):
        runs.append("add")
        return ops.add(x, y, out)

    def torch_add(_, x, y):
        runs.append("torch")
        return x + y

    b = Builder(SimpleNamespace(config=None), n_tokens=1, n_past=0)
    a, c = b.input("a", (1, 8), torch.float32), b.input("c", (1, 8), torch.float32)
    s = b.native("ADD", "s", add, a, c)                 # captured
    head = b.view("head", s, lambda x: x[:, :3])        # captured: a view of fixed memory
    t = b.op("ADD", "t", torch_add, head, head)        # torch: live
    b.graph.output = b.native("ADD", "u", add, t, head)      # reads a live value: live
    graph = b.graph
    rec = Recorder(enabled=True)
    cpu = CpuBackend({}, 1, 0, rec)
    try:
        sched = Scheduler({"CPU": cpu}, rec)
        plan = split_graph(graph, lambda _: "CPU")
        for i in range(3):
            x, y = torch.randn(1, 8), torch.randn(1, 8)         # new tensors each evaluation
            out = sched.compute(graph, plan, {"a": x, "c": y}, i)
            head_want = (x + y)[:, :3]
            torch.testing.assert_close(out, 3 * head_want)
    finally:
        cpu.close()
    later = ["torch", "add"] if native else ["add", "torch", "add"]
    assert runs == ["add", "torch", "add"] + later * 2
    assert [e["name"] for e in rec.drain() if e["type"] == "op"] == ["s", "head", "t", "u"] * 3


def test_copies_land_in_memory_kept_per_node():
    """ACC0's copies in and out go into memory kept per node (as a real device's staging
    buffers): the same memory at every evaluation, holding that evaluation's contents, so a
    captured CPU program reads its copied inputs in place; tuples are copied element-wise."""
    acc = AccBackend({}, Recorder(enabled=False))
    x_node, y_node = node("INPUT", "x", (), None), node("INPUT", "y", (), None)
    try:
        first = acc.to_host(torch.ones(2, 3), x_node)
        again = acc.to_host(torch.full((2, 3), 7.0), x_node)
        assert again.data_ptr() == first.data_ptr() and torch.equal(again, torch.full((2, 3), 7.0))
        other = acc.to_device(torch.ones(2, 3), y_node)
        assert other.data_ptr() != first.data_ptr()
        pair = acc.to_host((torch.zeros(1), torch.arange(3)), y_node)
        assert torch.equal(pair[1], torch.arange(3)) and pair[0].data_ptr() != pair[1].data_ptr()
    finally:
        acc.close()
