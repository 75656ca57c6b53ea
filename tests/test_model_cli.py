"""`hyprof model make` / `hyprof model info` end to end through the CLI's main()."""

from __future__ import annotations

import json

import pytest

from hybrid.gguf_model import load_model
from hybrid.make_model import make_model
from hyprof.cli import main

EXPERTS_ON_CPU = r"\.ffn_.*_exps\.=CPU"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("preset", ["tiny", "qwen3-tiny"])
def test_make_then_info_experts_on_cpu(tmp_path, capsys, preset):
    path = tmp_path / "t.gguf"
    rc, _, err = run(capsys, "model", "make", "--preset", preset, "-o", str(path), "--no-progress")
    assert rc == 0 and "wrote" in err
    model = load_model(path)
    rc, out, _ = run(capsys, "model", "info", str(path), "-ngl", "99", "-ot", EXPERTS_ON_CPU,
                     "--accel", "emulated", "--json", "--tensors")
    assert rc == 0
    r = json.loads(out)
    for t in r["tensors"]:
        expected = "CPU" if "_exps." in t["name"] or t["name"] == "token_embd.weight" else "ACC0"
        assert t["backend"] == expected, t
    backends = r["placement"]["backends"]
    assert set(backends) == {"CPU", "ACC0"}
    assert sum(b["bytes"] for b in backends.values()) == model.tensor_data_bytes == r["model"]["tensor_data_bytes"]
    assert sum(b["tensors"] for b in backends.values()) == len(model.tensors)
    c = model.config
    per_expert = sum(t.n_bytes for t in model.tensors.values() if "_exps." in t.name) // c.n_expert \
        // (c.n_layer - c.n_layer_dense_lead)
    assert backends["CPU"]["expert_bytes_per_token"] == c.n_expert_used * per_expert * (c.n_layer - c.n_layer_dense_lead)
    assert backends["ACC0"]["expert_bytes"] == 0
    assert r["config"]["n_expert"] == 8 and r["model"]["ftype"] == "Q4_0"


@pytest.mark.parametrize("rank", [0, 48])
def test_make_with_q_lora_rank(tmp_path, capsys, rank):
    """The preset's attention form replaced: no q-LoRA (attn_q) or another rank (attn_q_a rows)."""
    path = tmp_path / "t.gguf"
    rc, _, err = run(capsys, "model", "make", "--preset", "tiny", "--q-lora-rank", str(rank), "-o", str(path),
                     "--no-progress")
    assert rc == 0, err
    model = load_model(path)
    assert model.config.q_lora_rank == rank
    if rank:
        assert model.tensors["blk.0.attn_q_a.weight"].shape[0] == rank and "blk.0.attn_q.weight" not in model.tensors
    else:
        assert "blk.0.attn_q.weight" in model.tensors and "blk.0.attn_q_a.weight" not in model.tensors


@pytest.mark.parametrize("preset,rank,message", [("qwen3-tiny", 16, "only the deepseek2 presets"),
                                                 ("tiny", -1, "--q-lora-rank -1")])
def test_make_refuses_a_q_lora_rank_it_cannot_write(tmp_path, capsys, preset, rank, message):
    path = tmp_path / "t.gguf"
    rc, _, err = run(capsys, "model", "make", "--preset", preset, "--q-lora-rank", str(rank), "-o", str(path),
                     "--no-progress")
    assert rc == 2 and message in err and "Traceback" not in err and not path.exists()


def test_info_table(tiny_gguf, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, _ = run(capsys, "model", "info", str(tiny_gguf), "-ot", EXPERTS_ON_CPU, "--accel", "emulated")
    assert rc == 0
    for text in ("deepseek2", "Q4_0", "kv_lora_rank", "ACC0 (emulated)", "expert bytes/token", "total"):
        assert text in out


def test_info_without_accelerator(tiny_gguf, capsys):
    rc, out, err = run(capsys, "model", "info", str(tiny_gguf), "--accel", "none", "--json")
    assert rc == 0 and "-ngl 99 ignored" in err
    assert set(json.loads(out)["placement"]["backends"]) == {"CPU"}


def test_make_refuses_existing_output_unless_forced(tmp_path, capsys):
    path = tmp_path / "t.gguf"
    path.write_bytes(b"precious")
    rc, _, err = run(capsys, "model", "make", "--preset", "tiny", "-o", str(path), "--no-progress")
    assert rc == 2 and "file exists (use --force to overwrite)" in err
    assert path.read_bytes() == b"precious"
    rc, _, _ = run(capsys, "model", "make", "--preset", "tiny", "-o", str(path), "--force", "--no-progress")
    assert rc == 0 and load_model(path).config.n_layer == 3


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--layers", "0"], "--layers 0: out of range"),
    (["--preset", "tiny", "--layers", "9999"], "--layers 9999: out of range"),
    (["--preset", "tiny", "--layers", "27"], "--layers 27: llama.cpp reads"),
    (["--preset", "huge"], "--preset huge: unknown preset (available: tiny, deepseek-v2-lite-mini, deepseek-v2-lite, "
                           "qwen3-tiny, qwen3-30b-a3b-mini, qwen3-30b-a3b)"),
    (["--preset", "tiny", "--type", "q4_k"], "--type q4_k: unknown type (available: q4_0, q8_0, f16, bf16, f32, "
                                             "q4_k_m, q5_k_m, q6_k, iq4_xs)"),
])
def test_make_bad_arguments(tmp_path, capsys, argv, message):
    path = tmp_path / "t.gguf"
    rc, _, err = run(capsys, "model", "make", *argv, "-o", str(path), "--no-progress")
    assert rc == 2
    assert err.strip() == f"hyprof: error: {err.strip().removeprefix('hyprof: error: ')}" and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ot, message", [
    ("exps", "expected REGEX=BACKEND (missing '=')"),
    ("blk.(=CPU", "invalid regex 'blk.('"),
    ("exps=GPU0", "unknown backend 'GPU0' (available: CPU"),
])
def test_info_bad_rules(tiny_gguf, capsys, ot, message):
    rc, _, err = run(capsys, "model", "info", str(tiny_gguf), "-ot", ot)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_info_warns_for_rule_matching_nothing(tiny_gguf, capsys):
    rc, _, err = run(capsys, "model", "info", str(tiny_gguf), "-ot", "nothing=CPU", "--json")
    assert rc == 0 and "hyprof: warning: -ot rule 1 'nothing=CPU' matches no tensor" in err


@pytest.mark.parametrize("drop,message", [
    (dict(drop_tensors={"blk.1.attn_k_norm.weight"}), "missing tensor blk.1.attn_k_norm.weight required by qwen3moe"),
    (dict(drop_keys={"qwen3moe.attention.head_count"}), "missing metadata key qwen3moe.attention.head_count"),
])
def test_info_qwen3moe_file_missing_a_tensor_or_key(make_gguf, tmp_path, capsys, drop, message):
    """Bad input names what is missing in one line, exit 2."""
    from test_gguf_model import copy_gguf

    p = copy_gguf(make_gguf("qwen3-tiny", "q4_0"), tmp_path / "bad.gguf", **drop)
    rc, _, err = run(capsys, "model", "info", str(p))
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_info_bad_file(tmp_path, capsys):
    p = tmp_path / "x.gguf"
    p.write_text("not a model")
    rc, _, err = run(capsys, "model", "info", str(p))
    assert rc == 2 and err.strip() == f"hyprof: error: {p}: not a GGUF file (no 'GGUF' magic at the start)"


def test_interrupted_make_leaves_nothing(tmp_path):
    def interrupt(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_model(tmp_path / "t.gguf", "tiny", "f32", progress=interrupt)
    assert list(tmp_path.iterdir()) == []
