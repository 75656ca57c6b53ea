"""The architectures the engine runs: one graph-builder module each, by GGUF `general.architecture`.

A module gives `rope_setup(config, metadata) -> Rope`, `cache_layout(config, mla)` (each KV
cache buffer's row shape and parent tensor) and `build_graph(model, n_tokens, n_past,
all_logits, keep_output) -> Graph`. A new architecture is one more module and one more entry.
"""

from hybrid.models import deepseek2, qwen3moe

ARCHITECTURES = {"deepseek2": deepseek2, "qwen3moe": qwen3moe}
