"""Greedy generation: prefill the prompt in one batch, then decode one token at a time.

gpt-fast style plain functions. `generate` takes any `evaluate(tokens) -> logits`
(the sequential `Model.forward`, or the scheduler's engine), so the loop is the
same whatever runs the graph. `check_ram` refuses, before loading, a model that
needs more memory than the machine has.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hybrid.model import kv_cache_bytes
from profiler.errors import UserError

GiB = 1 << 30


@dataclass(frozen=True)
class Generation:
    prompt: list[int]
    tokens: list[int]                       # the generated ids, in order
    prompt_s: float                         # prefill wall time
    decode_s: float                         # wall time of the decode steps
    step_s: list[float] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return len(self.prompt) / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        n = len(self.tokens) - 1            # the first token comes from the prefill's logits
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def generate(evaluate: Callable[[list[int]], torch.Tensor], prompt: list[int], n_predict: int,
             on_token: Callable[[int], None] | None = None, eos_id: int | None = None) -> Generation:
    """Greedy continuation of `prompt` by `n_predict` tokens (fewer if `eos_id` comes)."""
    t0 = time.perf_counter()
    logits = evaluate(prompt)                                       # [1, n_vocab]: the last token's
    prompt_s = time.perf_counter() - t0
    tokens: list[int] = []
    steps: list[float] = []
    while len(tokens) < n_predict:
        token = int(torch.argmax(logits[-1]))
        tokens.append(token)
        if on_token:
            on_token(token)
        if token == eos_id or len(tokens) == n_predict:
            break
        t = time.perf_counter()
        logits = evaluate([token])
        steps.append(time.perf_counter() - t)
    return Generation(prompt, tokens, prompt_s, sum(steps), steps)


def machine_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ram_needed_bytes(gguf, n_ctx: int, mla: bool) -> int:
    """Weights (all pages of the file are touched within a few tokens) plus the KV cache."""
    return gguf.tensor_data_bytes + kv_cache_bytes(gguf.config, n_ctx, mla)


def check_ram(gguf, n_ctx: int, mla: bool) -> None:
    """Refuse, before any weight is read, a model needing more RAM than the machine has."""
    need, have = ram_needed_bytes(gguf, n_ctx, mla), machine_ram_bytes()
    if need > have:
        kv = kv_cache_bytes(gguf.config, n_ctx, mla)
        raise UserError(f"{gguf.path}: needs {need / GiB:.1f} GiB of RAM (weights {gguf.tensor_data_bytes / GiB:.1f}"
                        f" GiB + KV cache {kv / GiB:.1f} GiB for {n_ctx} tokens), but this machine has "
                        f"{have / GiB:.1f} GiB")


def check_prompt(prompt: list[int], n_predict: int, n_vocab: int, n_ctx: int) -> None:
    """Token ids in range and prompt + generation within the context, as one-line errors."""
    if not prompt:
        raise UserError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < n_vocab]
    if bad:
        raise UserError(f"--prompt-ids: token id {bad[0]} out of range (the vocabulary has {n_vocab} tokens, "
                        f"ids 0..{n_vocab - 1})")
    if len(prompt) > n_ctx:
        raise UserError(f"the prompt has {len(prompt)} tokens, longer than the context of {n_ctx} (-c)")
    if len(prompt) + n_predict > n_ctx:
        raise UserError(f"-n {n_predict}: the prompt ({len(prompt)} tokens) and {n_predict} generated tokens "
                        f"exceed the context of {n_ctx} (-c)")
