"""Expert routing: which experts each token used, how concentrated their traffic is, and what
keeping the hot ones on the GPU would save (DESIGN.md, report key `experts`).

Public API (stable):

    expert_usage(timings, test_of_route, test_of_event, n_tests) -> [ExpertUsage | None]
        per test, from the `route` events inside its repetitions (None: it has none, as an
        ik_llama.cpp log, which carries no routing); its `whatif` still empty.
    with_whatif(usage, rates) -> the usage with its `whatif` for the test's `Rates`
    layer_counts(layers, ids, n_expert) -> (MoE layers, counts [layer, expert])
    distinct_in_order(ids) -> the experts of one route once each, in order of first use
    top_coverage(reads, ks) -> [layer, k]: share of a layer's reads its k most-read experts carry
    lru_stack_distances(accesses) -> per access, its LRU stack distance (-1: first use)
    lru_hit_rates(distances, sizes) -> share of accesses a cache of each size would hit
    ExpertUsage (frozen): n_expert, n_expert_used, n_graphs, n_tokens, layers, counts, reads, ks,
        coverage, lru_hit, cpu_bytes_per_read, whatif; .overall(shares), .to_json()

Why reads, not counts: a MUL_MAT_ID reads an expert's weights once per graph however many of
the graph's tokens chose it, so an expert's traffic (bytes) is the graphs that used it times
its size (`reads`). In generation (one token a graph) reads are the counts. Pinning the k
hottest experts of every layer on the GPU moves the share `top_coverage` of each layer's
reads off the CPU (chosen from the same run that scores it: the ceiling of a static list
tuned on this workload); an LRU cache of C experts per layer, replayed over the test's recorded
graphs (its repetitions one after another) from a cold start, moves the share it hits. The
replay computes LRU stack distances (Mattson et al., 1970: an access hits a cache of C iff fewer
than C other experts were used since its expert last was), so every size comes from one pass.

The what-if per token: bytes moved off the CPU = each layer's share times the CPU expert bytes
it read (the bytes of its expert ops that ran on the CPU: a layer whose experts are on the GPU,
or a batch whose experts were offloaded, moves nothing, and its experts cost no VRAM here); the projected t/s takes their time at the measured CPU expert bandwidth away and adds
them at the accelerator's measured bandwidth (none in the run: no projection). LRU misses are
uploads (`upload_bytes_per_token`), assumed hidden behind compute; VRAM is the experts' size
as stored (a GPU engine that dequantises them holds more).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from analysis.attribution import is_cpu_backend
from analysis.timings import Timings
from profiler.errors import UserError
from profiler.schema import EXPERT_TENSOR_MARK

MAX_EXPERTS = 1 << 16       # far beyond any model's (DeepSeek-V3: 256); the heatmap and tables are per expert


@dataclass(frozen=True)
class Rates:
    """What a test's projection reads: its mean ns per token, the CPU expert ops' bandwidth, the
    accelerator's (GB/s; None where the run has none)."""
    ns_per_token: float
    cpu_expert_GBps: float | None
    gpu_GBps: float | None


@dataclass(frozen=True)
class ExpertUsage:
    n_expert: int
    n_expert_used: int
    n_graphs: int                   # graphs (evaluations) whose routes were recorded
    n_tokens: int
    layers: tuple                   # the MoE layers, in order
    counts: np.ndarray              # [layer, expert]: tokens that chose the expert
    reads: np.ndarray               # [layer, expert]: graphs that used it (its weights read once each)
    ks: tuple                       # the cache / pin sizes reported
    coverage: np.ndarray            # [layer, k in 1..n_expert]: share of reads the k most-read carry
    lru_hit: np.ndarray             # [layer, C in 1..n_expert]: share of reads an LRU of C would hit
    cpu_bytes_per_read: np.ndarray  # [layer]: CPU bytes one expert read costs (0: its experts are not on the CPU)
    whatif: dict                    # {"top": {k: {...}}, "lru": {C: {...}}} per token

    def overall(self, shares: np.ndarray) -> np.ndarray:
        """[size] the share of all CPU expert bytes, from per-layer shares [layer, size] (the layers
        weighed by the bytes their experts read on the CPU; by their reads where none did)."""
        weight = self.reads.sum(axis=1) * (self.cpu_bytes_per_read if self.cpu_bytes_per_read.any() else 1)
        return weight @ shares / weight.sum() if weight.sum() else np.zeros(shares.shape[1])

    def to_json(self) -> dict:
        def per_size(shares: np.ndarray) -> dict:
            overall = self.overall(shares)
            return {str(k): {"overall": float(overall[k - 1]),
                             "layers": {str(layer): float(shares[i, k - 1]) for i, layer in enumerate(self.layers)}}
                    for k in self.ks}
        return {"n_expert": self.n_expert, "n_expert_used": self.n_expert_used, "n_graphs": self.n_graphs,
                "n_tokens": self.n_tokens,
                "counts": {str(layer): self.counts[i].tolist() for i, layer in enumerate(self.layers)},
                "top_coverage": per_size(self.coverage), "lru_hit_rate": per_size(self.lru_hit),
                "whatif": {kind: {str(k): v for k, v in rows.items()} for kind, rows in self.whatif.items()}}


def cache_sizes(n_expert: int, n_expert_used: int) -> tuple:
    """The few sizes the report shows: a token's worth of experts, two, a quarter and half of them."""
    return tuple(sorted({k for k in (n_expert_used, 2 * n_expert_used, n_expert // 4, n_expert // 2)
                         if 1 <= k <= n_expert}))


def layer_counts(layers: np.ndarray, ids: np.ndarray, n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct layers, counts [layer, expert]) of ids whose layer is `layers` (one per id)."""
    moe, row = np.unique(layers, return_inverse=True)
    counts = np.bincount(row * n_expert + ids, minlength=len(moe) * n_expert).reshape(len(moe), n_expert)
    return moe, counts


def distinct_in_order(ids: np.ndarray) -> np.ndarray:
    """A route's experts once each, in the order the graph's tokens first chose them."""
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def top_coverage(reads: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """[layer, k]: the share of each layer's reads that its k most-read experts carry."""
    ranked = np.cumsum(-np.sort(-reads, axis=1), axis=1)
    total = np.maximum(ranked[:, -1:], 1)
    return ranked[:, np.asarray(ks) - 1] / total


def lru_stack_distances(accesses) -> np.ndarray:
    """Each access's LRU stack distance: how many other experts were used since its expert last was
    (-1: its first use, a miss at every size). An LRU cache of C holds it iff the distance < C."""
    stack: list = []            # most recent first
    out = np.empty(len(accesses), dtype=np.int64)
    for i, e in enumerate(accesses):
        try:
            d = stack.index(e)
            del stack[d]
        except ValueError:
            d = -1
        stack.insert(0, e)
        out[i] = d
    return out


def lru_hit_rates(distances: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The share of accesses an LRU cache of each size hits."""
    if not len(distances):
        return np.zeros(len(sizes))
    hits = np.bincount(distances[distances >= 0], minlength=int(max(sizes)))
    return np.cumsum(hits)[np.asarray(sizes) - 1] / len(distances)


def expert_usage(t: Timings, test_of_route: np.ndarray, test_of_event: np.ndarray, n_tests: int) -> list:
    if not (test_of_route >= 0).any():
        return [None] * n_tests
    model = t.header.get("model") or {}
    n_expert, n_used = model.get("n_expert"), model.get("n_expert_used")
    if n_expert is None or n_used is None:
        raise UserError(f"{t.source}: route events, but the header's model lacks n_expert / n_expert_used")
    if not (type(n_expert) is int and type(n_used) is int and 1 <= n_used <= n_expert <= MAX_EXPERTS):
        raise UserError(f"{t.source}: the header's model.n_expert {n_expert!r} and n_expert_used {n_used!r} must be "
                        f"whole numbers, 1 <= n_expert_used <= n_expert <= {MAX_EXPERTS}")
    wrong = np.flatnonzero(t.routes["n_ids"] != t.routes["n_tokens"].astype(np.int64) * n_used)
    if wrong.size:
        r = t.routes[wrong[0]]
        raise UserError(f"{t.source}: a route event of graph {r['graph']}, layer {r['layer']} has {r['n_ids']} ids, "
                        f"not n_tokens {r['n_tokens']} x the header's model.n_expert_used {n_used}")
    if int(t.route_ids.max()) >= n_expert:
        raise UserError(f"{t.source}: a route event names expert {int(t.route_ids.max())}, "
                        f"but the header's model.n_expert is {n_expert}")
    cpu_bytes = _cpu_expert_bytes(t, test_of_event, n_tests)
    return [_test_usage(t, np.flatnonzero(test_of_route == i), int(n_expert), int(n_used), cpu_bytes[i])
            if (test_of_route == i).any() else None for i in range(n_tests)]


def _cpu_expert_bytes(t: Timings, test_of_event: np.ndarray, n_tests: int) -> np.ndarray:
    """[test, layer]: the bytes each test's expert ops on the CPU read per layer (the report's
    `cpu_expert_matmul` bytes, by layer)."""
    ev = t.events
    mine = (t.of_type("op") & np.isin(ev["name"], t.ids(lambda s: EXPERT_TENSOR_MARK in s))
            & is_cpu_backend(t, ev["backend"], ev["tid"]) & (test_of_event >= 0) & (ev["layer"] >= 0))
    n_layers = int(ev["layer"][mine].max()) + 1 if mine.any() else 1
    return np.bincount(test_of_event[mine] * n_layers + ev["layer"][mine], weights=ev["bytes"][mine].astype(float),
                       minlength=n_tests * n_layers).reshape(n_tests, n_layers)


def _test_usage(t: Timings, rows: np.ndarray, n_expert: int, n_used: int, cpu_bytes: np.ndarray) -> ExpertUsage:
    routes = t.routes[rows]                         # in time order: the sequence the cache replays
    per_route = [t.route_ids[a:a + n] for a, n in zip(routes["first"].tolist(), routes["n_ids"].tolist())]
    layers, counts = layer_counts(np.repeat(routes["layer"], routes["n_ids"]), np.concatenate(per_route), n_expert)
    sizes = np.arange(1, n_expert + 1)
    reads = np.zeros_like(counts)
    lru_hit = np.zeros((len(layers), n_expert))
    single = (routes["n_tokens"] == 1).tolist()     # a token's own top-k ids are distinct already
    for i, layer in enumerate(layers):
        used = [per_route[j] if single[j] else distinct_in_order(per_route[j])
                for j in np.flatnonzero(routes["layer"] == layer).tolist()]
        accesses = np.concatenate(used)
        reads[i] = np.bincount(accesses, minlength=n_expert)
        lru_hit[i] = lru_hit_rates(lru_stack_distances(accesses.tolist()), sizes)
    on_cpu = np.array([cpu_bytes[layer] if layer < len(cpu_bytes) else 0 for layer in layers])
    cpu_bytes_per_read = on_cpu / np.maximum(reads.sum(axis=1), 1)
    n_tokens = int(routes["n_tokens"][routes["layer"] == layers[0]].sum())
    return ExpertUsage(n_expert=n_expert, n_expert_used=n_used, n_graphs=int((routes["layer"] == layers[0]).sum()),
                        n_tokens=n_tokens, layers=tuple(int(x) for x in layers), counts=counts, reads=reads,
                        ks=cache_sizes(n_expert, n_used), coverage=top_coverage(reads, sizes), lru_hit=lru_hit,
                       cpu_bytes_per_read=cpu_bytes_per_read, whatif={})


def with_whatif(u: ExpertUsage, rates: Rates) -> ExpertUsage:
    return replace(u, whatif={"top": {k: _whatif(u, u.coverage[:, k - 1], k, rates, False) for k in u.ks},
                              "lru": {c: _whatif(u, u.lru_hit[:, c - 1], c, rates, True) for c in u.ks}})


def _whatif(u: ExpertUsage, share: np.ndarray, k: int, r: Rates, cached: bool) -> dict:
    """Per token: the CPU expert bytes that `share` of each layer's reads moves to the GPU, the t/s
    projected from the measured bandwidths, the VRAM of k experts per layer, and (`cached`, an LRU)
    the bytes its misses upload."""
    layer_bytes = u.cpu_bytes_per_read * u.reads.sum(axis=1)            # [layer] CPU expert bytes read
    moved = float(share @ layer_bytes) / u.n_tokens
    tps = None
    if r.cpu_expert_GBps and r.gpu_GBps:
        ns = r.ns_per_token - moved / r.cpu_expert_GBps + moved / r.gpu_GBps
        tps = 1e9 / ns if ns > 0 else None
    return {"cpu_bytes_moved_per_token": moved,
            "upload_bytes_per_token": float((1 - share) @ layer_bytes) / u.n_tokens if cached else 0.0,
            "vram_bytes": int(k * u.cpu_bytes_per_read[u.cpu_bytes_per_read > 0].sum()),
            "tps": tps}
