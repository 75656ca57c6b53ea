"""Which backend holds each weight: llama.cpp's `-ngl N` and `-ot REGEX=BACKEND`, in one function.

The rule (`place`), as llama.cpp's loader has it (src/llama-model.cpp, load_tensors):
- the input layer (`token_embd`) stays on the CPU: offloading it gains little;
- `-ngl N` offloads the last N of the n_layer + 1 "layers", where the output layer
  (`output_norm`, `output`) counts as the last one: `-ngl 1` offloads only the output,
  `-ngl n_layer + 1` (or 99, or -1) offloads everything;
- each `-ot REGEX=BACKEND` rule is tried in order with `re.search` on the tensor name,
  and the first match wins over everything above.
The `-ot` text is read here too, for every command: `split_override_sets` is its grammar,
`override_sets` `run`'s sweep of sets, `parse_override_rules` one set of compiled rules.
`-ncmoe N` (llama.cpp's --n-cpu-moe) is one more such rule, made by `n_cpu_moe_rule` and
tried before the -ot rules, as llama-bench puts it first.
Every tensor gets its backend and the cause, so `model info` can say why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from hybrid.config import ModelConfig
from profiler.errors import UserError

CPU = "CPU"
EMULATED = "ACC0"


@dataclass(frozen=True)
class OverrideRule:
    """One `-ot` rule: tensors whose name `re.search`es `pattern` go to `backend`."""
    pattern: str
    backend: str
    regex: re.Pattern

    def __str__(self) -> str:
        return f"{self.pattern}={self.backend}"


@dataclass(frozen=True)
class Placement:
    backend: dict[str, str]         # tensor name -> backend, in the order the names came
    cause: dict[str, str]           # tensor name -> why: "-ot rule 1", "-ngl", "below -ngl", "input layer", ...
    accel: str | None               # the accelerator -ngl offloads to (None: CPU only)
    warnings: tuple[str, ...]       # e.g. a rule that matches nothing; the CLI prints them

    def names_on(self, backend: str) -> list[str]:
        return [n for n, b in self.backend.items() if b == backend]


# The `-ot` grammar, one for every command. A value is a list of REGEX=BACKEND rules separated
# by `;` or `,`. A piece without '=' is not a rule yet: it is joined, with the separator after
# it, to the next piece, so the regex may hold either separator (`blk\.\d{1,2}\.=CPU`). The
# separator after a whole rule is what it means: in `run`, as llama-bench, `,` ends a set and
# `;` the next rule of the same set; elsewhere both just end a rule. An empty value is an empty set.
_SEPARATORS = re.compile(r"([,;])")


def split_override_sets(value: str) -> list[list[str]]:
    """One `-ot` value -> its `,`-separated sets, each a list of rule texts (see the grammar above).

    `"a=CPU;b=CPU,c=CPU"` -> [["a=CPU", "b=CPU"], ["c=CPU"]]; `""` -> [[]]; a trailing `;` ends
    nothing more, a trailing `,` starts an empty set (as llama-bench reads it).
    """
    parts = _SEPARATORS.split(value)
    sets: list[list[str]] = []
    rules: list[str] = []
    pending = ""
    for piece, separator in zip(parts[::2], [*parts[1::2], ""]):
        pending += piece
        if pending and "=" not in pending:
            if not separator:
                raise UserError(f"-ot '{pending}': expected REGEX=BACKEND (missing '=')")
            pending += separator
            continue
        if pending:
            rules.append(pending)
            pending = ""
        if separator != ";":
            sets.append(rules)
            rules = []
    return sets


def override_sets(values: Iterable[str]) -> list[list[str]]:
    """`run`'s -ot sweep, as llama-bench: every `,`-separated set of every -ot flag, in order.

    Each rule is checked here (REGEX=BACKEND, a valid regex), before any engine is made;
    the backend names are checked by `place`, which knows the backends.
    """
    sets = [rules for value in values for rules in split_override_sets(value)]
    for rule in (rule for rules in sets for rule in rules):
        _parse_rule(rule, None)
    return sets


def parse_override_rules(specs: Iterable[str], backends: Sequence[str] | None = None) -> list[OverrideRule]:
    """The rules of `-ot` arguments in order, as one set: `generate`, `model info` and the engine.

    `,` and `;` both separate rules here (there is no sweep to start a set of). Backend names
    are matched case-insensitively against `backends` when given (else `place` checks them).
    """
    return [_parse_rule(rule, backends) for spec in specs for rules in split_override_sets(spec) for rule in rules]


def n_cpu_moe_rule(n_layers: int) -> list[str]:
    """`-ncmoe N` as -ot rule text: the routed experts of layers 0 .. N-1 on the CPU (llama.cpp's
    `llm_ffn_exps_block_regex`, one rule per layer there, one alternation here, so that the dense
    leading layers, which have no experts, raise no "matches no tensor" warning of their own).
    [] for 0."""
    if n_layers <= 0:
        return []
    layers = "|".join(map(str, range(n_layers)))
    return [rf"blk\.({layers})\.ffn_(up|down|gate)_exps=CPU"]


def _parse_rule(text: str, backends: Sequence[str] | None) -> OverrideRule:
    pattern, backend = text.rsplit("=", 1)
    if not pattern:
        raise UserError(f"-ot '{text}': empty regex before '='")
    if not backend.strip():
        raise UserError(f"-ot '{text}': empty backend after '='")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"-ot '{text}': invalid regex '{pattern}': {e}") from None
    if backends is not None:
        backend = _backend_name(backend, backends, f"-ot '{text}'")
    return OverrideRule(pattern, backend, regex)


def _backend_name(name: str, backends: Sequence[str], what: str) -> str:
    for b in backends:
        if b.lower() == name.strip().lower():
            return b
    raise UserError(f"{what}: unknown backend {name!r} (available: {', '.join(backends)})")


def layer_of(name: str, n_layer: int) -> int | None:
    """llama.cpp's layer of a tensor: blk.N -> N, output tensors -> n_layer, token_embd -> None (input)."""
    if name.startswith("blk."):
        return int(name.split(".", 2)[1])
    if name.startswith("token_embd"):
        return None
    return n_layer


def place(tensor_names: Iterable[str], rules: Sequence[OverrideRule], n_gpu_layers: int, n_layer: int,
          backends: Sequence[str], accel: str | None) -> Placement:
    """The backend of every tensor (the placement rule; see the module docstring).

    `accel` is the backend -ngl offloads to ("CUDA0", "ACC0") or None for CPU only;
    `n_gpu_layers` < 0 means all layers, as in llama.cpp.
    """
    if accel is not None and accel not in backends:
        raise UserError(f"accelerator {accel!r} is not available (backends: {', '.join(backends)})")
    rules = [OverrideRule(r.pattern, _backend_name(r.backend, backends, f"-ot '{r}'"), r.regex) for r in rules]
    n_offload = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    i_gpu_start = n_layer + 1 - n_offload
    warnings = []
    if accel is None and n_gpu_layers != 0:
        warnings.append(f"-ngl {n_gpu_layers} ignored: no accelerator (--accel none), every layer stays on CPU")

    backend: dict[str, str] = {}
    cause: dict[str, str] = {}
    hits = [0] * len(rules)
    for name in tensor_names:
        rule = next((i for i, r in enumerate(rules) if r.regex.search(name)), None)
        il = layer_of(name, n_layer)
        if rule is not None:
            hits[rule] += 1
            backend[name], cause[name] = rules[rule].backend, f"-ot rule {rule + 1}"
        elif il is None:
            backend[name], cause[name] = CPU, "input layer"
        elif accel is None:
            backend[name], cause[name] = CPU, "no accelerator"
        elif il >= i_gpu_start:
            backend[name], cause[name] = accel, "-ngl"
        else:
            backend[name], cause[name] = CPU, "below -ngl"
    for i, (r, n) in enumerate(zip(rules, hits)):
        if n == 0:
            warnings.append(f"-ot rule {i + 1} '{r}' matches no tensor")
    return Placement(backend, cause, accel, tuple(warnings))


def buffer_backends(placement: Placement, derived: Mapping[str, str]) -> dict[str, str]:
    """Every buffer's backend: a stored tensor's placement, and a derived buffer (a layer's
    KV cache, the fused gate+up experts; `derived`: name -> the stored tensor it derives
    from) where its parent is, so a cache sits where its layer's attention runs and the
    fused experts where their gate experts are."""
    backends = dict(placement.backend)
    for name, parent in derived.items():
        if parent not in placement.backend:
            raise UserError(f"{name} derives from tensor {parent}, which the model file does not have")
        backends[name] = placement.backend[parent]
    return backends


# ---- what each backend holds and reads per token ----------------------------------------------

@dataclass(frozen=True)
class BackendLoad:
    backend: str
    n_tensors: int
    n_bytes: int                    # weight bytes held, as stored
    expert_bytes: int               # of which routed-expert tensors (*_exps)
    expert_bytes_per_token: int     # expert bytes one token reads: n_expert_used of n_expert per MoE layer
    bytes_per_token: int            # all weight bytes one token reads (one token_embd row, all dense
                                    # weights, the used experts' share of the expert tensors)


def is_expert_tensor(name: str) -> bool:
    """Routed experts (ffn_gate/up/down_exps), not the shared expert (_shexp)."""
    return "_exps." in name


def backend_loads(tensor_bytes: Mapping[str, int], config: ModelConfig, placement: Placement) -> list[BackendLoad]:
    """Per backend (in order of first appearance): tensors, bytes held and bytes read per token.

    The byte totals add up to the tensors' data size; a token reads each used expert
    whole, so `expert_bytes_per_token` = n_expert_used x per-expert bytes x MoE layers.
    """
    acc: dict[str, list[int]] = {}
    for name, n_bytes in tensor_bytes.items():
        a = acc.setdefault(placement.backend[name], [0, 0, 0, 0, 0])
        expert = is_expert_tensor(name)
        expert_read = n_bytes // config.n_expert * config.n_expert_used if expert else 0
        if expert:
            read = expert_read
        elif name.startswith("token_embd"):
            read = n_bytes // config.n_vocab
        else:
            read = n_bytes
        for i, v in enumerate((1, n_bytes, n_bytes if expert else 0, expert_read, read)):
            a[i] += v
    return [BackendLoad(b, *v) for b, v in acc.items()]


def available_backends(accel: str = "auto") -> tuple[tuple[str, ...], str | None]:
    """(backends, the accelerator -ngl uses) for `--accel auto|cuda|emulated|none`.

    CPU always; CUDA0..n when torch sees GPUs; ACC0, the emulated accelerator, always.
    `auto` picks CUDA0 when there is one, else none: a run never falls back to the
    emulation unasked, since its figures are not GPU figures.
    """
    import torch

    cuda = tuple(f"CUDA{i}" for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()
    backends = (CPU, *cuda, EMULATED)
    if accel == "auto":
        return backends, cuda[0] if cuda else None
    if accel == "cuda":
        if not cuda:
            raise UserError("--accel cuda: torch sees no CUDA GPU (use --accel emulated or auto)")
        return backends, cuda[0]
    if accel == "emulated":
        return backends, EMULATED
    if accel == "none":
        return backends, None
    raise UserError(f"--accel {accel}: expected auto, cuda, emulated or none")
