"""The placement rule: -ngl as llama.cpp counts layers, -ot rules in order, causes, errors."""

from __future__ import annotations

import pytest

from hybrid.config import ModelConfig
from hybrid.placement import (backend_loads, layer_of, override_sets, parse_override_rules, place,
                              split_override_sets)
from profiler.errors import UserError

N_LAYER = 3
NAMES = ["token_embd.weight",
         *(f"blk.{il}.{t}.weight" for il in range(N_LAYER) for t in ("attn_norm", "attn_q", "ffn_up_exps")),
         "output_norm.weight", "output.weight"]
BACKENDS = ("CPU", "CUDA0", "ACC0")


def on(placement, backend):
    return set(placement.names_on(backend))


def layers_on(placement, backend):
    return {layer_of(n, N_LAYER) for n in placement.names_on(backend)}


@pytest.mark.parametrize("ngl, offloaded", [
    (0, set()), (1, {3}), (2, {2, 3}), (3, {1, 2, 3}), (4, {0, 1, 2, 3}), (99, {0, 1, 2, 3}), (-1, {0, 1, 2, 3}),
])
def test_ngl_offloads_the_last_layers_counting_output_as_last(ngl, offloaded):
    """llama.cpp: i_gpu_start = n_layer + 1 - ngl; layer n_layer is the output layer."""
    p = place(NAMES, [], ngl, N_LAYER, BACKENDS, "ACC0")
    assert layers_on(p, "ACC0") == offloaded
    assert p.backend["token_embd.weight"] == "CPU" and p.cause["token_embd.weight"] == "input layer"
    for name in p.names_on("ACC0"):
        assert p.cause[name] == "-ngl"
    for name in set(NAMES) - on(p, "ACC0") - {"token_embd.weight"}:
        assert p.cause[name] == "below -ngl"


def test_experts_on_cpu_rest_on_accelerator():
    rules = parse_override_rules([r"\.ffn_.*_exps\.=CPU"], BACKENDS)
    p = place(NAMES, rules, 99, N_LAYER, BACKENDS, "CUDA0")
    assert on(p, "CPU") == {"token_embd.weight", *(f"blk.{il}.ffn_up_exps.weight" for il in range(N_LAYER))}
    assert p.cause["blk.1.ffn_up_exps.weight"] == "-ot rule 1"
    assert on(p, "CUDA0") == set(NAMES) - on(p, "CPU")
    assert p.warnings == ()


def test_first_matching_rule_wins_and_beats_ngl():
    rules = parse_override_rules([r"blk\.1\.=ACC0,blk\.[12]\.=CPU", "output=CUDA0"], BACKENDS)
    p = place(NAMES, rules, 0, N_LAYER, BACKENDS, "CUDA0")
    assert p.backend["blk.1.attn_q.weight"] == "ACC0" and p.cause["blk.1.attn_q.weight"] == "-ot rule 1"
    assert p.backend["blk.2.attn_q.weight"] == "CPU" and p.cause["blk.2.attn_q.weight"] == "-ot rule 2"
    assert p.backend["output.weight"] == "CUDA0" and p.cause["output.weight"] == "-ot rule 3"
    assert p.backend["output_norm.weight"] == "CUDA0"         # re.search: "output" is in "output_norm"
    assert p.cause["blk.0.attn_q.weight"] == "below -ngl"


def test_override_can_move_the_input_layer():
    p = place(NAMES, parse_override_rules(["token_embd=ACC0"], BACKENDS), 0, N_LAYER, BACKENDS, "ACC0")
    assert p.backend["token_embd.weight"] == "ACC0"


def test_comma_inside_a_quantifier_does_not_split():
    rules = parse_override_rules([r"blk\.[0-9]{1,2}\.ffn=CPU,output=ACC0"], BACKENDS)
    assert [(r.pattern, r.backend) for r in rules] == [(r"blk\.[0-9]{1,2}\.ffn", "CPU"), ("output", "ACC0")]


@pytest.mark.parametrize("value, sets", [
    (r"blk\.\d{1,2}\.=CPU", [[r"blk\.\d{1,2}\.=CPU"]]),
    ("a=CPU;b=CPU,c=CPU", [["a=CPU", "b=CPU"], ["c=CPU"]]),
    (r"a=CPU;blk\.\d{1,2}\.=CPU,c=CPU", [["a=CPU", r"blk\.\d{1,2}\.=CPU"], ["c=CPU"]]),
    ("(a;b)=CPU", [["(a;b)=CPU"]]),
    ("", [[]]),
    ("a=CPU;", [["a=CPU"]]),
    ("a=CPU,", [["a=CPU"], []]),
])
def test_override_grammar_splits_sets_at_commas_rules_at_semicolons_never_inside_a_regex(value, sets):
    assert split_override_sets(value) == sets


def test_run_sweeps_one_set_per_comma_or_flag():
    assert override_sets([r"blk\.\d{1,2}\.=CPU"]) == [[r"blk\.\d{1,2}\.=CPU"]]
    assert override_sets(["a=CPU;b=CPU,c=CPU"]) == [["a=CPU", "b=CPU"], ["c=CPU"]]
    assert override_sets(["a=CPU", ""]) == [["a=CPU"], []]


def test_one_set_elsewhere_semicolons_and_commas_alike():
    rules = parse_override_rules(["a=CPU;b=ACC0,c=CPU", r"blk\.\d{1,2}\.=ACC0"], BACKENDS)
    assert [str(r) for r in rules] == ["a=CPU", "b=ACC0", "c=CPU", r"blk\.\d{1,2}\.=ACC0"]


def test_backend_names_are_case_insensitive():
    assert parse_override_rules(["exps=cpu,attn=acc0"], BACKENDS)[1].backend == "ACC0"
    rules = parse_override_rules(["exps=cuda0"])                 # checked later, by place
    assert place(NAMES, rules, 0, N_LAYER, BACKENDS, "ACC0").backend["blk.0.ffn_up_exps.weight"] == "CUDA0"


def test_no_accelerator_keeps_everything_on_cpu_and_warns_about_ngl():
    p = place(NAMES, [], 99, N_LAYER, ("CPU", "ACC0"), None)
    assert on(p, "CPU") == set(NAMES)
    assert p.cause["blk.2.attn_q.weight"] == "no accelerator"
    assert any("-ngl 99 ignored" in w for w in p.warnings)
    assert place(NAMES, [], 0, N_LAYER, ("CPU", "ACC0"), None).warnings == ()


def test_rule_matching_nothing_warns():
    rules = parse_override_rules([r"exps=CPU,nothing\.here=CPU"], BACKENDS)
    p = place(NAMES, rules, 99, N_LAYER, BACKENDS, "ACC0")
    assert p.warnings == (r"-ot rule 2 'nothing\.here=CPU' matches no tensor",)


@pytest.mark.parametrize("spec, message", [
    ("exps", r"-ot 'exps': expected REGEX=BACKEND \(missing '='\)"),
    ("a=CPU,b", r"-ot 'b': expected REGEX=BACKEND"),
    ("=CPU", "empty regex"),
    ("blk.(1=CPU", r"invalid regex 'blk.\(1': missing \), unterminated subpattern"),
    ("exps=GPU", r"unknown backend 'GPU' \(available: CPU, CUDA0, ACC0\)"),
    ("a=CPU;b", r"^-ot 'b': expected REGEX=BACKEND"),
    ("exps=", r"-ot 'exps=': empty backend after '='"),
])
def test_bad_rules_are_refused_by_run_and_the_other_commands_alike(spec, message):
    with pytest.raises(UserError, match=message):
        parse_override_rules([spec], BACKENDS)
    if "backend '" not in message:                    # run leaves backend names to `place`
        with pytest.raises(UserError, match=message):
            override_sets([spec])


def test_unknown_backend_caught_by_place_too():
    with pytest.raises(UserError, match=r"unknown backend 'CUDA1' \(available: CPU, ACC0\)"):
        place(NAMES, parse_override_rules(["exps=CUDA1"]), 0, N_LAYER, ("CPU", "ACC0"), "ACC0")
    with pytest.raises(UserError, match="accelerator 'CUDA0' is not available"):
        place(NAMES, [], 99, N_LAYER, ("CPU", "ACC0"), "CUDA0")


def test_backend_loads_add_up_and_count_used_experts():
    config = ModelConfig(arch="deepseek2", n_layer=N_LAYER, n_embd=8, n_head=1, n_head_kv=1, n_vocab=10,
                         n_ctx_train=16, rms_eps=1e-6, n_ff=8, n_expert=4, n_expert_used=1,
                         n_layer_dense_lead=1)
    sizes = {n: 400 if "exps" in n else 1000 if n == "token_embd.weight" else 40 for n in NAMES}
    p = place(NAMES, parse_override_rules(["exps=CPU"], BACKENDS), 99, N_LAYER, BACKENDS, "ACC0")
    loads = {ld.backend: ld for ld in backend_loads(sizes, config, p)}
    assert sum(ld.n_bytes for ld in loads.values()) == sum(sizes.values())
    assert sum(ld.n_tensors for ld in loads.values()) == len(NAMES)
    cpu = loads["CPU"]
    assert cpu.expert_bytes == 3 * 400
    assert cpu.expert_bytes_per_token == 3 * 400 // 4             # 1 of 4 experts per tensor
    assert cpu.bytes_per_token == cpu.expert_bytes_per_token + 1000 // 10   # one embedding row
    assert loads["ACC0"].expert_bytes == 0 and loads["ACC0"].bytes_per_token == loads["ACC0"].n_bytes


def test_accel_auto_is_a_gpu_or_none_never_the_emulation():
    import torch

    from hybrid.placement import available_backends

    backends, accel = available_backends("auto")
    assert "ACC0" in backends
    assert accel == ("CUDA0" if torch.cuda.is_available() else None)
    assert available_backends("emulated")[1] == "ACC0"
    assert available_backends("none")[1] is None
