"""Op offload: a big batch's matmul on a weight in host memory runs on the accelerator.

llama.cpp's scheduler (ggml/src/ggml-backend.cpp, `ggml_backend_sched_backend_id_from_cur`,
cause `1.off`) moves an op whose weight sits in a host buffer to a higher-priority backend
whose `offload_op` says yes; CUDA says yes when the op's batch (MUL_MAT: its tokens `ne[1]`;
MUL_MAT_ID: its tokens `ne[2]`) is at least the offload minimum (`GGML_OP_OFFLOAD_MIN_BATCH`,
default 32). Each such op then starts a split of its own, and `ggml_backend_sched_compute_splits`
synchronises, reads the batch's expert ids back, and uploads only the rows of the experts used
(in runs of consecutive experts) before the device computes. So with `-ot exps=CPU` a prompt's
experts cross the bus (PCIe) instead of running on the CPU, and a token's do not.

ik_llama.cpp (ggml-cuda.cu, `ggml_backend_cuda_offload_op`) weighs the experts a batch spreads
over: a MUL_MAT_ID is offloaded only when batch >= min and batch x n_expert_used >= min x
n_expert, i.e. when each expert sees `min` tokens on average (its per-byte tuning,
`offload_batch_size_per_byte`, is not modelled).

This module holds the rule (`OpOffload.wants`, which hybrid/sched.py asks in its first pass),
the ids -> uploaded experts step (`used_experts`, `expert_runs`), and the one helper every
device backend uses to stage a host weight in its memory (`staged`, `stored_parts`).
`-ncmoe N` (llama.cpp's --n-cpu-moe) is a placement rule, `hybrid.placement.n_cpu_moe_rule`.
"""

from __future__ import annotations

import os
from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from hybrid.placement import is_expert_tensor
from hybrid.weights import GateUpExperts, Weight
from profiler.errors import UserError

POLICIES = ("llama.cpp", "ik")
DEFAULT_MIN_BATCH = 32              # GGML_OP_OFFLOAD_MIN_BATCH's default, and ik's GGML_CUDA_MIN_BATCH_OFFLOAD
MIN_BATCH_ENV = "GGML_OP_OFFLOAD_MIN_BATCH"
EXPERT_OPS = frozenset({"MUL_MAT_ID", "MOE_FUSED_UP_GATE"})
OFFLOADED_OPS = EXPERT_OPS | {"MUL_MAT"}


def min_batch_from_env(environ=os.environ) -> int:
    """The offload minimum as llama.cpp reads it: GGML_OP_OFFLOAD_MIN_BATCH, else 32."""
    text = environ.get(MIN_BATCH_ENV, "").strip()
    if not text:
        return DEFAULT_MIN_BATCH
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{MIN_BATCH_ENV}={text!r}: expected a whole number of tokens") from None
    if value < 1:
        raise UserError(f"{MIN_BATCH_ENV}={value}: the minimum batch must be >= 1")
    return value


@dataclass(frozen=True)
class OpOffload:
    """When an op on a host weight goes to the accelerator `accel` (None: never, -nopo 1).

    `weights`: the buffers that are weights (a KV cache on the host is not offloaded: in ggml its
    buffer is not a weight buffer); `n_expert` / `n_expert_used`: the model's, for ik's rule."""
    accel: str | None
    min_batch: int = DEFAULT_MIN_BATCH
    policy: str = "llama.cpp"
    n_expert: int = 0
    n_expert_used: int = 0
    weights: frozenset[str] = frozenset()

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UserError(f"--op-offload {self.policy}: expected one of {', '.join(POLICIES)}")
        if self.min_batch < 1:
            raise UserError(f"--op-offload-min-batch {self.min_batch}: the minimum batch must be >= 1")

    def wants(self, op: str, buffer: str | None, n_tokens: int) -> bool:
        """Whether an op reading host buffer `buffer` on a batch of n_tokens moves to `accel`."""
        if self.accel is None or op not in OFFLOADED_OPS or buffer not in self.weights:
            return False
        if n_tokens < self.min_batch:
            return False
        if self.policy == "ik" and op in EXPERT_OPS:
            return n_tokens * self.n_expert_used >= self.min_batch * self.n_expert
        return True


def used_experts(ids: torch.Tensor) -> list[int]:
    """The distinct experts of a batch's ids [T, U], ascending (read back to the host)."""
    return torch.unique(ids.cpu()).tolist()


def expert_runs(experts: list[int]) -> list[tuple[int, int]]:
    """Ascending expert ids as [first, last + 1) runs of consecutive ids: each run is one copy,
    as `ggml_backend_sched_compute_splits` groups them."""
    runs: list[tuple[int, int]] = []
    for e in experts:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def stored_parts(host_buffer: Any) -> tuple[str, ...]:
    """The stored tensors an offloaded op's buffer is made of: the fused gate+up pair's two, else
    itself; each is uploaded (and recorded) as its own copy."""
    if isinstance(host_buffer, GateUpExperts):
        return host_buffer.gate.name, host_buffer.up.name
    return (host_buffer.name,)


def staged(host_buffer: Any, stage: Callable[[str], Any]) -> Any:
    """A device's form of an offloaded op's buffer, from `stage(stored name)` for each part: what
    the op binds to when the device compiles its split, filled by each upload."""
    if isinstance(host_buffer, GateUpExperts):
        return GateUpExperts(host_buffer.name, stage(host_buffer.gate.name), stage(host_buffer.up.name))
    return stage(host_buffer.name)


def split_buffers(split, buffers: Mapping[str, Any], host: Callable[[str], Any],
                  stage: Callable[[str], Any]) -> Mapping[str, Any]:
    """The buffers a device compiles a split with: its own, and where the split starts with an
    offloaded op, that op's host weight as staged in the device's memory (`staged`)."""
    if split.upload is None:
        return buffers
    return ChainMap({split.upload.buffer: staged(host(split.upload.buffer), stage)}, buffers)


def upload_runs(experts: list[int] | None, n_rows: int) -> list[tuple[int, int]]:
    """What an upload copies: the used experts' runs, or (experts None: a MUL_MAT's weight) all
    of its n_rows rows as one run."""
    return [(0, n_rows)] if experts is None else expert_runs(experts)


def staging_key(w: Weight) -> tuple:
    """Which staging memory a stored tensor is uploaded into: routed-expert tensors of every layer
    share one per role, shape and type (blk.3.ffn_up_exps.weight -> ffn_up_exps.weight; splits run
    one at a time, as ggml reuses its compute buffer, and an expert op derives nothing from its
    buffer that it keeps), other weights keep one each (an op may keep what it derives from its
    buffer: `hybrid.builder._head_weights`, the per-head attention weights, 3-D ones included)."""
    role = w.name.split(".", 2)[2] if is_expert_tensor(w.name) and w.name.startswith("blk.") else w.name
    return role, w.shape, w.ggml_type
