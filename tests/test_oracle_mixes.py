"""llama.cpp against `model make --type q4_k_m|q5_k_m|q6_k|iq4_xs` (llama-cpp-python).

Two checks: llama.cpp's own quantizer (`llama_model_quantize`), given the same model
as F32, picks the same type for every tensor as `tensor_plan` (so the mixes are
llama.cpp's, fallbacks and 8-expert rules included); and llama.cpp loads the files
hyprof writes, with finite, spread logits and the greedy tokens of hyprof's engine
(tests/test_oracle_generate.py: a first divergence only at a near-tie).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from hybrid.generate import generate  # noqa: E402
from hybrid.gguf_model import load_model  # noqa: E402
from hybrid.make_model import MIXES, QTYPES, tensor_plan  # noqa: E402
from hybrid.model import Model  # noqa: E402
from profiler.gguf_file import read_gguf  # noqa: E402
from test_oracle_generate import N_STEPS, PROMPT, check_greedy, llama_greedy  # noqa: E402

pytestmark = pytest.mark.oracle

# 256-wide variants (K-quants fit) with 96-wide expert rows (they fall back); 10 layers, so
# that use_more_bits and the first eighth pick some layers and not others
MODELS = {
    "tiny": dict(n_embd=256, n_ff=256, n_ff_exp=96),
    "tiny, 10 layers, 16 experts": dict(n_layers=10, n_embd=256, n_ff=256, n_ff_exp=96, n_expert=16),
    "qwen3-tiny": dict(n_embd=256, n_ff_exp=96),
    "qwen3-tiny, 10 layers, GQA 4": dict(n_layers=10, n_embd=256, n_ff_exp=96, n_head=8, n_head_kv=2),
    "deepseek-v2-lite-mini, 2 layers": dict(n_layers=2),     # the real shapes: 1408-wide expert rows
}


def _make(make_gguf, model: str, qtype: str):
    overrides = dict(MODELS[model])
    return make_gguf(model.split(",")[0], qtype, overrides.pop("n_layers", None), **overrides)


@pytest.mark.parametrize("model", [m for m in MODELS if "mini" not in m])    # (an F32 mini: 9 GB)
@pytest.mark.parametrize("qtype", MIXES)
def test_types_are_llama_quantizes(make_gguf, tmp_path, model, qtype):
    src = _make(make_gguf, model, "f32")
    dst = tmp_path / f"{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QTYPES[qtype][0])
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    theirs = {t.name: t.ggml_type.name for t in read_gguf(dst).tensors}
    ours = {name: t.name for name, (_, t) in tensor_plan(load_model(src).config, qtype).items()}
    assert ours == theirs


@pytest.mark.parametrize("model,qtype", [(m, q) for m in ("tiny", "qwen3-tiny") for q in MIXES]
                         + [("deepseek-v2-lite-mini, 2 layers", q) for q in ("q4_k_m", "iq4_xs")])
def test_llama_cpp_runs_the_mixes_as_hyprof_does(make_gguf, model, qtype):
    path = _make(make_gguf, model, qtype)
    llm = llama_cpp.Llama(model_path=str(path), n_gpu_layers=0, n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False)
    llm.eval(PROMPT)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    assert np.isfinite(logits).all() and logits.std() > 0.5
    del llm
    want, gaps = llama_greedy(path, PROMPT, N_STEPS)
    model_ = Model(load_model(path), n_ctx=64, fmoe=True)
    check_greedy(f"{model} {qtype}", generate(model_.forward, PROMPT, N_STEPS).tokens, want, gaps)
