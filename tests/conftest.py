"""Shared fixtures: made GGUF models, written once per test session.

`make_gguf(preset="tiny", qtype="f32", n_layers=None, seed=0, **overrides) -> Path`
writes a model on first request and returns the cached path for the same arguments
afterwards; `overrides` are ModelConfig fields (q_lora_rank=0, kv_layout="k_b_v_b",
expert_gating_func=2, n_expert_groups=4, n_group_used=2, ...). `tiny_gguf` is the
tiny preset at Q4_0.

The tiny models' ops are far below the size the CPU backend cuts into worker
tasks (hybrid/backends/cpu.py MIN_SPLIT_*), so every test splits every op that
has a parallel form, to exercise the worker pool; `test_small_ops_stay_on_main`
(tests/test_engine.py) checks the production sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture(autouse=True)
def split_every_parallel_op(monkeypatch):
    from hybrid.backends import cpu

    monkeypatch.setattr(cpu, "MIN_SPLIT_BYTES", 0)
    monkeypatch.setattr(cpu, "MIN_SPLIT_FLOPS", 0)


@pytest.fixture(scope="session")
def make_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from hybrid.make_model import make_model

    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple, Path] = {}

    def make(preset: str = "tiny", qtype: str = "f32", n_layers: int | None = None, seed: int = 0,
             **overrides: Any) -> Path:
        key = (preset, qtype, n_layers, seed, tuple(sorted(overrides.items())))
        if key not in made:
            path = root / f"{preset}-{qtype}-{len(made)}.gguf"
            make_model(path, preset, qtype, n_layers=n_layers, seed=seed, overrides=overrides or None)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(make_gguf: Callable[..., Path]) -> Path:
    return make_gguf("tiny", "q4_0")
