"""What-if projections: the token rate if a part of the time went away or ran at the hardware's limit.

Public API (stable):

    whatif_tps(n_tokens, categories_ns, cpu_expert_bytes, cpu_peak_GBps, backend_bytes, backend_peak_GBps)
        -> {"no_overhead": t/s, "cpu_expert_at_peak": t/s | None, "bound": t/s | None}

Every argument but the peaks is per test repetition (arrays, one value per repetition; the
dicts map a category or backend to such an array). Each projection gives every repetition
a projected wall time and takes the token rate of those walls by the one definition
(profiler/rate.py, llama-bench's avg_ts), so a projection and the measured `tps` are the
same statistic and agree when nothing is projected away:
- no_overhead: a repetition's compute categories only (cpu_expert_matmul, cpu_other, gpu_compute).
- cpu_expert_at_peak: its CPU expert time replaced by its expert bytes read at the peak bandwidth.
- bound: every backend reads its bytes of the repetition at its peak, one after the other (a
  token's CPU experts wait on the GPU's attention and back); backends without a known peak
  count as free, so this is an upper limit. None where those read more of the repetition's
  bytes than the backends with a peak (an emulated accelerator that op offload gave a prompt's
  experts): a bound on a sliver of the work would bound nothing.
Rates are None where a peak is unknown, or there are no tokens, or a repetition is projected
to no time at all; cpu_expert_at_peak also where CPU experts ran without saying what they read
(an imported log without its model file).
"""

from __future__ import annotations

import numpy as np

from profiler.rate import token_rate
from profiler.schema import CATEGORIES, OVERHEAD_CATEGORIES


def _rate(n_tokens: np.ndarray, projected_ns: np.ndarray) -> float | None:
    if n_tokens.sum() <= 0 or (projected_ns <= 0).any():
        return None
    return token_rate(n_tokens, projected_ns)[0]


def whatif_tps(n_tokens: np.ndarray, categories_ns: dict, cpu_expert_bytes: np.ndarray,
               cpu_peak_GBps: float | None, backend_bytes: dict, backend_peak_GBps: dict) -> dict:
    wall = sum(categories_ns[c] for c in CATEGORIES)
    compute = wall - sum(categories_ns[c] for c in OVERHEAD_CATEGORIES)
    at_peak = None
    expert_ns = categories_ns["cpu_expert_matmul"]
    if cpu_peak_GBps and not ((expert_ns > 0) & (cpu_expert_bytes <= 0)).any():     # bytes / (GB/s) is ns
        at_peak = _rate(n_tokens, wall - expert_ns + cpu_expert_bytes / cpu_peak_GBps)
    zeros = np.zeros(len(n_tokens))
    known = [b for b in backend_bytes if backend_peak_GBps.get(b)]
    bound_ns = sum((backend_bytes[b] / backend_peak_GBps[b] for b in known), zeros)
    known_bytes = sum((backend_bytes[b] for b in known), zeros)
    unknown_bytes = sum((backend_bytes[b] for b in backend_bytes if b not in known), zeros)
    bound = None if (unknown_bytes > known_bytes).any() else _rate(n_tokens, bound_ns)
    return {"no_overhead": _rate(n_tokens, compute), "cpu_expert_at_peak": at_peak, "bound": bound}
