"""The hybrid engine: a model placed across backends, evaluated split by split.

`Engine` ties the parts together: it loads a GGUF model (hybrid/gguf_model.py),
places each tensor on a backend (`-ngl`, `-ot`, `--accel`; hybrid/placement.py) and
each derived buffer (KV caches, fused experts) where its parent tensor is, gives
each backend its buffers (a device its own copy of the weights it holds and the KV
caches it allocates), builds the graph of each evaluation
(hybrid/model.py, hybrid/models/), cuts it into splits and runs them (hybrid/sched.py) on the CPU
worker pool and the accelerator (hybrid/backends/). It implements the runner's
`BenchEngine` (profiler/bench.py), so `hyprof run` and `hyprof generate` drive it.

Each evaluation is one `graph` event holding its phases (`graph_build`: the model
graph and its splits; `set_inputs`; `sample`) and the scheduler's events.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import torch

from hybrid import ops
from hybrid.backends.acc import AccBackend
from hybrid.backends.cpu import CpuBackend
from hybrid.gguf_model import load_model
from hybrid.graph import Graph
from hybrid.model import Model
from hybrid.placement import (CPU, available_backends, backend_loads, buffer_backends, parse_override_rules,
                              place)
from hybrid.sched import Scheduler, SplitPlan, split_graph
from hybrid.weights import Weight, for_gpu
from profiler.errors import UserError
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE

MAX_GRAPHS = 8      # reusable graphs kept, one per batch size (pp, tg, depth prompts)


def copy_buffer(buf: Any, move: Callable[[torch.Tensor], torch.Tensor],
                memo: dict[int, Any]) -> Any:
    """A copy of a weight (or cache) object with every tensor in it passed through
    `move`; objects met before (the gate and up experts a fused buffer refers
    to) are copied once, through `memo`."""
    key = id(buf)
    if key in memo:
        return memo[key]
    if isinstance(buf, torch.Tensor):
        out = move(buf)
    elif isinstance(buf, tuple):
        out = tuple(copy_buffer(b, move, memo) for b in buf)
    elif dataclasses.is_dataclass(buf) and not isinstance(buf, type):
        out = dataclasses.replace(buf, **{f.name: copy_buffer(getattr(buf, f.name), move, memo)
                                          for f in dataclasses.fields(buf) if f.init})
    else:
        out = buf
    memo[key] = out
    return out


class Engine:
    """A GGUF model placed on CPU + accelerator, evaluated through the scheduler."""

    def __init__(self, model_path: str, *, threads: int = 1, n_gpu_layers: int = 0,
                 overrides: Sequence[str] = (), accel: str = "auto", mla: int = 0,
                 fmoe: int = 0, rtr: int = 0, poll: int = 0, recorder: Recorder | None = None,
                 n_ctx: int | None = None, fa: int = 0):
        if threads < 1:
            raise UserError(f"-t {threads}: the thread count must be >= 1")
        self.recorder = recorder if recorder is not None else Recorder(enabled=False)
        self.lane = self.recorder.lane(MAIN_LANE)
        self.gguf = load_model(model_path)
        backends, self.accel = available_backends(accel)
        rules = parse_override_rules(overrides, backends)
        c = self.gguf.config
        self.placement = place(self.gguf.tensors, rules, n_gpu_layers, c.n_layer, backends,
                               self.accel)
        self.model = Model(self.gguf, n_ctx=n_ctx, mla=bool(mla), fmoe=bool(fmoe), rtr=bool(rtr), fa=bool(fa),
                           on_cpu=lambda name: self.placement.backend.get(name) == CPU)
        self.n_vocab = c.n_vocab
        self.options = dict(threads=threads, n_gpu_layers=n_gpu_layers, overrides=list(overrides),
                            mla=mla, fa=fa, fmoe=fmoe, rtr=rtr, poll=poll)
        self._buffer_backend = buffer_backends(self.placement, self.model.derived_buffers())
        self.backends: dict[str, Any] = {}
        try:
            self.backends[CPU] = CpuBackend(self._buffers_on(CPU, None), threads, poll,
                                            self.recorder)
            for name in sorted(set(self._buffer_backend.values()) - {CPU}):
                self.backends[name] = self._make_device(name)
        except BaseException:
            self.close()
            raise
        self.scheduler = Scheduler(self.backends, self.recorder)
        self._graphs: dict[int, tuple[Graph, SplitPlan]] = {}
        self.last_plan: SplitPlan | None = None
        self._greedy = ops.Greedy()          # the greedy token of eval(), by the logits' address

    # -- placement ------------------------------------------------------------

    def _buffers_on(self, backend: str, device: torch.device | None) -> dict[str, Any]:
        """The buffers a backend holds. The CPU reads the model's (host) weights and caches;
        a device (`device`: where its tensors live) gets its own copy of its weights (a GPU:
        dequantised once, `weights.for_gpu`) and allocates its KV caches there, so the host
        holds no cache of a device's layer."""
        memo: dict[int, Any] = {}
        gpu_memo: dict[str, Any] = {}
        out = {}
        for name, b in self._buffer_backend.items():
            if b != backend:
                continue
            if device is None:
                out[name] = self.model.buffer(name)
            elif name in self.model.cache.layout:
                out[name] = self.model.cache.allocate(name, device)
            elif device.type == "cuda":
                out[name] = for_gpu(self.model.weights[name], self._stored, device, gpu_memo)
            else:   # a copy even on the CPU: the emulated device has memory of its own
                out[name] = copy_buffer(self.model.weights[name], lambda t: t.to(device, copy=True), memo)
        return out

    def _stored(self, name: str) -> Weight:
        return Weight.from_tensor(self.gguf.tensors[name])

    def _make_device(self, name: str):
        if name.startswith("CUDA"):
            from hybrid.backends.cuda import CudaBackend
            device = torch.device("cuda", int(name[4:]))
            return CudaBackend(self._buffers_on(name, device), self.recorder, index=device.index)
        return AccBackend(self._buffers_on(name, torch.device("cpu")), self.recorder, name)

    # -- evaluation ------------------------------------------------------------

    def forward(self, tokens: Sequence[int], test: str = "") -> torch.Tensor:
        """Evaluate `tokens` after the cached ones as one graph; the logits [1, n_vocab]
        of the last token, on the host (a copy: the graph reuses its output's memory)."""
        return self._evaluate(tokens, test, sample=False).clone()

    def eval(self, tokens: Sequence[int], test: str) -> int:
        """BenchEngine: evaluate one batch, return the greedy next token."""
        return self._evaluate(tokens, test, sample=True)

    def _evaluate(self, tokens: Sequence[int], test: str, sample: bool):
        """One `graph` event: build and split the graph, set its inputs, run the
        splits, and (`sample`) pick the greedy token, all inside the interval."""
        rec, lane = self.recorder, self.lane
        model = self.model
        n_past = model.cache.n_past
        if n_past + len(tokens) > model.n_ctx:
            raise UserError(f"{n_past + len(tokens)} tokens exceed the context of {model.n_ctx}")
        graph_id = rec.next_graph()         # unique across the engines of a sweep
        t_graph = rec.now()
        graph, plan = self._graph_for(len(tokens))
        self.last_plan = plan
        graph.n_past = n_past
        t = rec.now()
        model.inputs(graph, list(tokens))          # into the graph's own input memory
        if rec.enabled:
            lane.phase(t_graph, t - t_graph, graph_id, "graph_build")
            lane.phase(t, rec.now() - t, graph_id, "set_inputs")
        result = self.scheduler.compute(graph, plan, None, graph_id)
        model.cache.n_past += len(tokens)
        if sample:
            t = rec.now()
            result = self._greedy(result)
            if rec.enabled:
                lane.phase(t, rec.now() - t, graph_id, "sample")
        if rec.enabled:
            lane.graph(t_graph, rec.now() - t_graph, graph_id, test, len(tokens), n_past)
        return result

    def _graph_for(self, n_tokens: int) -> tuple[Graph, SplitPlan]:
        """The graph of a batch of n_tokens and its split plan, built once and reused (as
        llama.cpp reuses its graph between generated tokens): only n_past changes, and
        building ~130 nodes and their splits again cost ~0.5 ms a token."""
        if n_tokens not in self._graphs:
            if len(self._graphs) >= MAX_GRAPHS:     # the oldest batch size goes
                del self._graphs[next(iter(self._graphs))]
            graph = self.model.graph(n_tokens, keep_output=True)
            self._graphs[n_tokens] = graph, split_graph(graph, self._buffer_backend.__getitem__)
        return self._graphs[n_tokens]

    def reset(self) -> None:
        self.model.reset()

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the timings header says ---------------------------------------------

    @property
    def accel_label(self) -> str:
        if self.accel is None:
            return "none"
        return f"{self.accel} (emulated)" if self.accel.startswith("ACC") else self.accel

    def header(self) -> dict:
        g = self.gguf
        loads = backend_loads({n: t.n_bytes for n, t in g.tensors.items()}, g.config, self.placement)
        placement = {ld.backend: {"bytes": ld.n_bytes, "tensors": ld.n_tensors} for ld in loads}
        gpu = None
        if self.accel is not None and self.accel.startswith("CUDA"):
            gpu = torch.cuda.get_device_name(int(self.accel[4:]))
        return {"model": {"path": str(g.path), "arch": g.config.arch, "size_bytes": g.size_bytes,
                          "n_params": g.n_params, "ftype": g.ftype, "n_expert": g.config.n_expert,
                          "n_expert_used": g.config.n_expert_used},
                "config": {**self.options, "accel": self.accel_label},
                "placement": placement, "machine": {"gpu": gpu}}


def make_engine(model_path: str, *, threads: int, n_gpu_layers: int, overrides: Sequence[str],
                accel: str, mla: int, fa: int, fmoe: int, rtr: int, poll: int,
                recorder: Recorder) -> Engine:
    """The runner's `MakeEngine` (profiler/bench.py); tells placement warnings on stderr."""
    engine = Engine(model_path, threads=threads, n_gpu_layers=n_gpu_layers, overrides=overrides,
                    accel=accel, mla=mla, fa=fa, fmoe=fmoe, rtr=rtr, poll=poll, recorder=recorder)
    for warning in engine.placement.warnings:
        print(f"hyprof: warning: {warning}", file=sys.stderr)
    return engine
