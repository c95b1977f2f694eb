"""Memory estimates, in one place: a stack that cannot fit is refused before it is built,
with its size and what to do instead (the allocator's own failure comes after minutes of
work, or not at all on an overcommitting machine that then swaps)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def available(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory, else the machine's
    ``MemAvailable`` (Linux), else its free pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        info = Path("/proc/meminfo").read_text()
        kib = next(ln for ln in info.splitlines() if ln.startswith("MemAvailable:")).split()[1]
        return int(kib) * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def size(nbytes: float | int) -> str:
    """``1.5 GiB``-style."""
    nbytes = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def check_fits(
    nbytes: int, what: str, hint: str, device: torch.device, max_memory: int | None = None
) -> None:
    """Raise `MemoryError` naming `what`, its size, the limit and `hint` when `nbytes` exceeds
    `max_memory` (bytes, the caller's own limit) or, without one, what `device` has free."""
    limit = available(device) if max_memory is None else max_memory
    if nbytes > limit:
        whose = "max_memory" if max_memory is not None else f"free memory on {device}"
        raise MemoryError(f"{what} needs {size(nbytes)}, more than the {size(limit)} of "
                          f"{whose}: {hint}")  # fmt: skip


__all__ = ["available", "check_fits", "size"]
