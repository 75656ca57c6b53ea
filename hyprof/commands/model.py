"""`hyprof model make` and `hyprof model info`: write test models, and see what goes where."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from hyprof.offload_flags import add_offload_flags
from profiler.errors import UserError

MAKE_EPILOG = """\
presets:
  tiny                   3 layers (1 dense + 2 MoE), 8 experts (2 used, 1 shared),
                         q-LoRA attention, n_embd 64: a few hundred KB, for tests
  deepseek-v2-lite-mini  DeepSeek-V2-Lite shapes (n_embd 2048, 64 experts x 1408,
                         6 used, 2 shared), 4 layers: ~1.4 GiB at q4_0
  deepseek-v2-lite       all 27 layers, 15.7 B parameters: ~8.8 GiB at q4_0
  qwen3-tiny             2 MoE layers, 8 experts (2 used), GQA 4 heads over 2: for tests
  qwen3-30b-a3b-mini     Qwen3-30B-A3B shapes (n_embd 2048, 128 experts x 768,
                         8 used, GQA 32/4 heads of 128), 4 layers: ~2 GiB at q4_0
  qwen3-30b-a3b          all 48 layers, 30.5 B parameters: ~17 GiB at q4_0
Weights are seeded noise scaled to keep activations finite and logits spread;
norms and the router stay F32, as llama.cpp quantizes. llama.cpp loads the files.

mixes (--type q4_k_m | q5_k_m | q6_k | iq4_xs): per tensor the type llama.cpp's
  llama-quantize picks for that file type (without an importance matrix): the
  output Q6_K; in Q4_K_M and Q5_K_M, attn_v / attn_kv_b and ffn_down of about half
  the layers Q6_K; in IQ4_XS, ffn_down of the first eighth Q5_K; with exactly 8
  experts, attn_v and attn_k Q8_0. Rows that are not whole 256-value blocks fall back
  as llama.cpp's do: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL
  (DeepSeek-V2-Lite's 1408-wide expert rows: its ffn_down_exps). Quantized by
  hyprof's own NumPy quantizers (one pass per block, no error search): deepseek-v2-
  lite-mini at q4_k_m in ~35 s on one core of a Xeon (q4_0: ~20 s).
  `hyprof model info FILE --tensors` shows each tensor's type.

examples:
  hyprof model make --preset tiny -o tiny.gguf
  hyprof model make --preset deepseek-v2-lite --layers 8 --type q8_0 -o lite8.gguf
  hyprof model make --preset deepseek-v2-lite-mini --type q4_k_m -o mini-q4_k_m.gguf
  hyprof model make --preset deepseek-v2-lite-mini --q-lora-rank 1536 -o mini-qlora.gguf
      (V2-Lite shapes with DeepSeek-V2's q-LoRA attention: ik_llama.cpp takes a deepseek2
      file without q-LoRA for V2-Lite only at 26 or 27 layers, so compare with it on this one)
"""

INFO_EPILOG = """\
placement (as llama.cpp):
  token_embd stays on the CPU. -ngl N puts the last N of the n_layer + 1 layers on
  the accelerator, the output layer counting as the last (-ngl 99: everything).
  Each -ot REGEX=BACKEND rule (repeated, or separated by `;` or `,`: both, as there
  is no sweep here, and a piece without '=' belongs to the next rule, so a regex may
  hold either) is tried in order with re.search on the tensor name; the first match
  wins over -ngl. -ncmoe N keeps the routed experts of the first N layers on the
  CPU: one more rule, tried before the -ot ones.

op offload: at a ubatch of -ub tokens (default 512), the CPU's expert matmuls run on
  the accelerator when the batch reaches the minimum (as `hyprof run`: 32, or
  GGML_OP_OFFLOAD_MIN_BATCH, or --op-offload-min-batch; -nopo 1: never), uploading
  the experts the batch uses, at most all of the CPU's expert bytes per ubatch.

examples:
  hyprof model info tiny.gguf -ngl 99 -ot "\\.ffn_.*_exps\\.=CPU"
  hyprof model info tiny.gguf -ngl 99 -ncmoe 2 -ub 16
  hyprof model info tiny.gguf -ngl 2 --accel emulated --tensors
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("model", help="make test models; show a model and its placement",
                              description="Write DeepSeek-shaped GGUF models with random weights, "
                              "and show a model's hyperparameters and where its tensors go.")
    sub = p.add_subparsers(dest="model_command", metavar="make|info")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    mk = sub.add_parser("make", help="write a DeepSeek2 or Qwen3-MoE GGUF with seeded random weights",
                        description="Write a DeepSeek2 or Qwen3-MoE GGUF model with seeded random weights, "
                        "streaming tensor by tensor (the full preset needs ~1 GiB of memory).",
                        epilog=MAKE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mk.add_argument("--preset", required=True, metavar="NAME",
                    help="tiny | deepseek-v2-lite-mini | deepseek-v2-lite | qwen3-tiny | "
                         "qwen3-30b-a3b-mini | qwen3-30b-a3b")
    mk.add_argument("--layers", type=int, metavar="N", help="layer count instead of the preset's")
    mk.add_argument("--type", default="q4_0", metavar="T", dest="qtype",
                    help="q4_0 | q8_0 | f16 | bf16 | f32, or one of llama.cpp's mixes q4_k_m | q5_k_m | q6_k | "
                         "iq4_xs (default: q4_0; see below)")
    mk.add_argument("--q-lora-rank", type=int, metavar="R",
                    help="deepseek2 presets: q-LoRA attention of rank R (attn_q_a/attn_q_b, as DeepSeek-V2/V3: "
                         "1536) instead of the preset's (0: a plain attn_q, as V2-Lite)")
    mk.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    mk.add_argument("-o", "--output", required=True, metavar="FILE.gguf", help="output file")
    mk.add_argument("--force", action="store_true", help="overwrite an existing output file")
    mk.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    mk.set_defaults(func=make)

    info = sub.add_parser("info", help="hyperparameters, type mix and placement of a GGUF model",
                          description="Show a GGUF model (architecture, parameters, size, type mix, "
                          "hyperparameters) and where -ngl / -ot put its tensors: bytes per backend "
                          "and the expert bytes each backend must read per token.",
                          epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("model", metavar="FILE.gguf")
    info.add_argument("-ngl", "--n-gpu-layers", type=int, default=99, metavar="N",
                      help="last N layers (output counting as the last) on the accelerator (default: 99)")
    info.add_argument("-ot", "--override-tensor", action="append", default=[], metavar="REGEX=BACKEND[;...]",
                      help="placement rule overriding -ngl; repeatable, first match wins")
    add_offload_flags(info, "the ubatch the op-offload line is told for (default: 512)")
    info.add_argument("--accel", choices=("auto", "cuda", "emulated", "none"), default=None,
                      help="accelerator -ngl offloads to (default: CUDA0 if present, else ACC0 standing "
                           "in for a GPU, so that -ngl shows what an accelerator would hold)")
    info.add_argument("--tensors", action="store_true", help="also list every tensor with its backend and cause")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=show_info)


def make(args: argparse.Namespace) -> int:
    from hybrid.make_model import make_model
    from profiler.progress import progress_bar

    with progress_bar(0, f"making {args.output}", not args.no_progress, "MiB") as advance:
        config = make_model(args.output, args.preset, args.qtype, n_layers=args.layers, seed=args.seed,
                            overrides=_q_lora_override(args.preset, args.q_lora_rank),
                            force=args.force, progress=lambda done, total: advance(
                                completed=done >> 20, total=max(total >> 20, 1)))
    print(f"wrote {args.output}: {args.preset}, {config.n_layer} layers, {args.qtype.upper()}", file=sys.stderr)
    return 0


def _q_lora_override(preset: str, rank: int | None) -> dict | None:
    from hybrid.make_model import PRESETS
    from profiler.errors import UserError

    if rank is None:
        return None
    if PRESETS.get(preset, {}).get("arch") != "deepseek2":
        raise UserError(f"--q-lora-rank: only the deepseek2 presets have q-LoRA attention, not {preset}")
    if rank < 0:
        raise UserError(f"--q-lora-rank {rank}: must be 0 (none) or a positive rank")
    return {"q_lora_rank": rank}


def show_info(args: argparse.Namespace) -> int:
    from hybrid.gguf_model import load_model
    from hybrid.offload import OpOffload, min_batch_from_env
    from hybrid.placement import available_backends, backend_loads, n_cpu_moe_rule, parse_override_rules, place

    if args.n_cpu_moe < 0:
        raise UserError(f"-ncmoe {args.n_cpu_moe}: the layer count must be >= 0")
    if args.ubatch_size < 1:
        raise UserError(f"-ub {args.ubatch_size}: the ubatch must be >= 1 token")
    model = load_model(args.model)
    backends, accel = available_backends(args.accel or "auto")
    if args.accel is None and accel is None:
        backends, accel = available_backends("emulated")
    rules = parse_override_rules([*n_cpu_moe_rule(args.n_cpu_moe), *args.override_tensor], backends)
    placement = place(model.tensors, rules, args.n_gpu_layers, model.config.n_layer, backends, accel)
    for w in placement.warnings:
        print(f"hyprof: warning: {w}", file=sys.stderr)
    loads = backend_loads({n: t.n_bytes for n, t in model.tensors.items()}, model.config, placement)
    c = model.config
    offload = OpOffload(None if args.no_op_offload else accel, args.op_offload_min_batch or min_batch_from_env(),
                        args.op_offload, c.n_expert, c.n_expert_used,
                        frozenset(n for n, t in model.tensors.items() if len(t.shape) == 3))
    result = info_result(model, placement, loads, args.n_gpu_layers, [str(r) for r in rules], args.tensors)
    cpu_experts = [n for n in placement.names_on("CPU") if n in offload.weights]
    result["op_offload"] = {"n_ubatch": args.ubatch_size, "min_batch": offload.min_batch, "rule": args.op_offload,
                            "to": offload.accel,
                            "experts_offloaded": bool(cpu_experts) and offload.wants("MUL_MAT_ID", cpu_experts[0],
                                                                                     args.ubatch_size),
                            "max_upload_bytes": sum(model.tensors[n].n_bytes for n in cpu_experts)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        render_info(result)
    return 0


def info_result(model, placement, loads, n_gpu_layers: int, overrides: list[str], with_tensors: bool) -> dict:
    """Everything `model info` shows, as plain data (the --json output)."""
    out = {
        "model": {"path": str(model.path), "arch": model.config.arch, "size_bytes": model.size_bytes,
                  "n_params": model.n_params, "ftype": model.ftype,
                  "file_type": _file_type(model.metadata.get("general.file_type")),
                  "tensor_data_bytes": model.tensor_data_bytes, "type_bytes": model.type_bytes(),
                  "n_vocab_tokens": len(model.vocab) if model.vocab else 0},
        "config": dataclasses.asdict(model.config),
        "placement": {"accel": placement.accel, "n_gpu_layers": n_gpu_layers, "overrides": overrides,
                      "backends": {ld.backend: {"tensors": ld.n_tensors, "bytes": ld.n_bytes,
                                                "expert_bytes": ld.expert_bytes,
                                                "expert_bytes_per_token": ld.expert_bytes_per_token,
                                                "bytes_per_token": ld.bytes_per_token} for ld in loads},
                      "warnings": list(placement.warnings)},
    }
    if with_tensors:
        out["tensors"] = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.n_bytes,
                           "backend": placement.backend[t.name], "cause": placement.cause[t.name]}
                          for t in model.tensors.values()]
    return out


def _file_type(value) -> str | None:
    """The header's general.file_type as llama-quantize names it ("Q4_K_M"): which mix the file
    claims to be, beside the type mix it holds."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return None if value is None else f"unknown ({value})"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def render_info(r: dict) -> None:
    """Draw `info_result` as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = r["model"]
    head = Table(title=m["path"], show_header=False, title_justify="left")
    head.add_row("architecture", m["arch"])
    head.add_row("parameters", _count(m["n_params"]))
    head.add_row("file size", f"{_size(m['size_bytes'])}  ({m['size_bytes']:,} bytes)")
    head.add_row("tensor data", f"{_size(m['tensor_data_bytes'])}  ({m['tensor_data_bytes']:,} bytes)")
    head.add_row("type", m["ftype"] + (f"  (file type {m['file_type']})" if m["file_type"] else ""))
    head.add_row("type mix", ", ".join(f"{t} {_size(b)} ({100 * b / m['tensor_data_bytes']:.1f}%)"
                                       for t, b in m["type_bytes"].items()))
    head.add_row("vocabulary", f"{m['n_vocab_tokens']} tokens")
    console.print(head)

    hp = Table(title="hyperparameters", show_header=False, title_justify="left")
    items = list(r["config"].items())
    half = (len(items) + 1) // 2
    for (k1, v1), right in zip(items[:half], items[half:] + [("", "")]):
        hp.add_row(k1, str(v1), right[0], str(right[1]))
    console.print(hp)

    p = r["placement"]
    accel = p["accel"] or "none"
    if accel == "ACC0":
        accel += " (emulated)"
    rules = "; ".join(p["overrides"]) or "none"
    t = Table(title=f"placement: -ngl {p['n_gpu_layers']}, -ot {rules}, accelerator {accel}",
              title_justify="left")
    for col in ("backend", "tensors", "bytes", "share", "expert bytes", "expert bytes/token", "bytes/token"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    total = m["tensor_data_bytes"]
    for name, b in p["backends"].items():
        t.add_row(name, str(b["tensors"]), _size(b["bytes"]), f"{100 * b['bytes'] / total:.1f}%",
                  _size(b["expert_bytes"]), _size(b["expert_bytes_per_token"]), _size(b["bytes_per_token"]))
    sums = [sum(b[k] for b in p["backends"].values())
            for k in ("tensors", "bytes", "expert_bytes", "expert_bytes_per_token", "bytes_per_token")]
    t.add_row("total", str(sums[0]), _size(sums[1]), "100.0%", *map(_size, sums[2:]), style="bold")
    console.print(t)

    o = r["op_offload"]
    if o["experts_offloaded"]:
        console.print(f"op offload at a ubatch of {o['n_ubatch']}: the CPU's expert matmuls run on {o['to']}, "
                      f"uploading the experts each ubatch uses (at most {_size(o['max_upload_bytes'])})")
    elif o["max_upload_bytes"]:
        why = "op offload is off" if o["to"] is None else f"minimum {o['min_batch']}, rule {o['rule']}"
        console.print(f"op offload at a ubatch of {o['n_ubatch']}: the CPU's expert matmuls stay on the CPU ({why})")

    if "tensors" in r:
        tt = Table(title="tensors", title_justify="left")
        for col in ("name", "type", "shape", "bytes", "backend", "cause"):
            tt.add_column(col, justify="right" if col == "bytes" else "left")
        for x in r["tensors"]:
            tt.add_row(x["name"], x["type"], "x".join(map(str, x["shape"])), _size(x["bytes"]),
                       x["backend"], x["cause"])
        console.print(tt)
