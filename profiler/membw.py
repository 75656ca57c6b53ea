"""The machine's peak memory bandwidth, measured the STREAM way, cached per machine.

The report states the CPU expert matmul bandwidth as a fraction of this peak,
so it must be what the memory system delivers to this many threads, not a
datasheet figure: STREAM's copy (c = a) and triad (a = b + s*c) over arrays at
least 4x the last-level cache (this machine's L3 is 260 MB effective; 1 GiB
arrays by default), counting bytes as STREAM does (copy 2, triad 3 arrays per
pass; write-allocate traffic not counted), median of several runs. Triad is
the headline: like a matmul over weights it mostly reads.

torch runs the kernels (its elementwise ops are vectorised and use
`torch.set_num_threads` threads); it is imported inside the measurement so
that `analysis` never pulls it in through here.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

from profiler.errors import UserError
from profiler.files import atomic_output
from profiler.machine import cache_dir, host_machine
from profiler.progress import progress_bar

DEFAULT_ARRAY_BYTES = 1 << 30
DEFAULT_RUNS = 5
N_ARRAYS = 3
CACHE_FILE = "membw.json"


@dataclass(frozen=True)
class StreamResult:
    cpu: str
    cores: int
    threads: int
    array_bytes: int               # each of the three arrays
    copy_GBps: float               # medians over the runs
    triad_GBps: float
    copy_samples_GBps: tuple[float, ...]
    triad_samples_GBps: tuple[float, ...]
    measured: str = ""             # when (UTC); empty in caches written before it was kept

    @property
    def method(self) -> str:
        """How the peak was measured, and when: a cached peak from a slower minute of a
        shared machine reads as a fraction above 100 %, and the date says why."""
        when = f" at {self.measured}" if self.measured else ""
        return (f"measured{when}: stream triad, {N_ARRAYS} x {self.array_bytes / 2**20:.0f} MiB "
                f"arrays, {self.threads} threads, median of {len(self.triad_samples_GBps)}")


class StreamArrays:
    """STREAM's three arrays, filled (so page faults are never timed) and kept, for one
    timed kernel run at a time with `threads` torch threads. A caller that takes many
    samples (a benchmark bracketing its repetitions) keeps one: allocating and freeing
    3 GiB between samples costs seconds of page faults and, on a VM, host work that can
    overlap what is measured next."""

    def __init__(self, threads: int, array_bytes: int = DEFAULT_ARRAY_BYTES):
        import torch

        if threads < 1:
            raise UserError(f"membw: need threads >= 1, got {threads}")
        _check_memory(array_bytes)
        self.threads, self.array_bytes = threads, array_bytes
        n = array_bytes // 4
        self.a = torch.empty(n, dtype=torch.float32).fill_(1.0)
        self.b = torch.empty(n, dtype=torch.float32).fill_(2.0)
        self.c = torch.empty(n, dtype=torch.float32).fill_(0.0)

    def copy_GBps(self) -> float:
        """c = a, counted as 2 arrays."""
        return 2 * self.array_bytes / self._seconds(lambda: self.c.copy_(self.a)) / 1e9

    def triad_GBps(self) -> float:
        """a = b + 3 c, counted as 3 arrays."""
        import torch

        return 3 * self.array_bytes / self._seconds(lambda: torch.add(self.b, self.c, alpha=3.0, out=self.a)) / 1e9

    def _seconds(self, kernel: Callable[[], object]) -> float:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter_ns()
            kernel()
            return (time.perf_counter_ns() - t0) / 1e9
        finally:
            torch.set_num_threads(previous)


def measure_stream(threads: int, array_bytes: int = DEFAULT_ARRAY_BYTES,
                   runs: int = DEFAULT_RUNS,
                   advance: Callable[[], None] = lambda: None) -> StreamResult:
    """Run STREAM copy and triad `runs` times each with `threads` threads; `advance()`
    is called after each kernel run (a progress bar)."""
    if threads < 1 or runs < 1:
        raise UserError(f"membw: need threads >= 1 and runs >= 1, got {threads} and {runs}")
    arrays = StreamArrays(threads, array_bytes)
    copy, triad = [], []
    for _ in range(runs):
        copy.append(arrays.copy_GBps())
        advance()
        triad.append(arrays.triad_GBps())
        advance()
    del arrays
    machine = host_machine()
    return StreamResult(cpu=machine["cpu"], cores=machine["cores"], threads=threads,
                        array_bytes=array_bytes, copy_GBps=statistics.median(copy),
                        triad_GBps=statistics.median(triad),
                        copy_samples_GBps=tuple(copy), triad_samples_GBps=tuple(triad),
                        measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def _check_memory(array_bytes: int) -> None:
    """Refuse to start when the arrays would not fit in available memory."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    need = N_ARRAYS * array_bytes
    if need > 0.8 * available:
        raise UserError(f"membw: {N_ARRAYS} arrays of {array_bytes / 2**20:.0f} MiB need "
                        f"{need / 2**30:.1f} GiB, only {available / 2**30:.1f} GiB available "
                        "(use --array-mib)")


def _cache_key(threads: int) -> str:
    machine = host_machine()
    return f"{machine['cpu']}|{machine['cores']} cores|{threads} threads"


def _read_cache() -> dict:
    try:
        cache = json.loads((cache_dir() / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def cached_result(threads: int, array_bytes: int | None = None) -> StreamResult | None:
    """This machine's cached STREAM result for `threads` threads (any array size when None), or
    None: what an imported log's report compares with, without measuring for seconds."""
    entry = _read_cache().get(_cache_key(threads))
    if not isinstance(entry, dict) or (array_bytes is not None and entry.get("array_bytes") != array_bytes):
        return None
    try:
        return StreamResult(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
    except TypeError:       # written by another version: measure again
        return None


def cached_stream(threads: int, *, array_bytes: int | None = None,
                  runs: int = DEFAULT_RUNS, refresh: bool = False,
                  progress: bool = True) -> tuple[StreamResult, bool]:
    """The STREAM result for this machine and thread count, measured once and kept in
    the cache (keyed by CPU model, cores and threads). Returns it and whether it came
    from the cache. `array_bytes`: each array's size, DEFAULT_ARRAY_BYTES if None."""
    array_bytes = array_bytes or DEFAULT_ARRAY_BYTES
    cached = None if refresh else cached_result(threads, array_bytes)
    if cached is not None:
        return cached, True
    with progress_bar(2 * runs, f"membw: STREAM copy + triad, {threads} threads",
                      progress) as advance:
        result = measure_stream(threads, array_bytes, runs, advance)
    cache = _read_cache()
    cache[_cache_key(threads)] = asdict(result)
    with atomic_output(cache_dir() / CACHE_FILE, force=True, flag="cache") as f:
        json.dump(cache, f, indent=1)
    return result, False


def peak_bw_header(result: StreamResult) -> dict:
    """The timings header's `peak_bw` from a measurement."""
    return {"CPU": {"GBps": round(result.triad_GBps, 3), "method": result.method}}


def given_peak_bw(gbps: float) -> dict:
    """The timings header's `peak_bw` when the user states it (`--peak-bw`)."""
    if not gbps > 0:
        raise UserError(f"--peak-bw {gbps}: must be a bandwidth in GB/s > 0")
    return {"CPU": {"GBps": float(gbps), "method": "given: --peak-bw"}}
