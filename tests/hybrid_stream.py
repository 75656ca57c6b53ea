"""A hand-built hybrid run (contract v1 events) for the plot, trace and diff tests.

`hybrid_stream(...)` returns the header and events of a run with known shape:
every token is one graph; each layer is a CUDA0 split (input copy, attention ops
on the device lane, the main thread in `sync`) followed, with the experts on
the CPU, by a CPU split (copy back, a wakeup then one expert matmul per
worker lane, the join). With `experts_on="CUDA0"` the expert matmul runs in
the device split instead and the CPU split disappears: the placement change a
`hyprof diff` should show. Depth tests (`tg2@pp64`) make attention slower by
`attn_ns_per_depth` per token of KV cache. Every lane nests properly.

`engine_run(tiny_gguf, out)` makes the same kind of file with the real engine
(`hyprof run` on the tiny model, ACC0 emulated), for the engine-made tests.
"""

from __future__ import annotations

from pathlib import Path

import orjson

HEADER = {
    "type": "meta", "schema": "hyprof-timings/1", "tool": "hyprof test", "created": "2026-11-25T00:00:00Z",
    "model": {"path": "/models/DeepSeek-Lite-Q4_0.gguf", "arch": "deepseek2", "size_bytes": 9_000_000_000,
              "n_params": 15_700_000_000, "ftype": "Q4_0"},
    "config": {"threads": 2, "n_gpu_layers": 99, "overrides": ["\\.ffn_.*_exps\\.=CPU"], "accel": "CUDA0",
               "mla": 0, "fmoe": 1, "rtr": 1},
    "machine": {"cpu": "Test CPU 16-core", "cores": 16, "mem_bytes": 64 * 2**30, "gpu": "Test GPU"},
    "peak_bw": {"CPU": {"GBps": 64.0, "method": "measured: stream triad"},
                "CUDA0": {"GBps": 900.0, "method": "measured"}},
    "placement": {"CPU": {"bytes": 8_000_000_000, "tensors": 78}, "CUDA0": {"bytes": 1_000_000_000, "tensors": 300}},
}
TESTS = (("pp8", "pp", 8, 0, 0), ("tg3", "tg", 0, 3, 0), ("tg3@pp64", "tg", 0, 3, 64))
EXPERT_BYTES = 150_000_000           # per expert op (one per worker per layer per token)
ATTN_BYTES = 40_000_000
SETUP_NS, TAIL_NS = 50_000, 40_000     # split setup; from the last op to the end of a split


def hybrid_stream(*, tests=TESTS, reps: int = 2, n_layers: int = 2, workers: int = 2, experts_on: str = "CPU",
                  expert_ns: int = 5_000_000, attn_ns: int = 1_200_000, attn_ns_per_depth: int = 2_000,
                  wakeup_ns: int = 80_000, copy_ns: int = 60_000, header: dict | None = None) -> list[dict]:
    """`tests`: (name, kind, n_prompt, n_gen, depth); a pp test is one graph of n_prompt tokens."""
    head = dict(HEADER if header is None else header)
    if experts_on != "CPU":
        head["config"] = {**head["config"], "overrides": []}
    events: list[dict] = [head]
    ts, graph = 1_000, 0
    for name, kind, n_prompt, n_gen, depth in tests:
        for rep in range(reps):
            start, body = ts, []
            batches = [n_prompt] if n_prompt else [1] * n_gen
            for i, n_tokens in enumerate(batches):
                n_past = depth + (0 if n_prompt else i)
                graph_events, ts = _graph(ts, graph, name, n_tokens, n_past, n_layers, workers, experts_on,
                                          expert_ns, attn_ns + attn_ns_per_depth * n_past, wakeup_ns, copy_ns)
                body += graph_events
                graph += 1
                ts += 500_000                # Python between graphs: `other`
            events.append({"type": "test", "ts": start, "dur": ts - start, "name": name, "kind": kind,
                           "n_prompt": n_prompt, "n_gen": n_gen, "depth": depth, "rep": rep,
                           "n_tokens": n_prompt + n_gen, "tid": "main"})
            events += body
            ts += 2_000_000
    return events


def _graph(ts, graph, test, n_tokens, n_past, n_layers, workers, experts_on, expert_ns, attn_ns, wakeup_ns,
           copy_ns):
    scale = max(1, n_tokens // 2)        # a batch costs more than a token, less than n tokens
    g0 = ts
    ev = [{"type": "phase", "ts": ts, "dur": 300_000, "graph": graph, "name": "graph_build", "tid": "main"},
          {"type": "phase", "ts": ts + 300_000, "dur": 100_000, "graph": graph, "name": "set_inputs", "tid": "main"}]
    c, split = ts + 400_000, 0
    for layer in range(n_layers):
        # device split: attention (+ the experts, when they live on the GPU)
        s0 = c
        ev.append({"type": "phase", "ts": c, "dur": SETUP_NS, "graph": graph, "name": "split_setup", "tid": "main"})
        ev.append({"type": "copy", "ts": c + SETUP_NS, "dur": copy_ns, "graph": graph, "split": split, "src": "CPU",
                   "dst": "CUDA0", "bytes": 16_384 * n_tokens, "name": f"inp_{layer}", "tid": "main"})
        d = c + SETUP_NS + copy_ns
        device_ops = [("RMS_NORM", f"blk.{layer}.attn_norm", attn_ns // 6, 0),
                      ("MUL_MAT", f"blk.{layer}.attn_q", attn_ns // 2, ATTN_BYTES),
                      ("SOFT_MAX", f"blk.{layer}.kq_soft_max", attn_ns - attn_ns // 6 - attn_ns // 2, 0)]
        if experts_on != "CPU":
            device_ops.append(("MUL_MAT_ID", f"blk.{layer}.ffn_up_exps", expert_ns // 8, EXPERT_BYTES * workers))
        o = d
        for op, name, dur, nbytes in device_ops:
            ev.append({"type": "op", "ts": o, "dur": dur * scale, "graph": graph, "split": split, "backend": "CUDA0",
                       "tid": "CUDA0", "op": op, "name": name, "layer": layer, "bytes": nbytes,
                       "flops": 2 * nbytes * n_tokens,
                       "n_tokens": n_tokens})
            o += dur * scale
        ev.append({"type": "sync", "ts": d, "dur": o - d + TAIL_NS, "graph": graph, "split": split, "backend": "CUDA0",
                   "tid": "main"})
        c = o + TAIL_NS
        ev.append({"type": "split", "ts": s0, "dur": c - s0, "graph": graph, "split": split, "backend": "CUDA0",
                   "n_nodes": len(device_ops), "n_inputs": 1, "tid": "main"})
        split += 1
        if experts_on != "CPU":
            continue
        # CPU split: copy the activations back, wake the workers, one expert slice per worker, join
        s0 = c
        ev.append({"type": "phase", "ts": c, "dur": SETUP_NS, "graph": graph, "name": "split_setup", "tid": "main"})
        ev.append({"type": "copy", "ts": c + SETUP_NS, "dur": copy_ns, "graph": graph, "split": split, "src": "CUDA0",
                   "dst": "CPU", "bytes": 8_192 * n_tokens, "name": f"ffn_inp_{layer}", "tid": "main"})
        dispatch, last = c + SETUP_NS + copy_ns, 0
        for w in range(1, workers + 1):
            wake = wakeup_ns * w
            ev.append({"type": "wakeup", "ts": dispatch, "dur": wake, "graph": graph, "split": split,
                       "backend": "CPU", "tid": f"cpu{w}"})
            ev.append({"type": "op", "ts": dispatch + wake, "dur": expert_ns * scale, "graph": graph, "split": split,
                       "backend": "CPU", "tid": f"cpu{w}", "op": "MUL_MAT_ID", "name": f"blk.{layer}.ffn_up_exps",
                       "layer": layer, "bytes": EXPERT_BYTES, "flops": 2 * EXPERT_BYTES * n_tokens,
                       "n_tokens": n_tokens})
            last = max(last, dispatch + wake + expert_ns * scale)
        c = last + TAIL_NS
        ev.append({"type": "split", "ts": s0, "dur": c - s0, "graph": graph, "split": split, "backend": "CPU",
                   "n_nodes": 1, "n_inputs": 1, "tid": "main"})
        split += 1
    ev.append({"type": "phase", "ts": c, "dur": 100_000, "graph": graph, "name": "sample", "tid": "main"})
    c += 100_000
    ev.insert(0, {"type": "graph", "ts": g0, "dur": c - g0, "graph": graph, "test": test, "n_tokens": n_tokens,
                  "n_past": n_past, "tid": "main"})
    return ev, c


def write_stream(path: Path, events: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def engine_run(tiny_gguf: Path, out: Path, *extra: str) -> Path:
    """A real (small) `hyprof run` on the tiny model, experts on the CPU, the rest on ACC0 (emulated)."""
    from hyprof.cli import main

    assert main(["run", "-m", str(tiny_gguf), "-p", "8", "-n", "3", "-d", "0,16", "-r", "1", "-t", "2",
                 "--accel", "emulated", "-ot", "\\.ffn_.*_exps\\.=CPU", "--peak-bw", "10", "--no-progress",
                 "-o", str(out), *extra]) == 0
    return out
