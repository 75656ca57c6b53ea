"""The backends a split runs on: `CPU` (the engine's worker pool, cpu.py), `ACC0`
(the emulated accelerator, acc.py) and `CUDA0..` (torch CUDA streams, cuda.py).

All share the interface the scheduler (hybrid/sched.py) drives: `name`,
`is_device`, `buffers` (the weights and KV caches it holds, by name),
`compute(split, values, graph_id, i_split)` (synchronous on the CPU, queued on a
device), `to_device(value)`, `to_host(value)`, `synchronize()` and `close()`.
"""
