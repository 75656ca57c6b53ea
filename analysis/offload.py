"""Op offload, measured and projected: the weight uploads, and the batch where offloading pays.

Public API (stable; `hyprof advise` builds on it):

    uploads(timings, mask=None) -> {"bytes", "s", "GBps", "count"}
        the `copy` events of kind `weights` (op-offload uploads) among `mask`'s events (default: all).
    offload_rates(timings) -> OffloadRates
        what the file measured that the projection needs (None where it did not).
    offload_seconds(rates, batch) -> (cpu_s, offload_s)
        one graph of `batch` tokens: its CPU-resident experts computed on the CPU, or uploaded and
        computed on the accelerator.
    crossover_batch(rates, max_batch=8192) -> int | None
        the smallest batch from which offloading is faster (None: never up to max_batch, or unknown).

The model, per graph of B tokens over the experts the placement keeps on the CPU (W bytes in all,
E experts of which U are used per token, f expert flops per token):
    used(B)    = W x (1 - (1 - U/E)^B)            the expected bytes of the experts B tokens use,
                                                  routing taken as uniform (a skewed router uses fewer)
    cpu(B)     = max(used(B) / BW_cpu, B f / F_cpu)
    offload(B) = used(B) / BW_upload + B f / F_acc
with BW_cpu the CPU's expert-matmul bandwidth measured at one token (tg, memory bound), F_cpu its
expert flop rate measured at batches > 1 (pp, compute bound), BW_upload the uploads' measured
GB/s, F_acc the accelerator's expert flop rate at batches > 1 (taken as free when not measured: the
crossover is then a lower bound). Each rate is measured in the file when a run measured it: a
sweep over `-nopo 0,1` or `--op-offload-min-batch` gives both sides. Offloading costs a batch-size-
free upload (all experts once B is large) against CPU time that grows with B, so the two cross once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.attribution import is_cpu_backend
from analysis.intervals import merge
from analysis.timings import Timings
from profiler.schema import EXPERT_TENSOR_MARK, WEIGHTS_COPY


@dataclass(frozen=True)
class OffloadRates:
    upload_GBps: float | None           # measured upload bytes / upload time (B/ns = GB/s)
    cpu_expert_GBps: float | None       # CPU expert matmuls at 1 token: bytes / busy time
    cpu_expert_GFLOPs: float | None     # CPU expert matmuls at > 1 token: flops / busy time (GFLOP/s)
    acc_expert_GFLOPs: float | None     # accelerator expert matmuls at > 1 token
    expert_flops_per_token: float | None
    cpu_expert_bytes: int | None        # routed-expert bytes the placement keeps on the CPU
    n_expert: int | None
    n_expert_used: int | None


def _is_upload(t: Timings) -> np.ndarray:
    weights = t.id(WEIGHTS_COPY)
    return t.of_type("copy") & (t.events["kind"] == weights) & (weights >= 0)


def uploads(t: Timings, mask: np.ndarray | None = None) -> dict:
    ev = t.events
    sel = _is_upload(t) if mask is None else _is_upload(t) & mask
    n_bytes, ns = int(ev["bytes"][sel].sum()), int(ev["dur"][sel].sum())
    return {"bytes": n_bytes, "s": ns / 1e9, "GBps": n_bytes / ns if ns else None, "count": int(sel.sum())}


def _rate(t: Timings, sel: np.ndarray, column: str) -> float | None:
    """Σ column / the union of the selected events' time (per ns: GB/s for bytes, GFLOP/s for flops)."""
    ev = t.events
    start, end = merge(ev["ts"][sel], ev["ts"][sel] + ev["dur"][sel])
    busy = int((end - start).sum())
    total = float(ev[column][sel].sum())
    return total / busy if busy and total else None


def offload_rates(t: Timings) -> OffloadRates:
    ev = t.events
    experts = t.of_type("op") & np.isin(ev["name"], t.ids(lambda s: EXPERT_TENSOR_MARK in s))
    on_cpu = is_cpu_backend(t, ev["backend"], ev["tid"])
    batched = ev["n_tokens"] > 1
    # the layers whose experts the CPU holds: computed there, or uploaded from there (blk.N.*)
    uploaded = {int(t.sym(int(i)).split(".")[1]) for i in np.unique(ev["name"][_is_upload(t)])
                if t.sym(int(i)).startswith("blk.")}
    resident = experts & np.isin(ev["layer"], sorted(uploaded | set(ev["layer"][experts & on_cpu].tolist())))
    graphs = np.unique(ev["graph"][resident])
    is_graph = t.of_type("graph") & np.isin(ev["graph"], graphs)
    n_tokens = int(ev["n_tokens"][is_graph].sum())
    model = t.header.get("model") or {}
    placement = (t.header.get("placement") or {}).get("CPU") or {}
    return OffloadRates(
        upload_GBps=uploads(t)["GBps"],
        cpu_expert_GBps=_rate(t, experts & on_cpu & ~batched, "bytes"),
        cpu_expert_GFLOPs=_rate(t, experts & on_cpu & batched, "flops"),
        acc_expert_GFLOPs=_rate(t, experts & ~on_cpu & batched, "flops"),
        expert_flops_per_token=float(ev["flops"][resident].sum()) / n_tokens if n_tokens else None,
        cpu_expert_bytes=placement.get("expert_bytes"),
        n_expert=model.get("n_expert"), n_expert_used=model.get("n_expert_used"))


def used_expert_bytes(r: OffloadRates, batch: int) -> float:
    """The expected bytes of the CPU's experts a batch uses (uniform routing)."""
    return r.cpu_expert_bytes * (1.0 - (1.0 - r.n_expert_used / r.n_expert) ** batch)


def offload_seconds(r: OffloadRates, batch: int) -> tuple[float, float] | None:
    """(CPU s, offload s) for one graph of `batch` tokens; None where the file lacks a rate it needs."""
    if not (r.upload_GBps and r.cpu_expert_bytes and r.n_expert and r.n_expert_used and r.expert_flops_per_token
            and (r.cpu_expert_GBps or r.cpu_expert_GFLOPs)):
        return None
    used = used_expert_bytes(r, batch)
    flops = batch * r.expert_flops_per_token
    cpu_ns = max(used / r.cpu_expert_GBps if r.cpu_expert_GBps else 0.0,
                 flops / r.cpu_expert_GFLOPs if r.cpu_expert_GFLOPs else 0.0)
    offload_ns = used / r.upload_GBps + (flops / r.acc_expert_GFLOPs if r.acc_expert_GFLOPs else 0.0)
    return cpu_ns / 1e9, offload_ns / 1e9


def crossover_batch(r: OffloadRates, max_batch: int = 8192) -> int | None:
    if offload_seconds(r, 1) is None:
        return None
    for batch in range(1, max_batch + 1):
        cpu_s, offload_s = offload_seconds(r, batch)
        if offload_s < cpu_s:
            return batch
    return None


def offload_whatif(r: OffloadRates, batch: int) -> dict:
    """The report's `offload` entry for a test whose graphs hold `batch` tokens."""
    seconds = offload_seconds(r, batch)
    return {"batch": batch,
            "cpu_s": None if seconds is None else seconds[0],
            "offload_s": None if seconds is None else seconds[1],
            "faster": None if seconds is None else ("offload" if seconds[1] < seconds[0] else "cpu"),
            "crossover_batch": crossover_batch(r),
            "rates": {"upload_GBps": r.upload_GBps, "cpu_expert_GBps": r.cpu_expert_GBps,
                      "cpu_expert_GFLOPs": r.cpu_expert_GFLOPs, "acc_expert_GFLOPs": r.acc_expert_GFLOPs}}
