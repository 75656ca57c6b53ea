"""The weight bytes another engine's expert ops read, from the model file its log was produced from.

An ik_llama.cpp IK_PRINT_TIMING log says how long each op took and which node it
computed, never how many bytes it read; the model file says what each weight is
(name, ggml type, shape), so the two together give an imported op the `bytes` our
own engine records, and the report its CPU expert GB/s, bytes per token and
fraction of the peak.

The rule for an op over a `blk.L.ffn_{up,gate,down}_exps` tensor (MUL_MAT_ID, or
ik_llama.cpp's fused MOE_FUSED_UP_GATE, which reads the up and the gate experts):
- one token: its n_expert_used experts, each `tensor bytes / n_expert`;
- a batch of n tokens: the distinct experts its tokens chose, which the log does not
  name, so at most min(n_expert, n × n_expert_used) of them: an upper bound, which the
  event says (`bytes_ub`) and the report marks "≤".
Repacked tensors (`-rtr 1`, `_R4`/`_R8` types) hold the same bytes as stored
(profiler/ggml_types.py), so the file's bytes are what the matmul reads either way.

Public API:

    read_model(path) -> ModelWeights           (UserError: unreadable, not GGUF, no experts)
    ModelWeights: path, size_bytes, arch, n_layer, n_expert, n_expert_used, tensors {name: bytes},
        .expert_bytes(weight, n_tokens) -> (bytes, upper_bound) | None (None: not an expert weight
        of this file), .expert_layers -> sorted layer indices, .header() -> the timings header's
        `source.bytes` entry.
    check_log(model, log, expert_weights, top_layer, all_layers_printed, arch)
        UserError, in one line, when the log cannot come from this model file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from profiler.errors import UserError
from profiler.gguf_file import GGUFFormatError, read_gguf

EXPERT_WEIGHT_RE = re.compile(r"blk\.(\d+)\.ffn_(up|gate|down|up_gate)_exps")
RULE = ("MUL_MAT_ID / MOE_FUSED_UP_GATE on blk.L.ffn_*_exps: n_expert_used experts for a one-token "
        "graph; min(n_expert, n_tokens x n_expert_used) experts for a batch (an upper bound: the log does "
        "not say which experts a batch used); an expert is the tensor's bytes / n_expert, as stored "
        "(a repacked -rtr tensor reads the same bytes)")


@dataclass(frozen=True)
class ModelWeights:
    path: str
    size_bytes: int
    arch: str | None
    n_layer: int | None
    n_expert: int
    n_expert_used: int
    tensors: dict            # name without ".weight" -> bytes as stored

    @property
    def expert_layers(self) -> list[int]:
        return sorted({int(m.group(1)) for name in self.tensors if (m := EXPERT_WEIGHT_RE.fullmatch(name))})

    def expert_bytes(self, weight: str, n_tokens: int) -> tuple[int, bool] | None:
        """(bytes an op over expert tensor `weight` reads for a graph of `n_tokens`, whether that
        is an upper bound), or None when `weight` is no expert tensor of this file. A fused
        `ffn_up_gate_exps` is the file's own such tensor, else its up and gate experts together."""
        m = EXPERT_WEIGHT_RE.fullmatch(weight)
        if m is None:
            return None
        parts = [weight]
        if m.group(2) == "up_gate" and weight not in self.tensors:
            parts = [f"blk.{m.group(1)}.ffn_up_exps", f"blk.{m.group(1)}.ffn_gate_exps"]
        if any(p not in self.tensors for p in parts):
            return None
        per_expert = sum(self.tensors[p] for p in parts) // self.n_expert
        if n_tokens == 1:
            return per_expert * self.n_expert_used, False
        return per_expert * min(self.n_expert, n_tokens * self.n_expert_used), True

    def header(self) -> dict:
        return {"from": "model file", "model": self.path, "size_bytes": self.size_bytes,
                "n_expert": self.n_expert, "n_expert_used": self.n_expert_used, "rule": RULE}


def read_model(path: str | os.PathLike) -> ModelWeights:
    """The tensor table and expert counts of a GGUF MoE model file (no tensor data is read)."""
    path = os.fspath(path)
    try:
        gguf = read_gguf(path)
    except GGUFFormatError as e:
        raise UserError(f"--model {path}: {e}") from None
    except OSError as e:
        raise UserError(f"--model {path}: cannot read ({e.strerror})") from None
    arch = gguf.fields.get("general.architecture")
    counts = {key: gguf.fields.get(f"{arch}.{key}") for key in ("block_count", "expert_count", "expert_used_count")}
    for key in ("expert_count", "expert_used_count"):
        if type(counts[key]) is not int or counts[key] < 1:
            raise UserError(f"--model {path}: {arch}.{key} is {counts[key]!r}, not a count of experts")
    tensors = {t.name.removesuffix(".weight"): t.n_bytes for t in gguf.tensors}
    experts = [t for t in gguf.tensors if EXPERT_WEIGHT_RE.fullmatch(t.name.removesuffix(".weight"))]
    if not experts:
        raise UserError(f"--model {path}: no expert tensors (blk.N.ffn_*_exps): not a MoE model file")
    for t in experts:
        if len(t.dims) != 3 or t.dims[2] != counts["expert_count"]:
            raise UserError(f"--model {path}: tensor {t.name} has dims {t.dims}, not "
                            f"[n_in, n_out, {arch}.expert_count {counts['expert_count']}]")
    if counts["expert_used_count"] > counts["expert_count"]:
        raise UserError(f"--model {path}: {arch}.expert_used_count {counts['expert_used_count']} is more than "
                        f"expert_count {counts['expert_count']}")
    block_count = counts["block_count"] if type(counts["block_count"]) is int else None
    return ModelWeights(path=path, size_bytes=os.path.getsize(path), arch=arch, n_layer=block_count,
                        n_expert=counts["expert_count"], n_expert_used=counts["expert_used_count"], tensors=tensors)


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else (str(layers[0]) if layers else "none")


def check_log(model: ModelWeights, log: str, expert_weights: dict, top_layer: tuple | None,
              all_layers_printed: bool, arch: str | None) -> None:
    """Refuse a log and a model file that do not belong together, before any figure is made of them.

    expert_weights: {expert weight the log's ops read: (line number, line text)}; top_layer: the
    highest layer a node name in the log carries and its line, or None; all_layers_printed: every
    op of every layer printed a line (no CUDA graph hid a split's ops), so the log shows the
    model's layer count; arch: the architecture llama-bench's row names, or None.
    """
    other = f"{model.path} is not the model this log was produced from"
    if arch and model.arch and arch != model.arch:
        raise UserError(f"{log}: llama-bench ran a {arch} model; {other} (a {model.arch})")
    for weight, (line_no, text) in expert_weights.items():
        if model.expert_bytes(weight, 1) is None:
            raise UserError(f"{log}:{line_no}: {text.strip()} reads {weight}, which {model.path} does not have "
                            f"(its experts are in layers {_span(model.expert_layers)}); {other}")
    if top_layer is not None and model.n_layer is not None:
        layer, line_no = top_layer
        if layer >= model.n_layer or (all_layers_printed and layer != model.n_layer - 1):
            raise UserError(f"{log}: the log's layers end at {layer} (line {line_no}), {model.path} has "
                            f"{model.n_layer} layers (0-{model.n_layer - 1}); {other}")
