"""The engine's logits against the independent float64 NumPy references (tests/reference_*.py).

Every case runs a 6-token prompt batch and then 3 single-token steps through
the KV cache, with -mla 0 and 1 and -fmoe 0 and 1. Tolerance: the largest
logit error is below 1e-4 of the largest logit (float32 arithmetic on the same
dequantised weights gives ~5e-7); with -rtr 1, where 4-bit weights are
repacked into torch's int4 pack and multiplied in bfloat16 (~3e-3 per matmul),
below 3e-2. bfloat16 rounding can flip a near-tied expert choice, and then the
logits move further: it does on the plain-q tiny model (token 3, layer 2: expert
7 instead of 4, error 7e-2), so the -rtr case runs on the q-LoRA one, which has
no such tie. The Qwen3-MoE cases (GQA, per-head q/k norms, NEOX rope) run with -fa 0 and 1
and -fmoe 0 and 1 (-mla does not apply).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T

from gguf_retype import retype_gguf
from hybrid.gguf_model import load_model
from hybrid import ops, weights
from hybrid.make_model import MIXES
from hybrid.model import Model
from hybrid.rope import rope_cos_sin
from hybrid.program import compute
from reference_deepseek2 import Deepseek2Reference
from reference_qwen3moe import Qwen3MoeReference

PROMPT = [1, 5, 77, 300, 12, 9]
STEPS = [3, 100, 42]
TOL, TOL_RTR = 1e-4, 3e-2

YARN = dict(rope_scaling_type="yarn", rope_scaling_factor=40.0, rope_orig_ctx=64, rope_yarn_log_mul=0.0707)
CASES = {
    "f32": ("f32", {}),
    "f32-plain-q": ("f32", dict(q_lora_rank=0)),
    "f32-k_b_v_b": ("f32", dict(kv_layout="k_b_v_b")),
    "f32-plain-q-k_b_v_b": ("f32", dict(q_lora_rank=0, kv_layout="k_b_v_b")),
    "f32-sigmoid-bias-norm-scale": ("f32", dict(expert_gating_func=2, expert_weights_norm=True,
                                                expert_weights_scale=2.5)),
    "f32-groups": ("f32", dict(n_expert_groups=4, n_group_used=2, expert_gating_func=2)),
    "f32-yarn": ("f32", YARN),
    "f32-yarn-no-log-mul": ("f32", dict(YARN, rope_yarn_log_mul=0.0, rope_scaling_factor=4.0)),
    "q4_0": ("q4_0", {}),
    "q4_0-plain-q": ("q4_0", dict(q_lora_rank=0)),
    "q8_0": ("q8_0", {}),
    "f16": ("f16", {}),
    "bf16-k_b_v_b": ("bf16", dict(kv_layout="k_b_v_b")),
}
QWEN3_CASES = {
    "f32": ("f32", {}),
    "f32-no-gqa-head-of-n_embd-over-n_head": ("f32", dict(n_head_kv=4, n_rot=16, n_embd_head_k=16,
                                                          n_embd_head_v=16)),
    "q4_0": ("q4_0", {}),
    "q8_0": ("q8_0", {}),
    "bf16": ("bf16", {}),
}
REFERENCES = {"deepseek2": Deepseek2Reference, "qwen3moe": Qwen3MoeReference}

_references: dict = {}


@pytest.fixture(autouse=True)
def exact_matmuls(monkeypatch):
    """These tolerances are for the exact (dequantise-then-matmul) path: the native kernels,
    which round activations to 8 bits, are tested against the rounding reference in
    tests/test_engine.py."""
    monkeypatch.setattr(weights, "NATIVE", False)


def reference_logits(path) -> tuple[np.ndarray, list[np.ndarray]]:
    if path not in _references:
        ref = REFERENCES[load_model(path).config.arch](path)
        _references[path] = (ref.forward(PROMPT), [ref.forward([t]) for t in STEPS])
    return _references[path]


def rel_err(got: torch.Tensor, want: np.ndarray) -> float:
    return float(np.abs(got.double().numpy() - want).max() / np.abs(want).max())


def check_against_reference(path, tol: float, **options) -> None:
    want_prompt, want_steps = reference_logits(path)
    model = Model(load_model(path), n_ctx=32, **options)
    assert rel_err(model.forward(PROMPT, all_logits=True), want_prompt) < tol
    for tok, want in zip(STEPS, want_steps):
        assert rel_err(model.forward([tok]), want) < tol


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mla,fa,fmoe", [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)])
def test_logits_match_reference(make_gguf, case, mla, fa, fmoe):
    qtype, overrides = CASES[case]
    check_against_reference(make_gguf("tiny", qtype, **overrides), TOL, mla=bool(mla), fa=bool(fa),
                            fmoe=bool(fmoe))


@pytest.mark.parametrize("case", QWEN3_CASES)
@pytest.mark.parametrize("fa,fmoe", [(0, 0), (1, 1)])
def test_qwen3moe_logits_match_reference(make_gguf, case, fa, fmoe):
    qtype, overrides = QWEN3_CASES[case]
    check_against_reference(make_gguf("qwen3-tiny", qtype, **overrides), TOL, fa=bool(fa), fmoe=bool(fmoe))


def test_qwen3moe_head_tied_to_the_embedding(make_gguf, tmp_path):
    """A file without output.weight: the head is token_embd, as llama.cpp loads it."""
    from test_gguf_model import copy_gguf

    path = copy_gguf(make_gguf("qwen3-tiny", "q8_0"), tmp_path / "tied.gguf", drop_tensors={"output.weight"})
    check_against_reference(path, TOL, fa=True, fmoe=True)


@pytest.mark.parametrize("fa", [0, 1])
def test_qwen3moe_torch_ops_match_reference(make_gguf, monkeypatch, fa):
    """The torch path of NEOX rope, the per-head norms and GQA attention."""
    monkeypatch.setattr(ops, "NATIVE", False)
    check_against_reference(make_gguf("qwen3-tiny", "f32"), TOL, fa=bool(fa))


@pytest.mark.parametrize("fa", [0, 1])
@pytest.mark.parametrize("layout", ["kv_b", "k_b_v_b"])
@pytest.mark.parametrize("mla", [0, 1])
def test_torch_ops_match_reference(make_gguf, monkeypatch, mla, layout, fa):
    """The small ops' torch path (what CUDA tensors and HYPROF_OPS=torch take) through the whole
    pass: its causal mask, its rows of the rope table, its attention einsums."""
    monkeypatch.setattr(ops, "NATIVE", False)
    check_against_reference(make_gguf("tiny", "f32", **YARN, kv_layout=layout), TOL, mla=bool(mla), fa=bool(fa))


def test_rope_table_rows_are_rope_cos_sin(make_gguf):
    """The model's cos/sin table holds, row for row, exactly what rope_cos_sin computes for a
    batch of positions (YaRN scaled)."""
    model = Model(load_model(make_gguf("tiny", "f32", **YARN)), n_ctx=32)
    pos = torch.tensor([0, 5, 6, 31])
    for row, want in zip(model.cos_sin(pos.device), rope_cos_sin(pos, model.rope)):
        assert row.shape == (32, model.config.n_rot // 2) and row.dtype == torch.float32
        assert torch.equal(row[pos], want)


@pytest.mark.parametrize("mla,fmoe", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_repacked_weights_match_reference(make_gguf, mla, fmoe):
    path = make_gguf("tiny", "q4_0")
    model = Model(load_model(path), n_ctx=8, rtr=True)
    assert model.weights.resident_bytes() > 0, "-rtr 1 repacked nothing"
    check_against_reference(path, TOL_RTR, mla=bool(mla), fmoe=bool(fmoe), rtr=True)


def test_last_token_logits_equal_all_logits_row(tiny_gguf):
    """Without all_logits the head runs on the last token only, with the same result."""
    g = load_model(tiny_gguf)
    full = Model(g, n_ctx=16).forward(PROMPT, all_logits=True)
    last = Model(g, n_ctx=16).forward(PROMPT)
    assert last.shape == (1, g.config.n_vocab)
    torch.testing.assert_close(last[0], full[-1], rtol=1e-5, atol=1e-5)


def test_graph_nodes_name_their_buffers(tiny_gguf):
    """Weight ops carry the GGUF tensor they read; expert ops are MUL_MAT_ID on *_exps."""
    model = Model(load_model(tiny_gguf), n_ctx=16)
    graph = model.graph(4)
    names = set(model.buffer_names())
    for node in graph.nodes:
        if node.buffer is not None:
            assert node.buffer in names, node.buffer
    by_name = {n.name: n for n in graph.nodes}
    up = by_name["blk.1.ffn_up_exps"]
    assert up.op == "MUL_MAT_ID" and up.layer == 1 and up.buffer == "blk.1.ffn_up_exps.weight"
    assert by_name["blk.0.ffn_up"].op == "MUL_MAT" and by_name["blk.0.ffn_up"].cost.bytes > 0
    assert by_name["kq-2"].buffer == "cache_k_l2" and by_name["kqv-2"].buffer == "cache_v_l2"
    assert all(n.cost.at(n_kv=1)[1] > 0 for n in graph.nodes if n.op in ("MUL_MAT", "MUL_MAT_ID"))


def test_expert_bytes_are_the_selected_experts(tiny_gguf):
    """MUL_MAT_ID tells how many distinct experts it computed: its cost is that many experts' bytes."""
    model = Model(load_model(tiny_gguf), n_ctx=16)
    graph = model.graph(3)
    by_name = {n.name: n for n in graph.nodes}
    up, topk = by_name["blk.1.ffn_up_exps"], by_name["ffn_moe_topk-1"]
    values = {node: value for name, value in model.inputs(graph, [7, 8, 9]).items() for node in [graph.inputs[name]]}
    for node in graph.nodes[len(graph.inputs):]:
        buf = model.buffer(node.buffer) if node.buffer is not None else None
        values[node] = node.make(buf).serial(*[values[s] for s in node.srcs])
        if node is up:
            values[node], n_experts = values[node]
        elif node.cost.bytes_per_expert:
            values[node] = values[node][0]
    assert n_experts == len(set(values[topk].flatten().tolist())) > model.config.n_expert_used
    per_expert = model.weights["blk.1.ffn_up_exps.weight"].n_bytes // model.config.n_expert
    assert up.cost.at(n_kv=3, n_experts=n_experts)[0] == per_expert * n_experts


@pytest.mark.parametrize("rtr", [False, True])
@pytest.mark.parametrize("fmoe", [False, True])
def test_parallel_tasks_equal_fn(tiny_gguf, rtr, fmoe):
    """Every op with `parallel` gives, shared by a pool of 3 threads, what its `fn` gives (up
    to the float rounding of differently shaped matmuls: row slices change the reduction blocking)."""
    from hybrid._kernels import Pool

    model = Model(load_model(tiny_gguf), n_ctx=16, rtr=rtr, fmoe=fmoe)
    graph = model.graph(5)
    values: dict[int, object] = {}
    inputs = model.inputs(graph, [4, 8, 15, 16, 23])
    n_checked = 0
    pool = Pool(3, True)
    for node in graph.nodes:
        if node.is_input:
            values[id(node)] = inputs[node.name]
            continue
        forms = node.make(model.buffer(node.buffer) if node.buffer is not None else None)
        args = [values[id(s)] for s in node.srcs]
        values[id(node)] = forms.serial(*args)
        if forms.parallel is not None:
            for shared_by in (None, pool):
                dst = forms.parallel(*args, shared_by, None)
                torch.testing.assert_close(dst, values[id(node)], rtol=1e-4, atol=1e-6)
            n_checked += 1
        if node.cost.bytes_per_expert:      # (the value, the experts computed)
            values[id(node)] = values[id(node)][0]
    pool.close()
    assert n_checked > 10


@pytest.mark.parametrize("preset,overrides", [("tiny", dict(n_embd=256, n_ff=256, n_ff_exp=96)),
                                              ("qwen3-tiny", dict(n_embd=256, n_ff_exp=96))], ids=["tiny", "qwen3-tiny"])
@pytest.mark.parametrize("qtype", MIXES)
def test_mixes_match_reference(make_gguf, preset, overrides, qtype):
    """llama.cpp's mixes as `model make` writes them (K-quants, IQ4_XS and their fallbacks in one
    file: 256-wide variants with 96-wide expert rows), on the exact path."""
    check_against_reference(make_gguf(preset, qtype, **overrides), TOL, fmoe=True)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS],
                         ids=lambda t: t.name)
def test_other_quant_types_match_reference(make_gguf, tmp_path_factory, qtype):
    """Q4_1, Q5_0, Q5_1, IQ4_NL, the K-quants and IQ4_XS (256-weight blocks: a tiny variant with
    n_embd and n_ff_exp 256), on the exact path (the native kernels: tests/test_engine.py)."""
    src = make_gguf("tiny", "f32", n_embd=256, n_ff=256, n_ff_exp=256)
    path = retype_gguf(src, tmp_path_factory.mktemp("retype") / f"tiny-{qtype.name}.gguf", qtype)
    types = {t.ggml_type for t in load_model(path).tensors.values()}
    assert qtype in types
    check_against_reference(path, TOL, mla=True, fmoe=True)
    check_against_reference(path, TOL, mla=False, fmoe=False)
