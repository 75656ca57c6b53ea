"""Op offload (llama.cpp's `1.off`), -ub and -ncmoe: which ops move, what is uploaded, and that
the tokens never change.

The rule is checked against llama.cpp's and ik_llama.cpp's conditions worked by hand; the
engine on the tiny model (8 experts, 2 used, experts on the CPU, the rest on the emulated
ACC0) must upload for a prompt of 64 (never for generated tokens), none with -nopo 1 or
GGML_OP_OFFLOAD_MIN_BATCH=128, give the same tokens either way, and upload exactly the
experts the batch used: as many as the CPU's own MUL_MAT_ID counted computing the same
layer without offload.
"""

from __future__ import annotations

import pytest
import torch

from hybrid.engine import Engine
from hybrid.offload import OpOffload, expert_runs, min_batch_from_env, staging_key
from hybrid.placement import n_cpu_moe_rule, parse_override_rules
from hybrid.weights import Weight
from profiler.errors import UserError
from profiler.recorder import Recorder

EXPERTS_ON_CPU = r"\.ffn_.*_exps\.=CPU"
PROMPT = [(7 * i + 3) % 200 for i in range(64)]
HYBRID = dict(accel="emulated", n_gpu_layers=99, overrides=(EXPERTS_ON_CPU,), threads=2)


def run(path, prompt=PROMPT, n_gen: int = 4, **options) -> tuple[list[int], list[dict], Engine]:
    """A prompt then n_gen greedy tokens, recorded: (tokens, events, the closed engine)."""
    rec = Recorder(enabled=True, print_timing=False)
    with Engine(str(path), recorder=rec, **{**HYBRID, **options}) as engine:
        tokens = [engine.eval(prompt, "pp")]
        for _ in range(n_gen):
            tokens.append(engine.eval(tokens[-1:], "tg"))
    return tokens, rec.drain(), engine


def uploads(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "copy" and e.get("kind") == "weights"]


def graph_tokens(events: list[dict]) -> dict[int, int]:
    return {e["graph"]: e["n_tokens"] for e in events if e["type"] == "graph"}


# -- the rule --------------------------------------------------------------------------------

def test_llama_cpp_rule_is_the_batch_against_the_minimum():
    rule = OpOffload("ACC0", 32, "llama.cpp", n_expert=64, n_expert_used=6, weights=frozenset({"w", "e"}))
    assert rule.wants("MUL_MAT_ID", "e", 32) and rule.wants("MOE_FUSED_UP_GATE", "e", 512)
    assert not rule.wants("MUL_MAT_ID", "e", 31) and not rule.wants("MUL_MAT", "w", 1)
    assert rule.wants("MUL_MAT", "w", 32)
    assert not rule.wants("MUL_MAT", "cache_k_l0", 64)      # a KV cache is no weight buffer
    assert not rule.wants("RMS_NORM", "w", 64)               # only matmuls are offloaded here
    assert not OpOffload(None, 32, weights=frozenset({"e"})).wants("MUL_MAT_ID", "e", 4096)   # -nopo 1


def test_ik_rule_asks_each_expert_for_the_minimum_on_average():
    # 64 experts, 6 used, minimum 32: batch x 6 >= 32 x 64, i.e. batch >= 341.33 -> 342
    rule = OpOffload("CUDA0", 32, "ik", n_expert=64, n_expert_used=6, weights=frozenset({"e", "w"}))
    assert not rule.wants("MUL_MAT_ID", "e", 341) and rule.wants("MUL_MAT_ID", "e", 342)
    assert rule.wants("MUL_MAT", "w", 32)                    # dense matmuls keep the plain minimum


def test_bad_rule_settings_are_user_errors():
    with pytest.raises(UserError, match="--op-offload"):
        OpOffload("ACC0", 32, "fast")
    with pytest.raises(UserError, match="min-batch 0"):
        OpOffload("ACC0", 0)


@pytest.mark.parametrize("text, value", [("", 32), ("128", 128), (" 8 ", 8)])
def test_the_minimum_comes_from_the_environment_as_in_llama_cpp(text, value):
    assert min_batch_from_env({"GGML_OP_OFFLOAD_MIN_BATCH": text}) == value
    assert min_batch_from_env({}) == 32


@pytest.mark.parametrize("text", ["x", "0", "-3", "1.5"])
def test_a_bad_environment_minimum_is_named(text):
    with pytest.raises(UserError, match="GGML_OP_OFFLOAD_MIN_BATCH"):
        min_batch_from_env({"GGML_OP_OFFLOAD_MIN_BATCH": text})


def test_used_experts_are_copied_in_runs_of_consecutive_ids():
    assert expert_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert expert_runs([]) == [] and expert_runs([63]) == [(63, 64)]


def test_layers_share_expert_staging_by_role_and_other_weights_keep_their_own():
    def w(name, shape):
        return Weight(name, 2, shape, torch.zeros(1))
    assert staging_key(w("blk.1.ffn_up_exps.weight", (8, 4, 18))) == staging_key(w("blk.2.ffn_up_exps.weight",
                                                                                    (8, 4, 18)))
    assert staging_key(w("blk.1.ffn_up_exps.weight", (8, 4, 18))) != staging_key(w("blk.1.ffn_gate_exps.weight",
                                                                                    (8, 4, 18)))
    assert staging_key(w("blk.1.attn_q.weight", (4, 18)))[0] == "blk.1.attn_q.weight"
    assert staging_key(w("blk.1.attn_k_b.weight", (4, 8, 18))) != staging_key(w("blk.2.attn_k_b.weight", (4, 8, 18)))


def test_ncmoe_is_one_rule_for_the_first_layers_experts():
    assert n_cpu_moe_rule(0) == []
    [rule] = parse_override_rules(n_cpu_moe_rule(3))
    assert rule.backend == "CPU"
    hits = [n for n in ("blk.0.ffn_up_exps.weight", "blk.2.ffn_gate_exps.weight", "blk.2.ffn_down_exps.weight",
                        "blk.3.ffn_up_exps.weight", "blk.12.ffn_up_exps.weight", "blk.1.ffn_up_shexp.weight",
                        "blk.1.ffn_gate_inp.weight") if rule.regex.search(n)]
    assert hits == ["blk.0.ffn_up_exps.weight", "blk.2.ffn_gate_exps.weight", "blk.2.ffn_down_exps.weight"]


# -- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def no_offload(tiny_gguf):
    return run(tiny_gguf, no_op_offload=1)


@pytest.mark.parametrize("fmoe", [0, 1])
def test_a_prompt_uploads_its_experts_and_the_tokens_do_not_change(tiny_gguf, no_offload, fmoe):
    tokens, events, engine = run(tiny_gguf, fmoe=fmoe)
    reference = no_offload[0] if fmoe == 0 else run(tiny_gguf, no_op_offload=1, fmoe=fmoe)[0]
    assert tokens == reference
    n_tokens = graph_tokens(events)
    ups = uploads(events)
    assert ups and all(n_tokens[u["graph"]] == 64 for u in ups)          # the prompt's graph only
    moe_layers = [il for il in range(engine.model.config.n_layer) if engine.model.config.is_moe_layer(il)]
    names = {u["name"] for u in ups}
    assert names == {f"blk.{il}.ffn_{p}_exps" for il in moe_layers for p in ("gate", "up", "down")}
    assert all((u["src"], u["dst"], u["tid"]) == ("CPU", "ACC0", "main") for u in ups)
    # 64 tokens x 2 of 8 experts: every expert is used, so each upload is its whole tensor
    stored = engine.gguf.tensors
    assert all(u["bytes"] == stored[u["name"] + ".weight"].n_bytes for u in ups)
    ops = [e for e in events if e["type"] == "op" and "_exps" in e["name"]]
    assert {e["backend"] for e in ops if n_tokens[e["graph"]] == 64} == {"ACC0"}
    assert {e["backend"] for e in ops if n_tokens[e["graph"]] == 1} == {"CPU"}


def test_nopo_and_a_higher_environment_minimum_upload_nothing(tiny_gguf, no_offload, monkeypatch):
    tokens, events, _ = no_offload
    assert not uploads(events)
    monkeypatch.setenv("GGML_OP_OFFLOAD_MIN_BATCH", "128")
    tokens_128, events_128, engine = run(tiny_gguf)
    assert not uploads(events_128) and engine.offload.min_batch == 128
    assert tokens_128 == tokens


def test_only_the_experts_the_batch_used_are_uploaded(tiny_gguf):
    """A batch of 2 tokens uses at most 4 of the 8 experts: each upload is those experts' rows,
    as many as the CPU's MUL_MAT_ID computed for the same first MoE layer (whose input does not
    depend on where experts ran) without offload."""
    prompt = [11, 150]
    _, off_events, engine = run(tiny_gguf, prompt=prompt, n_gen=0, op_offload_min_batch=2, fmoe=0)
    _, cpu_events, _ = run(tiny_gguf, prompt=prompt, n_gen=0, no_op_offload=1, fmoe=0)
    il = engine.model.config.n_layer_dense_lead
    for part in ("gate", "up", "down"):
        name = f"blk.{il}.ffn_{part}_exps"
        info = engine.gguf.tensors[name + ".weight"]
        per_expert = info.n_bytes // info.shape[0]
        [upload] = [u for u in uploads(off_events) if u["name"] == name]
        computed = sum(e["bytes"] for e in cpu_events if e["type"] == "op" and e["name"] == name)
        assert upload["bytes"] == computed and upload["bytes"] % per_expert == 0
        assert 0 < upload["bytes"] // per_expert <= 4


def test_an_offloaded_op_starts_a_split_that_uploads_it(tiny_gguf):
    with Engine(str(tiny_gguf), **HYBRID) as engine:
        engine.eval(PROMPT, "pp")
        plan = engine.last_plan
        causes = dict(zip(engine._graphs[64][0].nodes, plan.causes))
        offloaded = [n for n, c in causes.items() if c == "1.off"]
        assert offloaded and all("_exps" in n.name for n in offloaded)
        assert [s.upload for s in plan.splits if s.upload is not None] == offloaded
        assert all(s.nodes[0] is s.upload and s.backend == "ACC0" for s in plan.splits if s.upload)
        engine.eval([1], "tg")
        assert not any(s.upload for s in engine.last_plan.splits)
        assert "1.off" not in engine.last_plan.causes


@pytest.mark.parametrize("kv_layout", ["kv_b", "k_b_v_b"])
def test_offload_reaches_the_accelerator_even_when_it_holds_no_weight(make_gguf, kv_layout):
    """-ngl 0 with an accelerator: llama.cpp still offloads a prompt's matmuls to it, the
    attention's per-head ones too (k_b_v_b's 3-D attn_k_b: staged per layer, not per role)."""
    path = make_gguf("tiny", "q4_0", **({} if kv_layout == "kv_b" else {"kv_layout": kv_layout}))
    tokens, events, engine = run(path, n_gpu_layers=0, overrides=())
    reference, _, _ = run(path, n_gpu_layers=0, overrides=(), no_op_offload=1)
    assert engine.placement.accel == "ACC0" and uploads(events)
    assert {"output", "blk.0.attn_output", "blk.2.ffn_up_exps"} <= {u["name"] for u in uploads(events)}
    assert tokens == reference


def test_ubatch_runs_a_long_prompt_as_several_graphs(tiny_gguf, no_offload):
    tokens, events, _ = run(tiny_gguf, n_ubatch=16, op_offload_min_batch=32)
    pp_graphs = [e["n_tokens"] for e in events if e["type"] == "graph" and e["test"] == "pp"]
    assert pp_graphs == [16, 16, 16, 16]
    assert not uploads(events)            # each ubatch is below the minimum
    _, events_20, _ = run(tiny_gguf, n_ubatch=20, n_gen=0)
    assert [e["n_tokens"] for e in events_20 if e["type"] == "graph"] == [20, 20, 20, 4]


def test_ncmoe_keeps_the_first_layers_experts_on_the_cpu(tiny_gguf):
    with Engine(str(tiny_gguf), accel="emulated", n_gpu_layers=99, n_cpu_moe=2) as engine:
        where = engine.placement.backend
    assert {n: b for n, b in where.items() if "_exps" in n} == {
        **{f"blk.1.ffn_{p}_exps.weight": "CPU" for p in ("gate", "up", "down")},
        **{f"blk.2.ffn_{p}_exps.weight": "ACC0" for p in ("gate", "up", "down")}}
    assert not engine.placement.warnings


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_ubatch=0), "-ub 0"), (dict(n_cpu_moe=-1), "-ncmoe -1"),
    (dict(op_offload="fast"), "--op-offload fast")])
def test_bad_engine_flags_are_user_errors(tiny_gguf, kwargs, message):
    with pytest.raises(UserError, match=message):
        Engine(str(tiny_gguf), **{**HYBRID, **kwargs}).close()


def test_hyprof_run_records_uploads_for_pp_and_none_with_nopo(tiny_gguf, tmp_path, capsys):
    """The Done-when command on the tiny model: pp64 uploads, tg never, -nopo 1 none; the
    timings file is valid contract v1 and its header says how the runs were configured."""
    from contract import check_timings_file
    from analysis.timings import load_timings
    from hyprof.cli import main

    out = tmp_path / "t.jsonl"
    rc = main(["run", "-m", str(tiny_gguf), "-p", "64", "-n", "4", "-r", "1", "-t", "2", "-ngl", "99",
               "-ot", EXPERTS_ON_CPU, "--accel", "emulated", "-nopo", "0,1", "-o", str(out), "--peak-bw", "10",
               "--no-progress"])
    assert rc == 0
    assert "nopo" in capsys.readouterr().out
    check_timings_file(out, require_types=("test", "graph", "copy"))
    t = load_timings(out)
    assert [c["no_op_offload"] for c in t.header["sweep"]] == [0, 1]
    ev = t.events
    weights = (ev["type"] == t.type_code("copy")) & (ev["kind"] == t.id("weights"))
    tests = t.tests
    for config, expect in ((0, True), (1, False)):
        for name in ("pp64", "tg4"):
            [test] = tests[(tests["config"] == config) & (tests["name"] == t.id(name))]
            inside = weights & (ev["ts"] >= test["ts"]) & (ev["ts"] < test["ts"] + test["dur"])
            assert inside.any() == (expect and name == "pp64"), (config, name)
    # the report: uploads in the offloaded pp64 only, and (both sides measured) the what-if
    from analysis.report import build_report

    by_name = {r.name: r for r in build_report(t).tests}
    assert [n for n, r in by_name.items() if r.uploads["count"]] == ["pp64 [nopo=0]"]
    offload = by_name["pp64 [nopo=0]"].offload
    assert offload["batch"] == 64 and offload["faster"] in ("cpu", "offload") and "crossover_batch" in offload


def test_a_higher_environment_minimum_records_no_upload_in_run(tiny_gguf, tmp_path, monkeypatch, capsys):
    from analysis.timings import load_timings
    from hyprof.cli import main

    monkeypatch.setenv("GGML_OP_OFFLOAD_MIN_BATCH", "128")
    out = tmp_path / "t.jsonl"
    assert main(["run", "-m", str(tiny_gguf), "-p", "64", "-n", "4", "-r", "1", "-t", "2", "-ngl", "99",
                 "-ot", EXPERTS_ON_CPU, "--accel", "emulated", "-o", str(out), "--peak-bw", "10",
                 "--no-progress"]) == 0
    t = load_timings(out)
    assert t.header["config"]["op_offload_min_batch"] == 128
    assert t.of_type("copy").any() and t.id("weights") == -1


def test_a_bad_environment_minimum_stops_run_before_any_work(tiny_gguf, monkeypatch, capsys):
    from hyprof.cli import main

    monkeypatch.setenv("GGML_OP_OFFLOAD_MIN_BATCH", "lots")
    assert main(["run", "-m", str(tiny_gguf), "-p", "8", "-n", "0", "--accel", "emulated", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GGML_OP_OFFLOAD_MIN_BATCH='lots'" in err[0]


# -- the report ------------------------------------------------------------------------------

def hand_timings():
    """Three graphs worked by hand (8 experts, 2 used, 8 MB of experts on the CPU):
    a token on the CPU (2 MB read in 0.2 ms: 10 GB/s), 16 tokens on the CPU (1.6 GFLOP in 16 ms:
    100 GFLOP/s), 16 tokens offloaded (8 MB uploaded in 4 ms: 2 GB/s; 1.6 GFLOP in 1.6 ms on
    ACC0: 1000 GFLOP/s); 0.1 GFLOP of expert work per token throughout."""
    import orjson
    from analysis.timings import load_lines

    header = {"type": "meta", "schema": "hyprof-timings/1", "model": {"n_expert": 8, "n_expert_used": 2},
              "config": {"accel": "ACC0 (emulated)"},
              "placement": {"CPU": {"bytes": 9_000_000, "tensors": 4, "expert_bytes": 8_000_000}}}
    ms = 1_000_000
    events = []
    for g, (n_tok, backend, op_bytes, dur, upload) in enumerate(((1, "CPU", 2_000_000, ms // 5, None),
                                                                  (16, "CPU", 8_000_000, 16 * ms, None),
                                                                  (16, "ACC0", 8_000_000, ms * 8 // 5, 4 * ms))):
        t0 = g * 100 * ms
        events.append({"type": "graph", "ts": t0, "dur": 50 * ms, "graph": g, "n_tokens": n_tok, "n_past": 0})
        t = t0 + ms
        if upload:
            events.append({"type": "copy", "ts": t, "dur": upload, "graph": g, "split": 1, "src": "CPU",
                           "dst": "ACC0", "bytes": 8_000_000, "name": "blk.1.ffn_up_exps", "kind": "weights",
                           "tid": "main"})
            t += upload
        events.append({"type": "op", "ts": t, "dur": dur, "graph": g, "split": 1, "backend": backend,
                       "op": "MUL_MAT_ID", "name": "blk.1.ffn_up_exps", "layer": 1, "bytes": op_bytes,
                       "flops": n_tok * 100_000_000, "n_tokens": n_tok, "tid": "main" if backend == "CPU" else backend})
    return load_lines([orjson.dumps(header)] + [orjson.dumps(e) for e in events], "hand.jsonl")


def test_the_crossover_is_the_hand_worked_batch():
    """cpu(B) = max(used(B) / 10 GB/s, B x 0.1 GFLOP / 100 GFLOP/s) and offload(B) = used(B) / 2 GB/s
    + B x 0.1 GFLOP / 1000 GFLOP/s with used(B) = 8 MB x (1 - 0.75^B): at B = 1, 1 ms against
    1.1 ms; at B = 2, 2 ms against 1.75 + 0.2 ms: offloading pays from a batch of 2."""
    from analysis.offload import crossover_batch, offload_rates, offload_seconds, uploads

    t = hand_timings()
    r = offload_rates(t)
    assert (r.upload_GBps, r.cpu_expert_GBps, r.cpu_expert_GFLOPs, r.acc_expert_GFLOPs) == \
        pytest.approx((2.0, 10.0, 100.0, 1000.0))
    assert r.expert_flops_per_token == pytest.approx(1e8)
    assert offload_seconds(r, 1) == pytest.approx((1e-3, 1.1e-3))
    assert offload_seconds(r, 2) == pytest.approx((2e-3, 1.95e-3))
    assert crossover_batch(r) == 2
    assert uploads(t) == {"bytes": 8_000_000, "s": 0.004, "GBps": 2.0, "count": 1}


def test_the_report_shows_uploads_and_the_crossover():
    from analysis.report import build_report
    from analysis.tables import report_tables

    report = build_report(hand_timings())
    [test] = report.to_json()["tests"]
    assert test["uploads"] == {"bytes": 8_000_000, "s": 0.004, "GBps": 2.0, "count": 1,
                               "bytes_per_token": 8_000_000 / 33}
    assert test["copy_s"]["weights"] == pytest.approx(0.004) and test["copy_s"]["h2d"] == 0
    assert (test["offload"]["batch"], test["offload"]["faster"], test["offload"]["crossover_batch"]) == \
        (16, "offload", 2)
    text = "\n".join(" ".join(map(str, row)) + "\n" + "\n".join(tbl.notes) for tbl in report_tables(report)
                     for row in tbl.rows)
    assert "weight uploads (h2d)" in text and "offloading pays from a batch of 2" in text


@pytest.mark.cuda
@pytest.mark.parametrize("prompt", [PROMPT, [11, 150]], ids=["pp64-every-expert", "pp2-some-experts"])
def test_cuda_uploads_through_pinned_staging_and_keeps_the_tokens(tiny_gguf, prompt, monkeypatch):
    """The CUDA upload path: the used experts' stored rows through the pinned buffer, dequantised on
    the device; the CPU weights take the exact path too (as CUDA's do) for a tight match."""
    from hybrid import weights

    monkeypatch.setattr(weights, "NATIVE", False)
    options = dict(HYBRID, accel="cuda", op_offload_min_batch=2)
    tokens, events, engine = run(tiny_gguf, prompt=prompt, **options)
    reference, _, _ = run(tiny_gguf, prompt=prompt, **options, no_op_offload=1)
    assert tokens == reference
    ups = uploads(events)
    assert ups and all((u["src"], u["dst"]) == ("CPU", "CUDA0") for u in ups)
    stored = engine.gguf.tensors
    for u in ups:
        info = stored[u["name"] + ".weight"]
        assert 0 < u["bytes"] <= info.n_bytes and u["bytes"] % (info.n_bytes // info.shape[0]) == 0
    n_tokens = graph_tokens(events)
    assert {e["backend"] for e in events if e["type"] == "op" and "_exps" in e["name"]
            and n_tokens[e["graph"]] > 1} == {"CUDA0"}


@pytest.mark.parametrize("ub, rule, offloaded", [(64, "llama.cpp", True), (16, "llama.cpp", False), (64, "ik", False)])
def test_model_info_tells_whether_a_ubatch_offloads_the_cpu_experts(tiny_gguf, capsys, ub, rule, offloaded):
    import json

    from hybrid.gguf_model import load_model
    from hyprof.cli import main

    # tiny: 8 experts, 2 used; ik at minimum 32 needs a batch of 128
    assert main(["model", "info", str(tiny_gguf), "-ngl", "99", "-ncmoe", "2", "-ub", str(ub), "--op-offload", rule,
                 "--accel", "emulated", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    o = info["op_offload"]
    expert_bytes = sum(t.n_bytes for n, t in load_model(str(tiny_gguf)).tensors.items() if n.startswith("blk.1.")
                       and "_exps" in n)
    assert (o["experts_offloaded"], o["to"], o["max_upload_bytes"]) == (offloaded, "ACC0", expert_bytes)
    assert info["placement"]["backends"]["CPU"]["expert_bytes"] == expert_bytes


def test_generate_takes_the_offload_flags(tiny_gguf, capsys):
    from hyprof.cli import main

    ids = []
    for flags in (["-nopo", "1"], ["-ub", "5", "--op-offload-min-batch", "2"]):
        assert main(["generate", "-m", str(tiny_gguf), "--prompt-ids", "1,17,42,99,7", "-n", "4", "-ngl", "99",
                     "-ot", EXPERTS_ON_CPU, "--accel", "emulated", "-t", "2", "--ids", *flags]) == 0
        ids.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert ids[0] == ids[1]


def test_the_trace_names_uploads():
    """`hyprof trace`: an upload's slice says upload (an activation copy's says copy)."""
    from analysis.attribution import attribute
    from analysis.trace import trace_events

    t = hand_timings()
    events, _ = trace_events(t, attribute(t))
    names = {e["name"] for e in events if e.get("ph") == "X"}
    assert "upload CPU→ACC0" in names and not any(n.startswith("copy ") for n in names)
