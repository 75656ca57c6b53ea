"""llama.cpp (through llama-cpp-python) loads every made model and computes sane logits.

The oracle for `hyprof model make`: if llama.cpp accepts a file, its metadata keys,
tensor names, shapes and tokenizer are what real DeepSeek2 GGUFs carry. The big
presets are made with few layers (their shapes are the real ones); a 27-layer tiny
file exercises llama.cpp's "V2-Lite by layer count" path (no q_lora_rank key).
"""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.oracle

CASES = {
    "tiny q4_0": dict(preset="tiny", qtype="q4_0"),
    "tiny f16": dict(preset="tiny", qtype="f16"),
    "tiny bf16": dict(preset="tiny", qtype="bf16"),
    "tiny q8_0 standard attention k_b/v_b": dict(preset="tiny", qtype="q8_0", q_lora_rank=0, kv_layout="k_b_v_b"),
    "tiny f32 sigmoid groups yarn": dict(preset="tiny", qtype="f32", expert_gating_func=2, n_expert_groups=4,
                                         n_group_used=2, rope_scaling_type="yarn", rope_scaling_factor=4.0,
                                         rope_orig_ctx=512, rope_yarn_log_mul=0.1),
    "tiny 27 layers without q-LoRA (Lite by layer count)": dict(preset="tiny", qtype="q4_0", n_layers=27,
                                                                 q_lora_rank=0),
    "deepseek-v2-lite-mini, 2 layers": dict(preset="deepseek-v2-lite-mini", qtype="q4_0", n_layers=2),
    "deepseek-v2-lite, 2 layers": dict(preset="deepseek-v2-lite", qtype="q8_0", n_layers=2),
}


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_loads_and_evaluates(make_gguf, case):
    from hybrid.gguf_model import load_model

    path = make_gguf(**CASES[case])
    config = load_model(path).config
    llm = llama_cpp.Llama(model_path=str(path), n_gpu_layers=0, n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False)
    assert llm.n_vocab() == config.n_vocab
    assert llm.n_embd() == config.n_embd

    text = "hello world, the cat sat\n"
    tokens = llm.tokenize(text.encode(), add_bos=False)
    assert llm.detokenize(tokens).decode() == text
    assert len(tokens) < len(text)                      # merges apply: not one token per byte

    prompt = llm.tokenize(text.encode(), add_bos=True)[:8]
    assert prompt[0] == load_model(path).bos_id
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float64)
    assert np.isfinite(logits).all()
    assert (logits.std(axis=-1) > 0.5).all()            # not flat
    assert len(set(logits.argmax(axis=-1).tolist())) > 1  # not the same winner everywhere
