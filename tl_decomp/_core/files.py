"""Writing pages to disk: one atomic write for reports and saved views.

A page goes to a temporary file in the target directory, is flushed to disk, and only then
renamed over the target (`os.replace`, atomic on POSIX and Windows), so a crash or a full disk
leaves the old file or the new one, never half a page. As output flags conventionally do, an
existing regular file is replaced (keeping its permissions); a symbolic link is never written
through and a directory never written onto.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def check_path(path: str | os.PathLike[str], what: str = "the file") -> Path:
    """`path` if `what` can be written there; else ValueError saying why (before any work).
    The directory is tried with a real file (the permission bits lie to root: /proc); a name
    with a control character (a newline) or ``-`` (standard output, not a file) is refused."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a path is a str or os.PathLike, not {type(path).__name__}")
    text = os.fspath(path)
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"cannot write {what} to {text!r}: an empty name or a control character")
    if text == "-":
        raise ValueError(f"cannot write {what} to standard output ('-'): give a file name")
    out = Path(path)
    where = f"cannot write {what} to {out}"
    if out.is_symlink():
        raise ValueError(f"{where}: it is a symbolic link (not followed)")
    if out.is_dir():
        raise ValueError(f"{where}: it is a directory")
    if out.exists() and not out.is_file():
        raise ValueError(f"{where}: it is not a regular file")
    if not out.parent.is_dir():
        raise ValueError(f"{where}: no directory {out.parent}")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{where}: permission denied")
    try:  # what atomic_write will do: a temporary file beside the target
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise ValueError(f"{where}: {err.strerror or err}") from None
    return out


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for every thread, briefly)
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        current = os.umask(0o022)
        os.umask(current)
        return current


def atomic_write(
    path: str | os.PathLike[str], text: str, what: str = "the file"
) -> tuple[Path, bool]:
    """Write `text` (UTF-8) to `path` atomically; return the path and whether an existing
    file was replaced. `path` is checked first (`check_path`); on any error, the temporary
    file is removed and the old file, if any, is left as it was."""
    out = check_path(path, what)
    data = text.encode("utf-8")
    replaced = out.exists()
    # A replaced file keeps its mode; a new one gets what open() would give under the
    # process's umask (mkstemp's own is 0600).
    mode = stat.S_IMODE(out.stat().st_mode) if replaced else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, replaced
