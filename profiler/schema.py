"""The timings file contract v1 (see DESIGN.md): names shared by writers and readers.

Kept as plain constants so that the engine, the recorder, importers and the
analyzer agree on spelling without importing each other.
"""

SCHEMA = "hyprof-timings/1"
REPORT_SCHEMA = "hyprof-report/1"
ADVICE_SCHEMA = "hyprof-advice/1"

# Event types and the fields each may carry beyond the common ones.
COMMON_FIELDS = ("type", "ts", "dur", "graph", "split", "backend", "tid")
EVENT_FIELDS = {
    "test": ("name", "kind", "n_prompt", "n_gen", "depth", "rep", "n_tokens"),
    "graph": ("test", "n_tokens", "n_past"),
    "phase": ("name",),
    "split": ("n_nodes", "n_inputs"),
    "op": ("op", "name", "layer", "bytes", "flops", "n_tokens"),
    "copy": ("src", "dst", "bytes", "name"),
    "wakeup": (),
    "sync": (),
    "route": ("layer", "n_tokens", "experts"),  # experts: n_tokens * n_expert_used ids, token-major
}
EVENT_TYPES = tuple(EVENT_FIELDS)
# Fields some writers add and readers know, beyond the ones above (optional: v1 readers skip
# unknown fields, so adding them needed no new schema). The numbers are read; the names only
# echo what the source printed, for people and traces.
OPTIONAL_FIELDS = {
    "test": ("config",      # index of the test's flag combination in the header's `sweep`
             "tps",         # t/s as the source engine reported it (llama-bench's mean) ...
             "tps_std"),    # ... and its spread, beside the t/s hyprof measures
    "graph": ("role",       # why an untimed graph ran: "warmup", "depth" (imported logs)
              "incomplete"),  # true: the log ended inside this graph
    "phase": ("label",),    # the source's own name for the phase (e.g. `sched_alloc_graph`)
    "op": ("node",          # the node name the source printed, when `name` is the weight's
           "bytes_ub"),     # 1: `bytes` is an upper bound (an imported batch's experts, which its
                            # log does not name: analysis/model_bytes.py); absent or 0: exact
    "copy": ("kind",),      # "weights": an op-offload upload of a host weight (absent: "act")
}

# A copy's `kind` when it is an op-offload upload of a host weight (absent: activations, "act").
WEIGHTS_COPY = "weights"

# Host phases that count as graph build in the attribution.
GRAPH_BUILD_PHASES = ("graph_build", "set_inputs")
# The phase in which the runner hands a graph's events to the timings writer (between graphs).
RECORD_PHASE = "record"

# Attribution categories, highest priority first (DESIGN.md, "Attribution").
CATEGORIES = (
    "cpu_expert_matmul",
    "cpu_other",
    "gpu_compute",
    "thread_wakeup",
    "copy",
    "sync",
    "sched",
    "graph_build",
    "other",
)
OVERHEAD_CATEGORIES = ("thread_wakeup", "copy", "sync", "sched", "graph_build", "other")

# An op reads an expert tensor when its name contains this (blk.3.ffn_up_exps).
EXPERT_TENSOR_MARK = "_exps"

MAIN_LANE = "main"
