"""What-if projections: the token rate if a part of the time went away or ran at the hardware's limit.

Public API (stable):

    whatif_tps(n_tokens, categories_ns, cpu_expert_bytes, cpu_peak_GBps, backend_bytes, backend_peak_GBps)
        -> {"no_overhead": t/s, "cpu_expert_at_peak": t/s | None, "bound": t/s | None}

- no_overhead: only the compute categories remain (cpu_expert_matmul, cpu_other, gpu_compute).
- cpu_expert_at_peak: the CPU expert time replaced by its bytes read at the peak bandwidth.
- bound: every backend reads its bytes at its peak, one after the other (a token's
  CPU experts wait on the GPU's attention and back); backends without a known peak
  count as free, so this is an upper limit.
Rates are None where a peak is unknown, or there are no tokens or no time.
"""

from __future__ import annotations

from profiler.schema import CATEGORIES, OVERHEAD_CATEGORIES

NS = 1e9


def _rate(n_tokens: int, seconds: float) -> float | None:
    return n_tokens / seconds if seconds > 0 and n_tokens > 0 else None


def whatif_tps(n_tokens: int, categories_ns: dict, cpu_expert_bytes: int, cpu_peak_GBps: float | None,
               backend_bytes: dict, backend_peak_GBps: dict) -> dict:
    wall = sum(categories_ns[c] for c in CATEGORIES) / NS
    compute = wall - sum(categories_ns[c] for c in OVERHEAD_CATEGORIES) / NS
    at_peak = None
    if cpu_peak_GBps:
        at_peak = _rate(n_tokens, wall - categories_ns["cpu_expert_matmul"] / NS + cpu_expert_bytes / (cpu_peak_GBps * NS))
    bound_s = sum(backend_bytes[b] / (backend_peak_GBps[b] * NS)
                  for b in backend_bytes if backend_peak_GBps.get(b))
    return {"no_overhead": _rate(n_tokens, compute), "cpu_expert_at_peak": at_peak,
            "bound": _rate(n_tokens, bound_s)}
