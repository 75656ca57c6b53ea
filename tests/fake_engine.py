"""A stand-in for hybrid.engine that implements profiler.bench.BenchEngine.

It computes nothing, but records what a hybrid CPU + ACC0 evaluation records,
with real clock readings: graph build and input phases, an accelerator split
(input copy, attention ops, sync), a CPU split (a wakeup per worker, expert
matmuls on the worker lanes, copy back), each layer's route (experts chosen round
robin: token t of the graph, slot u -> expert (n_past + t + u) % N_EXPERT), a sampling phase. Tests of the runner,
sinks and (later) analysis run on it without torch or a model file.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from profiler.recorder import Recorder

N_EXPERT, N_EXPERT_USED = 8, 2


def _spin(n: int = 200) -> None:
    """Let a little time pass, so that intervals are not all zero."""
    sum(range(n))


class FakeEngine:
    n_vocab = 1000

    def __init__(self, model_path: str, *, threads: int, n_gpu_layers: int,
                 overrides: Sequence[str], accel: str, mla: int, fa: int, fmoe: int, rtr: int,
                 poll: int, recorder: Recorder, n_ubatch: int = 512, n_cpu_moe: int = 0,
                 no_op_offload: int = 0, op_offload_min_batch: int | None = None, op_offload: str = "llama.cpp",
                 n_layer: int = 2,
                 interrupt_at_graph: int | None = None):
        self.recorder = recorder
        self.model_path = model_path
        self.threads = threads
        self.config = {"threads": threads, "n_gpu_layers": n_gpu_layers,
                       "overrides": list(overrides), "accel": "ACC0 (emulated)", "mla": mla,
                       "fa": fa, "fmoe": fmoe, "rtr": rtr}
        self.n_layer = n_layer
        self.n_past = 0
        self.n_evals = 0
        self.interrupt_at_graph = interrupt_at_graph
        self.closed = False
        self.main = recorder.lane("main")
        self.acc = recorder.lane("ACC0")
        self.workers = [recorder.lane(f"cpu{i}") for i in range(1, threads + 1)]

    def header(self) -> dict:
        return {"model": {"path": self.model_path, "arch": "deepseek2", "size_bytes": 123456,
                          "n_params": 2_000_000, "ftype": "Q4_0", "n_expert": N_EXPERT,
                          "n_expert_used": N_EXPERT_USED},
                "config": self.config,
                "placement": {"CPU": {"bytes": 100000, "tensors": 12},
                              "ACC0": {"bytes": 23456, "tensors": 30}},
                "machine": {"gpu": None}}

    def reset(self) -> None:
        self.n_past = 0

    def close(self) -> None:
        self.closed = True

    def eval(self, tokens: Sequence[int], test: str) -> int:
        rec = self.recorder
        graph = rec.next_graph()
        self.n_evals += 1
        t_graph = rec.now()
        self._phase(graph, "graph_build")
        self._phase(graph, "set_inputs")
        split = 0
        for layer in range(self.n_layer):
            self._acc_split(graph, split, layer, len(tokens))
            if self.n_evals - 1 == self.interrupt_at_graph and layer == 0:
                raise KeyboardInterrupt
            self._cpu_split(graph, split + 1, layer, len(tokens))
            split += 2
        if rec.enabled:
            experts = (self.n_past + np.arange(len(tokens))[:, None] + np.arange(N_EXPERT_USED)) % N_EXPERT
            for layer in range(self.n_layer):
                self.main.route(rec.now(), 0, graph, layer, len(tokens), experts.reshape(-1))
        self._phase(graph, "sample")
        if rec.enabled:
            self.main.graph(t_graph, rec.now() - t_graph, graph, test, len(tokens), self.n_past)
        self.n_past += len(tokens)
        return (sum(tokens) + self.n_past) % self.n_vocab

    def _phase(self, graph: int, name: str) -> None:
        t = self.recorder.now()
        _spin()
        if self.recorder.enabled:
            self.main.phase(t, self.recorder.now() - t, graph, name)

    def _copy(self, graph: int, split: int, src: str, dst: str, n_bytes: int, name: str) -> None:
        t = self.recorder.now()
        _spin()
        if self.recorder.enabled:
            self.main.copy(t, self.recorder.now() - t, graph, split, src, dst, n_bytes, name, None)

    def _acc_split(self, graph: int, split: int, layer: int, n_tokens: int) -> None:
        rec = self.recorder
        t_split = rec.now()
        self._copy(graph, split, "CPU", "ACC0", 4096 * n_tokens, f"attn_norm-{layer}")
        t_sync = rec.now()
        for op, name in (("MUL_MAT", f"blk.{layer}.attn_q"), ("SOFT_MAX", f"kq_soft_max-{layer}"),
                         ("MUL_MAT", f"blk.{layer}.ffn_gate_inp")):
            t = rec.now()
            _spin()
            if rec.enabled:
                self.acc.op(t, rec.now() - t, graph, split, "ACC0", op, name, layer, 2048, 4096,
                            n_tokens)
        if rec.enabled:
            end = rec.now()
            self.main.sync(t_sync, end - t_sync, graph, split, "ACC0")
            self.main.split(t_split, rec.now() - t_split, graph, split, "ACC0", 3, 1)

    def _cpu_split(self, graph: int, split: int, layer: int, n_tokens: int) -> None:
        rec = self.recorder
        t_split = rec.now()
        self._copy(graph, split, "ACC0", "CPU", 4096 * n_tokens, f"ffn_norm-{layer}")
        t_dispatch = rec.now()
        for lane in self.workers:
            t_run = rec.now()
            if rec.enabled:
                lane.wakeup(t_dispatch, t_run - t_dispatch, graph, split, "CPU")
            for name in ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps"):
                t = rec.now()
                _spin(500)
                if rec.enabled:
                    lane.op(t, rec.now() - t, graph, split, "CPU", "MUL_MAT_ID",
                            f"blk.{layer}.{name}", layer, 65536, 131072, n_tokens)
        if rec.enabled:
            self.main.split(t_split, rec.now() - t_split, graph, split, "CPU", 3, 1)


def make_fake_engine(model_path: str, **kwargs) -> FakeEngine:
    return FakeEngine(model_path, **kwargs)
