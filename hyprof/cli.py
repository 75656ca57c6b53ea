"""`hyprof`: parse the command line and hand it to one library function.

Each subcommand lives in `hyprof/commands/<name>.py` with a `register(subparsers)`
that adds its parser and sets `func`. Command modules import their heavy
dependencies (torch, matplotlib) inside `func`, so that `hyprof report` works
where torch is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from hyprof import __version__
from hyprof import commands
from profiler.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyprof",
        description="Profile hybrid CPU+GPU inference of Mixture-of-Experts LLMs: "
        "run a model with experts on the CPU and the rest on an accelerator, record "
        "every op, copy, wakeup and split, and attribute each nanosecond of wall time.",
        epilog="Start with `hyprof run` (a llama-bench style benchmark) and `hyprof report timings.jsonl`.",
    )
    parser.add_argument("--version", action="version", version=f"hyprof {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"hyprof.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"hyprof: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hyprof: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
