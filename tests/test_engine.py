"""The hybrid engine: placement never changes results, and Ctrl-C stops it cleanly.

The tiny model (1 dense + 2 MoE layers, Q4_0) runs 32 greedy steps all on the
CPU, all on the emulated accelerator ACC0 (-ngl 99), and with the routed experts
on the CPU and the rest on ACC0 (the hybrid case), with 1 and 2 threads and both
wait modes. Every run must give the same tokens and logits within tolerance, and
the first logits must match the independent float64 NumPy reference: on the exact
path (HYPROF_KERNELS=torch) as it is, and on the default native kernels
with the reference rounding matmul inputs to 8 bits per block as they do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T

from hybrid import cpu_kernels, weights
from hybrid.engine import Engine
from hybrid.gguf_model import load_model
from hybrid.weights import Weight
from profiler.errors import UserError
from profiler.recorder import Recorder
from gguf_retype import retype_gguf
from reference_deepseek2 import Deepseek2Reference
from reference_qwen3moe import Qwen3MoeReference

EXPERTS_ON_CPU = r"\.ffn_.*_exps\.=CPU"
PROMPT = [1, 17, 42, 99, 7]
N_STEPS = 32

PLACEMENTS = {
    "all-cpu": dict(accel="none", n_gpu_layers=0, overrides=()),
    "all-acc": dict(accel="emulated", n_gpu_layers=99, overrides=()),
    "experts-cpu": dict(accel="emulated", n_gpu_layers=99, overrides=(EXPERTS_ON_CPU,)),
}


def greedy(engine: Engine, n_steps: int = N_STEPS) -> tuple[list[int], torch.Tensor]:
    """Prompt, then n_steps single-token evaluations; the tokens and every step's logits."""
    logits = [engine.forward(PROMPT, "pp")[-1]]
    tokens = []
    for _ in range(n_steps):
        tokens.append(int(torch.argmax(logits[-1])))
        logits.append(engine.forward(tokens[-1:], "tg")[-1])
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def cpu_baseline(tiny_gguf):
    """The default (native kernels) all-CPU run every other placement must reproduce."""
    with Engine(str(tiny_gguf), threads=1, **PLACEMENTS["all-cpu"]) as engine:
        return greedy(engine)


@pytest.fixture(scope="module")
def exact_baseline(tiny_gguf):
    """The same run on the exact dequantise-then-matmul path."""
    mp = pytest.MonkeyPatch()
    mp.setattr(weights, "NATIVE", False)
    try:
        with Engine(str(tiny_gguf), threads=1, **PLACEMENTS["all-cpu"]) as engine:
            return greedy(engine)
    finally:
        mp.undo()


def test_baseline_matches_float64_reference(tiny_gguf, exact_baseline):
    ref = Deepseek2Reference(tiny_gguf).forward(PROMPT)
    np.testing.assert_allclose(exact_baseline[1][0].numpy(), np.asarray(ref)[-1], rtol=0, atol=2e-3)


def test_reused_graph_follows_the_cache(tiny_gguf, exact_baseline):
    """Generation reuses one graph (only n_past moves): every step must still attend over
    its own depth. The exact path, step by step, equals the float64 reference stepped the
    same way, and the attention ops count the bytes of the cache at the last depth."""
    ref = Deepseek2Reference(tiny_gguf)
    ref.forward(PROMPT)
    tokens, logits = exact_baseline
    for step in range(4):
        expected = np.asarray(ref.forward(tokens[step:step + 1]))[-1]
        np.testing.assert_allclose(logits[step + 1].numpy(), expected, rtol=0, atol=2e-3)
    with Engine(str(tiny_gguf), threads=1, **PLACEMENTS["all-cpu"]) as engine:
        greedy(engine, n_steps=3)
        c = engine.gguf.config
        kq = next(n for split in engine.last_plan.splits for n in split.nodes if n.name == "kq-0")
    n_kv = len(PROMPT) + 3
    assert kq.cost.at(n_kv)[0] == 4 * n_kv * c.n_head * c.n_embd_head_k


@pytest.mark.parametrize("mla", [0, 1])
@pytest.mark.parametrize("threads", [1, 2])
def test_flash_attention_follows_the_cache(tiny_gguf, mla, threads):
    """-fa 1 on the exact path, step by step in its reused graph (the CPY and FLASH_ATTN_EXT
    calls replayed at each new depth, the heads shared by the pool with 2 threads), equals the
    float64 reference stepped the same way; the op counts the bytes of the cache it read."""
    mp = pytest.MonkeyPatch()
    mp.setattr(weights, "NATIVE", False)
    try:
        with Engine(str(tiny_gguf), threads=threads, mla=mla, fa=1, **PLACEMENTS["all-cpu"]) as engine:
            tokens, logits = greedy(engine, n_steps=4)
            c = engine.gguf.config
            fattn = next(n for split in engine.last_plan.splits for n in split.nodes if n.name == "__fattn__-0")
    finally:
        mp.undo()
    ref = Deepseek2Reference(tiny_gguf)
    np.testing.assert_allclose(logits[0].numpy(), np.asarray(ref.forward(PROMPT))[-1], rtol=0, atol=2e-3)
    for step in range(4):
        expected = np.asarray(ref.forward(tokens[step:step + 1]))[-1]
        np.testing.assert_allclose(logits[step + 1].numpy(), expected, rtol=0, atol=2e-3)
    per_kv = 4 * (c.kv_lora_rank + c.n_rot) if mla else 4 * c.n_head * (c.n_embd_head_k + c.n_embd_head_v)
    assert fattn.op == "FLASH_ATTN_EXT" and fattn.cost.at(len(PROMPT) + 4)[0] == per_kv * (len(PROMPT) + 4)


@pytest.mark.parametrize("fmoe,threads,kv_layout", [(0, 1, "kv_b"), (1, 2, "kv_b"), (1, 2, "k_b_v_b")])
def test_native_kernels_match_the_reference_with_rounded_activations(make_gguf, fmoe, threads, kv_layout):
    """The native path computes the reference's rounded-input matmuls: logits agree to 2e-5
    (measured ~2e-6) while the rounding itself moves them by ~1e-1 (logits up to ~11)."""
    path = make_gguf("tiny", "q4_0", **({} if kv_layout == "kv_b" else {"kv_layout": kv_layout}))
    with Engine(str(path), threads=threads, fmoe=fmoe, **PLACEMENTS["all-cpu"]) as engine:
        logits = engine.forward(PROMPT, "pp")[-1].numpy()
    rounded = np.asarray(Deepseek2Reference(path, round_activations=True).forward(PROMPT))[-1]
    exact = np.asarray(Deepseek2Reference(path).forward(PROMPT))[-1]
    assert np.abs(rounded - exact).max() > 1e-2                       # the rounding is visible at all
    np.testing.assert_allclose(logits, rounded, rtol=0, atol=2e-5)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS], ids=lambda t: t.name)
def test_native_kernels_of_other_types_load_and_run(make_gguf, tmp_path_factory, qtype):
    """A file of Q5_0, Q5_1, IQ4_NL, K-quant or IQ4_XS weights (the 256-value ones in a tiny
    variant with n_embd and n_ff_exp 256) runs on their native kernels (tests/test_kernels.py
    proves them exact on rounded inputs), within the rounding's own size of the exact reference
    (measured 0.09-0.12, logits up to ~12), with its greedy token. Not held to the rounded reference
    at 2e-5 as the Q4_0 file is: there, a value that the engine's float32 upstream puts on the other
    side of a rounding tie than the float64 reference does moves the logits by ~0.07 (seen for
    Q5_1 on the scalar and AVX2 paths)."""
    wide = dict(n_embd=256, n_ff=256, n_ff_exp=256) if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS) else {}
    path = retype_gguf(make_gguf("tiny", "f32", **wide), tmp_path_factory.mktemp("retype") / f"{qtype.name}.gguf",
                       qtype)
    with Engine(str(path), threads=2, fmoe=True, **PLACEMENTS["all-cpu"]) as engine:
        experts = engine.model.weights["blk.1.ffn_up_exps.weight"]
        assert experts.ggml_type == qtype and weights.native(experts)
        logits = engine.forward(PROMPT, "pp")[-1].numpy()
    exact = np.asarray(Deepseek2Reference(path).forward(PROMPT))[-1]
    np.testing.assert_allclose(logits, exact, rtol=0, atol=0.25)
    assert logits.argmax() == exact.argmax()


# variants whose rows hold whole 256-value blocks, so that a mix has K-quants and IQ4_XS and,
# through the 96-wide expert rows, llama.cpp's fallbacks (tests/test_quantize.py: the types)
MIX_MODELS = {"tiny": dict(n_embd=256, n_ff=256, n_ff_exp=96), "qwen3-tiny": dict(n_embd=256, n_ff_exp=96)}


@pytest.mark.parametrize("preset", MIX_MODELS)
@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_m", "q6_k", "iq4_xs"])
def test_mixes_run_on_native_kernels(make_gguf, preset, qtype):
    """A file `model make --type` writes as llama.cpp's mix runs every weight on native kernels,
    within the activation rounding's own size of the float64 reference on the stored weights
    (as test_native_kernels_of_other_types_load_and_run), with its greedy token."""
    path = make_gguf(preset, qtype, **MIX_MODELS[preset])
    with Engine(str(path), threads=2, fmoe=True, **PLACEMENTS["all-cpu"]) as engine:
        quantized = [w for w in engine.model.weights.buffers.values()
                     if isinstance(w, Weight) and w.ggml_type not in (T.F32, T.F16)]
        assert len({w.ggml_type for w in quantized}) >= 2 and all(weights.native(w) for w in quantized)
        logits = engine.forward(PROMPT, "pp")[-1].numpy()
    reference = Deepseek2Reference if preset == "tiny" else Qwen3MoeReference
    exact = np.asarray(reference(path).forward(PROMPT))[-1]
    np.testing.assert_allclose(logits, exact, rtol=0, atol=0.25)
    assert logits.argmax() == exact.argmax()


def test_native_kernels_with_mla(tiny_gguf):
    """-mla 1 rounds other inputs than the standard form the reference computes (the
    absorbed per-head products stay exact), so it is held to the rounding's own size:
    within 0.25 of the exact reference (measured 0.13), as -mla 0 is (measured 0.10)."""
    exact = np.asarray(Deepseek2Reference(tiny_gguf).forward(PROMPT))[-1]
    for mla in (0, 1):
        with Engine(str(tiny_gguf), threads=2, mla=mla, **PLACEMENTS["all-cpu"]) as engine:
            logits = engine.forward(PROMPT, "pp")[-1].numpy()
        np.testing.assert_allclose(logits, exact, rtol=0, atol=0.25)


@pytest.mark.parametrize("placement", ["all-acc", "experts-cpu"])
@pytest.mark.parametrize("threads,poll", [(1, 0), (2, 0), (2, 1)])
def test_placement_never_changes_results(tiny_gguf, cpu_baseline, placement, threads, poll):
    with Engine(str(tiny_gguf), threads=threads, poll=poll, **PLACEMENTS[placement]) as engine:
        tokens, logits = greedy(engine)
    assert tokens == cpu_baseline[0]
    torch.testing.assert_close(logits, cpu_baseline[1], rtol=0, atol=1e-4)


def test_all_cpu_with_workers_matches(tiny_gguf, cpu_baseline):
    with Engine(str(tiny_gguf), threads=2, poll=1, **PLACEMENTS["all-cpu"]) as engine:
        tokens, logits = greedy(engine)
    assert tokens == cpu_baseline[0]
    torch.testing.assert_close(logits, cpu_baseline[1], rtol=0, atol=1e-4)


def test_hybrid_run_records_every_step(tiny_gguf):
    rec = Recorder(enabled=True)
    with Engine(str(tiny_gguf), threads=2, recorder=rec, **PLACEMENTS["experts-cpu"]) as engine:
        assert engine.eval(PROMPT, "pp5") in range(engine.n_vocab)
        engine.eval([3], "tg1")
        header = engine.header()
        plan = engine.last_plan
    events = rec.drain()
    assert header["config"]["accel"] == "ACC0 (emulated)"
    assert set(header["placement"]) == {"CPU", "ACC0"}
    # 1 dense + 2 MoE layers: [CPU get_rows] [ACC ...] then [CPU experts] [ACC ...] per MoE layer
    assert [s.backend for s in plan.splits] == ["CPU", "ACC0", "CPU", "ACC0", "CPU", "ACC0"]
    by_type = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    assert {"graph", "phase", "split", "op", "copy", "wakeup", "sync"} <= set(by_type)
    assert {e["name"] for e in by_type["phase"]} >= {"graph_build", "set_inputs", "split_setup",
                                                      "sample"}
    assert [e["test"] for e in by_type["graph"]] == ["pp5", "tg1"]
    expert_ops = [e for e in by_type["op"] if "_exps" in e["name"]]
    assert expert_ops and all(e["backend"] == "CPU" and e["tid"] in ("main", "cpu1")
                              for e in expert_ops)
    assert {e["tid"] for e in by_type["op"] if e["backend"] == "ACC0"} == {"ACC0"}
    copies = by_type["copy"]
    assert {(e["src"], e["dst"]) for e in copies} == {("CPU", "ACC0"), ("ACC0", "CPU")}
    assert all(e["bytes"] > 0 for e in copies)
    graphs = {e["graph"]: e for e in by_type["graph"]}
    splits = {(e["graph"], e["split"]): e for e in by_type["split"]}
    for e in events:
        if e["type"] == "graph":
            continue
        outer = [graphs[e["graph"]]] + ([splits[e["graph"], e["split"]]]
                                        if e.get("split") is not None and e["type"] != "split"
                                        else [])
        for o in outer:
            assert o["ts"] <= e["ts"] and e["ts"] + e["dur"] <= o["ts"] + o["dur"], (e, o)


def test_split_ops_count_their_bytes_once(tiny_gguf):
    """Workers sharing an op each record their share of its bytes and flops: the op
    events of a 2-thread run add up to those of a 1-thread run. (Threads claim chunks
    as they come, so on ops this small the main thread may take them all: which lanes
    ran is not fixed; tests/test_pool.py checks the shares of an op big enough to split.)"""
    totals = []
    for threads in (1, 2):
        rec = Recorder(enabled=True)
        with Engine(str(tiny_gguf), threads=threads, recorder=rec, **PLACEMENTS["all-cpu"]) as engine:
            engine.eval(PROMPT, "pp5")
        ops = [e for e in rec.drain() if e["type"] == "op"]
        totals.append((sum(e["bytes"] for e in ops), sum(e["flops"] for e in ops),
                       {e["tid"] for e in ops}))
    assert "main" in totals[1][2] and totals[1][2] <= {"main", "cpu1"}
    assert abs(totals[1][0] - totals[0][0]) <= len(ops) and abs(totals[1][1] - totals[0][1]) <= len(ops)


def test_recording_off_records_nothing(tiny_gguf):
    rec = Recorder(enabled=False)
    with Engine(str(tiny_gguf), threads=2, recorder=rec, **PLACEMENTS["experts-cpu"]) as engine:
        engine.eval(PROMPT, "pp5")
    assert rec.drain() == []


def test_cuda_without_gpu_is_a_user_error(tiny_gguf):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="--accel cuda"):
        Engine(str(tiny_gguf), accel="cuda")


def test_bad_thread_count_is_a_user_error(tiny_gguf):
    with pytest.raises(UserError, match="-t 0"):
        Engine(str(tiny_gguf), threads=0)


@pytest.mark.parametrize("poll", [0, 1])
def test_ctrl_c_stops_workers_cleanly(tiny_gguf, poll):
    """SIGINT in the middle of a long hybrid run: the process exits promptly, its
    workers and device thread stopped."""
    script = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)   # (see python_sigint in test_pool.py)
        from hybrid.backends import cpu
        from hybrid.engine import Engine
        cpu.MIN_SPLIT_BYTES = cpu.MIN_SPLIT_FLOPS = 0      # as the conftest fixture: use the workers
        engine = Engine({str(tiny_gguf)!r}, threads=2, poll={poll}, accel="emulated",
                        n_gpu_layers=99, overrides=[{EXPERTS_ON_CPU!r}])
        try:
            print("ready", flush=True)
            while True:
                engine.reset()
                for step in range(200):
                    engine.eval([step % 100], "tg")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        finally:
            engine.close()
        print("closed", flush=True)
    """)
    # Three runs, interrupted at different moments: an interrupt landing between a
    # wait's end and its bookkeeping once hung the process on its cleanup.
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
             for _ in range(3)]
    try:
        for delay, proc in zip((0.3, 0.7, 1.1), procs):
            if proc.stdout.readline().strip() != "ready":
                pytest.fail(f"the engine did not start: {proc.communicate(timeout=20)[1]}")
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert out.split() == ["interrupted", "closed"], (out, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_small_ops_stay_on_main(tiny_gguf, cpu_baseline, monkeypatch):
    """At the production split sizes the tiny model's ops are all too small to hand to a
    worker: the main thread runs them alone, with the same results."""
    from hybrid.backends import cpu

    monkeypatch.setattr(cpu, "MIN_SPLIT_BYTES", 1 << 20)
    monkeypatch.setattr(cpu, "MIN_SPLIT_FLOPS", 1 << 25)
    rec = Recorder(enabled=True)
    with Engine(str(tiny_gguf), threads=2, recorder=rec, **PLACEMENTS["all-cpu"]) as engine:
        tokens, logits = greedy(engine, 4)
    assert tokens == cpu_baseline[0][:4]
    torch.testing.assert_close(logits, cpu_baseline[1][:5], rtol=0, atol=1e-4)
    ops = [e for e in rec.drain() if e["type"] == "op"]
    assert ops and {e["tid"] for e in ops} == {"main"}


def test_device_holds_its_own_copy_of_its_weights(tiny_gguf):
    with Engine(str(tiny_gguf), threads=1, **PLACEMENTS["experts-cpu"]) as engine:
        acc, cpu = engine.backends["ACC0"].buffers, engine.backends["CPU"].buffers
        assert not any("_exps" in name for name in acc)
        assert all("_exps" in name or name.startswith("token_embd") for name in cpu)
        stored = {name: Weight.from_tensor(info) for name, info in engine.gguf.tensors.items()}
        for name, buf in acc.items():
            if name.startswith("cache_"):          # allocated there only
                assert name not in engine.model._host_caches and buf.shape[0] == engine.model.n_ctx
                continue
            # the host keeps only the file's map of a device's weight, no copy of its own
            assert engine.model.weights[name].data.data_ptr() == stored[name].data.data_ptr()
            host = stored[name].data                                # the file's memory map
            assert buf.data.data_ptr() != host.data_ptr() and torch.equal(buf.data, host)


def test_only_the_cpu_weights_are_repacked(tiny_gguf, monkeypatch):
    """Q4_0 matmul weights placed on the CPU get R16 blocks for its kernel; the device's,
    the embedding (read by rows) and the f32 norms stay as stored. Where the path in use reads
    the weights as stored, the choice is tested with the scalar path's repack (the engine is
    only loaded)."""
    if cpu_kernels.available() not in cpu_kernels.TRAITS[cpu_kernels.Q4_0].r16_first:
        repack = cpu_kernels.repack
        monkeypatch.setattr(cpu_kernels, "repack", lambda w, t: repack(w, t, path="scalar"))
    with Engine(str(tiny_gguf), threads=1, **PLACEMENTS["experts-cpu"]) as engine:
        weights = engine.model.weights.buffers
        packed = {name for name, w in weights.items() if getattr(w, "packed", None) is not None}
        assert packed and all("_exps" in name for name in packed)
        assert not any(name.startswith("token_embd") for name in packed)
        for name in packed:
            assert weights[name].packed.shape == weights[name].data.shape


def test_the_cpu_weights_left_in_the_map_are_read_at_load(tiny_gguf, monkeypatch):
    """Every weight the CPU reads in place from the file's map (not repacked) is faulted in
    at load, and no other: the device's are copied there, the repacked ones read once."""
    faulted = []
    monkeypatch.setattr(weights, "fault_in", lambda data: faulted.append(data.ctypes.data))
    with Engine(str(tiny_gguf), threads=1, **PLACEMENTS["experts-cpu"]) as engine:
        bufs = engine.model.weights.buffers
        on_cpu = {name for name, b in engine.placement.backend.items() if b == "CPU"}
        in_map = {name for name in on_cpu
                  if getattr(bufs[name], "packed", None) is None and not isinstance(bufs[name], weights.Int4Weight)}
        assert in_map and "token_embd.weight" in in_map
        assert sorted(faulted) == sorted(engine.gguf.tensors[name].data.ctypes.data for name in in_map)


def test_fault_in_brings_every_page_of_a_mapped_file_into_memory(tmp_path):
    import ctypes
    path = tmp_path / "w.bin"
    n_pages = 64
    path.write_bytes(os.urandom(n_pages * weights.PAGE_BYTES))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    data = np.memmap(path, dtype=np.float32, mode="r").reshape(n_pages, -1)
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * n_pages)()

    def resident() -> int:
        assert libc.mincore(ctypes.c_void_p(data.ctypes.data), ctypes.c_size_t(data.nbytes), vec) == 0
        return sum(v & 1 for v in vec)
    if resident() == n_pages:
        pytest.skip(f"{tmp_path}: the page cache here keeps the file's pages (tmpfs?)")
    weights.fault_in(data)
    assert resident() == n_pages


def test_generate_command_takes_placement_flags(tiny_gguf, cpu_baseline):
    from hyprof.cli import main
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["generate", "-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)),
                   "-n", "8", "--ids", "-t", "2", "--accel", "emulated", "-ngl", "99",
                   "-ot", EXPERTS_ON_CPU, "--poll", "1"])
    assert rc == 0
    assert out.getvalue().strip().splitlines()[-1] == ",".join(map(str, cpu_baseline[0][:8]))


@pytest.mark.cuda
@pytest.mark.parametrize("placement", ["all-gpu", "experts-cpu"])
def test_cuda_placement_matches_cpu(tiny_gguf, exact_baseline, placement, monkeypatch):
    """CUDA weights take the exact torch path, so the CPU ones must too for a tight match."""
    monkeypatch.setattr(weights, "NATIVE", False)
    cpu_baseline = exact_baseline
    overrides = () if placement == "all-gpu" else (EXPERTS_ON_CPU,)
    rec = Recorder(enabled=True)
    with Engine(str(tiny_gguf), threads=2, accel="cuda", n_gpu_layers=99, overrides=overrides,
                recorder=rec) as engine:
        tokens, logits = greedy(engine)
    assert tokens == cpu_baseline[0]
    torch.testing.assert_close(logits, cpu_baseline[1], rtol=0, atol=1e-3)
    events = rec.drain()
    gpu_ops = [e for e in events if e["type"] == "op" and e["tid"] == "CUDA0"]
    assert gpu_ops and all(e["dur"] >= 0 for e in gpu_ops)
    splits = {(e["graph"], e["split"]): e for e in events if e["type"] == "split"}
    for e in gpu_ops:      # device times mapped onto the host clock land inside their split
        s = splits[e["graph"], e["split"]]
        assert s["ts"] - 50_000 <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 50_000


def test_hyprof_run_with_the_real_engine_writes_a_valid_timings_file(tiny_gguf, tmp_path, capsys):
    """The runner drives this engine (BenchEngine): the file holds every event type, all
    nested as the contract demands (device ops inside their split included)."""
    from contract import check_timings_file
    from hyprof.cli import main

    out = tmp_path / "t.jsonl"
    rc = main(["run", "-m", str(tiny_gguf), "-p", "8", "-n", "4", "-r", "2", "-t", "2",
               "--accel", "emulated", "-ot", EXPERTS_ON_CPU, "--poll", "0,1", "-o", str(out),
               "--peak-bw", "10", "--no-progress"])
    assert rc == 0
    assert "ACC0" in capsys.readouterr().out
    summary = check_timings_file(out, require_types=("test", "graph", "phase", "split", "op",
                                                     "copy", "wakeup", "sync"))
    assert {"main", "cpu1", "ACC0"} <= summary.lanes


@pytest.mark.parametrize("n_tok", [1, 5])                   # gathered slots (T*U <= E), every expert
@pytest.mark.parametrize("fused,per_slot", [(False, False), (True, False), (False, True)])
def test_gpu_expert_matmuls_select_on_the_device(n_tok, fused, per_slot):
    """The GPU's MUL_MAT_ID form (no read-back inside a split) equals each slot's expert applied
    to its input, in both its forms, and counts the distinct experts used; run here on CPU
    tensors, as it runs on a GPU's."""
    from hybrid.builder import _experts_on_device
    from hybrid.weights import GateUpExperts

    g = torch.Generator().manual_seed(n_tok)
    n_expert, n_used, n_out, n_in = 8, 3, 16, 32
    dense = [Weight(f"w{i}", 0, (n_expert, n_out, n_in), torch.randn(n_expert, n_out, n_in, generator=g))
             for i in range(2)]
    w = GateUpExperts("gate_up", *dense) if fused else dense[0]
    ids = torch.stack([torch.randperm(n_expert, generator=g)[:n_used] for _ in range(n_tok)])
    x = torch.randn(n_tok, n_used, n_in, generator=g) if per_slot else torch.randn(n_tok, n_in, generator=g)
    got, n_experts = _experts_on_device(w, x, ids, fused)
    for t in range(n_tok):
        for u in range(n_used):
            xt = x[t, u] if per_slot else x[t]
            e = int(ids[t, u])
            want = dense[0].data[e] @ xt
            if fused:
                want = torch.nn.functional.silu(want) * (dense[1].data[e] @ xt)
            torch.testing.assert_close(got[t, u], want, rtol=1e-5, atol=1e-5)
    assert int(n_experts) == len(set(ids.flatten().tolist()))


def test_gpu_weights_are_dequantised_once_at_load(tiny_gguf):
    """A GPU's copy of a quantised weight is its float32 dequantisation, made from the stored
    tensor; the fused pair shares its gate and up copies."""
    from hybrid.weights import GateUpExperts, for_gpu

    g = load_model(tiny_gguf)
    stored = {name: Weight.from_tensor(info) for name, info in g.tensors.items()}
    memo: dict = {}
    name = "blk.1.ffn_up_exps.weight"
    dense = for_gpu(stored[name], stored.__getitem__, torch.device("cpu"), memo)
    assert dense.data.dtype == torch.float32 and dense.shape == stored[name].shape
    torch.testing.assert_close(dense.data, stored[name].dequantize().reshape(dense.shape), rtol=0, atol=0)
    pair = GateUpExperts("blk.1.ffn_gate_up_exps.weight", stored["blk.1.ffn_gate_exps.weight"], stored[name])
    assert for_gpu(pair, stored.__getitem__, torch.device("cpu"), memo).up is dense
