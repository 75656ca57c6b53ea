"""One or two lines that say what a run was: model, placement, threads, accelerator, machine.

    describe_run(header, emulated) -> str
    model_name(header) -> str | None

Every plot carries it as a subtitle and `hyprof diff` heads its tables with
it: a figure without the placement and the machine cannot be trusted or compared.
"""

from __future__ import annotations

import os


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def model_name(header: dict) -> str | None:
    """The model as a reader knows it: its file name, else the description the source printed
    (an imported llama-bench row has no path: `deepseek2 16B Q4_0`)."""
    model = header.get("model") or {}
    if model.get("path"):
        return os.path.basename(str(model["path"]))
    return model.get("name") or model.get("desc") or None


def describe_run(header: dict, emulated: bool) -> str:
    """Model, placement, threads and machine: what a reader needs to trust or compare a plot."""
    model, config, machine = header.get("model") or {}, header.get("config") or {}, header.get("machine") or {}
    parts = []
    if model:
        desc = ", ".join(str(x) for x in (model.get("arch"), model.get("ftype")) if x)
        if model.get("n_params"):
            desc += f", {_si(model['n_params'])} params"
        parts.append(f"model {model_name(header) or 'model'} ({desc})")
    placement = []
    if config.get("n_gpu_layers") is not None:
        placement.append(f"-ngl {config['n_gpu_layers']}")
    placement += [f"-ot {rule}" for rule in config.get("overrides") or ()]
    if placement:
        parts.append("placement " + " ".join(placement))
    line2 = []
    if config.get("threads") is not None:
        line2.append(f"{config['threads']} threads")
    accel = str(config.get("accel") or "")
    if accel:
        line2.append(f"accel {accel}" + (" — device times are NOT GPU times" if emulated else ""))
    elif emulated:
        line2.append("accelerator EMULATED — device times are NOT GPU times")
    flags = [f"{k}={config[k]}" for k in ("mla", "fa", "fmoe", "rtr") if config.get(k) is not None]
    if flags:
        line2.append(" ".join(flags))
    if any(machine.get(k) for k in ("cpu", "cores", "mem_bytes", "gpu")):
        desc = [str(machine["cpu"])] if machine.get("cpu") else []
        if machine.get("cores"):
            desc.append(f"{machine['cores']} cores")
        if machine.get("mem_bytes"):
            desc.append(f"{machine['mem_bytes'] / 2**30:.0f} GiB")
        desc.append(f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU")
        line2.append("machine " + ", ".join(desc))
    return "\n".join(" · ".join(p) for p in (parts, line2) if p)
