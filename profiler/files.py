"""Writing output files so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from profiler.errors import UserError


def check_output_path(path: str | os.PathLike, force: bool, flag: str = "-o") -> Path:
    """Refuse an existing output unless forced, and an unwritable directory, before any work."""
    out = Path(path)
    if out.exists() and not force:
        raise UserError(f"{flag} {out}: file exists (use --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is not a directory")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {out}: directory {parent} is not writable")
    return out


def new_file_mode() -> int:
    """The mode `open()` gives a new file (0o666 less the umask); mkstemp gives 0600,
    but outputs written through a temporary file are ordinary files."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", force: bool = True,
                  flag: str = "-o") -> Iterator[IO]:
    """Yield a temporary file beside `path`; rename it over `path` only on success.

    On any exception (Ctrl-C included) the temporary file is removed, so a reader
    never sees a partial output under the final name.
    """
    out = check_output_path(path, force, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        os.close(fd)
        with open(tmp, mode, encoding=encoding) as f:   # by path, so f.name names the temp file
            yield f
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
