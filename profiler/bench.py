"""The llama-bench style runner behind `hyprof run`: test plans, repetitions, statistics.

It drives any engine through `BenchEngine` and never imports `hybrid`: the CLI
makes engines with a `MakeEngine` callable (`hybrid.engine.make_engine`) and
hands it in. One `Recorder` is shared by every engine of a run, so that all
events of a sweep sit on one clock and in one timings file.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import statistics
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from profiler.errors import UserError
from profiler.machine import host_machine
from profiler.progress import progress_bar
from profiler.rate import rep_rates, sample_stdev, token_rate
from profiler.recorder import Recorder
from profiler.schema import MAIN_LANE, RECORD_PHASE
from profiler.sinks import TimingsWriter, check_timings_path, timings_header


class BenchEngine(Protocol):
    """What the runner needs from an engine (hybrid/engine.py implements it).

    The runner toggles `recorder.enabled` (off for warm-up and depth prefill), so
    call sites must read `recorder.enabled` each time rather than caching it.
    """

    recorder: Recorder          # the recorder passed to `MakeEngine`
    n_vocab: int                # tokens are drawn from range(n_vocab)

    def header(self) -> dict:
        """Parts of the timings header this engine knows, as contract-v1 dicts:
        {"model": {...}, "config": {...}, "placement": {...}, "machine": {"gpu": ...}}."""
        ...

    def reset(self) -> None:
        """Empty the KV cache: position 0 again (start of every test repetition)."""
        ...

    def eval(self, tokens: Sequence[int], test: str) -> int:
        """Evaluate one batch at the current position as one graph (id from
        `recorder.next_graph()`, unique across the engines of a run) and return the
        greedy next token. When `recorder.enabled`, records the `graph` event (its
        `test` field = `test`, e.g. "tg128") and every phase, split, op, copy,
        wakeup and sync inside it."""
        ...

    def close(self) -> None:
        """Stop worker threads and free buffers; the engine is not used again."""
        ...


class MakeEngine(Protocol):
    """Makes one engine per sweep combination (`hybrid.engine.make_engine`)."""

    def __call__(self, model_path: str, *, threads: int, n_gpu_layers: int,
                 overrides: Sequence[str], accel: str, mla: int, fa: int, fmoe: int, rtr: int,
                 poll: int, recorder: Recorder, n_ubatch: int, n_cpu_moe: int, no_op_offload: int,
                 op_offload_min_batch: int | None, op_offload: str) -> BenchEngine: ...


# ---------------------------------------------------------------------------
# The plan: which engines (one per sweep combination) run which tests.

@dataclass(frozen=True)
class EngineConfig:
    """One combination of the sweep flags: the arguments of one `MakeEngine` call."""

    threads: int
    n_gpu_layers: int
    overrides: tuple[str, ...]     # REGEX=BACKEND rules, first match wins
    accel: str                     # auto | cuda | emulated | none
    mla: int = 0
    fa: int = 1
    fmoe: int = 1
    rtr: int = 0
    poll: int = 50
    n_ubatch: int = 512
    n_cpu_moe: int = 0
    no_op_offload: int = 0
    op_offload_min_batch: int | None = None     # None: the engine's default (GGML_OP_OFFLOAD_MIN_BATCH, 32)
    op_offload: str = "llama.cpp"               # the op-offload rule (llama.cpp | ik)

    def as_dict(self) -> dict:
        return {"threads": self.threads, "n_gpu_layers": self.n_gpu_layers, "n_cpu_moe": self.n_cpu_moe,
                "overrides": list(self.overrides), "accel": self.accel, "mla": self.mla,
                "fa": self.fa, "fmoe": self.fmoe, "rtr": self.rtr, "poll": self.poll, "n_ubatch": self.n_ubatch,
                "no_op_offload": self.no_op_offload, "op_offload_min_batch": self.op_offload_min_batch,
                "op_offload": self.op_offload}


def sweep(*, threads: Sequence[int], n_gpu_layers: Sequence[int],
          override_sets: Sequence[Sequence[str]], accel: str, mla: Sequence[int] = (0,),
          fa: Sequence[int] = (1,), fmoe: Sequence[int] = (1,), rtr: Sequence[int] = (0,),
          poll: Sequence[int] = (50,), n_ubatch: Sequence[int] = (512,), n_cpu_moe: Sequence[int] = (0,),
          no_op_offload: Sequence[int] = (0,), op_offload_min_batch: Sequence[int | None] = (None,),
          op_offload: str = "llama.cpp") -> list[EngineConfig]:
    """Every combination of the swept values, in llama-bench's order (the last flag varies fastest)."""
    return [EngineConfig(t, ngl, tuple(ot), accel, m, a, f, r, p, ub, ncmoe, nopo, mb, op_offload)
            for t, ngl, ncmoe, ot, m, a, f, r, p, ub, nopo, mb in itertools.product(
                threads, n_gpu_layers, n_cpu_moe, override_sets or [()], mla, fa, fmoe, rtr, poll, n_ubatch,
                no_op_offload, op_offload_min_batch)]


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: a prompt of `n_prompt` tokens in one batch and/or `n_gen`
    single-token evaluations, after an untimed prompt of `depth` tokens."""

    name: str                      # pp512, tg128, pp512+tg128, tg64@pp512
    kind: str                      # pp | tg | pg
    n_prompt: int
    n_gen: int
    depth: int = 0

    @property
    def n_tokens(self) -> int:
        """Tokens that count for t/s (the depth prompt does not)."""
        return self.n_prompt + self.n_gen

    def fields(self) -> dict:
        return {"name": self.name, "kind": self.kind, "n_prompt": self.n_prompt,
                "n_gen": self.n_gen, "depth": self.depth, "n_tokens": self.n_tokens}


def plan_tests(*, n_prompt: Sequence[int], n_gen: Sequence[int],
              pg: Sequence[tuple[int, int]] = (), depths: Sequence[int] = (0,)) -> list[BenchTest]:
    """llama-bench's tests: pp<N> for each -p, tg<N> for each -n, pp<P>+tg<G> for each -pg,
    each at every depth -d (0 values of -p/-n are skipped, as there)."""
    for flag, values in (("-p", n_prompt), ("-n", n_gen), ("-d", depths),
                         ("-pg", [v for pair in pg for v in pair])):
        if any(v < 0 for v in values):
            raise UserError(f"{flag}: token counts must be >= 0, got {list(values)}")
    if any(p == 0 or g == 0 for p, g in pg):
        raise UserError(f"-pg: both counts must be > 0, got {[f'{p},{g}' for p, g in pg]}")
    tests = []
    for depth in depths or (0,):
        at = f"@pp{depth}" if depth else ""
        tests += [BenchTest(f"pp{p}{at}", "pp", p, 0, depth) for p in n_prompt if p > 0]
        tests += [BenchTest(f"tg{g}{at}", "tg", 0, g, depth) for g in n_gen if g > 0]
        tests += [BenchTest(f"pp{p}+tg{g}{at}", "pg", p, g, depth) for p, g in pg]
    if not tests:
        raise UserError("-p 0 -n 0: nothing to run (give -p N, -n N or -pg PP,TG with N > 0)")
    return tests


# ---------------------------------------------------------------------------
# Results: one per (engine config, test), with the wall time of every repetition.

@dataclass(frozen=True)
class BenchResult:
    config: EngineConfig
    config_index: int              # the `config` field of this test's events
    test: BenchTest
    samples_ns: tuple[int, ...]    # wall time of each measured repetition
    model: dict                    # the header's `model` object
    engine_config: dict            # the header's `config` object, as the engine reports it
    machine: dict

    @property
    def samples_ts(self) -> tuple[float, ...]:
        return rep_rates(self._n_tokens, self.samples_ns)

    @property
    def avg_ts(self) -> float:
        """llama-bench's avg_ts, by the one definition `hyprof report` uses too (profiler/rate.py)."""
        return token_rate(self._n_tokens, self.samples_ns)[0]

    @property
    def stddev_ts(self) -> float:
        return token_rate(self._n_tokens, self.samples_ns)[1]

    @property
    def _n_tokens(self) -> list[int]:
        """The tokens of each repetition: the test's, every time."""
        return [self.test.n_tokens] * len(self.samples_ns)

    @property
    def avg_ns(self) -> float:
        return statistics.fmean(self.samples_ns)

    @property
    def stddev_ns(self) -> float:
        return sample_stdev(self.samples_ns)

    @property
    def backend(self) -> str:
        """CPU, or the accelerator with the CPU: `CUDA0+CPU`, `ACC0+CPU (emulated)`."""
        accel = str(self.engine_config.get("accel") or "none")
        if accel.startswith("none"):
            return "CPU"
        return f"{accel.split()[0]}+CPU" + (" (emulated)" if "emulated" in accel else "")


# ---------------------------------------------------------------------------
# The runner.

def run_bench(make_engine: MakeEngine, model_path: str, configs: Sequence[EngineConfig],
              tests: Sequence[BenchTest], reps: int, *, timings: str | None = None,
              force: bool = False, peak_bw: Callable[[int], dict] | None = None,
              seed: int = 0, progress: bool = True) -> list[BenchResult]:
    """Run every test on every engine config: one warm-up run, then `reps` measured
    repetitions, each starting from an empty KV cache.

    With `timings`, every event of every measured repetition goes to that file
    (header from the first engine; `sweep` in it lists every config, and each test
    event names its own by index in `config`), written after each graph. Ctrl-C
    leaves it valid, with every graph that completed; the results so far are lost.
    """
    if reps < 1:
        raise UserError(f"-r {reps}: need at least one repetition")
    if timings is not None:
        check_timings_path(timings, force)
    recorder = Recorder(enabled=timings is not None)
    rng = random.Random(seed)
    results: list[BenchResult] = []
    n_graphs = len(configs) * sum(_graphs_per_warmup(t) + reps * _graphs_per_run(t)
                                  for t in tests)
    # Measured before any engine exists: its workers would share the memory bus.
    peak = peak_bw(configs[0].threads) if peak_bw and timings is not None else {}
    with contextlib.ExitStack() as stack:
        # HYPROF_PRINT_TIMING's lines would scroll the bar away: one or the other.
        advance = stack.enter_context(progress_bar(n_graphs, "run",
                                                   progress and not recorder.print_timing,
                                                   "graphs"))
        writer: TimingsWriter | None = None
        for i_config, config in enumerate(configs):
            engine = make_engine(model_path, threads=config.threads,
                                 n_gpu_layers=config.n_gpu_layers, overrides=config.overrides,
                                 accel=config.accel, mla=config.mla, fa=config.fa, fmoe=config.fmoe,
                                 rtr=config.rtr, poll=config.poll, recorder=recorder,
                                 n_ubatch=config.n_ubatch, n_cpu_moe=config.n_cpu_moe,
                                 no_op_offload=config.no_op_offload,
                                 op_offload_min_batch=config.op_offload_min_batch, op_offload=config.op_offload)
            try:
                header = engine.header()
                machine = _machine(header)
                if timings is not None and writer is None:
                    writer = stack.enter_context(TimingsWriter(timings, timings_header(
                        model=header.get("model", {}),
                        config=header.get("config", config.as_dict()), machine=machine,
                        peak_bw=peak,
                        placement=header.get("placement", {}),
                        sweep=[c.as_dict() for c in configs]), force=force))
                for test in tests:
                    label = f"{test.name} t={config.threads} ngl={config.n_gpu_layers}"
                    samples = _run_test(engine, test, reps, i_config, rng, writer,
                                        lambda rep: advance(
                                            f"{label} " + ("warm-up" if rep < 0 else
                                                           f"rep {rep + 1}/{reps}")))
                    results.append(BenchResult(config, i_config, test, tuple(samples),
                                               header.get("model", {}),
                                               header.get("config", {}), machine))
            except BaseException as e:
                if writer is not None:      # the file first: closing an engine may block
                    writer.finish(e)
                raise
            finally:
                engine.close()
    return results


def _run_test(engine: BenchEngine, test: BenchTest, reps: int, config_index: int,
              rng: random.Random, writer: TimingsWriter | None,
              advance: Callable[[int], None]) -> list[int]:
    recorder = engine.recorder
    recording = recorder.enabled
    lane = recorder.lane(MAIN_LANE)

    def flush() -> None:
        """Hand the events so far to the writer. When recording, the flush is itself a
        `record` phase (outside any graph, so `other` in the attribution, as all time between
        graphs is), written with the next graph's events: the profiler's own cost, which a run
        without -o does not pay, is in the file beside what it measured."""
        t = recorder.now() if recorder.enabled else 0
        batches = recorder.drain_batches()
        if writer is not None:
            writer.write_batches(batches)
        if recorder.enabled:
            lane.phase(t, recorder.now() - t, None, RECORD_PHASE)

    def evaluate(n_prompt: int, n_gen: int, rep: int) -> None:
        if n_prompt:
            engine.eval([rng.randrange(engine.n_vocab) for _ in range(n_prompt)], test.name)
            flush()
            advance(rep)
        token = rng.randrange(engine.n_vocab)
        for _ in range(n_gen):
            token = engine.eval([token], test.name)
            flush()
            advance(rep)

    # Warm-up as llama-bench does it: the prompt once, one generated token; not recorded.
    recorder.enabled = False
    engine.reset()
    evaluate(test.n_prompt, min(test.n_gen, 1), -1)
    recorder.discard()

    samples = []
    for rep in range(reps):
        recorder.enabled = False
        engine.reset()
        if test.depth:
            engine.eval([rng.randrange(engine.n_vocab) for _ in range(test.depth)],
                        f"{test.name}/depth")
            advance(rep)
        recorder.discard()
        recorder.enabled = recording
        t0 = recorder.now()
        evaluate(test.n_prompt, test.n_gen, rep)
        dur = recorder.now() - t0
        if recording:
            lane.test(t0, dur, {**test.fields(), "rep": rep, "config": config_index})
            flush()
        samples.append(dur)
    return samples


def _graphs_per_run(test: BenchTest) -> int:
    return (test.n_prompt > 0) + test.n_gen + (test.depth > 0)


def _graphs_per_warmup(test: BenchTest) -> int:
    return (test.n_prompt > 0) + (test.n_gen > 0)


def _machine(engine_header: dict) -> dict:
    """The header's `machine`: the host's facts, with what the engine knows (its GPU)."""
    known = {k: v for k, v in engine_header.get("machine", {}).items() if v is not None}
    return {**host_machine(), **known}
