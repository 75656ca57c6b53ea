"""The bytes an imported log's expert ops read, from its model file (analysis/model_bytes.py,
`hyprof report LOG --model`, `hyprof import ik LOG --model`).

Every expected byte count is worked out by hand below from the tensor shapes and ggml's block
sizes (Q8_0: 32 values in 34 bytes; IQ4_NL: 32 values in 18 bytes, 4.5 bits), never by the
code under test; the GB/s are checked against the log's own microseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import orjson
import pytest
from gguf import GGUFWriter

from analysis import ik_log
from analysis.model_bytes import ModelWeights, read_model
from analysis.report import build_report
from analysis.timings import load_timings
from hyprof.cli import main as hyprof
from profiler.ggml_types import GGMLType, row_bytes

DATA = Path(__file__).parent / "data"
CPU_TG = DATA / "ik_cpu_tg_fmoe.log"        # experts in layer 0 only, tg2, -fmoe 1
CPU_PP = DATA / "ik_cpu_pp_ubatch.log"      # experts in layer 1, pp8 in ubatches of 4, -fmoe 0
SAMPLES = Path("/work/shared/samples")
SAMPLE_LOG = SAMPLES / "ik_print_timing_deepseek2_cpu_t2.txt"
SAMPLE_MODEL = SAMPLES / "deepseek2_qlora5_q8_0.gguf"
needs_sample = pytest.mark.skipif(not (SAMPLE_LOG.exists() and SAMPLE_MODEL.exists()),
                                  reason="the shared sample is not on this machine")

Q8_0_BYTES_PER_32 = 34


def report_of(log, model) -> dict:
    return {t.name: t for t in build_report(load_timings(log, model=read_model(model))).tests}


@pytest.fixture(autouse=True)
def no_cached_peak(tmp_path, monkeypatch):
    """No machine's `hyprof membw` result unless a test writes one (the header would take it)."""
    monkeypatch.setenv("HYPROF_CACHE_DIR", str(tmp_path / "cache"))


# ---------------------------------------------------------------- the seed's arithmetic

def test_deepseek_lite_experts_at_iq4_nl_read_730_mb_per_token():
    """The seed's count: 2048 x 1408 x 3 x 6 x 25 = 1.298 B weights at 4.5 bits = 730 MB a token
    (DeepSeek-V2-Lite's expert shapes, 6 of 64 experts used, 25 MoE layers as the seed counted)."""
    n_embd, n_ff_exp, n_expert, n_used, layers = 2048, 1408, 64, 6, 25
    gate_up = n_expert * n_ff_exp * row_bytes(GGMLType.IQ4_NL, n_embd)      # rows of 2048 inputs
    down = n_expert * n_embd * row_bytes(GGMLType.IQ4_NL, n_ff_exp)         # rows of 1408 inputs
    tensors = {f"blk.{i}.ffn_{w}_exps": (down if w == "down" else gate_up)
               for i in range(1, layers + 1) for w in ("gate", "up", "down")}
    model = ModelWeights("lite.gguf", 0, "deepseek2", layers + 1, n_expert, n_used, tensors)
    per_token = sum(model.expert_bytes(f"blk.{i}.ffn_{w}_exps", 1)[0]
                    for i in range(1, layers + 1) for w in ("gate", "up", "down"))
    weights = 2048 * 1408 * 3 * 6 * 25
    assert weights == 1_297_612_800
    assert per_token == weights * 4.5 / 8 == 729_907_200        # 730 MB
    # ik_llama.cpp's fused up+gate op reads both tensors' experts
    fused = model.expert_bytes("blk.1.ffn_up_gate_exps", 1)
    assert fused == (2 * 6 * 1408 * 2048 * 18 // 32, False)


def test_a_batch_counts_at_most_every_expert_and_says_it_is_a_bound():
    model = ModelWeights("m.gguf", 0, "deepseek2", 1, 16, 4, {"blk.0.ffn_down_exps": 16 * 1000,
                                                               "blk.0.ffn_up_gate_exps": 16 * 3000})
    assert model.expert_bytes("blk.0.ffn_down_exps", 1) == (4 * 1000, False)
    assert model.expert_bytes("blk.0.ffn_down_exps", 3) == (12 * 1000, True)     # 3 tokens x 4 experts
    assert model.expert_bytes("blk.0.ffn_down_exps", 32) == (16 * 1000, True)    # no more than all 16
    assert model.expert_bytes("blk.0.ffn_up_gate_exps", 1) == (4 * 3000, False)  # the file's own fused tensor
    assert model.expert_bytes("blk.1.ffn_down_exps", 1) is None
    assert model.expert_bytes("blk.0.attn_q", 1) is None


# ---------------------------------------------------------------- the real sample log and its model

@needs_sample
def test_real_sample_expert_bytes_per_token_and_gbps():
    """5 layers, the first 2 dense; 16 experts of [128 -> 64] gate and up, [64 -> 128] down, 4 used; Q8_0."""
    expert_matrix = 128 * 64 // 32 * Q8_0_BYTES_PER_32          # 8704 bytes: gate, up or down of one expert
    per_token = 3 * expert_matrix * 4 * 3                       # 3 matrices x 4 used x 3 MoE layers
    assert per_token == 313_344
    tests = report_of(SAMPLE_LOG, SAMPLE_MODEL)
    tg = tests["tg8"]
    assert tg.bandwidth["cpu_expert_bytes_per_token"] == per_token
    assert tg.bandwidth["cpu_expert_upper_bound"] is False and tg.whatif_lower_bound == ()

    # expert time from the log's own lines: the 16 tg8 decodes are the last 16 before its row
    # (1 warm-up first); in each, the MOE_FUSED_UP_GATE and MUL_MAT_ID lines
    lines = SAMPLE_LOG.read_text().splitlines()
    row = next(i for i, s in enumerate(lines) if re.search(r"\|\s+tg8\s+\|", s))
    starts = [i for i, s in enumerate(lines[:row]) if s.startswith("prelude(")][-16:]
    expert_line = re.compile(r"(?:MOE_FUSED_UP_GATE|MUL_MAT_ID)\(ffn_moe_\w+-\d+\): (\d+) us")
    expert_us = sum(int(m.group(1)) for s in lines[starts[0]:row] if (m := expert_line.fullmatch(s)))
    assert not any(s.startswith("quantize(ffn_moe") for s in lines)   # no quantize of theirs to add
    assert tg.n_tokens == 16 and expert_us > 0
    assert tg.category_bw["cpu_expert_matmul"]["busy_ns"] == expert_us * 1000
    assert tg.bandwidth["cpu_expert_GBps"] == pytest.approx(per_token * 16 / (expert_us * 1000), rel=1e-12)


@needs_sample
def test_real_sample_prompt_is_an_upper_bound_in_console_markdown_and_json(tmp_path, capsys, monkeypatch):
    """pp32: one 32-token graph a repetition, 32 x 4 >= 16: every expert, marked as at most that."""
    every_expert = 3 * (128 * 64 // 32 * Q8_0_BYTES_PER_32) * 16 * 3
    pp = report_of(SAMPLE_LOG, SAMPLE_MODEL)["pp32"]
    assert pp.bandwidth["cpu_expert_bytes_per_token"] == every_expert / 32
    assert pp.bandwidth["cpu_expert_upper_bound"] is True

    args = ["report", str(SAMPLE_LOG), "--model", str(SAMPLE_MODEL), "--peak-bw", "40"]
    assert hyprof(args) == 0
    console = capsys.readouterr().out
    pp_part, tg_part = console.split("\ntg8: ", 1)
    assert re.search(r"CPU experts: ≤ [\d.]+ GB/s = ≤ [\d.]+ % of the 40\.0 GB/s peak, ≤ 39\.2 kB read per token",
                     pp_part)
    assert re.search(r"≥ [\d,.]+ t/s with the CPU experts at peak", pp_part)
    assert re.search(r"CPU experts: [\d.]+ GB/s = [\d.]+ % of the 40\.0 GB/s peak, 313\.3 kB read per token",
                     tg_part)
    assert "≤" not in tg_part.split("ops by backend")[0]
    assert f"expert ops, from {SAMPLE_MODEL}" in pp_part

    md = tmp_path / "r.md"
    assert hyprof(args + ["--md", str(md)]) == 0
    text = md.read_text()
    assert "≤ 39.2 kB read per token" in text and "| ≤ " in text        # the note and the tables' cells
    capsys.readouterr()
    assert hyprof(args + ["--json"]) == 0
    report = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tests"]}
    assert report["pp32"]["bandwidth"]["cpu_expert_upper_bound"] is True
    assert report["pp32"]["whatif_lower_bound"] == ["cpu_expert_at_peak"]
    assert report["pp32"]["category_bandwidth"]["cpu_expert_matmul"]["upper_bound"] is True
    assert report["tg8"]["bandwidth"]["cpu_expert_upper_bound"] is False
    assert report["tg8"]["bandwidth"]["cpu_expert_bytes_per_token"] == 313_344
    assert report["tg8"]["bandwidth"]["cpu_expert_fraction_of_peak"] == pytest.approx(
        report["tg8"]["bandwidth"]["cpu_expert_GBps"] / 40)
    ub_ops = [o for o in report["pp32"]["ops"] if o["bytes_ub"]]
    assert sorted(o["op"] for o in ub_ops) == ["MOE_FUSED_UP_GATE", "MUL_MAT_ID"]


@needs_sample
def test_real_sample_import_with_model_header_and_same_report(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert hyprof(["import", "ik", str(SAMPLE_LOG), "--model", str(SAMPLE_MODEL), "-o", str(out)]) == 0
    meta = orjson.loads(out.read_text().splitlines()[0])
    assert meta["model"]["path"] == str(SAMPLE_MODEL)
    assert meta["model"]["size_bytes"] == SAMPLE_MODEL.stat().st_size == 2_243_936
    assert (meta["model"]["n_expert"], meta["model"]["n_expert_used"]) == (16, 4)
    assert meta["source"]["bytes"]["from"] == "model file"
    assert meta["source"]["bytes"]["model"] == str(SAMPLE_MODEL)
    imported = {t.name: t.bandwidth for t in build_report(load_timings(out)).tests}
    direct = {name: t.bandwidth for name, t in report_of(SAMPLE_LOG, SAMPLE_MODEL).items()}
    assert imported == direct


# ---------------------------------------------------------------- hand-written logs and made models

def test_hand_written_tg_log_with_a_one_layer_model(make_gguf):
    """tiny at Q8_0: 8 experts of [64 -> 32] gate and up, [32 -> 64] down, 2 used; layer 0 is MoE."""
    model = make_gguf("tiny", "q8_0", n_layers=1, n_layer_dense_lead=0)
    matrix = 64 * 32 // 32 * Q8_0_BYTES_PER_32                 # 2176 bytes
    tg = report_of(CPU_TG, model)["tg2"]
    assert tg.bandwidth["cpu_expert_bytes_per_token"] == 3 * matrix * 2 == 13_056
    # the two timed decodes' expert lines: 80 + 40 and 80 + 40 us
    assert tg.category_bw["cpu_expert_matmul"]["busy_ns"] == 240_000
    assert tg.bandwidth["cpu_expert_GBps"] == pytest.approx(13_056 * 2 / 240_000)


def test_hand_written_ubatch_log_counts_the_bound_per_graph(make_gguf):
    """pp8 in ubatches of 4 on layer 1: 4 tokens x 2 used = 8 = every expert, per graph and matrix."""
    model = make_gguf("tiny", "q8_0", n_layers=2)
    matrix = 64 * 32 // 32 * Q8_0_BYTES_PER_32
    t = load_timings(CPU_PP, model=read_model(model))
    ev = t.events
    ops = (ev["type"] == t.type_code("op")) & (ev["bytes"] > 0)
    names = [t.sym(int(i)) for i in ev["name"][ops]]
    assert sorted(set(names)) == ["blk.1.ffn_down_exps", "blk.1.ffn_gate_exps", "blk.1.ffn_up_exps"]
    assert set(ev["bytes"][ops]) == {8 * matrix} and set(ev["bytes_ub"][ops]) == {1}
    pp = {r.name: r for r in build_report(t).tests}["pp8"]
    assert pp.bandwidth["cpu_expert_bytes_per_token"] == 2 * 3 * 8 * matrix / 8   # 2 graphs of 4 tokens
    assert pp.bandwidth["cpu_expert_upper_bound"] is True


def test_the_peak_measured_here_is_taken_and_says_so(tmp_path, monkeypatch, make_gguf):
    from profiler.membw import StreamResult, _cache_key
    result = StreamResult(cpu="Test CPU", cores=2, threads=2, array_bytes=1 << 30, copy_GBps=30.0,
                          triad_GBps=32.0, copy_samples_GBps=(30.0,), triad_samples_GBps=(32.0,),
                          measured="2026-01-01 00:00 UTC")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "membw.json").write_text(json.dumps({_cache_key(2): result.__dict__}))
    t = load_timings(CPU_TG, model=read_model(make_gguf("tiny", "q8_0", n_layers=1, n_layer_dense_lead=0)))
    assert t.header["peak_bw"]["CPU"]["GBps"] == 32.0
    assert "where the log was imported" in t.header["peak_bw"]["CPU"]["method"]
    tg = build_report(t).tests[0]
    assert tg.bandwidth["cpu_expert_fraction_of_peak"] == pytest.approx(tg.bandwidth["cpu_expert_GBps"] / 32.0)


# ---------------------------------------------------------------- a log and a model that do not match

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hyprof: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_model_without_the_logs_expert_layer_is_refused(make_gguf, tmp_path, capsys):
    model = make_gguf("tiny", "q8_0", n_layers=1, n_layer_dense_lead=0)     # experts in layer 0 only
    assert hyprof(["report", str(CPU_PP), "--model", str(model)]) == 2
    err = one_line_error(capsys)
    assert "MUL_MAT_ID(ffn_moe_up-1) reads blk.1.ffn_up_exps" in err and "layers 0" in err
    assert "is not the model this log was produced from" in err
    out = tmp_path / "t.jsonl"
    assert hyprof(["import", "ik", str(CPU_PP), "--model", str(model), "-o", str(out)]) == 2
    one_line_error(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []               # nothing half-written


def test_a_model_with_another_layer_count_is_refused(make_gguf, capsys):
    model = make_gguf("tiny", "q8_0", n_layers=3, n_layer_dense_lead=0)     # experts in 0-2, the log's in 0
    assert hyprof(["report", str(CPU_TG), "--model", str(model)]) == 2
    err = one_line_error(capsys)
    assert "the log's layers end at 0" in err and "has 3 layers" in err


def test_a_model_of_another_architecture_is_refused(make_gguf, capsys):
    model = make_gguf("qwen3-tiny", "q8_0")
    assert hyprof(["report", str(CPU_TG), "--model", str(model)]) == 2
    err = one_line_error(capsys)
    assert "llama-bench ran a deepseek2 model" in err and "(a qwen3moe)" in err


def test_bad_model_files_and_a_timings_file_are_refused(tmp_path, make_gguf, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    assert hyprof(["report", str(CPU_TG), "--model", str(junk)]) == 2
    assert f"--model {junk}: not a GGUF file" in one_line_error(capsys)
    assert hyprof(["report", str(CPU_TG), "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "cannot read" in one_line_error(capsys)
    dense = tmp_path / "dense.gguf"         # expert counts, but no expert tensor
    writer = GGUFWriter(dense, "deepseek2")
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert hyprof(["report", str(CPU_TG), "--model", str(dense)]) == 2
    assert "no expert tensors (blk.N.ffn_*_exps): not a MoE model file" in one_line_error(capsys)
    timings = tmp_path / "t.jsonl"
    timings.write_text("\n".join(ik_log.convert(CPU_TG)) + "\n")
    model = make_gguf("tiny", "q8_0", n_layers=1, n_layer_dense_lead=0)
    assert hyprof(["report", str(timings), "--model", str(model)]) == 2
    assert "only for another engine's log" in one_line_error(capsys)


def test_without_a_model_the_report_says_how_to_get_the_bytes(capsys):
    assert hyprof(["report", str(CPU_TG)]) == 0
    out = capsys.readouterr().out
    assert "none: the log carries no byte counts; --model FILE.gguf" in out
    assert "CPU experts:" not in out
