"""STREAM measurement, its cache per machine and thread count, and `hyprof membw`.

Small arrays keep these fast; the 1 GiB default is what `hyprof membw` runs.
"""

from __future__ import annotations

import json
import re

import pytest

from hyprof.cli import main
from profiler import membw
from profiler.errors import UserError

SMALL = 8 << 20


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPROF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_stream_reports_the_median_of_positive_runs():
    r = membw.measure_stream(1, array_bytes=SMALL, runs=3)
    assert r.threads == 1 and r.array_bytes == SMALL and r.cores >= 1
    for median, samples in ((r.copy_GBps, r.copy_samples_GBps),
                            (r.triad_GBps, r.triad_samples_GBps)):
        assert len(samples) == 3 and all(s > 0 for s in samples)
        assert median == sorted(samples)[1]
    assert "stream triad" in r.method and "3 x 8 MiB" in r.method and "median of 3" in r.method


def test_measured_once_per_thread_count_then_cached(monkeypatch, cache):
    calls = []
    real = membw.measure_stream

    def counting(threads, *args, **kwargs):
        calls.append(threads)
        return real(threads, *args, **kwargs)

    monkeypatch.setattr(membw, "measure_stream", counting)
    first, cached = membw.cached_stream(1, array_bytes=SMALL, runs=2, progress=False)
    assert not cached and calls == [1]
    again, cached = membw.cached_stream(1, array_bytes=SMALL, runs=2, progress=False)
    assert cached and again == first and calls == [1]
    membw.cached_stream(2, array_bytes=SMALL, runs=2, progress=False)
    membw.cached_stream(1, array_bytes=SMALL, runs=2, refresh=True, progress=False)
    membw.cached_stream(1, array_bytes=2 * SMALL, runs=2, progress=False)
    assert calls == [1, 2, 1, 1]
    keys = json.loads((cache / membw.CACHE_FILE).read_text())
    assert sorted(k.split("|")[-1] for k in keys) == ["1 threads", "2 threads"]


def test_peak_bw_header_forms():
    r = membw.measure_stream(1, array_bytes=SMALL, runs=1)
    header = membw.peak_bw_header(r)
    assert header["CPU"]["GBps"] == round(r.triad_GBps, 3)
    assert re.match(r"measured at \d{4}-\d\d-\d\d \d\d:\d\d UTC: stream triad", header["CPU"]["method"])
    assert membw.given_peak_bw(55.5) == {"CPU": {"GBps": 55.5, "method": "given: --peak-bw"}}
    with pytest.raises(UserError, match="--peak-bw"):
        membw.given_peak_bw(0)


def test_arrays_that_do_not_fit_are_refused_before_allocating():
    with pytest.raises(UserError, match="--array-mib"):
        membw.measure_stream(1, array_bytes=1 << 50, runs=1)


def test_cli_json_then_cached(capsys):
    assert main(["membw", "-t", "1", "--array-mib", "8", "--runs", "2", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cached"] is False and first["triad_GBps"] > 0 and first["threads"] == 1
    assert main(["membw", "-t", "1", "--array-mib", "8", "--runs", "2"]) == 0
    std = capsys.readouterr()
    assert "triad" in std.out and "cached" in std.err
    assert main(["membw", "--array-mib", "0"]) == 2
