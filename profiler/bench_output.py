"""`hyprof run`'s result table as llama-bench prints it: markdown, JSON or CSV.

`result_fields` is the one place a result becomes named fields (llama-bench's
names where it has them); the three renderers only lay those out.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Sequence

from profiler.bench import BenchResult

MD_COLUMNS = ("model", "size", "params", "backend", "threads", "ngl", "ot", "test", "t/s")
_RIGHT = {"size", "params", "threads", "ngl", "test", "t/s", "n_ubatch", "n_cpu_moe", "nopo", "offload_mb"}
# Columns shown before `test` only when some row's value is not llama-bench's default, as
# llama-bench does: (column, the value of a result, the default).
OPTIONAL_MD_COLUMNS = (
    ("n_ubatch", lambda r: r.config.n_ubatch, 512),
    ("n_cpu_moe", lambda r: r.config.n_cpu_moe, 0),
    ("nopo", lambda r: r.config.no_op_offload, 0),
    ("offload_mb", lambda r: r.config.op_offload_min_batch, None),
)


def result_fields(r: BenchResult) -> dict:
    """Every field of one result row (the JSON object; CSV columns in this order)."""
    return {
        "model_filename": r.model.get("path"),
        "model_type": _model_type(r),
        "model_size": r.model.get("size_bytes"),
        "model_n_params": r.model.get("n_params"),
        "ftype": r.model.get("ftype"),
        "backend": r.backend,
        "accel": r.engine_config.get("accel", r.config.accel),
        "cpu_info": r.machine.get("cpu"),
        "gpu_info": r.machine.get("gpu"),
        "config": r.config_index,
        "n_threads": r.config.threads,
        "n_gpu_layers": r.config.n_gpu_layers,
        "overrides": list(r.config.overrides),
        "mla": r.config.mla,
        "fa": r.config.fa,
        "fmoe": r.config.fmoe,
        "rtr": r.config.rtr,
        "poll": r.config.poll,
        "n_ubatch": r.config.n_ubatch,
        "n_cpu_moe": r.config.n_cpu_moe,
        "no_op_offload": r.config.no_op_offload,
        "op_offload_min_batch": r.engine_config.get("op_offload_min_batch", r.config.op_offload_min_batch),
        "op_offload": r.config.op_offload,
        "test": r.test.name,
        "kind": r.test.kind,
        "n_prompt": r.test.n_prompt,
        "n_gen": r.test.n_gen,
        "n_depth": r.test.depth,
        "reps": len(r.samples_ns),
        "avg_ns": round(r.avg_ns),
        "stddev_ns": round(r.stddev_ns),
        "avg_ts": r.avg_ts,
        "stddev_ts": r.stddev_ts,
        "samples_ns": list(r.samples_ns),
        "samples_ts": list(r.samples_ts),
    }


def render_markdown(results: Sequence[BenchResult]) -> str:
    extra = [(name, value) for name, value, default in OPTIONAL_MD_COLUMNS
             if any(value(r) != default for r in results)]
    columns = MD_COLUMNS[:-2] + tuple(name for name, _ in extra) + MD_COLUMNS[-2:]
    rows = [[_model_type(r), _size(r.model.get("size_bytes") or 0),
             _params(r.model.get("n_params") or 0), r.backend, str(r.config.threads),
             str(r.config.n_gpu_layers), _ot(r.config.overrides)]
            + [str(value(r)) for _, value in extra]
            + [r.test.name, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"] for r in results]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if name in _RIGHT else c.ljust(w)
                                 for c, w, name in zip(cells, widths, columns)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if name in _RIGHT else "-")
                             for w, name in zip(widths, columns)) + " |"
    return "\n".join([line(columns), rule] + [line(row) for row in rows]) + "\n"


def render_json(results: Sequence[BenchResult]) -> str:
    return json.dumps([result_fields(r) for r in results], indent=2) + "\n"


def render_csv(results: Sequence[BenchResult]) -> str:
    out = io.StringIO()
    rows = [result_fields(r) for r in results]
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in row.items()})
    return out.getvalue()


RENDERERS = {"md": render_markdown, "json": render_json, "csv": render_csv}


def _model_type(r: BenchResult) -> str:
    """llama-bench's model column: architecture, parameter count, file type."""
    return f"{r.model.get('arch', '?')} {_params(r.model.get('n_params') or 0, short=True)} " \
           f"{r.model.get('ftype', '?')}"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def _params(n: int, short: bool = False) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{0 if short else 2}f}{'' if short else ' '}{unit}"
    return str(n)


def _ot(overrides: Sequence[str]) -> str:
    """The override rules of one set as given to -ot (`;` between rules); `|` escaped
    so that a regex alternation does not split the markdown cell."""
    return ";".join(overrides).replace("|", "\\|") or "-"
