"""The engine: GGUF MoE models, placement, graph, backend splits, scheduler."""
