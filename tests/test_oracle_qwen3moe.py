"""Qwen3-MoE's greedy tokens against llama.cpp's (llama-cpp-python), 16 steps, on made files.

The rule of tests/test_oracle_generate.py (a first divergence only at a near-tie of
llama.cpp's top two logits), for two quant types, each run all-CPU (the plain forward,
-fa 0 and -fmoe 0, then -fa 1 and -fmoe 1) and hybrid: the engine with everything but the
experts on the emulated accelerator (-ngl 99 -ot exps=CPU), -fa 1 -fmoe 1, 2 threads.
"""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from hybrid.engine import Engine  # noqa: E402
from hybrid.generate import generate  # noqa: E402
from hybrid.gguf_model import load_model  # noqa: E402
from hybrid.model import Model  # noqa: E402
from test_oracle_generate import N_STEPS, PROMPT, check_greedy, llama_greedy  # noqa: E402

pytestmark = pytest.mark.oracle

CASES = {
    "qwen3-tiny q4_0": dict(preset="qwen3-tiny", qtype="q4_0"),
    "qwen3-tiny q8_0 seed 1": dict(preset="qwen3-tiny", qtype="q8_0", seed=1),
    "qwen3-tiny f16, no GQA": dict(preset="qwen3-tiny", qtype="f16", n_head_kv=4),
}


@pytest.mark.parametrize("case", CASES)
def test_qwen3moe_greedy_tokens_match_llama_cpp(make_gguf, case):
    path = make_gguf(**CASES[case])
    want, gaps = llama_greedy(path, PROMPT, N_STEPS)
    gguf = load_model(path)
    for fused in (False, True):
        model = Model(gguf, n_ctx=64, fa=fused, fmoe=fused)
        check_greedy(f"all-CPU fa={fused} fmoe={fused}", generate(model.forward, PROMPT, N_STEPS).tokens, want, gaps)
    with Engine(str(path), threads=2, n_gpu_layers=99, overrides=[r"\.ffn_.*_exps\.=CPU"], accel="emulated",
                fa=1, fmoe=1, n_ctx=64) as engine:
        check_greedy("hybrid", generate(engine.forward, PROMPT, N_STEPS).tokens, want, gaps)
