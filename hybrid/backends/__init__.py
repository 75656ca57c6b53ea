"""The backends a split runs on: `CPU` (the engine's worker pool, cpu.py), `ACC0`
(the emulated accelerator, acc.py) and `CUDA0..` (torch CUDA streams, cuda.py).

All share the interface the scheduler (hybrid/sched.py) drives: `name`,
`is_device`, `buffers` (the weights and KV caches it holds, by name),
`compute(split, values, graph_id, i_split)` (synchronous on the CPU, queued on a
device), `to_device(value)`, `to_host(value)`, `synchronize()` and `close()`.
"""

import signal

_HOST_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def keep_signals_off_this_thread() -> None:
    """Called first by every backend thread, so that Ctrl-C always reaches the main
    thread. The kernel hands a process signal to any thread that does not block it;
    one that lands on a worker leaves the main thread asleep in its wait (a lock,
    a device fence) instead of raising KeyboardInterrupt there, and it interrupts
    the worker's own lock waits."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _HOST_SIGNALS)
