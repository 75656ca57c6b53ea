"""Hostile files (issue 25): mutated GGUF headers and timings files, driven through the loaders
and the CLI, must end in success or the project's one-line error (exit 0 or 2, one line on
stderr, no traceback, no partial output file), never anything else.

The mutants are seeded, so a failure names a case that reproduces: `fast` runs a few hundred
(seconds), `slow` (`pytest -m slow`) thousands. Cases that once crashed are kept in
tests/data/hostile/: GGUF headers of the tiny Q4_0 model (gzipped; the test appends the made
model's tensor data) and small timings files, each refused in one line.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import random
from pathlib import Path

import orjson
import pytest
from gguf import GGUFReader, GGUFValueType

from profiler.gguf_file import read_gguf
from hyprof.cli import main
from hybrid_stream import engine_run, hybrid_stream, write_stream

DATA = Path(__file__).parent / "data"
HOSTILE = DATA / "hostile"
# Values that break sizes: zero, one, around powers of two, and the ends of u32 / u64.
INTERESTING = (0, 1, 2, 3, 7, 16, 17, 63, 64, 65, 513, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1)
# Tokens that break JSON readers: non-numbers, out-of-range numbers, invalid UTF-8, structure.
JSON_TOKENS = (b"NaN", b"Infinity", b"-1", b"1e999", b"18446744073709551616", b"9007199254740993", b"-0",
               b"1.5", b"\xff", b"\xc3", b"\x00", b"\n", b"{", b"}", b'"', b"\\", b"[]", b"null", b"true")
JSON_VALUES = (-5, -1, 0, 1, 99, 2**53, 2**62, "x", "", None, 1.5, [], {}, [1, [2]], True, "op", "CPU", "main")


def fuzz_cases(fast: int, slow: int):
    """The number of mutants: `fast` in the default run, `slow` with -m slow."""
    return pytest.mark.parametrize("n_cases", [pytest.param(fast, id="fast"),
                                               pytest.param(slow, id="slow", marks=pytest.mark.slow)])


def hyprof(*argv: str) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, stderr). An exception escapes as the failure."""
    err, out = io.StringIO(), io.TextIOWrapper(io.BytesIO())
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, err.getvalue()


def assert_clean_end(rc: int, stderr: str, case: str, outputs: tuple[Path, ...] = ()) -> None:
    """Success, or exactly one `hyprof: error:` line; an output exists only after success, and no
    temporary file is left beside it."""
    assert rc in (0, 2), f"{case}: exit {rc}\n{stderr}"
    if rc == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hyprof: error: "), f"{case}: {stderr}"
    for out in outputs:
        assert out.exists() == (rc == 0), f"{case}: {out} exists after exit {rc}"
        assert not list(out.parent.glob(f".{out.name}.*")), f"{case}: a temporary file is left"


# ---------------------------------------------------------------- mutating bytes

def mutate_bytes(data: bytes, rng: random.Random, end: int | None = None) -> bytes:
    """One to three edits within data[:end]: a bit flip, a byte stomp, an 8-byte stomp with a size
    that breaks things, or a cut."""
    b = bytearray(data)
    end = end or len(b)
    for _ in range(rng.randint(1, 3)):
        i, kind = rng.randrange(end - 8), rng.randrange(4)
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i] = rng.randrange(256)
        elif kind == 2:
            b[i:i + 8] = rng.choice(INTERESTING).to_bytes(8, "little")
        elif rng.random() < 0.2:
            return bytes(b[:i])
    return bytes(b)


def mutate_metadata(data: bytes, slots: list[tuple[int, int, int]], rng: random.Random) -> bytes:
    """One or two scalar metadata values replaced by a size that breaks things, or their value type
    by another."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 2)):
        at, size, type_at = rng.choice(slots)
        if rng.random() < 0.15:
            b[type_at:type_at + 4] = int(rng.choice(list(GGUFValueType))).to_bytes(4, "little")
        else:
            b[at:at + size] = (rng.choice(INTERESTING) % (1 << 8 * size)).to_bytes(size, "little")
    return bytes(b)


def scalar_slots(path: Path) -> list[tuple[int, int, int]]:
    """(value offset, value size, value type offset) of every scalar number key (gguf-py's view)."""
    out = []
    for key, f in GGUFReader(path).fields.items():
        if key.startswith("GGUF.") or f.types[0] in (GGUFValueType.ARRAY, GGUFValueType.STRING):
            continue
        end = f.offset + sum(p.nbytes for p in f.parts)
        size = f.parts[-1].nbytes
        out.append((end - size, size, end - size - 4))
    return out


def mutate_json_lines(events: list[dict], rng: random.Random) -> bytes:
    """One to three edits: a token spliced into the bytes, or a field of a line (the header a
    quarter of the time) set to a value of another type or size, or deleted."""
    events = orjson.loads(orjson.dumps(events))
    if rng.random() < 0.4:
        data = bytearray(b"".join(orjson.dumps(e) + b"\n" for e in events))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i:i + rng.randint(0, 4)] = rng.choice(JSON_TOKENS)
        return bytes(data)
    for _ in range(rng.randint(1, 3)):
        obj = events[0 if rng.random() < 0.25 else rng.randrange(len(events))]
        while True:
            key = rng.choice(list(obj))
            if isinstance(obj[key], dict) and obj[key] and rng.random() < 0.6:
                obj = obj[key]
                continue
            if rng.random() < 0.2:
                del obj[key]
            else:
                obj[key] = rng.choice(JSON_VALUES)
            break
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


# ---------------------------------------------------------------- GGUF files

@pytest.fixture(scope="module")
def tiny_header(tiny_gguf) -> tuple[bytes, int]:
    data = tiny_gguf.read_bytes()
    return data, read_gguf(tiny_gguf).data_offset


@fuzz_cases(400, 6000)
def test_mutated_gguf_headers_load_or_are_refused_in_one_line(tiny_header, tmp_path, n_cases):
    """Bit flips and stomps in the header, through `model info` (the reader, the metadata and
    tensor checks, placement)."""
    data, header_end = tiny_header
    rng = random.Random(25)
    path = tmp_path / "m.gguf"
    for case in range(n_cases):
        path.write_bytes(mutate_bytes(data, rng, header_end))
        assert_clean_end(*hyprof("model", "info", str(path), "--json"), f"header case {case}")


@pytest.mark.parametrize("preset", ["tiny", "qwen3-tiny"])
@fuzz_cases(20, 1000)
def test_mutated_metadata_values_generate_or_are_refused_in_one_line(make_gguf, preset, tmp_path, n_cases):
    """Metadata values replaced by sizes that break things, then one `generate` step: what loads
    must run, since nothing inconsistent may reach a native op."""
    model = make_gguf(preset, "q4_0")
    data, slots = model.read_bytes(), scalar_slots(model)
    rng = random.Random(26)
    path = tmp_path / "m.gguf"
    for case in range(n_cases):
        path.write_bytes(mutate_metadata(data, slots, rng))
        assert_clean_end(*hyprof("generate", "-m", str(path), "--prompt-ids", "1,2", "-n", "1", "-t", "2",
                                 "--accel", "none"), f"metadata case {case}")


@pytest.mark.parametrize("header", sorted(HOSTILE.glob("gguf_*.header.gz")), ids=lambda p: p.name.split(".")[0])
def test_gguf_cases_that_once_crashed_are_refused(header, tiny_header, tmp_path):
    data, header_end = tiny_header
    path = tmp_path / "m.gguf"
    path.write_bytes(gzip.decompress(header.read_bytes()) + data[header_end:])
    timings = tmp_path / "t.jsonl"
    for argv in (("model", "info", str(path)),
                 ("generate", "-m", str(path), "--prompt-ids", "1,2", "-n", "1", "--accel", "none"),
                 ("run", "-m", str(path), "-p", "8", "-n", "1", "-r", "1", "--accel", "none", "--peak-bw", "10",
                  "--no-progress", "-o", str(timings))):
        rc, stderr = hyprof(*argv)
        assert rc == 2 and len(stderr.strip().splitlines()) == 1 and str(path) in stderr, stderr
    assert not timings.exists()


# ---------------------------------------------------------------- timings files and logs

@pytest.fixture(scope="module")
def recorded_run(tiny_gguf, tmp_path_factory) -> list[dict]:
    """The events of a real `hyprof run` on the tiny model."""
    out = engine_run(tiny_gguf, tmp_path_factory.mktemp("run") / "t.jsonl")
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


@fuzz_cases(120, 3000)
def test_mutated_timings_report_or_are_refused_in_one_line(recorded_run, tmp_path, n_cases):
    """Byte splices and field edits of a recorded run (and of the hand-built hybrid stream, which
    has device lanes), through `report`; every tenth also through `trace` and `diff`."""
    rng = random.Random(27)
    streams = (recorded_run, hybrid_stream(reps=1, n_layers=1, workers=2))
    path, base, trace = tmp_path / "m.jsonl", write_stream(tmp_path / "base.jsonl", streams[1]), tmp_path / "t.json"
    for case in range(n_cases):
        path.write_bytes(mutate_json_lines(streams[case % 2], rng))
        assert_clean_end(*hyprof("report", str(path), "--layers", "--splits", "--graphs"), f"timings case {case}")
        if case % 10 == 0:
            trace.unlink(missing_ok=True)
            assert_clean_end(*hyprof("trace", str(path), "-o", str(trace)), f"trace case {case}", (trace,))
            assert_clean_end(*hyprof("diff", str(base), str(path)), f"diff case {case}")


@fuzz_cases(40, 1000)
def test_mutated_ik_logs_import_or_are_refused_in_one_line(tmp_path, n_cases):
    """Byte edits of a recorded ik_llama.cpp log, through `import ik` (and `report` of what it wrote)."""
    data = (DATA / "ik_cpu_tg_fmoe.log").read_bytes()
    rng = random.Random(28)
    path, out = tmp_path / "m.log", tmp_path / "m.jsonl"
    for case in range(n_cases):
        path.write_bytes(mutate_bytes(data, rng))
        out.unlink(missing_ok=True)
        rc, stderr = hyprof("import", "ik", str(path), "-o", str(out))
        assert_clean_end(rc, "" if rc == 0 else stderr, f"ik case {case}", (out,))
        if rc == 0:
            assert_clean_end(*hyprof("report", str(out)), f"ik report case {case}")


@pytest.mark.parametrize("timings", sorted(HOSTILE.glob("timings_*.jsonl")), ids=lambda p: p.stem)
def test_timings_cases_that_once_crashed_are_refused(timings, tmp_path):
    for argv in (("report", str(timings)), ("trace", str(timings), "-o", str(tmp_path / "t.json"))):
        rc, stderr = hyprof(*argv)
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and f"{timings}:" in lines[0], stderr
    assert not (tmp_path / "t.json").exists()


def test_fuzz_helpers_do_mutate():
    """The mutators change what they are given (a fuzz test of unchanged files would prove nothing)."""
    rng = random.Random(0)
    data = bytes(range(256)) * 4
    assert sum(mutate_bytes(data, rng) != data for _ in range(50)) >= 45
    events = hybrid_stream(reps=1, n_layers=1, workers=1)
    same = b"".join(orjson.dumps(e) + b"\n" for e in events)
    assert sum(mutate_json_lines(events, rng) != same for _ in range(50)) >= 45
