"""Route events: the experts each MoE layer chose in one graph, read once the graph has run.

The TOP_K values of a graph's MoE layers (`Graph.routes`) are copied out after its last split,
one stacked copy per backend that holds them (a GPU's: one read back to the host after the
split's sync, not one per layer, and nothing inside a split, so MUL_MAT_ID on the device stays
free of host syncs), and each layer's ids become one `route` event (DESIGN.md: `layer`,
`n_tokens`, `experts` token-major). The copy is needed anyway: a captured program writes the
next evaluation's choice into the same memory. Its time is a `record` phase, the profiler's own
cost, which the report's recording row shows.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from hybrid.graph import Graph, Node
from profiler.recorder import Lane, Recorder
from profiler.schema import RECORD_PHASE


def record_routes(rec: Recorder, lane: Lane, graph: Graph, graph_id: int,
                  value_of: Callable[[Node], Any]) -> None:
    """One `route` event per MoE layer of the graph just run; `value_of(node)` is a TOP_K's
    value (int64 [T, U], on the backend that ran it)."""
    t = rec.now()
    values = [value_of(node) for node in graph.routes]
    ids = np.empty((len(values), values[0].numel()), dtype=np.int64)          # [layers, T * U]
    for device in {v.device for v in values}:
        rows = [i for i, v in enumerate(values) if v.device == device]
        ids[rows] = torch.stack([values[i] for i in rows]).reshape(len(rows), -1).cpu().numpy()
    ts = rec.now()
    for node, experts in zip(graph.routes, ids):
        lane.route(ts, 0, graph_id, node.layer, graph.n_tokens, experts)
    lane.phase(t, rec.now() - t, graph_id, RECORD_PHASE)
