"""Facts about the host that a timings header and the membw cache are keyed by."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo `model name`), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def mem_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def host_machine() -> dict:
    """The header's `machine` object, less `gpu` (the engine knows its devices)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "mem_bytes": mem_bytes(),
            "gpu": None}


def cache_dir() -> Path:
    """Where hyprof keeps what it measures or makes once per machine:
    $HYPROF_CACHE_DIR, else $XDG_CACHE_HOME/hyprof, else ~/.cache/hyprof."""
    if os.environ.get("HYPROF_CACHE_DIR"):
        return Path(os.environ["HYPROF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyprof"
